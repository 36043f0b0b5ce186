"""``python -m pfc_fast`` is the ``pfc-fast`` command (also under ``torchrun ... -m pfc_fast train``)."""
import sys

from .app.cli import main

sys.exit(main())
