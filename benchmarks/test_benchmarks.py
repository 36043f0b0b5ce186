"""pytest-benchmark suite: ``python -m pytest benchmarks/ [--bench-size tiny|quick|full]``.

One test per device, case and contender of :mod:`benchmarks.cases` (the cases ``python -m benchmarks``
runs at the same size preset), grouped by case so pytest-benchmark shows ours beside the
baselines. CUDA cases are listed and skipped, with the reason, where there is no GPU; contenders
that would not fit in memory or would take minutes are skipped with the recorded reason.
"""
import gc

import pytest
import torch

import pfc_fast

from .cases import GROUPS, group_module, input_skip_reason, skip_reason
from .timing import run_times, sync

_CUDA = torch.cuda.is_available() and pfc_fast.build_info()["cuda"]
_CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not _CUDA, reason="no CUDA device (or pfc_fast built without "
                                                    "CUDA kernels): CUDA benchmark not run")]
#: Seconds of timed rounds a slow contender gets (at least one round).
_BUDGET = 10.0
_inputs = {}


def pytest_generate_tests(metafunc):
    if "bench" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--bench-size")
    params = []
    for device in ("cpu", "cuda"):
        for group in GROUPS:
            for case in group_module(group).cases(device, size):
                params += [pytest.param((device, case, name), marks=_CUDA_MARKS if device == "cuda" else [],
                                        id=f"{device}-{case.table}-{case.id}-{name}") for name in case.contenders]
    metafunc.parametrize("bench", params)


def _case_inputs(module, case, device):
    """The inputs of ``case``, made once for all its contenders (the tests run case by case)."""
    key = (device.type, case.table, case.id)
    if key not in _inputs:
        _inputs.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _inputs[key] = module.make_inputs(case, device)
    return _inputs[key]


def test_benchmark(benchmark, bench):
    device_type, case, name = bench
    device = torch.device(device_type)
    module = group_module(case.group)
    reason = input_skip_reason(case, device) or skip_reason(case, module.CONTENDERS[name], device)
    if reason:
        pytest.skip(reason)
    fn = module.runner(case, _case_inputs(module, case, device), name)

    def timed():
        result = fn()
        sync(device)
        return result

    first = run_times(timed, device, 1, budget=0.0)[0]  # the warm-up
    benchmark.group = f"{device_type} {case.table} {case.id}"
    benchmark.extra_info.update(case.params)
    if first < 0.05:
        benchmark(timed)
    else:
        benchmark.pedantic(timed, rounds=max(1, min(5, int(_BUDGET / first))), iterations=1)
