"""The permutation null (nc_metrics / NCAccumulator / PFCMonitor ``null_permutations``): each
permuted labelling's metrics, computed by one product per batch for all of them, against the exact
path (nc_metrics on the permuted labels, the second-pass kernel) on fresh random inputs; its
statistics on pure noise and on collapsed features; the batch-order and few-classes checks; the
D >= N warning; bad arguments."""
import math
import warnings

import pytest
import torch

import pfc_fast
from pfc_fast.metrics import FewSamplesWarning, _splitmix64

from conftest import make_features, seed_for

COUNTS = ("num_samples", "class_counts", "num_classes", "dim", "null_mean", "null_std")


def _permutations(sizes, permutations, seed):
    """The documented draw: batch b's R permutations from a generator seeded by SplitMix64(seed)'s
    (b + 1)-th number (shifted right by one bit)."""
    orders = []
    for batch, size in enumerate(sizes):
        generator = torch.Generator().manual_seed(_splitmix64(seed, batch + 1)[-1] >> 1)
        orders.append([torch.randperm(size, generator=generator) for _ in range(permutations)])
    return orders


def _expected_null(feats, labels, sizes, permutations, seed, **kwargs):
    """mean and std (ddof 1) over the permutations of nc_metrics on the labels permuted batch by batch."""
    orders = _permutations(sizes, permutations, seed)
    starts = [sum(sizes[:b]) for b in range(len(sizes))]
    runs = []
    for r in range(permutations):
        permuted = torch.cat([labels[start:start + size][orders[b][r].to(labels.device)]
                              for b, (start, size) in enumerate(zip(starts, sizes))])
        runs.append(pfc_fast.nc_metrics(feats, permuted, **kwargs).to_dict())
    names = [k for k in runs[0] if k not in COUNTS and all(run[k] is not None for run in runs)]
    values = {k: torch.tensor([float(run[k]) for run in runs], dtype=torch.float64) for k in names}
    return ({k: float(v.mean()) for k, v in values.items()},
            {k: float(v.std()) if permutations > 1 else 0.0 for k, v in values.items()})


def _assert_null_close(null_mean, null_std, expected, rtol=1e-9):
    mean, std = expected
    assert set(null_mean) == set(mean) and set(null_std) == set(std)
    for name in mean:
        assert math.isclose(null_mean[name], mean[name], rel_tol=rtol, abs_tol=1e-12), (name, null_mean[name], mean[name])
        assert math.isclose(null_std[name], std[name], rel_tol=1e-6, abs_tol=1e-12), (name, null_std[name], std[name])


CASES = [  # (N, D, K, options)
    (600, 40, 6, {}),
    (400, 3, 8, {}),  # D < K - 1: the D x D scatter
    (500, 64, 5, {"global_mean": "weighted"}),
    (300, 700, 4, {}),  # D >= N
]


@pytest.mark.parametrize("n,d,k,options", CASES)
def test_nc_metrics_null_equals_the_exact_metrics_of_permuted_labels(device, n, d, k, options):
    seed = seed_for("null", n, d, k)
    feats, labels = make_features(n, d, k, seed=seed, device=device, absent=(k - 1,) if k > 5 else ())
    gen = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(k, d, generator=gen).to(device), torch.randn(k, generator=gen).to(device)
    predictions = (feats.double() @ weight.double().T + bias.double()).argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewSamplesWarning)
        m = pfc_fast.nc_metrics(feats, labels, num_classes=k, classifier=weight, bias=bias, null_permutations=3,
                                null_seed=seed, **options)
        expected = _expected_null(feats, labels, [n], 3, seed, num_classes=k, classifier=weight, bias=bias,
                                  predictions=predictions, **options)
    _assert_null_close(m.null_mean, m.null_std, expected)
    plain = pfc_fast.nc_metrics(feats, labels, num_classes=k, classifier=weight, bias=bias, **options) \
        if d < n else None
    if plain is not None:  # the null changes nothing of the metrics themselves
        assert {key: v for key, v in m.to_dict().items() if not key.startswith("null")} == \
            {key: v for key, v in plain.to_dict().items() if not key.startswith("null")}


def _two_passes(acc, feats, labels, sizes):
    """``acc.compute()`` after both passes over the batches of ``sizes``, in order."""
    for _ in range(2):
        for piece_feats, piece_labels in zip(feats.split(sizes), labels.split(sizes)):
            acc.update(piece_feats, piece_labels)
        if acc.current_pass == 1:
            acc.next_pass()
    return acc.compute()


def test_accumulator_null_permutes_within_batches_and_rescales(device):
    seed = seed_for("null batches")
    feats, labels = make_features(900, 24, 5, seed=seed, device=device, dtype=torch.float64)
    feats = feats * 2.0 ** -400  # the power-of-two rescaling applies to every labelling
    sizes = [400, 300, 200]
    m = _two_passes(pfc_fast.NCAccumulator(5, null_permutations=4, null_seed=7), feats, labels, sizes)
    _assert_null_close(m.null_mean, m.null_std, _expected_null(feats, labels, sizes, 4, 7, num_classes=5))
    assert m.null_mean["nc1"] > 10 * m.nc1  # separated classes: far below the null
    repeated = _two_passes(pfc_fast.NCAccumulator(5, null_permutations=4, null_seed=7), feats, labels, sizes)  # the same seed, the same permutations (to the last bits the simt blocks' order moves)
    _assert_null_close(repeated.null_mean, repeated.null_std, (m.null_mean, m.null_std), rtol=1e-12)


def test_pure_noise_is_indistinguishable_from_its_null():
    """Random labels on Gaussian noise in D >> n_c: raw nc1 looks collapsed, and so does its null."""
    gen = torch.Generator().manual_seed(seed_for("noise null"))
    feats = torch.randn(500, 2000, generator=gen)
    labels = torch.randperm(500, generator=gen) % 10
    with pytest.warns(FewSamplesWarning, match=r"feats has D = 2000 >= N = 500 samples.*compare the metrics"):
        m = pfc_fast.nc_metrics(feats, labels, null_permutations=8)
    for name in ("nc1", "nc2_etf", "ncc_accuracy"):
        assert abs(getattr(m, name) - m.null_mean[name]) <= 6 * m.null_std[name], name  # exchangeable: t, 7 d.o.f.
    assert m.ncc_accuracy >= 0.99 and m.null_mean["ncc_accuracy"] >= 0.99  # noise "collapsed" by every labelling


def test_the_second_pass_must_feed_the_batches_in_order():
    feats, labels = make_features(200, 8, 4, seed=seed_for("null order"))
    acc = pfc_fast.NCAccumulator(4, null_permutations=2)
    acc.update(feats[:100], labels[:100])
    acc.update(feats[100:], labels[100:])
    acc.next_pass()
    acc.update(feats[100:], labels[100:])
    acc.update(feats[:100], labels[:100])
    with pytest.raises(ValueError, match=r"same order .* batch\(es\) \[0, 1\] differ"):
        acc.compute()


def test_batches_of_one_class_warn_that_nothing_is_permuted():
    gen = torch.Generator().manual_seed(seed_for("null sorted"))
    feats, labels = torch.randn(300, 8, generator=gen), torch.arange(300) // 100  # a loader sorted by class
    acc = pfc_fast.NCAccumulator(3, null_permutations=2)
    for piece in range(3):
        acc.update(feats[piece * 100:(piece + 1) * 100], labels[piece * 100:(piece + 1) * 100])
    with pytest.warns(UserWarning, match=r"kept \d+% of the labels in place .* shuffle the loader"):
        acc.next_pass()


def test_the_monitor_measures_the_null_by_default_and_warns_where_d_exceeds_n():
    from pfc_fast.app.models import small_image_resnet

    torch.manual_seed(seed_for("null monitor"))
    gen = torch.Generator().manual_seed(seed_for("null monitor data"))
    images, labels = torch.randn(40, 1, 8, 8, generator=gen), torch.randperm(40, generator=gen) % 4
    model = small_image_resnet("resnet18", 4, in_channels=1, width=4).eval()
    with pytest.warns(FewSamplesWarning, match="features of layer 'stem' has D = 256 >= N = 40"):
        result = pfc_fast.PFCMonitor(model, num_classes=4).measure([(images[:20], labels[:20]), (images[20:], labels[20:])])
    assert all(m.null_mean is not None and len(m.null_std) == len(m.null_mean) for m in result.layers.values())
    none = pfc_fast.PFCMonitor(model, num_classes=4, null_permutations=0, pooling="gap").measure([(images, labels)])
    assert all(m.null_mean is None for m in none.layers.values())


def test_null_on_the_simt_layer_equals_the_cpu():
    if not pfc_fast.build_info()["simt"]:
        pytest.skip("this build has no SIMT layer")
    feats, labels = make_features(300, 30, 5, seed=seed_for("null simt"))
    cpu = pfc_fast.nc_metrics(feats, labels, null_permutations=3)
    with pfc_fast.use_simt():
        simt = pfc_fast.nc_metrics(feats, labels, null_permutations=3)
    _assert_null_close(simt.null_mean, simt.null_std, (cpu.null_mean, cpu.null_std), rtol=1e-10)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"null_permutations": -1}, ValueError, "null_permutations must be >= 0"),
    ({"null_permutations": 2.0}, TypeError, "null_permutations must be an integer"),
    ({"null_permutations": True}, TypeError, "null_permutations must be an integer"),
    ({"null_permutations": 2, "null_seed": -3}, ValueError, "null_seed must be >= 0"),
    ({"null_permutations": 2, "null_seed": 2 ** 64}, ValueError, "null_seed must be < 2\\*\\*64"),
])
def test_bad_null_arguments(kwargs, error, match):
    feats, labels = make_features(50, 4, 3, seed=1)
    with pytest.raises(error, match=match):
        pfc_fast.nc_metrics(feats, labels, **kwargs)
    with pytest.raises(error, match=match):
        pfc_fast.NCAccumulator(3, **kwargs)
