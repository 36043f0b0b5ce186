"""The compiled operators of ``pfc_fast._C`` (and ``pfc_fast._simt``) and their fake kernels.

Schemas are written once in ``csrc/schemas.h``; CPU and CUDA kernels in ``csrc/<family>/*_cpu.cpp`` and
``csrc/<family>/*_cuda.cu``. ``pfc_fast._simt``, where it is built, registers the same schemas under the
namespace ``pfc_fast_simt`` with the CUDA kernels run on CPU tensors by the SIMT layer
(``csrc/simt``); :func:`use_simt` routes the library's calls on CPU tensors there. The fake
kernels below give output shapes without data, so the ops trace under ``torch.compile`` and pass
``torch.library.opcheck``; ``residual_stats`` is called through a Python custom op that takes its
``score_error`` as a tensor, so that a compiled graph does not depend on its value.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Callable, Optional, Tuple, TypedDict, TypeVar

import torch

from . import _inputs

#: PFC_FAST_CPU_KERNELS: run a lower variant of the CPU kernels than the CPU supports (for tests
#: and benchmarks of the portable builds); read when pfc_fast._C loads.
CPU_KERNEL_VARIANTS = ("baseline", "avx2", "avx512")
if os.getenv("PFC_FAST_CPU_KERNELS", CPU_KERNEL_VARIANTS[-1]) not in CPU_KERNEL_VARIANTS:
    raise ValueError(f"PFC_FAST_CPU_KERNELS must be one of {', '.join(CPU_KERNEL_VARIANTS)}, got "
                     f"{os.environ['PFC_FAST_CPU_KERNELS']!r}")

try:
    from . import _C
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        f"pfc_fast's compiled core (pfc_fast._C) could not be loaded with torch {torch.__version__}: {error}. "
        "Build it with `pip install --no-build-isolation .` (README.md, Install); importing pfc_fast from a "
        "source checkout that was never built, or after torch was upgraded or downgraded, also ends here."
    ) from error


def check_torch_version(built: Tuple[int, int], running: str) -> None:
    """Raises ``ImportError`` when the core was compiled against another torch ``major.minor``
    (``built``) than the one imported (``running``, e.g. ``"2.14.1+cu130"``): torch's C++ ABI
    changes between minor releases, so such a core would crash or misbehave."""
    version = tuple(int(part) for part in running.split("+")[0].split(".")[:2])
    if version != built:
        raise ImportError(f"pfc_fast's compiled core was built against torch {built[0]}.{built[1]}, but torch "
                          f"{running} is imported: rebuild pfc_fast against this torch "
                          "(`pip install --no-build-isolation --force-reinstall --no-deps .`, README.md, Install)")


check_torch_version((_C.torch_version_major, _C.torch_version_minor), torch.__version__)

_simt: Optional[ModuleType]
try:
    from . import _simt
except ImportError:  # built without the SIMT layer (PFC_FAST_SIMT=0, or no Boost.Context)
    _simt = None

#: The operator namespaces with kernels in this build.
NAMESPACES = ("pfc_fast", "pfc_fast_simt") if _simt is not None else ("pfc_fast",)


_Fake = TypeVar("_Fake", bound=Callable[..., object])


def _register_fake(name: str) -> Callable[[_Fake], _Fake]:
    """Registers the decorated fake kernel for ``name`` in every namespace."""
    def register(fake: _Fake) -> _Fake:
        for namespace in NAMESPACES:
            torch.library.register_fake(f"{namespace}::{name}")(fake)
        return fake
    return register


@_register_fake("class_sums")
def _class_sums_fake(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    labellings = tuple(labels.shape[:-1])  # () for labels (N,), (L,) for L labellings (L, N)
    sums = feats.new_empty((*labellings, num_classes, feats.shape[1]), dtype=torch.float64)
    return sums, labels.new_empty((*labellings, num_classes), dtype=torch.int64)


@_register_fake("residual_stats")
def _residual_stats_fake(feats: torch.Tensor, labels: torch.Tensor, means: torch.Tensor, proj: torch.Tensor,
                         mean_coords: torch.Tensor, ncc_bias: torch.Tensor, score_error: float,
                         logit_offset: Optional[torch.Tensor],
                         predictions: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_classes = means.shape[0]
    basis_sq = feats.new_empty((mean_coords.shape[1],), dtype=torch.float64)
    class_sq = feats.new_empty((num_classes,), dtype=torch.float64)
    return basis_sq, class_sq, feats.new_empty((2,), dtype=torch.int64)


@_register_fake("sinkhorn_softmin")
def _sinkhorn_softmin_fake(x: Optional[torch.Tensor], y: Optional[torch.Tensor], cost: Optional[torch.Tensor],
                           h: torch.Tensor, log_w: torch.Tensor, eps: float, shift: Optional[torch.Tensor] = None,
                           transpose: bool = False) -> torch.Tensor:
    given = cost if cost is not None or transpose else x  # transpose: the columns of a given cost
    assert given is not None, "sinkhorn_softmin takes points x, y or a cost"
    rows = given.shape[2] if transpose else given.shape[1]
    return h.new_empty((h.shape[0], rows))


@_register_fake("sinkhorn_plan_sums")
def _sinkhorn_plan_sums_fake(x: Optional[torch.Tensor], y: Optional[torch.Tensor], cost: Optional[torch.Tensor],
                             f: torch.Tensor, g: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor,
                             eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return f.new_empty(f.shape), f.new_empty(f.shape)


@_register_fake("sinkhorn_kernel")
def _sinkhorn_kernel_fake(cost: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    return cost.new_empty(cost.shape)


@_register_fake("sinkhorn_scaling_step")
def _sinkhorn_scaling_step_fake(kernel: torch.Tensor, u: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                                b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return u.new_empty(u.shape), v.new_empty(v.shape), u.new_empty((u.shape[0], 2))


_simt_active = False


class use_simt:
    """Routes the library's kernels on CPU tensors through the SIMT layer: ``nc_metrics``,
    ``NCAccumulator``, ``PFCMonitor``, ``sinkhorn`` and everything built on them then run the CUDA
    kernels (``csrc/*/*_cuda.cu``), executed on the CPU thread by thread (``torch.ops.pfc_fast_simt``),
    instead of the C++ CPU kernels. For testing the CUDA code without a GPU; much slower.

    Takes effect when called; as a context manager it restores the previous setting on exit::

        with pfc_fast.use_simt():
            m = pfc_fast.nc_metrics(feats, labels)      # the CUDA kernels' numbers

    ``PFC_FAST_USE_SIMT=1`` in the environment turns it on at import. Raises ``RuntimeError``
    where pfc_fast was built without the SIMT layer (``build_info()["simt"]`` is False).
    """

    def __init__(self, enabled: bool = True) -> None:
        global _simt_active
        _inputs.check_bool(enabled, "enabled")
        if enabled and _simt is None:
            raise RuntimeError("pfc_fast was built without the SIMT layer (pfc_fast._simt); rebuild with "
                               "PFC_FAST_SIMT=1 and Boost.Context installed (README.md, Install)")
        self._previous = _simt_active
        _simt_active = enabled

    def __enter__(self) -> use_simt:
        return self

    def __exit__(self, *exc_info: object) -> None:
        global _simt_active
        _simt_active = self._previous


def _on_simt(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s kernels are the SIMT layer's: a CPU tensor under use_simt."""
    return _simt_active and tensor.device.type == "cpu"


def ops_for(tensor: torch.Tensor) -> torch._ops._OpNamespace:
    """The ops that run ``tensor``'s kernels: ``pfc_fast``, or ``pfc_fast_simt`` for a CPU tensor under use_simt."""
    return torch.ops.pfc_fast_simt if _on_simt(tensor) else torch.ops.pfc_fast


def class_sums(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return ops_for(feats).class_sums(feats, labels, num_classes)


@torch.library.custom_op("pfc_fast::residual_stats_of_error_tensor", mutates_args=())
def _residual_stats_of_error_tensor(feats: torch.Tensor, labels: torch.Tensor, means: torch.Tensor,
                                    proj: torch.Tensor, mean_coords: torch.Tensor, ncc_bias: torch.Tensor,
                                    score_error: torch.Tensor, logit_offset: Optional[torch.Tensor],
                                    predictions: Optional[torch.Tensor],
                                    simt: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``residual_stats`` of the namespace ``pfc_fast`` (``pfc_fast_simt`` with ``simt``) with its
    ``score_error`` given as a 0-d CPU tensor, read here, at run time: what :func:`residual_stats`
    calls under ``torch.compile``, whose graph then takes it as an input, where a float would be a
    constant, guarded, and recompiled for at every new value (one per set of class means)."""
    namespace = torch.ops.pfc_fast_simt if simt else torch.ops.pfc_fast
    return namespace.residual_stats(feats, labels, means, proj, mean_coords, ncc_bias, float(score_error),
                                    logit_offset, predictions)


@_residual_stats_of_error_tensor.register_fake
def _residual_stats_of_error_tensor_fake(feats: torch.Tensor, labels: torch.Tensor, means: torch.Tensor,
                                         proj: torch.Tensor, mean_coords: torch.Tensor, ncc_bias: torch.Tensor,
                                         score_error: torch.Tensor, logit_offset: Optional[torch.Tensor],
                                         predictions: Optional[torch.Tensor],
                                         simt: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _residual_stats_fake(feats, labels, means, proj, mean_coords, ncc_bias, 0.0, logit_offset, predictions)


def residual_stats(feats: torch.Tensor, labels: torch.Tensor, means: torch.Tensor, proj: torch.Tensor,
                   mean_coords: torch.Tensor, ncc_bias: torch.Tensor, score_error: torch.Tensor,
                   logit_offset: Optional[torch.Tensor],
                   predictions: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``residual_stats`` (csrc/schemas.h) with ``score_error`` a 0-d float64 CPU tensor: read on the
    host in eager mode (no device sync: it is on the CPU), a graph input under ``torch.compile``
    (:func:`_residual_stats_of_error_tensor`; the same kernel, without a Python op's overhead in eager mode)."""
    if torch.compiler.is_compiling():
        return _residual_stats_of_error_tensor(feats, labels, means, proj, mean_coords, ncc_bias, score_error,
                                               logit_offset, predictions, _on_simt(feats))
    return ops_for(feats).residual_stats(feats, labels, means, proj, mean_coords, ncc_bias, float(score_error),
                                         logit_offset, predictions)


def sinkhorn_softmin(x: Optional[torch.Tensor], y: Optional[torch.Tensor], cost: Optional[torch.Tensor],
                     h: torch.Tensor, log_w: torch.Tensor, eps: float, shift: Optional[torch.Tensor] = None,
                     transpose: bool = False) -> torch.Tensor:
    return ops_for(h).sinkhorn_softmin(x, y, cost, h, log_w, eps, shift, transpose=transpose)


def sinkhorn_plan_sums(x: Optional[torch.Tensor], y: Optional[torch.Tensor], cost: Optional[torch.Tensor],
                       f: torch.Tensor, g: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor,
                       eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return ops_for(f).sinkhorn_plan_sums(x, y, cost, f, g, log_a, log_b, eps)


def sinkhorn_kernel(cost: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """``pfc_fast::sinkhorn_kernel`` (csrc/schemas.h): ``exp(((f_i + g_j) - C_ij) / eps)`` (B, N, M)."""
    return ops_for(cost).sinkhorn_kernel(cost, f, g, eps)


def sinkhorn_scaling_step(kernel: torch.Tensor, u: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                          b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pfc_fast::sinkhorn_scaling_step`` (csrc/schemas.h): new scalings ``u``, ``v`` and status ``(B, 2)``."""
    return ops_for(kernel).sinkhorn_scaling_step(kernel, u, v, a, b)


if os.getenv("PFC_FAST_USE_SIMT", "0") == "1":
    use_simt()


class BuildInfo(TypedDict):
    """What :func:`build_info` returns."""

    cuda: bool
    native: bool
    cpu_kernels: str
    simt: bool
    simt_active: bool
    openmp: bool
    torch: str
    torch_runtime: str
    cuda_available: bool
    num_threads: int


def build_info() -> BuildInfo:
    """What the compiled core was built with.

    Returns a dict: ``cuda`` (CUDA kernels compiled in), ``native`` (the CPU kernels built with
    ``-march=native``, ``PFC_FAST_NATIVE=1``), ``cpu_kernels`` (the variant that runs: ``"native"``,
    ``"avx2"`` (AVX2 + FMA, chosen at load time where the CPU has them) or ``"baseline"`` (x86-64)), ``simt`` (the CUDA kernels also built for
    the SIMT layer, ``pfc_fast._simt``), ``simt_active`` (:func:`use_simt` is on), ``openmp`` (CPU
    kernels built with OpenMP), ``torch`` (the torch version the core was compiled against),
    ``torch_runtime`` (the torch imported now), ``cuda_available`` (a GPU usable now) and
    ``num_threads`` (CPU threads the kernels use, ``torch.get_num_threads()``).
    """
    return {
        "cuda": bool(_C.with_cuda),
        "native": bool(_C.native),
        "cpu_kernels": _C.cpu_kernels,
        "simt": _simt is not None,
        "simt_active": _simt_active,
        "openmp": bool(_C.with_openmp),
        "torch": f"{_C.torch_version_major}.{_C.torch_version_minor}.{_C.torch_version_patch}",
        "torch_runtime": torch.__version__,
        "cuda_available": bool(_C.with_cuda) and torch.cuda.is_available(),
        "num_threads": torch.get_num_threads(),
    }
