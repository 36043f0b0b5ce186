"""The ``pfc-fast`` application, built on the library (:mod:`pfc_fast`): training a ResNet with PFC
measured at every layer every epoch, its run directories and their reports.

- :mod:`pfc_fast.app.cli`: the ``pfc-fast`` command (``train``, ``report``, ``demo``);
- :mod:`pfc_fast.app.config`: :class:`~pfc_fast.app.config.TrainConfig`, the options of a run;
- :mod:`pfc_fast.app.record`: :class:`~pfc_fast.app.record.EpochRecord`, one line of ``metrics.jsonl``;
- :mod:`pfc_fast.app.run_directory`: :class:`~pfc_fast.app.run_directory.RunDirectory`, the only
  reader and writer of ``config.json``, ``metrics.jsonl`` and ``checkpoint.pt``;
- :mod:`pfc_fast.app.train`: :class:`~pfc_fast.app.train.TrainingRun` and the training loop;
- :mod:`pfc_fast.app.data`, :mod:`pfc_fast.app.models`: datasets (none downloaded) and ResNets;
- :mod:`pfc_fast.app.report`: the figures and summary of a run; :mod:`pfc_fast.app.demo`: the demo;
- :mod:`pfc_fast.app.flags`: the command-line value types and :class:`~pfc_fast.app.flags.UsageError`.

The library never imports this package; ``import pfc_fast`` does not load it.
"""
import importlib.util

#: The modules the application needs beyond the library, and their distributions (the ``app`` extra).
REQUIRED = {"torchvision": "torchvision", "sklearn": "scikit-learn"}

_missing = [name for module, name in REQUIRED.items() if importlib.util.find_spec(module) is None]
if _missing:
    raise ImportError(f"the pfc-fast application needs {' and '.join(_missing)}, which this Python lacks: "
                      'pip install "pfc_fast[app]" (the library, import pfc_fast, works without them)')
