"""The benchmark baselines compute the numbers of pfc_fast.reference, unbalanced classes included,
so no speed-up is ever measured against a wrong baseline; so do the timed calls of every
contender of the benchmark cases."""
import pytest
import torch

import pfc_fast
from benchmarks import baselines, nc_metrics_bench, sinkhorn_bench, stream_bench, timing
from benchmarks.cases import Case
from pfc_fast import reference

from conftest import make_features, seed_for


@pytest.mark.parametrize("baseline", [baselines.papyan_nc_metrics, baselines.published_nc_metrics],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_nc_baselines_match_reference(device, baseline, dtype):
    feats, labels = make_features(1200, 24, 5, seed=61, device=device, dtype=dtype)  # unbalanced classes
    ours = baseline(feats, labels, 5, batch_size=256)
    expected = reference.nc_metrics(feats.double(), labels)
    for name, value in ours.items():
        assert value == pytest.approx(expected[name], rel=1e-9), name


def test_wu_papyan_package_defaults_in_float32(device):
    """The float32 variant (the package's default accumulators) is near the float64 reference on
    well-conditioned data, and computes in float32 (its nc1 is not the float64 one to 1e-9)."""
    feats, labels = make_features(1200, 24, 5, seed=63, device=device, dtype=torch.float32)
    ours = baselines.published_nc_metrics(feats, labels, 5, batch_size=256, dtype=torch.float32)
    expected = reference.nc_metrics(feats.double(), labels)
    for name in ("nc1", "nc1_quotient", "nc2_etf"):
        assert ours[name] == pytest.approx(expected[name], rel=1e-4), name
    assert abs(ours["ncc_accuracy"] - expected["ncc_accuracy"]) <= 0.01
    assert ours["nc1"] != pytest.approx(expected["nc1"], rel=1e-12)


def test_nc_contenders_compute_nc1():
    case = nc_metrics_bench.cases("cpu", "tiny")[0]
    inputs = nc_metrics_bench.make_inputs(case, torch.device("cpu"))
    expected = reference.nc_metrics(inputs["feats"].double(), inputs["labels"])["nc1"]
    for name in case.contenders:
        output = nc_metrics_bench.runner(case, inputs, name)()
        nc1 = output["nc1"] if isinstance(output, dict) else output.nc1
        assert nc1 == pytest.approx(expected, rel=1e-4 if name == "wu_papyan_f32" else 1e-9), name


def test_stream_contenders_compute_nc1_of_the_same_rows():
    """The streaming case makes the same batches in each pass; every contender's nc1 is the reference's
    on those rows gathered, and the peak-memory probe sees an allocation it is told about."""
    case = stream_bench.cases("cpu", "tiny")[0]
    inputs = stream_bench.make_inputs(case, torch.device("cpu"))
    first, second = list(inputs["stream"]()), list(inputs["stream"]())
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    feats, labels = torch.cat([f for f, _ in first]), torch.cat([y for _, y in first])
    assert feats.shape == (case.params["N"], case.params["D"])
    expected = reference.nc_metrics(feats.double(), labels)["nc1"]
    for name in ("ours", "wu_papyan", "wu_papyan_f32"):
        output = stream_bench.runner(case, inputs, name)()
        nc1 = output["nc1"] if isinstance(output, dict) else output.nc1
        assert nc1 == pytest.approx(expected, rel=1e-4 if name == "wu_papyan_f32" else 1e-9), name
    assert timing.peak_memory(lambda: torch.ones(64 << 20, dtype=torch.uint8).sum(), torch.device("cpu")) >= 60 << 20


def _problem(device, batch=(), n=40, m=30, seed=62):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch + (n, 3), generator=gen, dtype=torch.float64)
    y = torch.randn(batch + (m, 3), generator=gen, dtype=torch.float64) + 0.5
    a = torch.rand(batch + (n,), generator=gen, dtype=torch.float64) + 0.5
    b = torch.rand(batch + (m,), generator=gen, dtype=torch.float64) + 0.5
    cost = torch.cdist(x, y).square()
    return [t.to(device) for t in (cost, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True))]


def test_torch_sinkhorn_log_is_the_reference_loop(device):
    cost, a, b = _problem(device)
    f, g = baselines.torch_sinkhorn_log(cost, 0.4, 37, a, b)
    expected = reference.sinkhorn(cost=cost.cpu(), a=a.cpu(), b=b.cpu(), eps=0.4, max_iter=37, tol=0)
    torch.testing.assert_close(f.cpu(), expected["f"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g.cpu(), expected["g"], rtol=1e-12, atol=1e-12)
    costs, a, b = _problem(device, batch=(3,))
    f, g = baselines.torch_sinkhorn_log(costs, 0.4, 37, a, b)
    for k in range(3):
        single = baselines.torch_sinkhorn_log(costs[k], 0.4, 37, a[k], b[k])
        torch.testing.assert_close(f[k], single[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g[k], single[1], rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(baselines.ot is None, reason="POT is not installed")
@pytest.mark.parametrize("solver", [baselines.pot_sinkhorn_log, baselines.pot_sinkhorn], ids=lambda f: f.__name__)
def test_pot_baselines_match_reference_at_convergence(device, solver):
    cost, a, b = _problem(device)
    plan = solver(cost, 0.4, 3000, a, b)
    expected = reference.sinkhorn(cost=cost.cpu(), a=a.cpu(), b=b.cpu(), eps=0.4, max_iter=100_000, tol=1e-14)
    torch.testing.assert_close(plan.cpu(), expected["plan"], rtol=1e-8, atol=1e-14)
    assert float((plan * cost).sum()) == pytest.approx(expected["cost"], rel=1e-8)


def _transport_costs(output, cost, eps):
    """``<P, C>`` of each problem, from whatever a sinkhorn contender returns."""
    if isinstance(output, list):
        return torch.stack([_transport_costs(o, c, eps).reshape(()) for o, c in zip(output, cost)])
    if isinstance(output, pfc_fast.SinkhornResult):
        return output.cost.double()
    if isinstance(output, tuple):  # potentials, uniform weights
        f, g = output
        n, m = cost.shape[-2:]
        output = torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / eps) / (n * m)
    return (output.double() * cost).sum((-2, -1))


@pytest.mark.skipif(baselines.ot is None, reason="POT is not installed")
@pytest.mark.parametrize("table", ["sinkhorn", "sinkhorn-batch"])
def test_sinkhorn_contenders_compute_the_transport_cost(table):
    """Every contender, run to convergence in float32 (at 10 times the benchmarks' eps, where 100
    iterations converge), gives the reference's <P, C> (float64)."""
    params = {"N": 40, "M": 40, "D": 3, "iterations": 100}
    params = {"B": 2, **params} if table == "sinkhorn-batch" else params
    template = next(c for c in sinkhorn_bench.cases("cpu", "tiny") if c.table == table)
    case = Case("sinkhorn", table, params, (), template.contenders)
    inputs = sinkhorn_bench.make_inputs(case, torch.device("cpu"))
    inputs["eps"] *= 10
    x, y, eps = inputs["x"].double(), inputs["y"].double(), inputs["eps"]
    batch = x.shape[0] if x.dim() == 3 else None
    problems = zip(x, y) if batch else [(x, y)]
    expected = torch.tensor([reference.sinkhorn(xk, yk, eps=eps, max_iter=10_000, tol=1e-10)["cost"]
                             for xk, yk in problems], dtype=torch.float64)
    cost = torch.cdist(inputs["x"], inputs["y"]).square()
    for name in case.contenders:
        found = _transport_costs(sinkhorn_bench.runner(case, inputs, name)(), cost, eps).reshape(-1)
        torch.testing.assert_close(found, expected, rtol=2e-4, atol=0, msg=name)


@pytest.mark.skipif(baselines.ot is None or baselines.geomloss is None, reason="POT or GeomLoss is not installed")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_tolerance_contenders_solve_the_same_problem_and_their_errors_are_measured(dtype):
    """The time-to-tolerance contenders on one case: each gives the reference's <P, C> (GeomLoss
    at its loosest accuracy), and outcome() measures the marginal error of what each returned
    against the same error formed directly from its plan in float64."""
    case = Case("sinkhorn", "sinkhorn-tol", {"N": 50, "M": 50, "D": 3, "eps": 0.05, "dtype": dtype}, (),
                sinkhorn_bench._TOLERANCE)
    inputs = sinkhorn_bench.make_inputs(case, torch.device("cpu"))
    x, y, eps = inputs["x"].double(), inputs["y"].double(), inputs["eps"]
    expected = reference.sinkhorn(x, y, eps=eps, max_iter=10_000, tol=1e-12)
    cost = torch.cdist(x, y).square()
    tol = sinkhorn_bench.TOLERANCE[dtype]
    for name in case.contenders:
        output = sinkhorn_bench.runner(case, inputs, name)()
        found = sinkhorn_bench.outcome(case, inputs, name, output)
        plan = torch.as_tensor(output[0]).double() if name.startswith("pot") else \
            (output.plan().double() if name.startswith("ours") else
             torch.exp((output[0].double()[:, None] + output[1].double()[None] - cost) / eps) / 2500)
        direct = max(float((plan.sum(1) - 1 / 50).abs().sum()), float((plan.sum(0) - 1 / 50).abs().sum()))
        # the plan of ours is formed in the compute dtype, the outcome's error in float64 from its potentials
        assert found["marginal_error"] == pytest.approx(direct, rel=1e-3 if dtype == "float64" else 2e-2, abs=1e-9), name
        assert found["reached"] == (direct < sinkhorn_bench.REACHED_SLACK * tol) or abs(direct / tol - 1.5) < 1e-3
        accuracy = 5e-2 if name == "geomloss_tol" else (1e-3 if dtype == "float32" else 1e-5)  # GeomLoss: annealed
        assert float((plan * cost).sum()) == pytest.approx(expected["cost"], rel=accuracy), name
        if name.startswith("ours"):
            assert found["reached"] and found["n_iter"] == output.n_iter


@pytest.mark.skipif(baselines.ot is None, reason="POT is not installed")
def test_pot_stabilized_is_given_a_tau_under_which_it_converges_at_1000_points():
    """POT's sinkhorn_stabilized with the benchmark's tau (baselines.POT_TAU; its default never
    stops from N = 1000 on) stops at the tolerance with the plan of reference.sinkhorn."""
    gen = torch.Generator().manual_seed(seed_for("pot_stabilized_tau"))
    x = torch.randn(1000, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(1000, 8, generator=gen, dtype=torch.float64) * 0.8 + 0.5
    cost = torch.cdist(x, y).square()
    eps = 0.05 * float(cost.median())
    plan, n_iter = baselines.pot_to_tolerance(cost, eps, 1e-9, 1000, "sinkhorn_stabilized")
    assert n_iter < 1000 and baselines.plan_marginal_error(plan) < 1e-7
    expected = reference.sinkhorn(cost=cost, eps=eps, max_iter=1000, tol=1e-10)
    assert float((plan * cost).sum()) == pytest.approx(float(expected["cost"]), rel=1e-7)
