"""Shared fixtures: data generators and the device parameter.

``device`` is ``cpu`` (the C++ kernels), ``cuda`` (the CUDA kernels on a GPU; skipped visibly
without one) and ``simt`` (the same CUDA kernels run on CPU tensors by the SIMT layer, through
``pfc_fast.use_simt``; skipped visibly where pfc_fast._simt was not built).

``SESSION_SEED`` (``PFC_FAST_TEST_SEED``, random per session unless set, shown in pytest's header)
seeds, with the test's name or parameters, the simt cases' block order and the fresh data of the
tests that draw it (``seed_for``), so a failure replays with the seed the header showed.
"""
import math
import os
import random
import sys
import zlib

import pytest
import torch

import pfc_fast

# benchmarks/ and experiments/ for tests run from outside the source tree (against an installed
# wheel): appended, so an installed pfc_fast still comes before the checkout's
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

SESSION_SEED = int(os.environ.get("PFC_FAST_TEST_SEED", random.SystemRandom().randrange(2**32)))


def seed_for(*params):
    """A data seed for these test parameters in this session (replayable with PFC_FAST_TEST_SEED)."""
    return (zlib.crc32(repr(params).encode()) ^ SESSION_SEED) % 2**31

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(
                not (torch.cuda.is_available() and pfc_fast.build_info()["cuda"]),
                reason="no CUDA device (or pfc_fast built without CUDA kernels): CUDA case not run",
            ),
        ],
    ),
    pytest.param(
        "simt",
        marks=[
            pytest.mark.simt,
            pytest.mark.skipif(not pfc_fast.build_info()["simt"],
                               reason="pfc_fast built without the SIMT layer (pfc_fast._simt): simt case not run"),
        ],
    ),
]


def pytest_report_header(config):
    simt = "" if pfc_fast.build_info()["simt"] else " (SIMT layer not built: simt cases skipped)"
    return f"data and SIMT block order: PFC_FAST_TEST_SEED={SESSION_SEED}{simt}"


def seed_simt_block_order(request):
    """Seeds the SIMT block order from the session seed and the test's name."""
    from pfc_fast import _simt
    _simt.set_block_order_seed(seed_for(request.node.nodeid))


@pytest.fixture(params=DEVICES)
def device(request):
    """The device of the test's tensors; for ``simt``, CPU tensors with the library routed through the SIMT layer."""
    if request.param != "simt":
        yield torch.device(request.param)
        return
    seed_simt_block_order(request)
    with pfc_fast.use_simt():
        yield torch.device("cpu")


def make_features(n, d, k, *, seed, device="cpu", dtype=torch.float32, spread=1.0, offset=0.0,
                  balanced=False, absent=()):
    """Features ``offset + mu_y + spread * noise`` with labels; classes in ``absent`` never occur.

    Unbalanced by default (class c drawn with probability proportional to c + 1).
    """
    gen = torch.Generator().manual_seed(seed)
    weights = torch.ones(k) if balanced else torch.arange(1, k + 1, dtype=torch.float64)
    for c in absent:
        weights[c] = 0
    labels = torch.multinomial(weights, n, replacement=True, generator=gen)
    means = torch.randn(k, d, generator=gen, dtype=torch.float64)
    feats = offset + means[labels] + spread * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return feats.to(device=device, dtype=dtype), labels.to(device)


def assert_metrics_close(ours, ref, rtol, exact_decisions=True, abs_tol=1e-14):
    """Every field of ``ours`` (NCMetrics) against the reference dict; the permutation null
    (``null_mean``, ``null_std``) only where the reference has one (tests/test_null.py checks it)."""
    ours = ours.to_dict()
    if ref.get("null_mean") is None:
        ours = {key: value for key, value in ours.items() if key not in ("null_mean", "null_std")}
        ref = {key: value for key, value in ref.items() if key not in ("null_mean", "null_std")}
    assert set(ours) == set(ref)
    for name, value in ours.items():
        expected = ref[name]
        if expected is None or value is None:
            assert value is None and expected is None, f"{name}: {value} vs {expected}"
        elif isinstance(expected, float) and not (exact_decisions and name in ("nc4", "ncc_accuracy")):
            assert math.isclose(value, expected, rel_tol=rtol, abs_tol=abs_tol), f"{name}: {value} vs {expected}"
        else:
            assert value == expected, f"{name}: {value} vs {expected}"


def resnet_by_hand(model, x):
    """Stem output and every block output of a torchvision ResNet, and its logits, computed
    explicitly (torchvision's ``_forward_impl`` step by step; timm's ResNets name the stem's
    activation ``act1`` and pool with ``global_pool``, which flattens)."""
    activation = model.relu if hasattr(model, "relu") else model.act1
    pool = model.avgpool if hasattr(model, "avgpool") else model.global_pool
    h = model.maxpool(activation(model.bn1(model.conv1(x))))
    feats = [h]
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            h = block(h)
            feats.append(h)
    return feats, model.fc(torch.flatten(pool(h), 1))


def interrupt_on_call(function, n, signum=None):
    """``function`` that raises KeyboardInterrupt (Ctrl-C) on its n-th call, or with ``signum``
    sends that signal to this process (a plain function, so it also binds as a method)."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            if signum is None:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
        return function(*args, **kwargs)
    return wrapper
