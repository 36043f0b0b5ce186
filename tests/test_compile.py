"""``torch.compile(fullgraph=True)`` of ``NCAccumulator.update``: both passes trace whole (the first
batch's set-up too, no graph break, no host sync) and give the metrics of eager ``nc_metrics``; the
checks that need host values (class indices in range, finite features) run at ``next_pass()`` and
``compute()``.

Compiling is slow, so one compiled step per backend is shared by the module (``steps``), and the
inductor backend (code generated and compiled) runs one case; the others run on ``aot_eager``
(Dynamo's graph, functionalised and traced with the fake kernels, run eagerly), which checks the
same tracing in a fraction of the time; the scale arithmetic has an inductor case of its own.
"""
import dataclasses
import math

import pytest
import torch
import torch._dynamo.testing

import pfc_fast
from pfc_fast import metrics

from conftest import assert_metrics_close, make_features, seed_for, seed_simt_block_order

K, D = 6, 24


def _update(acc, feats, labels, predictions=None):
    acc.update(feats, labels, predictions)


@pytest.fixture(scope="module")
def steps():
    """``_update`` compiled with fullgraph=True for "inductor" and "aot_eager" (counting its
    compiled frames); a recompile beyond the limit fails instead of running eagerly."""
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        yield {"inductor": torch.compile(_update, fullgraph=True),
               "aot_eager": torch.compile(_update, fullgraph=True, backend=counter), "counter": counter}
        torch._dynamo.reset()


def _batches(n, size):
    """Index ranges of batches of ``size`` rows, the last one smaller (a new batch size)."""
    assert n % size
    return [slice(start, start + size) for start in range(0, n, size)]


def _passes(step, acc, feats, labels, size, predictions=None, scales=None):
    """Both passes of ``acc`` over ``feats`` in batches of ``size`` (batch ``j`` times ``scales[j]``), then compute()."""
    for first in (True, False):
        for j, rows in enumerate(_batches(feats.shape[0], size)):
            batch = feats[rows] if scales is None else feats[rows] * scales[j]
            step(acc, batch, labels[rows], None if first or predictions is None else predictions[rows])
        if first:
            acc.next_pass()
    return acc.compute()


def _eager(acc, *args):
    return acc.update(*args)


def _data(name, n=700, dtype=torch.float32):
    """Features with classifier, bias and predictions (about 1 in 7 off the labels); class 2 absent."""
    feats, labels = make_features(n, D, K, seed=seed_for("compile", name), dtype=dtype, absent=(2,))
    gen = torch.Generator().manual_seed(seed_for("compile", name, "classifier"))
    weight, bias = torch.randn(K, D, generator=gen, dtype=torch.float64), torch.randn(K, generator=gen, dtype=torch.float64)
    predictions = torch.where(torch.rand(n, generator=gen) < 1 / 7, torch.randint(0, K, (n,), generator=gen), labels)
    return feats, labels, weight, bias, predictions


def test_inductor_passes_equal_eager(steps):
    """float32 features, classifier and bias, predictions in the second pass, an absent class,
    batches of 256 and a last one of 188: the numbers of nc_metrics, and exactly those of the eager
    accumulator fed the same batches (the kernels are the same; only the glue is compiled)."""
    feats, labels, weight, bias, predictions = _data("inductor")
    compiled = _passes(steps["inductor"], pfc_fast.NCAccumulator(K, classifier=weight, bias=bias), feats, labels, 256,
                       predictions)
    eager = _passes(_eager, pfc_fast.NCAccumulator(K, classifier=weight, bias=bias), feats, labels, 256, predictions)
    whole = pfc_fast.nc_metrics(feats, labels, num_classes=K, classifier=weight, bias=bias, predictions=predictions)
    assert compiled.nc4 is not None and compiled.class_counts[2] == 0
    assert_metrics_close(compiled, whole.to_dict(), rtol=1e-10)
    assert compiled.to_dict() == eager.to_dict()


@pytest.mark.parametrize("factor", [1.0, 2.0 ** -400, 3e150], ids=["1", "2^-400", "3e150"])
def test_float64_features_rescaled_exactly(steps, factor):
    """float64 features times 2^-400 or 3e150, nc4 from the classifier's argmax: the numbers of
    nc_metrics; batches of mixed magnitudes (one batch times the factor: the sums so far rescaled
    by the power-of-two ratio on the device) exactly those of the eager accumulator."""
    feats, labels, weight, bias, _ = _data("float64", dtype=torch.float64)
    feats = feats * factor
    step = steps["aot_eager"]
    compiled = _passes(step, pfc_fast.NCAccumulator(K, classifier=weight, bias=bias * factor), feats, labels, 256)
    whole = pfc_fast.nc_metrics(feats, labels, num_classes=K, classifier=weight, bias=bias * factor)
    assert compiled.nc4 is not None
    assert_metrics_close(compiled, whole.to_dict(), rtol=1e-10, abs_tol=0.0)
    mixed = [1.0, 1.0 / factor, 1.0]
    results = [_passes(update, pfc_fast.NCAccumulator(K), feats, labels, 256, scales=mixed) for update in (step, _eager)]
    assert results[0].to_dict() == results[1].to_dict()


@pytest.mark.parametrize("magnitude", [0.0, 5e-324, 1e-310, 2.0 ** -241, 2.0 ** -240, 1.0, 2.0 ** 240,
                                       1.5 * 2.0 ** 240, 3e150, 1e300, 2.0 ** 1023, 1.7976931348623157e308])
def test_power_of_two_scale_compiled(magnitude):
    """The scale of float64 features, computed on the device (frexp and exponent bits), compiled
    by inductor: exactly the power of two of math.frexp / math.ldexp."""
    expected = 1.0
    if magnitude != 0.0 and not 2.0 ** -240 <= magnitude <= 2.0 ** 240:
        expected = math.ldexp(1.0, min(-math.frexp(magnitude)[1], 1000))
    scale = torch.compile(metrics._power_of_two_scale, fullgraph=True)
    value = torch.tensor(magnitude, dtype=torch.float64)
    assert float(scale(value)) == float(metrics._power_of_two_scale(value)) == expected


@pytest.mark.simt
@pytest.mark.skipif(not pfc_fast.build_info()["simt"], reason="pfc_fast built without the SIMT layer: simt case not run")
def test_compiled_through_simt(steps, request):
    """Under use_simt the compiled update runs the SIMT layer's kernels: the eager accumulator's
    numbers (to rounding: the blocks run in another shuffled order)."""
    feats, labels, weight, bias, predictions = _data("simt", n=180)
    seed_simt_block_order(request)
    with pfc_fast.use_simt():
        results = [_passes(update, pfc_fast.NCAccumulator(K, classifier=weight, bias=bias), feats, labels, 64,
                           predictions) for update in (steps["aot_eager"], _eager)]
        whole = pfc_fast.nc_metrics(feats, labels, num_classes=K, classifier=weight, bias=bias, predictions=predictions)
    assert_metrics_close(results[0], results[1].to_dict(), rtol=1e-12)
    assert_metrics_close(results[0], whole.to_dict(), rtol=1e-10)


def test_other_data_compiles_nothing_new(steps):
    """A new accumulator of other data (other class means, so another score bound of the second
    pass) and of another magnitude (another power-of-two scale) reuses the compiled graphs."""
    step, counter = steps["aot_eager"], steps["counter"]
    for name, factor in (("reuse", 1e100), ("again", 1e-100)):
        feats, labels, weight, bias, predictions = _data(name, dtype=torch.float64)
        before = counter.frame_count
        _passes(step, pfc_fast.NCAccumulator(K, classifier=weight, bias=bias), feats * factor, labels, 256, predictions)
    assert counter.frame_count == before


def _first_pass(step, acc, feats, labels):
    for rows in _batches(feats.shape[0], 256):
        step(acc, feats[rows], labels[rows])


@pytest.mark.parametrize("mode", ["aot_eager", "eager"])
def test_bad_class_indices_raise_at_next_pass_and_compute(steps, mode):
    """Labels and predictions out of range pass through update (clamped: no kernel reads out of
    bounds), compiled or not, and are refused, with their range over the pass, by next_pass()
    (first-pass labels) and compute() (second-pass labels, predictions)."""
    step = steps.get(mode, _eager)
    feats, labels, weight, bias, predictions = _data("bad-labels")
    bad = labels.clone()
    bad[3], bad[600] = -1, K + 4  # in the first and the last batch
    acc = pfc_fast.NCAccumulator(K)
    _first_pass(step, acc, feats, bad)
    with pytest.raises(ValueError, match=rf"^labels must lie in \[0, {K}\) \(num_classes = {K}\); found values in "
                                         rf"\[-1, {K + 4}\]$"):
        acc.next_pass()
    for second_labels, second_predictions, name in ((bad, predictions, "labels"), (labels, bad, "predictions")):
        acc = pfc_fast.NCAccumulator(K, classifier=weight, bias=bias)
        _first_pass(step, acc, feats, labels)
        acc.next_pass()
        for rows in _batches(feats.shape[0], 256):
            step(acc, feats[rows], second_labels[rows], second_predictions[rows])
        with pytest.raises(ValueError, match=rf"^{name} must lie in \[0, {K}\) .* found values in \[-1, {K + 4}\]$"):
            acc.compute()


@pytest.mark.parametrize("mode", ["aot_eager", "eager"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_features_raise_at_next_pass_and_compute(steps, value, mode):
    """NaN or Inf in a first-pass batch reach the class sums (next_pass() raises), in a second-pass
    batch the residual sums (compute() raises), compiled or not."""
    step = steps.get(mode, _eager)
    feats, labels, _, _, _ = _data("non-finite")
    bad = feats.clone()
    bad[300, 5] = value
    acc = pfc_fast.NCAccumulator(K)
    _first_pass(step, acc, bad, labels)
    with pytest.raises(ValueError, match="^feats contains NaN or Inf values$"):
        acc.next_pass()
    acc = pfc_fast.NCAccumulator(K)
    _first_pass(step, acc, feats, labels)
    acc.next_pass()
    _first_pass(step, acc, bad, labels)
    with pytest.raises(ValueError, match="^feats contains NaN or Inf values$"):
        acc.compute()


def test_no_graph_breaks():
    """torch._dynamo.explain of every kind of update call (the first batch, later ones, the second
    pass with and without predictions): one graph, no break."""
    feats, labels, weight, bias, predictions = _data("explain", dtype=torch.float64)
    acc = pfc_fast.NCAccumulator(K, classifier=weight, bias=bias)
    calls = [(feats[:256], labels[:256]), (feats[256:] * 1e200, labels[256:])]
    explanations = [torch._dynamo.explain(_update)(acc, *call) for call in calls]
    acc.next_pass()
    calls = [(feats[:256], labels[:256], predictions[:256]), (feats[256:] * 1e200, labels[256:])]
    explanations += [torch._dynamo.explain(_update)(acc, *call) for call in calls]
    for explanation in explanations:
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
    whole = pfc_fast.nc_metrics(torch.cat([feats[:256], feats[256:] * 1e200]), labels, num_classes=K,
                                classifier=weight, bias=bias)
    # nc4 of two decision sources (predictions, then the classifier) is no one call's
    assert_metrics_close(dataclasses.replace(acc.compute(), nc4=None), whole.to_dict() | {"nc4": None}, rtol=1e-10)


def test_residual_stats_of_error_tensor_passes_opcheck():
    """The Python op that the compiled second pass calls (score_error a tensor): schema, fake kernel
    and the C++ kernel's numbers."""
    feats, labels, weight, bias, _ = _data("opcheck", n=120)
    acc = pfc_fast.NCAccumulator(K, classifier=weight, bias=bias)
    acc.update(feats, labels)
    acc.next_pass()
    second = acc._second
    args = (feats, labels, second.means, second.proj, second.mean_coords, second.ncc_bias, second.score_error,
            second.logit_offset, None, False)
    torch.library.opcheck(torch.ops.pfc_fast.residual_stats_of_error_tensor.default, args)
    expected = torch.ops.pfc_fast.residual_stats(*args[:6], float(second.score_error), *args[7:9])
    for ours, theirs in zip(torch.ops.pfc_fast.residual_stats_of_error_tensor(*args), expected):
        assert torch.equal(ours, theirs)


def test_accumulators_of_two_dimensions_compile_with_inductor():
    """A second D compiles with dynamic=False, as the docstring says (with a dynamic D the pass
    tally's 64-bit draws, seeded by D, overflow inductor's int64 arithmetic: a known limitation)."""
    torch._dynamo.reset()
    for dim in (8, 16):
        feats, labels = make_features(64, dim, 4, seed=seed_for("two dims", dim))
        acc = pfc_fast.NCAccumulator(4)
        update = torch.compile(acc.update, fullgraph=True, dynamic=False)
        update(feats, labels)
        acc.next_pass()
        update(feats, labels)
        assert_metrics_close(acc.compute(), pfc_fast.nc_metrics(feats, labels, num_classes=4).to_dict(), rtol=1e-10)


def test_the_null_says_that_it_does_not_compile():
    feats, labels = make_features(32, 4, 3, seed=seed_for("null compile"))
    acc = pfc_fast.NCAccumulator(3, null_permutations=2)
    with pytest.raises(Exception, match="null_permutations > 0 draws its permutations on the host"):
        torch.compile(acc.update, fullgraph=True, backend="aot_eager")(feats, labels)
