"""What the benchmarks time: contenders (ours and the baselines), cases (the inputs of one row of a
table), the size presets, and why a contender is skipped.

Each group of benchmarks is a module (``GROUPS``) that defines ``TABLES`` (``{name: Table}``),
``CONTENDERS`` (``{name: Contender}``), ``TARGETS`` (``[Target]``) and the functions
``cases(device_type, size)`` (a list of :class:`Case`), ``make_inputs(case, device)``,
``runner(case, inputs, name)`` (the zero-argument callable that is timed) and
``floor(case, name, rates)`` (the least time the device's measured rates allow, or ``None``).
``python -m benchmarks`` (:mod:`benchmarks.report`) and the pytest-benchmark suite
(``benchmarks/test_benchmarks.py``) both run them.

A contender is skipped, with the reason recorded, when its inputs or working memory would take
more than a fraction of the free memory (``MEMORY_FRACTION``), or when its cost (``work``, e.g.
``N D^2`` outer-product entries) is over its limit for the device type: a run would take minutes.
"""
import importlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from pfc_fast._memory import free_bytes

#: Size presets: ``tiny`` (seconds, for the tests), ``quick`` (``python -m benchmarks --quick``: the
#: acceptance targets and short sweeps), ``full`` (the whole sweep of the device).
SIZES = ("tiny", "quick", "full")
#: The groups of benchmarks and their modules.
GROUPS = {"nc": "benchmarks.nc_metrics_bench", "stream": "benchmarks.stream_bench",
          "sinkhorn": "benchmarks.sinkhorn_bench", "monitor": "benchmarks.monitor_bench"}
#: Largest share of the free memory a case may take (the CPU is shared with other processes).
MEMORY_FRACTION = {"cpu": 0.5, "cuda": 0.85}


@dataclass(frozen=True)
class Contender:
    """One thing that is timed.

    ``role``: ``"ours"``, ``"baseline"`` (speed-up = its time / the fastest of ours in the row) or
    ``"reference"`` (a cost ours is compared with, e.g. a training epoch). ``memory(params)``:
    bytes it allocates beyond the case's inputs (``memory_text`` says what). ``work(params)``: a
    cost measure compared with ``work_limit[device type]`` (``work_text`` says what it counts).
    ``unavailable()``: why it cannot run here (a missing package), or ``None``.
    """

    label: str
    role: str
    memory: Optional[Callable[[dict], float]] = None
    memory_text: str = ""
    work: Optional[Callable[[dict], float]] = None
    work_limit: Dict[str, float] = field(default_factory=dict)
    work_text: str = ""
    unavailable: Optional[Callable[[], Optional[str]]] = None


@dataclass(frozen=True)
class Table:
    """How a table shows its cases: ``columns`` ``((param, header), ...)``, times per call or, with
    ``per_iteration``, divided by the case's ``iterations``; ``with_memory``: each contender's peak
    memory is measured in one more run (:func:`benchmarks.timing.peak_memory`) and shown beside its time."""

    title: str
    columns: Tuple[Tuple[str, str], ...]
    per_iteration: bool = False
    with_memory: bool = False

    def to_dict(self, contenders, names):
        return {"title": self.title, "columns": [list(c) for c in self.columns], "per_iteration": self.per_iteration,
                "with_memory": self.with_memory,
                "contenders": [[n, contenders[n].label, contenders[n].role] for n in names]}


@dataclass(frozen=True)
class Target:
    """An acceptance target: on ``device``, the fastest of ``ours`` at ``params`` is at least
    ``minimum`` times faster than ``baseline``."""

    text: str
    device: str
    table: str
    params: dict
    ours: Tuple[str, ...]
    baseline: str
    minimum: float


@dataclass(frozen=True)
class Case:
    """One row of a table: its ``params`` (ordered as the table's columns), the ``series`` (sweeps)
    it belongs to, the ``contenders`` run on it (ours first) and ``input_bytes``, the memory its
    inputs take while they are made."""

    group: str
    table: str
    params: dict
    series: Tuple[str, ...]
    contenders: Tuple[str, ...]
    input_bytes: float = 0.0

    @property
    def id(self):
        return ",".join(f"{key}={value}" for key, value in self.params.items())


def group_module(group):
    """The module of a group of benchmarks (``GROUPS``)."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {', '.join(GROUPS)}, got {group!r}")
    return importlib.import_module(GROUPS[group])


def check_size(size):
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    return size


def sweep(base, sweeps):
    """``[(params, series)]``: ``base`` varied one sweep at a time.

    ``sweeps`` is ``{series: [overrides, ...]}``, each override a dict of params that replace
    ``base``'s (a sweep over N also sets ``iterations``, say). Equal params are one case, in every
    series that reaches it, in order of first appearance.
    """
    found = {}
    for series, overrides in sweeps.items():
        for override in overrides:
            unknown = set(override) - set(base)
            if unknown:
                raise ValueError(f"sweep {series!r}: {sorted(unknown)} are not params of {sorted(base)}")
            params = {**base, **override}
            key = tuple(params.items())
            found.setdefault(key, (params, []))[1].append(series)
    return [(params, tuple(series)) for params, series in found.values()]


def _gigabytes(count):
    return f"{count / 1e9:.1f} GB"


def skip_reason(case, contender, device):
    """Why ``contender`` is not run on ``case`` on ``device``, or ``None``."""
    if contender.unavailable is not None:
        reason = contender.unavailable()
        if reason:
            return reason
    if device.type == "cuda":
        torch.cuda.empty_cache()
    limit = MEMORY_FRACTION[device.type] * free_bytes(device)
    need = contender.memory(case.params) if contender.memory else 0.0
    if need > limit:
        return (f"needs ~{_gigabytes(need)} ({contender.memory_text}), over {_gigabytes(limit)} "
                f"({MEMORY_FRACTION[device.type]:.0%} of the free {device.type} memory)")
    if contender.work is not None:
        work, most = contender.work(case.params), contender.work_limit.get(device.type, math.inf)
        if work > most:
            return f"{contender.work_text} = {work:.1e} > {most:.0e} on {device.type} (a run would take minutes)"
    return None


def input_skip_reason(case, device):
    """Why the inputs of ``case`` are not even made on ``device``, or ``None``."""
    limit = MEMORY_FRACTION[device.type] * free_bytes(device)
    if case.input_bytes > limit:
        return (f"its inputs need ~{_gigabytes(case.input_bytes)}, over {_gigabytes(limit)} "
                f"({MEMORY_FRACTION[device.type]:.0%} of the free {device.type} memory)")
    return None
