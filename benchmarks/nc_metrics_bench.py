"""The nc_metrics benchmarks: :func:`pfc_fast.nc_metrics` (all the features in one call) and
:class:`pfc_fast.NCAccumulator` (batches of ``BATCH`` rows, both passes) against the published
baselines of :mod:`benchmarks.baselines`, float64 re-implementations of the published algorithms
(Papyan et al. 2020's per-class outer products; Wu & Papyan's one GEMM per batch) and Wu &
Papyan's in float32, their package's default accumulators, which read the features in the same
batches.

Inputs: ``N`` features of dimension ``D`` in ``K`` classes, ``h_i = mu_{y_i} + noise`` with unit
Gaussian means and noise and uniformly drawn labels, in ``dtype`` (float32 or bfloat16), made on
the device. Sweeps vary N, D, K and the dtype one at a time around a base case (the CPU's is the
acceptance target N = 20,000, D = 512, K = 10, float32).

GPU floor: reading the features twice (the two passes) at the measured copy bandwidth,
``2 N D s / bandwidth`` with ``s`` bytes per element.
"""
import torch

import pfc_fast

from . import baselines
from .cases import Case, Contender, Table, Target, check_size, sweep

#: Rows per batch of NCAccumulator and of the baselines (a data loader's batch).
BATCH = 1024
#: The input dtypes by name.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

TABLES = {"nc": Table("`nc_metrics` and `NCAccumulator` against the published baselines",
                      (("N", "N"), ("D", "D"), ("K", "K"), ("dtype", "dtype")))}

CONTENDERS = {
    "ours": Contender("nc_metrics", "ours"),
    "ours_acc": Contender("NCAccumulator", "ours"),
    "papyan": Contender(
        "Papyan et al. (re-impl., f64)", "baseline",
        memory=lambda p: (1.5 * min(BATCH, p["N"]) / p["K"] + 6) * p["D"] ** 2 * 8,
        memory_text="(n_c, D, D) float64 outer products",
        work=lambda p: p["N"] * p["D"] ** 2, work_limit={"cpu": 1e9, "cuda": 1e12},
        work_text="N D^2 outer-product entries"),
    "wu_papyan": Contender(
        "Wu & Papyan (re-impl., f64)", "baseline",
        memory=lambda p: 7 * p["D"] ** 2 * 8, memory_text="D x D float64 matrices",
        work=lambda p: p["N"] * p["D"] ** 2 + 10 * p["D"] ** 3, work_limit={"cpu": 2e11, "cuda": 1e14},
        work_text="N D^2 + 10 D^3 (GEMMs, eigh)"),
    "wu_papyan_f32": Contender(
        "Wu & Papyan package defaults (f32)", "baseline",
        memory=lambda p: 7 * p["D"] ** 2 * 4, memory_text="D x D float32 matrices",
        work=lambda p: p["N"] * p["D"] ** 2 + 10 * p["D"] ** 3, work_limit={"cpu": 2e11, "cuda": 1e14},
        work_text="N D^2 + 10 D^3 (GEMMs, eigh)"),
}

_BASE = {"cpu": {"N": 20_000, "D": 512, "K": 10, "dtype": "float32"},
         "cuda": {"N": 50_000, "D": 512, "K": 10, "dtype": "float32"}}
_DTYPES = [{"dtype": "float32"}, {"dtype": "bfloat16"}]
#: ``{size: {device type: (base, sweeps)}}``, see :func:`benchmarks.cases.sweep`.
_GRIDS = {
    "tiny": {device: ({"N": 300, "D": 16, "K": 3, "dtype": "float32"},
                      {"N": [{"N": 150}, {"N": 300}], "dtype": _DTYPES}) for device in ("cpu", "cuda")},
    "quick": {
        "cpu": (_BASE["cpu"], {
            "N": [{"N": n} for n in (1_000, 5_000, 20_000, 100_000)],
            "D": [{"N": 5_000, "D": d} for d in (64, 256, 512, 1024, 4096, 16384, 65536)],
            "K": [{"K": k} for k in (10, 100, 1000)],
            "K at D = 2,048": [{"D": 2048, "K": k} for k in (10, 1000)],
            "dtype": _DTYPES}),
        "cuda": (_BASE["cuda"], {
            "N": [{"N": n} for n in (10_000, 50_000, 1_000_000)],
            "D": [{"N": 10_000, "D": d} for d in (512, 4096, 65536)],
            "K": [{"K": k} for k in (10, 1000)],
            "K at D = 2,048": [{"D": 2048, "K": k} for k in (10, 1000)],
            "dtype": _DTYPES}),
    },
    "full": {
        "cpu": (_BASE["cpu"], {
            "N": [{"N": n} for n in (1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000)],
            "D": [{"N": 5_000, "D": d} for d in (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)],
            "K": [{"K": k} for k in (10, 30, 100, 300, 1000)],
            "K at D = 2,048": [{"D": 2048, "K": k} for k in (10, 100, 1000)],
            "dtype": _DTYPES}),
        "cuda": (_BASE["cuda"], {
            "N": [{"N": n} for n in (1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000)],
            "D": [{"N": 10_000, "D": d} for d in (64, 256, 512, 1024, 4096, 16384, 65536)],
            "K": [{"K": k} for k in (10, 100, 1000)],
            "K at D = 2,048": [{"D": 2048, "K": k} for k in (10, 100, 1000)],
            "dtype": _DTYPES}),
    },
}

TARGETS = [Target("`nc_metrics` vs Wu & Papyan, N = 20,000, D = 512, K = 10, float32", "cpu", "nc",
                  _BASE["cpu"], ("ours",), "wu_papyan", 10.0)]


def cases(device_type, size):
    base, sweeps = _GRIDS[check_size(size)][device_type]
    return [Case("nc", "nc", params, series, tuple(CONTENDERS),
                 input_bytes=3 * params["N"] * params["D"] * 4)
            for params, series in sweep(base, sweeps)]


def make_inputs(case, device, seed=0):
    """``{"feats": (N, D), "labels": (N,)}`` on ``device``."""
    n, d, k = case.params["N"], case.params["D"], case.params["K"]
    gen = torch.Generator(device=device).manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=gen, device=device)
    feats = torch.randn(k, d, generator=gen, device=device)[labels]
    feats += torch.randn(n, d, generator=gen, device=device)
    return {"feats": feats.to(DTYPES[case.params["dtype"]]), "labels": labels}


def _accumulate(feats, labels, k):
    accumulator = pfc_fast.NCAccumulator(k)
    for start in range(0, feats.shape[0], BATCH):
        accumulator.update(feats[start:start + BATCH], labels[start:start + BATCH])
    accumulator.next_pass()
    for start in range(0, feats.shape[0], BATCH):
        accumulator.update(feats[start:start + BATCH], labels[start:start + BATCH])
    return accumulator.compute()


def runner(case, inputs, name):
    """The timed call of contender ``name``; it returns what the contender computes."""
    feats, labels, k = inputs["feats"], inputs["labels"], case.params["K"]
    calls = {
        "ours": lambda: pfc_fast.nc_metrics(feats, labels, num_classes=k),
        "ours_acc": lambda: _accumulate(feats, labels, k),
        "papyan": lambda: baselines.papyan_nc_metrics(feats, labels, k, batch_size=BATCH),
        "wu_papyan": lambda: baselines.published_nc_metrics(feats, labels, k, batch_size=BATCH),
        "wu_papyan_f32": lambda: baselines.published_nc_metrics(feats, labels, k, batch_size=BATCH,
                                                                dtype=torch.float32),
    }
    return calls[name]


def floor(case, name, rates):
    """Seconds to read the features twice at the copy bandwidth (ours only)."""
    if rates is None or CONTENDERS[name].role != "ours":
        return None
    p = case.params
    return 2 * p["N"] * p["D"] * DTYPES[p["dtype"]].itemsize / rates["copy_bytes_per_s"]
