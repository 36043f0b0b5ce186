"""The compiled operators of ``pfc_fast._C`` and their fake kernels.

Schemas are registered once in ``csrc/pfc_fast.cpp`` (``TORCH_LIBRARY``); CPU and CUDA kernels in
``csrc/cpu`` and ``csrc/cuda``. The fake kernels below give output shapes without data, so the ops
trace under ``torch.compile`` and pass ``torch.library.opcheck``.
"""
import torch

try:
    from . import _C
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "pfc_fast's compiled core (pfc_fast._C) could not be loaded. Build it with "
        "`pip install --no-build-isolation .` (see README.md); importing pfc_fast from a source "
        "checkout that was never built also ends here."
    ) from error


@torch.library.register_fake("pfc_fast::class_sums")
def _class_sums_fake(feats, labels, num_classes):
    sums = feats.new_empty((num_classes, feats.shape[1]), dtype=torch.float64)
    return sums, labels.new_empty((num_classes,), dtype=torch.int64)


@torch.library.register_fake("pfc_fast::residual_stats")
def _residual_stats_fake(feats, labels, means, proj, ncc_bias, logit_offset, predictions):
    num_classes = means.shape[0]
    gram = feats.new_empty((num_classes, num_classes), dtype=torch.float64)
    class_sq = feats.new_empty((num_classes,), dtype=torch.float64)
    return gram, class_sq, feats.new_empty((2,), dtype=torch.int64)


@torch.library.register_fake("pfc_fast::sinkhorn_softmin")
def _sinkhorn_softmin_fake(x, y, cost, h, log_w, eps, shift=None, transpose=False):
    rows = cost.shape[2] if transpose else (cost if cost is not None else x).shape[1]
    return h.new_empty((h.shape[0], rows))


@torch.library.register_fake("pfc_fast::sinkhorn_plan_sums")
def _sinkhorn_plan_sums_fake(x, y, cost, f, g, log_a, log_b, eps):
    return f.new_empty(f.shape), f.new_empty(f.shape)


class_sums = torch.ops.pfc_fast.class_sums
residual_stats = torch.ops.pfc_fast.residual_stats
sinkhorn_softmin = torch.ops.pfc_fast.sinkhorn_softmin
sinkhorn_plan_sums = torch.ops.pfc_fast.sinkhorn_plan_sums


def build_info():
    """What the compiled core was built with.

    Returns a dict: ``cuda`` (CUDA kernels compiled in), ``openmp`` (CPU kernels built with
    OpenMP), ``torch`` (the torch version the core was compiled against), ``torch_runtime`` (the
    torch imported now), ``cuda_available`` (a GPU usable now) and ``num_threads`` (CPU threads the
    kernels use, ``torch.get_num_threads()``).
    """
    return {
        "cuda": bool(_C.with_cuda),
        "openmp": bool(_C.with_openmp),
        "torch": f"{_C.torch_version_major}.{_C.torch_version_minor}.{_C.torch_version_patch}",
        "torch_runtime": torch.__version__,
        "cuda_available": bool(_C.with_cuda) and torch.cuda.is_available(),
        "num_threads": torch.get_num_threads(),
    }
