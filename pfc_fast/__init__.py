"""pfc_fast: exact neural-collapse and progressive-feedforward-collapse metrics for every layer of
a ResNet, computed by fused C++/CUDA kernels, and the optimal-transport tools of the theory.

Front door: :func:`nc_metrics`. Batched data: :class:`NCAccumulator`. Optimal transport:
:func:`sinkhorn`, :func:`sinkhorn_divergence`, :func:`wasserstein2`; geodesic checks:
:mod:`pfc_fast.geodesic`. Every layer of a network:
:class:`PFCMonitor`; in a Lightning ``Trainer``: :class:`pfc_fast.lightning.PFCCallback` (optional,
``pip install lightning``); training with it: ``pfc-fast train`` (:mod:`pfc_fast.app`). Definitions:
README.md ("Metrics") and ``docs/spec.md``; float64 pure-PyTorch formulas:
:mod:`pfc_fast.reference`. Multilayer unconstrained feature model: :mod:`pfc_fast.mufm`. The CUDA
kernels run on the CPU by the SIMT layer, for testing without a GPU: :class:`use_simt`.
"""
from ._ops import build_info, use_simt
from .metrics import FewSamplesWarning, NCAccumulator, NCMetrics, nc_metrics
from .monitor import PFCMonitor, PFCResult
from .transport import ConvergenceWarning, SinkhornResult, median_cost, sinkhorn, sinkhorn_divergence, wasserstein2
from . import geodesic, mufm, reference

from ._version import __version__

__all__ = ["ConvergenceWarning", "FewSamplesWarning", "NCAccumulator", "NCMetrics", "PFCMonitor", "PFCResult", "SinkhornResult", "build_info", "geodesic",
           "median_cost", "mufm", "nc_metrics", "reference", "sinkhorn", "sinkhorn_divergence", "use_simt",
           "wasserstein2", "__version__"]
