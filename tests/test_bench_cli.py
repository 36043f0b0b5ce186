"""``python -m benchmarks`` end to end on the tiny preset (JSON, markdown and PNG written; new files
beside existing ones unless --replace), its argument errors, the acceptance-target verdicts, and
the README generator (idempotent, text outside the markers kept, the committed README equal to
what the committed results give)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from benchmarks import nc_metrics_bench, readme, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert report.main(["--sizes", "tiny", "--device", "cpu", "--out", str(out)]) == 0
    return out


def test_bench_writes_json_markdown_and_plot(tiny_run, capsys):
    paths = sorted(os.listdir(tiny_run))
    assert len(paths) == 3 and {os.path.splitext(p)[1] for p in paths} == {".json", ".md", ".png"}
    stem = os.path.join(tiny_run, os.path.splitext(paths[0])[0])
    with open(stem + ".json") as handle:
        result = json.load(handle)
    assert os.path.basename(stem) == f"bench-{result['machine']}" and result["machine"].endswith("t")
    assert result["sizes"] == "tiny" and result["device"] == "cpu" and result["targets"] == []
    assert set(result["tables"]) == {"nc", "stream", "sinkhorn", "sinkhorn-batch", "sinkhorn-tol", "monitor"}
    for case in result["cases"]:
        assert set(case["results"]) == {name for name, _, _ in result["tables"][case["table"]]["contenders"]}
        for entry in case["results"].values():
            assert entry["seconds"] > 0 and entry["runs"] == 1
            assert ("peak_bytes" in entry) == result["tables"][case["table"]]["with_memory"]
    with open(stem + ".md") as handle:
        text = handle.read()
    assert all(table["title"] in text for table in result["tables"].values())
    with open(stem + ".png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv", [["--sizes", "huge"], ["--threads", "0"], ["--only", "gemm"],
                                  ["--quick", "--sizes", "tiny"], ["--device", "tpu"]])
def test_bench_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as error:
        report.main(argv)
    assert error.value.code == 2
    assert "argument --" in capsys.readouterr().err


def test_a_run_keeps_existing_results_unless_told_to_replace(tiny_run, tmp_path):
    [first] = [p for p in os.listdir(tiny_run) if p.endswith(".json")]
    with open(os.path.join(tiny_run, first)) as handle:
        result = json.load(handle)
    shutil.copy(os.path.join(tiny_run, first), tmp_path / first)
    committed = (tmp_path / first).read_text()
    new = report.write(result, str(tmp_path))
    again = report.write(result, str(tmp_path))
    assert os.path.basename(new[0]) != first and os.path.basename(again[0]) not in (first, os.path.basename(new[0]))
    assert (tmp_path / first).read_text() == committed
    assert report.write(result, str(tmp_path), replace=True)[0] == str(tmp_path / first)


def test_module_entry_point(tmp_path):
    """``python -m benchmarks``: the package's ``__main__``, run as ``-m`` runs it, from outside the
    checkout with the checkout appended to the path (so an installed pfc_fast is the one imported,
    as in the checkout itself after an in-place build)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run_as_main = (f"import runpy, sys; sys.path.append({root!r}); sys.argv[0] = 'benchmarks'; "
                   "runpy.run_module('benchmarks', run_name='__main__', alter_sys=True)")
    out = subprocess.run([sys.executable, "-c", run_as_main, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: python -m benchmarks") and "--replace" in out.stdout


def test_targets_pass_or_fail():
    target = nc_metrics_bench.TARGETS[0]
    case = {"table": "nc", "params": dict(target.params),
            "results": {"ours": {"seconds": 0.01}, "ours_acc": {"seconds": 0.02}, "wu_papyan": {"seconds": 0.25}}}
    result = {"device": "cpu", "cases": [case]}
    [found] = report._targets(result, [nc_metrics_bench])
    assert found["speedup"] == pytest.approx(25) and found["passed"] is True
    case["results"]["wu_papyan"] = {"seconds": 0.05}
    assert report._targets(result, [nc_metrics_bench])[0]["passed"] is False
    case["results"]["wu_papyan"] = {"skipped": "needs too much memory"}
    assert report._targets(result, [nc_metrics_bench])[0]["passed"] is None
    assert report._targets({**result, "device": "cuda"}, [nc_metrics_bench]) == []


def test_readme_generator_round_trips(tiny_run, tmp_path):
    results = tmp_path / "benchmarks" / "results"
    shutil.copytree(tiny_run, results)
    path = tmp_path / "README.md"
    before, after = "# title\n\nintro\n\n## Performance\n\n", "\nmore text\n\n## Layout\n"
    path.write_text(before + readme.START + "\nstale\n" + readme.END + after)
    assert readme.update_readme(str(path), str(results)) is True
    first = path.read_text()
    assert first.startswith(before + readme.START) and first.endswith(readme.END + after) and "stale" not in first
    assert "](benchmarks/results/bench-" in first and "| machine |" in first
    assert readme.update_readme(str(path), str(results)) is False
    assert path.read_text() == first
    path.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        readme.update_readme(str(path), str(results))


def test_committed_readme_is_generated_from_committed_results():
    with open(os.path.join(ROOT, "README.md")) as handle:
        text = handle.read()
    body = text[text.index(readme.START) + len(readme.START):text.index(readme.END)]
    expected = readme.section(readme.load_results(os.path.join(ROOT, "benchmarks", "results")), ROOT)
    assert body == "\n" + expected + "\n", "README.md is stale: run python -m benchmarks --readme"
