"""``python -m benchmarks`` (run in the repository root): time pfc_fast against its baselines.

Runs the benchmark groups (``nc``: :mod:`benchmarks.nc_metrics_bench`, ``stream``:
:mod:`benchmarks.stream_bench`, ``sinkhorn``: :mod:`benchmarks.sinkhorn_bench`, ``monitor``:
:mod:`benchmarks.monitor_bench`) at a size preset
(``--quick``: the acceptance targets and short sweeps, a few minutes on a 2-core CPU; default: the
full sweep of the device), printing a line per case as it goes, then the tables: each case's
params, the median time of ours and of every baseline (speed-up = baseline / fastest of ours, same
run), and on a GPU the fraction of the floor (memory bandwidth or arithmetic) ours reached. On the
CPU it states whether the acceptance targets pass. Writes ``bench-<machine>.json``, ``.md`` and
``.png`` (time against size, log-log) to ``--out`` (default ``benchmarks/results/``), the machine
being the GPU's name or the CPU's model and thread count. Where that machine's files exist (the
committed results), a run writes new ones beside them, ``bench-<machine>-<date>``, unless
``--replace`` says to overwrite them.

A group may define ``outcome(case, inputs, name, output)``: what the last timed run of a contender
reached (the time-to-tolerance table: its marginal error, iterations and whether it reached the
tolerance), kept in the results beside its time.

``--readme`` runs nothing: it rewrites README.md's generated performance section from the
``bench-*.json`` files of ``--out`` (:mod:`benchmarks.readme`).

Timing: one warm-up run, then up to ``repeat`` runs while the contender's time stays under a
budget (``TIMING``), median reported; synchronised on CUDA.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

import pfc_fast
from pfc_fast.app.flags import positive_int

from .baselines import ot
from .cases import GROUPS, SIZES, check_size, group_module, input_skip_reason, skip_reason
from .plot import plot
from .readme import update_readme
from .render import bytes_text, outcome_text, ratio_text, report_markdown, seconds_text
from .timing import device_name, device_rates, machine_name, peak_memory, run_times

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(os.path.dirname(HERE), "README.md")
#: ``{size: (repeat, budget in seconds per contender)}``.
TIMING = {"tiny": (1, 0.0), "quick": (3, 6.0), "full": (5, 20.0)}


def add_arguments(parser):
    """The flags of ``python -m benchmarks``."""
    parser.add_argument("--quick", action="store_true", help="the quick subset: acceptance targets and short "
                        "sweeps (minutes on a 2-core CPU)")
    parser.add_argument("--sizes", choices=SIZES, help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=positive_int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", default=RESULTS, help="directory of the results files (default benchmarks/results)")
    parser.add_argument("--only", nargs="+", choices=tuple(GROUPS), help="run these groups only (default: all)")
    parser.add_argument("--replace", action="store_true", help="overwrite this machine's bench-<machine> files in "
                        "--out (default: write bench-<machine>-<date> files beside them)")
    parser.add_argument("--readme", action="store_true", help="run nothing; rewrite README.md's performance "
                        "section from the bench-*.json files of --out")
    return parser


def _command(sizes, device, groups):
    words = ["python -m benchmarks"]
    words += ["--quick"] if sizes == "quick" else ([] if sizes == "full" else [f"--sizes {sizes}"])
    words.append(f"--device {device.type}")
    if device.type == "cpu":
        words.append(f"--threads {torch.get_num_threads()}")
    if groups is not None:
        words.append("--only " + " ".join(groups))
    return " ".join(words)


def _say(text):
    print(text, flush=True)


def _time_contender(module, case, inputs, name, device, sizes, rates):
    """The results entry of one contender: ``{"seconds", "min_s", "runs"[, "floor_s"]}`` or ``{"skipped"}``."""
    contender = module.CONTENDERS[name]
    reason = skip_reason(case, contender, device)
    if reason:
        return {"skipped": reason}
    repeat, budget = TIMING[sizes]
    fn = module.runner(case, inputs, name)
    last = []  # the last run's output, for the group's outcome()

    def keeping():
        last[:] = [fn()]

    try:
        times = run_times(keeping, device, repeat, budget)
        peak = peak_memory(fn, device) if module.TABLES[case.table].with_memory else None
    except (torch.OutOfMemoryError, MemoryError) as error:
        return {"skipped": f"out of memory ({str(error).splitlines()[0][:120]})"}
    entry = {"seconds": statistics.median(times), "min_s": min(times), "runs": len(times)}
    found = module.outcome(case, inputs, name, last[0]) if hasattr(module, "outcome") else None
    if found is not None:
        entry["outcome"] = found
    if peak is not None:
        entry["peak_bytes"] = peak
    floor = module.floor(case, name, rates)
    if floor is not None:
        entry["floor_s"] = floor
    return entry


def _entry_text(entry, label, ours):
    if "skipped" in entry:
        return f"    {label}: not run: {entry['skipped']}"
    runs = f"{entry['runs']} run" + ("s" if entry["runs"] > 1 else "")
    text = f"    {label}: {seconds_text(entry['seconds'])} ({runs})"
    if "peak_bytes" in entry:
        text += f", peak {bytes_text(entry['peak_bytes'])}"
    if "outcome" in entry:
        text += f", {outcome_text(entry['outcome'])}"
    return text + (f", {ratio_text(entry['seconds'] / ours)} ours" if ours else "")


def _targets(result, modules):
    """The acceptance targets of the device that this run measured."""
    found = []
    for module in modules:
        for target in module.TARGETS:
            if target.device != result["device"]:
                continue
            case = next((c for c in result["cases"] if c["table"] == target.table and c["params"] == target.params),
                        None)
            if case is None:
                continue
            ours = [case["results"][n]["seconds"] for n in target.ours if "seconds" in case["results"].get(n, {})]
            baseline = case["results"].get(target.baseline, {}).get("seconds")
            speedup = baseline / min(ours) if ours and baseline else None
            found.append({"text": target.text, "minimum": target.minimum, "speedup": speedup,
                          "passed": None if speedup is None else speedup >= target.minimum})
    return found


def run(device, sizes, groups=None):
    """Run the benchmarks of ``groups`` (default all) at size preset ``sizes`` on ``device``;
    returns the results dict (what ``bench-<machine>.json`` holds)."""
    check_size(sizes)
    started, clock = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    modules = [group_module(group) for group in dict.fromkeys(groups or GROUPS)]
    rates = device_rates(device)
    result = {
        "schema": 1, "machine": machine_name(device), "device": device.type, "device_name": device_name(device),
        "threads": torch.get_num_threads(), "sizes": sizes, "command": _command(sizes, device, groups),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "pot": None if ot is None else ot.__version__, "pfc_fast": pfc_fast.__version__},
        "build": pfc_fast.build_info(), "rates": rates, "tables": {}, "cases": [],
    }
    work = [(module, case) for module in modules for case in module.cases(device.type, sizes)]
    for module in modules:
        for name, table in module.TABLES.items():
            names = []
            for _, case in work:
                names += [n for n in case.contenders if case.table == name and n not in names]
            result["tables"][name] = table.to_dict(module.CONTENDERS, names)
    for index, (module, case) in enumerate(work, 1):
        _say(f"[{index}/{len(work)}] {case.table} {case.id}")
        entry = {"group": case.group, "table": case.table, "id": case.id, "series": list(case.series),
                 "params": case.params, "results": {}}
        reason = input_skip_reason(case, device)
        inputs = None if reason else module.make_inputs(case, device)
        ours = []  # the contenders of ours come first
        for name in case.contenders:
            contender = module.CONTENDERS[name]
            measured = ({"skipped": reason} if reason else
                        _time_contender(module, case, inputs, name, device, sizes, rates))
            if contender.role == "ours" and "seconds" in measured:
                ours.append(measured["seconds"])
            _say(_entry_text(measured, contender.label, min(ours) if ours and contender.role == "baseline" else None))
            entry["results"][name] = measured
        result["cases"].append(entry)
        del inputs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["targets"] = _targets(result, modules)
    result["seconds"] = time.perf_counter() - clock
    return result


def write(result, out, replace=False):
    """Write ``bench-<machine>.json``, ``.md`` and ``.png`` to ``out``; returns their paths. Where
    that machine's JSON exists and not ``replace``, the files are ``bench-<machine>-<date>`` (with
    ``-2``, ``-3``, ... where that exists too)."""
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"bench-{result['machine']}")
    if not replace and os.path.exists(stem + ".json"):
        dated = stem + "-" + "".join(c for c in result["date"] if c.isdigit())
        stem, copy = dated, 1
        while os.path.exists(stem + ".json"):
            copy += 1
            stem = f"{dated}-{copy}"
    with open(stem + ".json", "w") as handle:
        json.dump(result, handle, indent=1)
        handle.write("\n")
    with open(stem + ".md", "w") as handle:
        handle.write(report_markdown(result))
    plot(result, stem + ".png")
    return [stem + ".json", stem + ".md", stem + ".png"]


def run_cli(args, parser):
    """``python -m benchmarks`` with parsed ``args``; errors go through ``parser.error``."""
    if args.readme:
        changed = update_readme(README, args.out)
        _say(f"{README}: performance section {'rewritten' if changed else 'unchanged'} from {args.out}/bench-*.json")
        return 0
    if args.quick and args.sizes not in (None, "quick"):
        parser.error("argument --quick: not allowed with --sizes")
    sizes = "quick" if args.quick else (args.sizes or "full")
    if args.threads:
        torch.set_num_threads(args.threads)
    with_cuda = torch.cuda.is_available() and pfc_fast.build_info()["cuda"]
    device = torch.device(args.device or ("cuda" if with_cuda else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda asked for, but torch sees no CUDA device")
    if device.type == "cuda" and not pfc_fast.build_info()["cuda"]:
        parser.error("argument --device: pfc_fast was built without its CUDA kernels (build with FORCE_CUDA=1)")
    result = run(device, sizes, args.only)
    paths = write(result, args.out, args.replace)
    _say("")
    _say(report_markdown(result))
    _say("written " + ", ".join(paths))
    return 0


def main(argv=None, prog="python -m benchmarks"):
    """The command line; ``argv`` defaults to ``sys.argv[1:]``."""
    parser = add_arguments(argparse.ArgumentParser(
        prog=prog, description="Time pfc_fast against its baselines; write bench-<machine>.{json,md,png}."))
    return run_cli(parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
