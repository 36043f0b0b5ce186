"""The sinkhorn benchmarks: :func:`pfc_fast.sinkhorn` (``mode="dense"`` and ``"online"``) against
POT (``ot.bregman.sinkhorn_log``, ``ot.sinkhorn``) and a plain PyTorch log-domain loop
(:mod:`benchmarks.baselines`), B problems in one batched call against a loop of B calls, and the
time to a tolerance against POT's three solvers and GeomLoss.

Time to tolerance (table ``sinkhorn-tol``): the time until the marginal error reaches ``TOLERANCE``
(1e-6 in float64, 1e-4 in float32), at ``eps`` = 0.05, 0.01 and 0.001 times the median cost, from
the same clouds. The error is measured the same way for everyone after the timed call,
``max(||P 1 - a||_1, ||P^T 1 - b||_1)`` of the returned plan or potentials in float64
(:func:`benchmarks.baselines.plan_marginal_error`), and shown beside each time with the iterations
where known; a contender whose error is not below ``REACHED_SLACK`` times the tolerance (each stops
at it by its own arithmetic and rule) or that returns NaN is marked so. Ours: ``auto``
(the scaling solver in dense mode) and ``method="log"``, ``tol`` as given, ``max_iter =
max_iterations(params)`` (``MAX_ITER``, fewer at large N M). POT: the same ``numItermax``, and
its own stopping rule, a 2-norm of a marginal's violation checked every 10 iterations (20 in
``sinkhorn_stabilized``), so that ``stopThr = tol`` may stop it at a larger 1-norm error: its ``stopThr`` is chosen, untimed, as the
first of ``tol`` times ``POT_STOP_FACTORS`` whose plan reaches the tolerance (tighter ones are not
tried once a run took every iteration or broke down). GeomLoss has no tolerance: its
eps-annealing factor ``scaling`` is chosen, untimed, as the first of ``GEOMLOSS_SCALINGS`` whose
potentials reach the tolerance; near 1 its error falls about as ``1 - scaling``, so the search
stops where even the last factor would miss the tolerance by that rule. The setting chosen is shown
beside the time.

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
    "sinkhorn-tol": Table("`sinkhorn` time to tolerance (marginal error 1e-6 in float64, 1e-4 in float32; "
                          "eps a fraction of the median cost; the error reached and the iterations beside each time)",
                          (("N", "N"), ("M", "M"), ("D", "D"), ("eps", "eps / median"), ("dtype", "dtype"))),
}
#: The marginal error to reach, by dtype.
TOLERANCE = {"float64": 1e-6, "float32": 1e-4}
#: The most iterations of every contender to a tolerance: MAX_ITER, or fewer where N M is so large
#: that they would sweep more than MAX_ENTRIES kernel entries (a solver that breaks down runs to it).
MAX_ITER = 20_000
MAX_ENTRIES = 2e10


def max_iterations(params):
    """The iteration cap of every contender of a time-to-tolerance case."""
    return max(10, min(MAX_ITER, int(MAX_ENTRIES / (params["N"] * params["M"]))))
#: GeomLoss's eps-annealing factors tried, in order, until its potentials reach the tolerance.
GEOMLOSS_SCALINGS = (0.5, 0.7, 0.9, 0.95, 0.99, 0.995, 0.999)
#: From this factor on GeomLoss's error falls about as ``1 - scaling`` (measured: N = M = 1,000, D = 64).
GEOMLOSS_LINEAR_FROM = 0.95
#: POT's ``stopThr``, as multiples of the tolerance, tried in order until its plan reaches it.
POT_STOP_FACTORS = (1.0, 0.1, 0.01, 0.001)
#: A contender reached the tolerance where its error, measured again in float64, is below this
#: multiple of it (everyone stops right at the tolerance by their own arithmetic).
REACHED_SLACK = 1.5


def _entries(p):
    return p.get("B", 1) * p["N"] * p["M"]


def _pot_missing():
    return None if baselines.ot is not None else "POT is not installed"


def _geomloss_missing():
    return None if baselines.geomloss is not None else "GeomLoss is not installed"


def _to_tolerance(label, role="baseline", unavailable=None, memory=0, **limits):
    """A contender of the time-to-tolerance table holding ``memory`` N x M matrices of the dtype
    (``limits``: its ``work``, ``work_limit``, ``work_text``)."""
    return Contender(label, role, memory=lambda p: memory * _entries(p) * (8 if p["dtype"] == "float64" else 4),
                     memory_text="N x M matrices", unavailable=unavailable, **limits)


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
    "ours_tol": _to_tolerance("ours (auto: scaling)", "ours", memory=2),
    "ours_log_tol": _to_tolerance("ours, log domain", "ours", memory=1),
    "pot_tol": _to_tolerance("POT sinkhorn", unavailable=_pot_missing, memory=4),
    "pot_log_tol": _to_tolerance("POT sinkhorn_log", unavailable=_pot_missing, memory=6),
    "pot_stabilized_tol": _to_tolerance("POT sinkhorn_stabilized", unavailable=_pot_missing, memory=6),
    "geomloss_tol": _to_tolerance("GeomLoss tensorized", unavailable=_geomloss_missing, memory=6, work=_entries,
                                  work_limit={"cpu": 4.1e6, "cuda": 1e9},
                                  work_text="N M (its calibration runs up to one solve per scaling)"),
}
_SINGLE = ("ours_dense", "ours_online", "pot_log", "pot", "torch_log")
_BATCHED = ("ours_batched", "ours_loop", "pot_log_loop", "torch_log_batched")
_TOLERANCE = ("ours_tol", "ours_log_tol", "pot_tol", "pot_log_tol", "pot_stabilized_tol", "geomloss_tol")
_CONTENDERS = {"sinkhorn": _SINGLE, "sinkhorn-batch": _BATCHED, "sinkhorn-tol": _TOLERANCE}


_EPS_FACTORS = (0.05, 0.01, 0.001)


def _tolerance_grid(sizes, size_factors=_EPS_FACTORS):
    """The time-to-tolerance cases: N = M = sizes[0] at every eps in float32 and float64, then the
    other sizes at the eps factors ``size_factors`` in float32."""
    base = {"N": sizes[0], "M": sizes[0], "D": 64, "eps": _EPS_FACTORS[0], "dtype": "float32"}
    return base, {"eps": [{"eps": e, "dtype": d} for d in ("float32", "float64") for e in _EPS_FACTORS],
                  "N": [{"N": n, "M": n, "eps": e} for n in sizes[1:] for e in size_factors]}


def _n(n, iterations=None):
    return {"N": n, "M": n} if iterations is None else {"N": n, "M": n, "iterations": iterations}


_BASE = {"cpu": {"N": 2_000, "M": 2_000, "D": 64, "iterations": 100},
         "cuda": {"N": 10_000, "M": 10_000, "D": 64, "iterations": 100}}
#: ``{size: {device type: {table: (base, sweeps)}}}``, see :func:`benchmarks.cases.sweep`.
_GRIDS = {
    "tiny": {device: {"sinkhorn": ({"N": 64, "M": 64, "D": 8, "iterations": 5}, {"N": [_n(32), _n(64)]}),
                      "sinkhorn-batch": ({"B": 2, "N": 32, "M": 32, "D": 8, "iterations": 5}, {"B": [{"B": 2}]}),
                      "sinkhorn-tol": ({"N": 64, "M": 64, "D": 8, "eps": 0.05, "dtype": "float64"},
                                       {"eps": [{"eps": 0.05}, {"eps": 0.01, "dtype": "float32"}]})}
             for device in ("cpu", "cuda")},
    "quick": {
        "cpu": {"sinkhorn": (_BASE["cpu"], {"N": [_n(1_000), _n(2_000), _n(5_000, 50), _n(10_000, 50)],
                                            "D": [{"D": d} for d in (16, 64, 256, 512)]}),
                "sinkhorn-batch": ({"B": 8, "N": 1_000, "M": 1_000, "D": 64, "iterations": 50},
                                   {"B": [{"B": b} for b in (2, 8)]}),
                "sinkhorn-tol": _tolerance_grid((1_000, 2_000, 5_000, 10_000), size_factors=(0.05, 0.01))},
        "cuda": {"sinkhorn": (_BASE["cuda"], {"N": [_n(10_000), _n(50_000), _n(100_000, 20)],
                                              "D": [{"D": d} for d in (16, 64, 512)]}),
                 "sinkhorn-batch": ({"B": 8, "N": 10_000, "M": 10_000, "D": 64, "iterations": 100},
                                    {"B": [{"B": 8}]}),
                 "sinkhorn-tol": _tolerance_grid((1_000, 10_000))},
    },
    "full": {
        "cpu": {"sinkhorn": (_BASE["cpu"], {"N": [_n(1_000), _n(2_000), _n(5_000, 50), _n(10_000, 50),
                                                  _n(20_000, 5)],
                                            "D": [{"D": d} for d in (16, 32, 64, 128, 256, 512)]}),
                "sinkhorn-batch": ({"B": 8, "N": 1_000, "M": 1_000, "D": 64, "iterations": 50},
                                   {"B": [{"B": b} for b in (2, 4, 8, 16)]}),
                "sinkhorn-tol": _tolerance_grid((1_000, 2_000, 5_000, 10_000))},
        "cuda": {"sinkhorn": (_BASE["cuda"], {"N": [_n(n) for n in (1_000, 2_000, 5_000, 10_000, 20_000, 50_000)]
                                              + [_n(100_000, 20)],
                                              "D": [{"D": d} for d in (16, 32, 64, 128, 256, 512)]}),
                 "sinkhorn-batch": ({"B": 8, "N": 10_000, "M": 10_000, "D": 64, "iterations": 100},
                                    {"B": [{"B": b} for b in (2, 4, 8, 16)]}),
                 "sinkhorn-tol": _tolerance_grid((1_000, 2_000, 5_000, 10_000))},
    },
}

TARGETS = [Target("`sinkhorn` (faster mode) vs POT `sinkhorn_log`, N = M = 2,000, D = 64, float32, 100 iterations",
                  "cpu", "sinkhorn", _BASE["cpu"], ("ours_dense", "ours_online"), "pot_log", 5.0),
           Target("`sinkhorn` dense (auto: the scaling solver) vs POT `sinkhorn` per iteration, N = M = 2,000, D = 64, "
                  "float32, 100 iterations", "cpu", "sinkhorn", _BASE["cpu"], ("ours_dense",), "pot", 1.5)]


def cases(device_type, size):
    found = []
    for table, (base, sweeps) in _GRIDS[check_size(size)][device_type].items():
        for params, series in sweep(base, sweeps):
            points = params.get("B", 1) * (params["N"] + params["M"]) * params["D"] * 4
            found.append(Case("sinkhorn", table, params, series, _CONTENDERS[table], input_bytes=2 * points))
    return found


def make_inputs(case, device, seed=0):
    """``{"x", "y", "eps"}`` on ``device`` (with a leading ``B`` in the batch table); the cost
    matrix the baselines share is made by the first that needs it."""
    p = case.params
    batch = (p["B"],) if "B" in p else ()
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, p.get("dtype", "float32"))
    x = torch.randn(batch + (p["N"], p["D"]), generator=gen, device=device).to(dtype)
    y = (torch.randn(batch + (p["M"], p["D"]), generator=gen, device=device) * 0.8 + 0.5).to(dtype)
    median = pfc_fast.median_cost(x.reshape(-1, p["N"], p["D"])[0].cpu(), y.reshape(-1, p["M"], p["D"])[0].cpu())
    return {"x": x, "y": y, "eps": p.get("eps", 0.05) * median}


def _cost(inputs):
    """The squared-Euclidean cost matrix ``(N, M)`` or ``(B, N, M)``, made once per case."""
    if "cost" not in inputs:
        inputs["cost"] = torch.cdist(inputs["x"], inputs["y"]).square_()
    return inputs["cost"]


def _reached(error, tol):
    """Whether a contender's measured marginal error reached ``tol`` (``REACHED_SLACK``; NaN did not)."""
    return bool(error < REACHED_SLACK * tol)


def _geomloss_scaling(inputs, tol):
    """The first of ``GEOMLOSS_SCALINGS`` whose potentials reach ``tol`` (:func:`_reached`); else the last tried (the
    search stops, from ``GEOMLOSS_LINEAR_FROM`` on, where the error, taken to fall as ``1 - scaling``,
    would miss ``tol`` at the last one)."""
    for scaling in GEOMLOSS_SCALINGS:
        f, g = baselines.geomloss_potentials(inputs["x"], inputs["y"], inputs["eps"], scaling)
        error = baselines.potentials_marginal_error(_cost(inputs), f, g, inputs["eps"])
        hopeless = scaling >= GEOMLOSS_LINEAR_FROM and \
            not error * (1 - GEOMLOSS_SCALINGS[-1]) / (1 - scaling) < REACHED_SLACK * tol  # NaN too
        if _reached(error, tol) or hopeless:
            break
    return scaling


def _pot_stop(inputs, method, tol, cap):
    """The first ``stopThr`` of ``tol * POT_STOP_FACTORS`` whose plan reaches ``tol``; else the last
    tried (a tighter one cannot help once a run took all ``cap`` iterations or broke down)."""
    for stop in (tol * factor for factor in POT_STOP_FACTORS):
        plan, n_iter = baselines.pot_to_tolerance(_cost(inputs), inputs["eps"], stop, cap, method)
        error = baselines.plan_marginal_error(plan)
        if _reached(error, tol) or n_iter >= cap or error != error:  # NaN: it broke down
            break
    return stop


#: POT's solvers to a tolerance: the ``method`` of each contender.
_POT_METHODS = {"pot_tol": "sinkhorn", "pot_log_tol": "sinkhorn_log", "pot_stabilized_tol": "sinkhorn_stabilized"}


def _tolerance_runner(case, inputs, name):
    x, y, eps = inputs["x"], inputs["y"], inputs["eps"]
    tol, cap = TOLERANCE[case.params["dtype"]], max_iterations(case.params)
    if name in ("ours_tol", "ours_log_tol"):
        method = "auto" if name == "ours_tol" else "log"
        return lambda: pfc_fast.sinkhorn(x, y, eps=eps, tol=tol, max_iter=cap, method=method)
    settings = inputs.setdefault("settings", {})  # what outcome() shows beside the time
    if name == "geomloss_tol":
        scaling = _geomloss_scaling(inputs, tol)  # untimed
        settings[name] = f"scaling {scaling:g}"
        return lambda: baselines.geomloss_potentials(x, y, eps, scaling)
    cost, method = _cost(inputs), _POT_METHODS[name]
    stop = _pot_stop(inputs, method, tol, cap)  # untimed
    settings[name] = f"stopThr {stop:.0e}"
    return lambda: baselines.pot_to_tolerance(cost, eps, stop, cap, method)


def outcome(case, inputs, name, output):
    """What a contender to a tolerance reached (``None`` in the other tables): ``{"marginal_error",
    "reached"[, "n_iter"]}``, the error measured alike for everyone (module docstring)."""
    if case.table != "sinkhorn-tol":
        return None
    tol, eps = TOLERANCE[case.params["dtype"]], inputs["eps"]
    if name in ("ours_tol", "ours_log_tol"):
        error = baselines.potentials_marginal_error(_cost(inputs), output.f, output.g, eps)
        found = {"marginal_error": error, "n_iter": output.n_iter}
    elif name == "geomloss_tol":
        found = {"marginal_error": baselines.potentials_marginal_error(_cost(inputs), *output, eps)}
    else:
        found = {"marginal_error": baselines.plan_marginal_error(output[0]), "n_iter": output[1]}
    found["reached"] = _reached(found["marginal_error"], tol)
    if name in inputs.get("settings", {}):
        found["setting"] = inputs["settings"][name]
    return found


def runner(case, inputs, name):
    """The timed call of contender ``name``; it returns what the contender computes."""
    if case.table == "sinkhorn-tol":
        return _tolerance_runner(case, inputs, name)
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
    if rates is None or CONTENDERS[name].role != "ours" or case.table == "sinkhorn-tol":
        return None
    p = case.params
    online = name == "ours_online" or (name == "ours_batched" and 4 * _entries(p) > DENSE_BYTES)
    if online:
        per_entry = p["D"] / rates["fma_per_s"] + 1 / rates["exp_per_s"]
    else:
        per_entry = max(4 / rates["copy_bytes_per_s"], 1 / rates["exp_per_s"])
    return 2 * _entries(p) * p["iterations"] * per_entry
