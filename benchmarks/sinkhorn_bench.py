"""The sinkhorn benchmarks: :func:`pfc_fast.sinkhorn` (``mode="dense"`` and ``"online"``) against
POT (``ot.bregman.sinkhorn_log``, ``ot.sinkhorn``) and a plain PyTorch log-domain loop
(:mod:`benchmarks.baselines`), and B problems in one batched call against a loop of B calls.

Inputs: point clouds ``x ~ N(0, I)``, ``y ~ N(0.5, 0.64 I)`` of ``N = M`` points in dimension
``D`` (batches: ``(B, N, D)``), float32, uniform weights, ``eps = 0.05 * median_cost(x, y)``, a
fixed number of ``iterations`` (``tol=0``; POT ``stopThr=0``). The baselines are given their
squared-Euclidean cost matrix, computed before the timing; pfc_fast computes its own in the call.
Times are of the whole call (ours: cost, iterations, transport cost), shown per iteration.

GPU floor of ours per iteration (an f and a g update, each over the ``N M`` entries):
``online``: ``2 N M (D / fma_rate + 1 / exp_rate)`` (the cost recomputed, one exp per entry);
``dense``: ``2 N M max(4 bytes / bandwidth, 1 / exp_rate)`` (the cost matrix read), with the
card's measured fp32 FMA rate, exp rate and copy bandwidth.
"""
import torch

import pfc_fast
from pfc_fast.transport import DENSE_BYTES

from . import baselines
from .cases import Case, Contender, Table, Target, check_size, sweep

_POINT = (("N", "N"), ("M", "M"), ("D", "D"), ("iterations", "iterations"))
TABLES = {
    "sinkhorn": Table("`sinkhorn` against POT and a PyTorch loop (float32, time per iteration)", _POINT,
                      per_iteration=True),
    "sinkhorn-batch": Table("`sinkhorn` on B problems (layer pairs): one batched call against B calls "
                            "(float32, time per iteration)", (("B", "B"),) + _POINT, per_iteration=True),
}


def _entries(p):
    return p.get("B", 1) * p["N"] * p["M"]


def _pot_missing():
    return None if baselines.ot is not None else "POT is not installed"


def _baseline(label, matrices, loop_matrices=0, pot=False):
    """A baseline that holds ``matrices`` float32 ``N x M`` matrices per problem (plus ``loop_matrices``
    for a loop over the problems)."""
    return Contender(label, "baseline",
                     memory=lambda p: 4 * (matrices * _entries(p) + loop_matrices * p["N"] * p["M"]),
                     memory_text="N x M float32 matrices",
                     work=lambda p: _entries(p) * p["iterations"], work_limit={"cpu": 5e9, "cuda": 1e12},
                     work_text="B N M iterations", unavailable=_pot_missing if pot else None)


CONTENDERS = {
    "ours_dense": Contender("ours dense", "ours", memory=lambda p: 4 * _entries(p), memory_text="the cost matrix"),
    "ours_online": Contender("ours online", "ours"),
    "pot_log": _baseline("POT sinkhorn_log", 6, pot=True),
    "pot": _baseline("POT sinkhorn", 4, pot=True),
    "torch_log": _baseline("PyTorch log loop", 4),
    "ours_batched": Contender("ours, one call", "ours",
                              memory=lambda p: 4 * _entries(p) if 4 * _entries(p) <= DENSE_BYTES else 0,
                              memory_text="the cost matrices"),
    "ours_loop": Contender("ours, B calls", "baseline"),
    "pot_log_loop": _baseline("POT sinkhorn_log, B calls", 1, loop_matrices=5, pot=True),
    "torch_log_batched": _baseline("PyTorch log loop, batched", 4),
}
_SINGLE = ("ours_dense", "ours_online", "pot_log", "pot", "torch_log")
_BATCHED = ("ours_batched", "ours_loop", "pot_log_loop", "torch_log_batched")


def _n(n, iterations=None):
    return {"N": n, "M": n} if iterations is None else {"N": n, "M": n, "iterations": iterations}


_BASE = {"cpu": {"N": 2_000, "M": 2_000, "D": 64, "iterations": 100},
         "cuda": {"N": 10_000, "M": 10_000, "D": 64, "iterations": 100}}
#: ``{size: {device type: {table: (base, sweeps)}}}``, see :func:`benchmarks.cases.sweep`.
_GRIDS = {
    "tiny": {device: {"sinkhorn": ({"N": 64, "M": 64, "D": 8, "iterations": 5}, {"N": [_n(32), _n(64)]}),
                      "sinkhorn-batch": ({"B": 2, "N": 32, "M": 32, "D": 8, "iterations": 5}, {"B": [{"B": 2}]})}
             for device in ("cpu", "cuda")},
    "quick": {
        "cpu": {"sinkhorn": (_BASE["cpu"], {"N": [_n(1_000), _n(2_000), _n(5_000, 20), _n(10_000, 10)],
                                            "D": [{"D": d} for d in (16, 64, 256, 512)]}),
                "sinkhorn-batch": ({"B": 8, "N": 1_000, "M": 1_000, "D": 64, "iterations": 50},
                                   {"B": [{"B": b} for b in (2, 8)]})},
        "cuda": {"sinkhorn": (_BASE["cuda"], {"N": [_n(10_000), _n(50_000), _n(100_000, 20)],
                                              "D": [{"D": d} for d in (16, 64, 512)]}),
                 "sinkhorn-batch": ({"B": 8, "N": 10_000, "M": 10_000, "D": 64, "iterations": 100},
                                    {"B": [{"B": 8}]})},
    },
    "full": {
        "cpu": {"sinkhorn": (_BASE["cpu"], {"N": [_n(1_000), _n(2_000), _n(5_000, 20), _n(10_000, 10),
                                                  _n(20_000, 5)],
                                            "D": [{"D": d} for d in (16, 32, 64, 128, 256, 512)]}),
                "sinkhorn-batch": ({"B": 8, "N": 1_000, "M": 1_000, "D": 64, "iterations": 50},
                                   {"B": [{"B": b} for b in (2, 4, 8, 16)]})},
        "cuda": {"sinkhorn": (_BASE["cuda"], {"N": [_n(n) for n in (1_000, 2_000, 5_000, 10_000, 20_000, 50_000)]
                                              + [_n(100_000, 20)],
                                              "D": [{"D": d} for d in (16, 32, 64, 128, 256, 512)]}),
                 "sinkhorn-batch": ({"B": 8, "N": 10_000, "M": 10_000, "D": 64, "iterations": 100},
                                    {"B": [{"B": b} for b in (2, 4, 8, 16)]})},
    },
}

TARGETS = [Target("`sinkhorn` (faster mode) vs POT `sinkhorn_log`, N = M = 2,000, D = 64, float32, 100 iterations",
                  "cpu", "sinkhorn", _BASE["cpu"], ("ours_dense", "ours_online"), "pot_log", 5.0)]


def cases(device_type, size):
    found = []
    for table, (base, sweeps) in _GRIDS[check_size(size)][device_type].items():
        names = _BATCHED if table == "sinkhorn-batch" else _SINGLE
        for params, series in sweep(base, sweeps):
            points = params.get("B", 1) * (params["N"] + params["M"]) * params["D"] * 4
            found.append(Case("sinkhorn", table, params, series, names, input_bytes=2 * points))
    return found


def make_inputs(case, device, seed=0):
    """``{"x", "y", "eps"}`` on ``device`` (with a leading ``B`` in the batch table); the cost
    matrix the baselines share is made by the first that needs it."""
    p = case.params
    batch = (p["B"],) if "B" in p else ()
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch + (p["N"], p["D"]), generator=gen, device=device)
    y = torch.randn(batch + (p["M"], p["D"]), generator=gen, device=device) * 0.8 + 0.5
    eps = 0.05 * pfc_fast.median_cost(x.reshape(-1, p["N"], p["D"])[0].cpu(), y.reshape(-1, p["M"], p["D"])[0].cpu())
    return {"x": x, "y": y, "eps": eps}


def _cost(inputs):
    """The squared-Euclidean cost matrix ``(N, M)`` or ``(B, N, M)``, made once per case."""
    if "cost" not in inputs:
        inputs["cost"] = torch.cdist(inputs["x"], inputs["y"]).square_()
    return inputs["cost"]


def runner(case, inputs, name):
    """The timed call of contender ``name``; it returns what the contender computes."""
    x, y, eps, iterations = inputs["x"], inputs["y"], inputs["eps"], case.params["iterations"]
    ours = lambda mode, xs=x, ys=y: pfc_fast.sinkhorn(xs, ys, eps=eps, tol=0, max_iter=iterations, mode=mode)
    if name.startswith("ours"):
        return {"ours_dense": lambda: ours("dense"), "ours_online": lambda: ours("online"),
                "ours_batched": lambda: ours("auto"),
                "ours_loop": lambda: [ours("auto", xs, ys) for xs, ys in zip(x, y)]}[name]
    cost = _cost(inputs)
    return {"pot_log": lambda: baselines.pot_sinkhorn_log(cost, eps, iterations),
            "pot": lambda: baselines.pot_sinkhorn(cost, eps, iterations),
            "torch_log": lambda: baselines.torch_sinkhorn_log(cost, eps, iterations),
            "torch_log_batched": lambda: baselines.torch_sinkhorn_log(cost, eps, iterations),
            "pot_log_loop": lambda: [baselines.pot_sinkhorn_log(c, eps, iterations) for c in cost]}[name]


def floor(case, name, rates):
    """The least time of ``iterations`` iterations of ours at the card's rates (module docstring)."""
    if rates is None or CONTENDERS[name].role != "ours":
        return None
    p = case.params
    online = name == "ours_online" or (name == "ours_batched" and 4 * _entries(p) > DENSE_BYTES)
    if online:
        per_entry = p["D"] / rates["fma_per_s"] + 1 / rates["exp_per_s"]
    else:
        per_entry = max(4 / rates["copy_bytes_per_s"], 1 / rates["exp_per_s"])
    return 2 * _entries(p) * p["iterations"] * per_entry
