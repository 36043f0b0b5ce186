"""Markdown of benchmark results (the dicts ``benchmarks/results/bench-<machine>.json`` hold): the
report of one run, and tables that gather the rows of several machines (the README's section).

A row shows the case's params, the median time of every contender (per iteration where the table
says so) and, where the table measures it, its peak memory or what it reached (a tolerance), each baseline's speed-up ``baseline
time / time of the fastest of ours`` in the same run,
``ours / reference`` where the table has a reference (a training epoch), and on a GPU the fraction
of the floor each of ours reached (``floor time / measured time``). Skipped contenders point to a
numbered note with the recorded reason.
"""


def _number(value):
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def seconds_text(seconds):
    """``1.23 s``, ``45.6 ms``, ``789 µs``."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{_number(seconds * 1e3)} ms"
    return f"{_number(seconds * 1e6)} µs"


def bytes_text(count):
    """``1.2 GB``, ``34 MB``, ``5.6 kB``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{_number(count / size)} {unit}"
    return f"{count:.0f} B"


def ratio_text(ratio):
    """``454x``, ``24.1x``, ``0.73x``."""
    if ratio >= 100:
        return f"{ratio:.0f}x"
    return f"{ratio:.1f}x" if ratio >= 1 else f"{ratio:.2f}x"


def outcome_text(outcome):
    """``err 3.1e-07, 412 it`` or ``NOT REACHED: err 0.012`` (with the contender's setting, if any,
    e.g. ``, stopThr 1e-07``): what a contender to a tolerance reached."""
    error = outcome["marginal_error"]
    text = f"err {error:.2g}" + (f", {outcome['n_iter']:,} it" if "n_iter" in outcome else "") \
        + (f", {outcome['setting']}" if "setting" in outcome else "")
    if outcome["reached"]:
        return text
    return "NaN" if error != error else f"NOT REACHED: {text}"


def _param_text(value):
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _fastest_ours(case, table):
    times = [case["results"][name]["seconds"] for name, _, role in table["contenders"]
             if role == "ours" and "seconds" in case["results"].get(name, {})]
    return min(times) if times else None


def _row(result, case, table, notes, with_machine, with_floor):
    scale = case["params"]["iterations"] if table["per_iteration"] else 1
    ours = _fastest_ours(case, table)
    cells = [result["machine"]] if with_machine else []
    cells += [_param_text(case["params"].get(key)) for key, _ in table["columns"]]
    reference = None
    for name, _, role in table["contenders"]:
        entry = case["results"].get(name)
        if entry is None:
            cells.append("-")
        elif "seconds" not in entry:
            notes.setdefault(entry["skipped"], len(notes) + 1)
            cells.append(f"not run [{notes[entry['skipped']]}]")
        else:
            text = seconds_text(entry["seconds"] / scale)
            if role == "baseline" and ours:
                text += f" ({ratio_text(entry['seconds'] / ours)})"
            if "peak_bytes" in entry:
                text += f", peak {bytes_text(entry['peak_bytes'])}"
            if "outcome" in entry:
                text += f", {outcome_text(entry['outcome'])}"
            if role == "reference":
                reference = entry["seconds"]
            cells.append(text)
    if any(role == "reference" for _, _, role in table["contenders"]):
        cells.append(f"{100 * ours / reference:.1f}%" if ours and reference else "-")
    if with_floor:
        floors = [f"{label} {100 * case['results'][name]['floor_s'] / case['results'][name]['seconds']:.0f}%"
                  for name, label, _ in table["contenders"] if "floor_s" in case["results"].get(name, {})]
        cells.append(", ".join(floors) or "-")
    return cells


def _has_floor(case):
    return any("floor_s" in entry for entry in case["results"].values())


def table_markdown(results, name, with_machine=False):
    """The markdown table ``name`` with the rows of every result in ``results`` that has it, then
    the notes of the skipped contenders; ``""`` when none has rows."""
    chosen = [(result, case) for result in results if name in result["tables"]
              for case in result["cases"] if case["table"] == name]
    if not chosen:
        return ""
    tables = [result["tables"][name] for result in results if name in result["tables"]]
    contenders = []
    for entry in (entry for t in tables for entry in t["contenders"]):
        if entry[0] not in [known[0] for known in contenders]:
            contenders.append(entry)
    table = {**tables[-1], "contenders": contenders}
    with_floor = any(_has_floor(case) for _, case in chosen)
    notes = {}
    rows = [_row(result, case, table, notes, with_machine, with_floor) for result, case in chosen]
    headers = (["machine"] if with_machine else []) + [header for _, header in table["columns"]]
    headers += [label for _, label, _ in table["contenders"]]
    reference = [label for _, label, role in table["contenders"] if role == "reference"]
    if reference:
        ours = " or ".join(label for _, label, role in table["contenders"] if role == "ours")
        headers.append(f"{ours} / {reference[0]}")
    if with_floor:
        headers.append("floor reached")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    if notes:
        lines.append("")
        lines += [f"- [{number}] {reason}" for reason, number in notes.items()]
    return "\n".join(lines)


def targets_markdown(results, with_machine=False):
    """The acceptance targets of every result that evaluated one; ``""`` when none did."""
    lines = []
    for result in results:
        for target in result.get("targets", []):
            measured = "-" if target["speedup"] is None else ratio_text(target["speedup"])
            verdict = {True: "PASS", False: "FAIL", None: "not measured"}[target["passed"]]
            cells = ([result["machine"]] if with_machine else []) + [
                target["text"], str(result["threads"]), measured, f">= {target['minimum']:g}x", verdict]
            lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    headers = (["machine"] if with_machine else []) + ["target", "threads", "measured", "required", "result"]
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + lines)


def machine_line(result):
    """What and how a result was measured, in one line."""
    versions = result["versions"]
    build = result.get("build", {})
    kernels = build.get("cpu_kernels", "native" if build.get("native", True) else "baseline")
    line = (f"{result['device_name']} ({result['device']}, {result['threads']} threads, {kernels} CPU kernels), "
            f"torch {versions['torch']}, "
            f"POT {versions['pot'] or 'absent'}, {result['date']}, sizes `{result['sizes']}`, "
            f"{result['seconds']:.0f} s: `{result['command']}`")
    rates = result.get("rates")
    if rates:
        line += (f"; measured copy bandwidth {rates['copy_bytes_per_s'] / 1e9:.0f} GB/s, fp32 FMA "
                 f"{rates['fma_per_s'] / 1e12:.1f} T/s, exp {rates['exp_per_s'] / 1e9:.0f} G/s")
    return line


def report_markdown(result):
    """The markdown report of one run."""
    parts = [f"# pfc_fast benchmarks on {result['machine']}", "", machine_line(result)]
    targets = targets_markdown([result])
    if targets:
        parts += ["", "## Targets", "", targets]
    for name, table in result["tables"].items():
        parts += ["", f"## {table['title']}", "", table_markdown([result], name)]
    return "\n".join(parts) + "\n"
