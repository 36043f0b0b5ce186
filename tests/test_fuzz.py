"""Table-driven fuzzing of the public API and the command line.

Each case runs in a process of its own, forked from a server that has imported pfc_fast, under a
timeout, and its outcome is classified:

- ``refused``: a ``ValueError`` / ``TypeError`` whose message names the argument, or, on the
  command line, exit status 2 with the flag named on stderr;
- ``finite``: it returns, and every number in the result is finite;
- ``value``: it returns without NaN, and a documented property of the result holds (an
  expression: documented infinities, say);
- ``warns``: it returns a finite result and warns with the given category;
- ``misuse``: a method called out of order: a ``RuntimeError`` that says what to call first.

The test fails on a crash (a signal, an exception of another type), a hang, a silent NaN or inf,
an accepted bad input, or a refusal that does not name the argument. Inputs are drawn fresh from
seeded generators (the case id carries the seed), hard cases among them.
"""
import dataclasses
import multiprocessing
import random

import pytest

TIMEOUT = 60.0

PRELUDE = """
import contextlib, io, math, os, tempfile, warnings
import numpy as np
import torch
import pfc_fast
from pfc_fast import geodesic
from pfc_fast.app import cli

def clusters(n, d, k, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    means = 4 * torch.randn(k, d, generator=g, dtype=torch.float64)
    return (means[labels] + torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype), labels

feats, labels = clusters(120, 6, 4, SEED)
x = torch.randn(30, 3, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
y = x[torch.randperm(30, generator=torch.Generator().manual_seed(SEED + 1))] + 1.0
"""


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    code: str  # sets ``result``; SEED is defined
    outcome: str  # "refused", "finite", "value", "warns", "misuse"
    detail: str = ""  # refused: a fragment of the message; value: an expression of result; warns: a category


def _numbers(value, path="result"):
    """(path, float) of every number in ``value``: tensors, dataclasses, mappings, sequences."""
    import math
    import torch
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        yield path, float(value)
    elif isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            yield path, math.nan
    elif dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            yield from _numbers(getattr(value, field.name), f"{path}.{field.name}")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _numbers(item, f"{path}[{index}]")


def _run(case, seed, connection):
    """In the child: run ``case``; send back what happened."""
    import contextlib
    import io
    import math
    import warnings
    namespace = {"SEED": seed}
    stderr = io.StringIO()
    try:
        exec(PRELUDE, namespace)
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr):
            warnings.simplefilter("always")
            exec(case.code, namespace)
        result = namespace.get("result")
        bad = [(path, number) for path, number in _numbers(result) if not math.isfinite(number)]
        holds = bool(eval(case.detail, namespace)) if case.outcome == "value" else None
        connection.send(("returned", repr(result)[:300], bad, holds,
                         [type(w.message).__name__ + ": " + str(w.message) for w in caught]))
    except SystemExit as error:
        connection.send(("exit", error.code, stderr.getvalue()[-2000:]))
    except BaseException as error:  # noqa: B902 - every outcome is reported to the parent
        connection.send(("raised", type(error).__name__, str(error)[:2000]))


def _verdict(case, report):
    """``None`` when the outcome is the expected one, else what went wrong."""
    kind = report[0]
    if case.outcome == "refused":
        if kind == "raised" and report[1] in ("ValueError", "TypeError") and case.detail in report[2]:
            return None
        if kind == "exit" and report[1] == 2 and case.detail in report[2]:
            return None
        return f"expected a refusal naming {case.detail!r}, got {report}"
    if case.outcome == "misuse":
        if kind == "raised" and report[1] == "RuntimeError" and case.detail in report[2]:
            return None
        return f"expected a RuntimeError saying {case.detail!r}, got {report}"
    if kind != "returned":
        return f"expected a result, got {report}"
    _, text, bad, holds, caught = report
    if case.outcome == "value":  # documented infinities may be there, NaN never
        nan = [path for path, number in bad if number != number]
        if nan:
            return f"silent NaN at {nan} in {text}"
        return None if holds else f"the documented property {case.detail!r} does not hold for {text}"
    if bad:
        return f"silent NaN or inf at {bad} in {text}"
    if case.outcome == "warns" and not any(w.startswith(case.detail + ":") for w in caught):
        return f"expected a {case.detail}, got warnings {caught}"
    return None


def _generated_cases(seed):
    """Bad and good inputs drawn with ``seed``: where a NaN or inf lands, which label is out of range."""
    rng = random.Random(seed)
    row, column = rng.randrange(120), rng.randrange(6)
    poison = rng.choice(["float('nan')", "float('inf')", "-float('inf')"])
    wrong_label = rng.choice([-1, 4, 10**6, -(2**40)])
    dtype = rng.choice(["torch.float16", "torch.bfloat16", "torch.float32", "torch.float64"])
    scale = rng.choice(["1e-150", "1e-30", "1.0", "1e30", "1e150"])
    return [
        Case(f"feats {poison} at ({row}, {column})", f"feats[{row}, {column}] = {poison}\n"
             "result = pfc_fast.nc_metrics(feats, labels)", "refused", "feats contains NaN or Inf"),
        Case(f"label {wrong_label}", f"labels[{row}] = {wrong_label}\n"
             "result = pfc_fast.nc_metrics(feats, labels, num_classes=4)", "refused", "labels must lie in [0, 4)"),
        Case(f"feats in {dtype}", f"result = pfc_fast.nc_metrics(feats.to({dtype}), labels)", "finite"),
        Case(f"feats scaled by {scale}", f"result = pfc_fast.nc_metrics(feats * {scale}, labels)", "finite"),
        Case(f"points {poison} in x", f"x[{row % 30}, {column % 3}] = {poison}\nresult = pfc_fast.sinkhorn(x, y, eps=0.5)",
             "refused", "x contains NaN or Inf"),
    ]


CASES = [
    # the front door
    Case("labels uint16", "result = pfc_fast.nc_metrics(feats, labels.to(torch.uint16))", "finite"),
    Case("labels uint64", "result = pfc_fast.nc_metrics(feats, labels.to(torch.uint64))", "refused", "labels"),
    Case("labels float", "result = pfc_fast.nc_metrics(feats, labels.double())", "refused", "labels"),
    Case("labels bool", "result = pfc_fast.nc_metrics(feats, labels % 2 == 0)", "refused", "labels"),
    Case("labels too short", "result = pfc_fast.nc_metrics(feats, labels[:-1])", "refused", "labels"),
    Case("feats 1-D", "result = pfc_fast.nc_metrics(feats[:, 0], labels)", "refused", "feats"),
    Case("feats 3-D flatten", "result = pfc_fast.nc_metrics(feats.view(120, 2, 3), labels)", "finite"),
    Case("feats complex", "result = pfc_fast.nc_metrics(feats.to(torch.complex128), labels)", "refused", "feats"),
    Case("feats a list", "result = pfc_fast.nc_metrics(feats.tolist(), labels)", "refused", "feats"),
    Case("feats empty", "result = pfc_fast.nc_metrics(feats[:0], labels[:0], num_classes=4)", "refused", "feats"),
    Case("num_classes 0", "result = pfc_fast.nc_metrics(feats, labels, num_classes=0)", "refused", "num_classes"),
    Case("num_classes True", "result = pfc_fast.nc_metrics(feats, labels, num_classes=True)", "refused",
         "num_classes"),
    Case("num_classes 1.5", "result = pfc_fast.nc_metrics(feats, labels, num_classes=1.5)", "refused",
         "num_classes"),
    Case("one class present", "result = pfc_fast.nc_metrics(feats, labels * 0)", "refused", "labels"),
    Case("constant features", "result = pfc_fast.nc_metrics(torch.ones(120, 6), labels)", "refused", "feats"),
    Case("predictions out of range", "result = pfc_fast.nc_metrics(feats, labels, predictions=labels + 4)",
         "refused", "predictions"),
    Case("classifier wrong shape", "result = pfc_fast.nc_metrics(feats, labels, classifier=torch.randn(3, 6))",
         "refused", "classifier"),
    Case("classifier inf", "result = pfc_fast.nc_metrics(feats, labels, classifier=torch.full((4, 6), math.inf))",
         "refused", "classifier"),
    Case("pooling bogus", "result = pfc_fast.nc_metrics(feats, labels, pooling='max')", "refused", "pooling"),
    Case("accumulator D changes", "acc = pfc_fast.NCAccumulator(4)\nacc.update(feats, labels)\n"
         "acc.update(feats[:, :5], labels)", "refused", "feats"),
    Case("accumulator nothing seen", "result = pfc_fast.NCAccumulator(4).compute()", "misuse", "next_pass()"),
    Case("accumulator second pass differs", "acc = pfc_fast.NCAccumulator(4)\nacc.update(feats, labels)\n"
         "acc.next_pass()\nacc.update(feats[:60], labels[:60])\nresult = acc.compute()", "refused", "pass"),
    Case("accumulator num_classes huge", "result = pfc_fast.NCAccumulator(10**12)", "refused", "num_classes"),
    Case("nc_metrics num_classes huge", "result = pfc_fast.nc_metrics(feats, labels, num_classes=10**12)", "refused",
         "num_classes"),
    Case("feats on meta", "result = pfc_fast.nc_metrics(feats.to('meta'), labels)", "refused", "feats"),
    Case("monitor on NaN images", "net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), "
         "torch.nn.Linear(5, 4))\nmon = pfc_fast.PFCMonitor(net, num_classes=4, layers=['0', '2'])\n"
         "bad = feats.float().clone()\nbad[7] = math.nan\nresult = mon.measure([(bad, labels)])", "refused",
         "layer '0'"),
    # degenerate geometry (docs/spec.md section 2, "Degenerate cases")
    Case("two equal class means", "feats[labels == 1] = feats[labels == 0][:30]\n"
         "result = pfc_fast.nc_metrics(feats, labels)", "value", "math.isinf(result.cdnv)"),
    Case("a class mean at the global mean", "feats[labels == 3] += feats[labels < 3].mean(0) - "
         "feats[labels == 3].mean(0)  # balanced classes: mu_3 = mu_G\nresult = pfc_fast.nc_metrics(feats, labels)",
         "finite"),
    Case("one sample per class", "result = pfc_fast.nc_metrics(feats[:4], labels[:4])", "finite"),
    Case("D = 1, K = 2", "result = pfc_fast.nc_metrics(feats[:, :1], labels % 2)", "value",
         "math.isfinite(result.nc1)"),
    # optimal transport
    Case("eps 0", "result = pfc_fast.sinkhorn(x, y, eps=0.0)", "refused", "eps"),
    Case("eps nan", "result = pfc_fast.sinkhorn(x, y, eps=float('nan'))", "refused", "eps"),
    Case("eps a bool", "result = pfc_fast.sinkhorn(x, y, eps=True)", "refused", "eps"),
    Case("eps np.float32", "result = pfc_fast.sinkhorn(x, y, eps=np.float32(0.5)).value", "finite"),
    Case("eps 0-d tensor", "result = pfc_fast.sinkhorn(x, y, eps=torch.tensor(0.5)).value", "finite"),
    Case("eps meta tensor", "result = pfc_fast.sinkhorn(x, y, eps=torch.tensor(0.5, device='meta'))",
         "refused", "eps"),
    Case("cost and points", "result = pfc_fast.sinkhorn(x, y, cost=torch.ones(30, 30), eps=0.5)", "refused", "cost"),
    Case("empty cost", "result = pfc_fast.sinkhorn(cost=torch.ones(0, 3), eps=0.5)", "refused", "cost"),
    Case("negative weight", "a = torch.full((30,), 1 / 30, dtype=torch.float64)\na[0] = -a[0]\n"
         "result = pfc_fast.sinkhorn(x, y, a=a, eps=0.5)", "refused", "a"),
    Case("max_iter 0", "result = pfc_fast.sinkhorn(x, y, eps=0.5, max_iter=0)", "refused", "max_iter"),
    Case("unconverged", "result = pfc_fast.sinkhorn(x, y, eps=1e-3, max_iter=3, tol=1e-9).value", "warns",
         "ConvergenceWarning"),
    Case("eps below 1e-17 of the cost", "r = pfc_fast.sinkhorn(x, y, eps=1e-18, max_iter=50)\n"
         "result = float(r.marginal_error)", "value", "result > 1e-3"),
    Case("float16 uniform weights", "a = torch.full((30,), 1 / 30, dtype=torch.float16)\n"
         "result = pfc_fast.sinkhorn(x, y, a=a, b=a, eps=0.5).value", "finite"),
    Case("float32 points that overflow", "result = pfc_fast.sinkhorn(x.float() * 1e20, y.float() * 1e20, eps=1.0)",
         "refused", "x"),
    Case("empty batch", "result = pfc_fast.sinkhorn(torch.ones(0, 5, 3), torch.ones(0, 6, 3), eps=0.5)",
         "refused", "B = 0"),
    Case("LSS out and back", "track = [x, y, x]\nresult = geodesic.line_shape_score(track)", "value",
         "result == math.inf"),
    Case("path ratio on 2 class points", "pts = torch.tensor([[0., 0.], [1., 1.]], dtype=torch.float64)\n"
         "lab = torch.arange(40) % 2\nlayers = [torch.randn(40, 2, dtype=torch.float64), pts[lab] * 2, pts[lab] * 3]\n"
         "result = geodesic.wasserstein_path_ratio(layers, max_iter=5000)", "value", "0 < result <= 1 + 1e-9"),
    Case("median_cost empty", "result = pfc_fast.median_cost(x[:0], y)", "refused", "x"),
    Case("points of other dims", "result = pfc_fast.sinkhorn(x, y[:, :2], eps=0.5)", "refused", "y"),
    Case("ot_score mismatched", "result = geodesic.ot_score(x, y[:5])", "refused", ""),
    Case("mufm sinkhorn on collapsed inputs", "X = feats.clone()\nX[:100] = 0\n"
         "result = pfc_fast.mufm.solve(X, labels, 2, 0.1, cost='sinkhorn', steps=2)", "refused",
         "X: at least half of the pairs of points coincide"),
    # the command line
    *[Case(f"train {' '.join(flags)}", f"result = cli.main(['train', *{flags!r}, '--out', tempfile.mkdtemp()])",
           "refused", f"argument {flags[0]}") for flags in (
        ["--lr", "inf"], ["--lr", "1e400"], ["--lr", "-0.1"], ["--momentum", "inf"], ["--weight-decay", "-1"],
        ["--seed", str(2**70)], ["--seed", "-3"], ["--seed", "1.5"], ["--device", "meta"], ["--device", "mps"],
        ["--device", "cuda:99"], ["--device", "nonsense"], ["--epochs", "0"], ["--epochs", "-1"],
        ["--batch-size", "0"], ["--width", "-1"], ["--probe-per-class", "0"], ["--geodesic-samples", "-1"],
        ["--dataset", "imagenet"], ["--dist-timeout", "0"], ["--dist-timeout", "inf"], ["--depth", "-1"])],
    Case("train --out a file", "path = tempfile.mkstemp()[1]\nresult = cli.main(['train', '--out', path])",
         "refused", "argument --out"),
    Case("train --resume nothing", "result = cli.main(['train', '--resume', '--out', tempfile.mkdtemp()])",
         "refused", "argument --resume"),
    *[Case(f"demo {' '.join(flags)}", f"result = cli.main(['demo', *{flags!r}])", "refused", f"argument {flags[0]}")
      for flags in (["--epochs", "0"], ["--epochs", "-1"], ["--depth", "-1"], ["--every", "0"], ["--width", "0"],
                    ["--lr", "inf"], ["--seed", str(2**70)])],
    Case("report of nothing", "result = cli.main(['report', tempfile.mkdtemp()])", "refused", "argument run_dir"),
    Case("report of a file", "result = cli.main(['report', tempfile.mkstemp()[1]])", "refused", "argument run_dir"),
]


@pytest.fixture(scope="module")
def context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "pfc_fast", "pfc_fast.app.cli"])
    return context


def _cases():
    generated = [(case, seed) for seed in range(3) for case in _generated_cases(seed)]
    return [(case, 0) for case in CASES] + generated


@pytest.mark.parametrize("case,seed", _cases(), ids=lambda value: value.id if isinstance(value, Case) else f"s{value}")
def test_fuzz_case(context, case, seed):
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_run, args=(case, seed, sender))
    process.start()
    sender.close()
    ready = receiver.poll(TIMEOUT)
    try:
        report = receiver.recv() if ready else None
    except EOFError:  # the process died before it could report
        report = None
    process.join(5 if ready else 0)
    if process.is_alive():
        process.kill()
        process.join()
        assert report is not None, f"hang: no outcome after {TIMEOUT:g} s"
    assert report is not None, f"crash: the process ended with exit code {process.exitcode} and no outcome"
    verdict = _verdict(case, report)
    assert verdict is None, verdict
