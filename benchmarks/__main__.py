"""``python -m benchmarks``: time pfc_fast against its baselines (:mod:`benchmarks.report`)."""
import sys

from .report import main

sys.exit(main())
