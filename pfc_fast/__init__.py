"""pfc_fast: exact neural-collapse and progressive-feedforward-collapse metrics for every layer of
a ResNet, computed by fused C++/CUDA kernels, and the optimal-transport tools of the theory.

Front door: :func:`nc_metrics`. Batched data: :class:`NCAccumulator`. Definitions: README.md
("Metrics") and ``shared/spec/pfc.md``; float64 pure-PyTorch formulas: :mod:`pfc_fast.reference`.
"""
from ._ops import build_info
from .metrics import NCAccumulator, NCMetrics, nc_metrics
from . import reference

__version__ = "0.1.0"

__all__ = ["NCAccumulator", "NCMetrics", "build_info", "nc_metrics", "reference", "__version__"]
