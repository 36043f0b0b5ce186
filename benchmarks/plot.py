"""The PNG of a benchmark run: time against size on log-log axes, one panel per sweep (a series of
cases that vary one numeric param: N, D, K, B), one line per contender (ours solid, baselines
dashed); tables without such a sweep get a bar panel of their cases. Drawn with matplotlib's
object API on its Agg canvas (no pyplot, no display needed)."""
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter


def _swept(series):
    """The param a series varies: its name's first word ("K" and "K at D = 2,048" vary K)."""
    return series.split(" ")[0]


def _panels(result):
    """``[(table name, series or None, cases)]``: a line panel per numeric sweep with two or more
    points, a bar panel (series ``None``) for a table that has none."""
    panels = []
    for name in result["tables"]:
        cases = [case for case in result["cases"] if case["table"] == name]
        names = []
        for case in cases:
            names += [series for series in case["series"] if series not in names]
        lines = []
        for series in names:
            members = [case for case in cases if series in case["series"]]
            param = _swept(series)
            xs = {case["params"].get(param) for case in members}
            if len(xs) > 1 and all(isinstance(x, (int, float)) for x in xs):
                lines.append((name, series, sorted(members, key=lambda case: case["params"][param])))
        panels += lines or ([(name, None, cases)] if cases else [])
    return panels


def _fixed(cases, series):
    """The params every case of a sweep shares, as text."""
    keys = [key for key in cases[0]["params"] if key != _swept(series)]
    same = [key for key in keys if len({str(case["params"][key]) for case in cases}) == 1]
    return ", ".join(f"{key}={cases[0]['params'][key]}" for key in same)


def _seconds(case, contender, table):
    entry = case["results"].get(contender, {})
    if "seconds" not in entry:
        return None
    return entry["seconds"] / (case["params"]["iterations"] if table["per_iteration"] else 1)


def _line_panel(axes, name, table, series, cases):
    for index, (contender, label, role) in enumerate(table["contenders"]):
        points = [(case["params"][_swept(series)], _seconds(case, contender, table)) for case in cases]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            axes.loglog(*zip(*points), marker="o" if role == "ours" else "s", color=f"C{index}",
                        linestyle="-" if role == "ours" else "--", label=label)
    xs = [case["params"][_swept(series)] for case in cases]
    axes.set_xticks(xs)
    axes.set_xticklabels([f"{x:,}" for x in xs], fontsize=7)
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel(_swept(series))
    axes.set_title(f"{name} vs {series}\n({_fixed(cases, series)})", fontsize=9)


def _bar_panel(axes, name, table, cases):
    width = 0.8 / max(1, len(table["contenders"]))
    for index, (contender, label, _) in enumerate(table["contenders"]):
        heights = [_seconds(case, contender, table) or 0.0 for case in cases]
        axes.bar([i + index * width for i in range(len(cases))], heights, width, label=label, color=f"C{index}")
    axes.set_yscale("log")
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    axes.set_xticklabels([case["id"] for case in cases], fontsize=6, rotation=15)
    axes.set_title(name, fontsize=9)


def plot(result, path):
    """Write the figure of ``result`` (a run's results dict) to ``path`` (PNG)."""
    panels = _panels(result)
    columns = min(3, max(1, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    figure = Figure(figsize=(5.2 * columns, 4.0 * rows))
    FigureCanvasAgg(figure)
    for index, (name, series, cases) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        table = result["tables"][name]
        if series is None:
            _bar_panel(axes, name, table, cases)
        else:
            _line_panel(axes, name, table, series, cases)
        axes.set_ylabel("seconds per iteration" if table["per_iteration"] else "seconds per call")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(f"pfc_fast benchmarks on {result['machine']} ({result['sizes']}, {result['date']})")
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    figure.savefig(path, dpi=100)
