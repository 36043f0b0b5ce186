"""Every Python block of README.md runs as it is: each in a fresh namespace, in a temporary
working directory (the blocks write runs/, logs/, pfc.png there). A block whose optional
dependency is not installed, or that needs the SIMT layer of a build without it, is skipped."""
import pathlib
import re

import matplotlib
import pytest

import pfc_fast

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
#: The optional dependencies a block may import (pyproject.toml's extras; installed by the test extra).
OPTIONAL = ("lightning", "tensorboard", "pandas", "timm")


def _python_blocks():
    """``(line, heading, code)`` of every ```python block of the README."""
    text = README.read_text(encoding="utf-8")
    blocks, heading = [], ""
    for match in re.finditer(r"^(#{2,3} [^\n]*)$|^```python\n(.*?)^```$", text, flags=re.M | re.S):
        if match.group(1):
            heading = match.group(1).lstrip("# ")
        else:
            blocks.append((text.count("\n", 0, match.start()) + 1, heading, match.group(2)))
    return blocks


BLOCKS = _python_blocks()


def test_the_readme_has_python_blocks_in_every_usage_section():
    headings = {heading.split(":")[0] for _, heading, _ in BLOCKS}
    assert {"Use", "PFCMonitor", "A plain training loop, logged to TensorBoard", "Lightning",
            "Other model families", "Optimal transport", "MUFM (multilayer unconstrained feature model)"} <= headings


@pytest.mark.parametrize("line, heading, code", BLOCKS, ids=[f"line{line}-{heading}" for line, heading, _ in BLOCKS])
def test_readme_block_runs(line, heading, code, tmp_path, monkeypatch):
    if "use_simt()" in code and not pfc_fast.build_info()["simt"]:
        pytest.skip("this build has no SIMT layer (PFC_FAST_SIMT=1)")
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"readme_line{line}"}
    try:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] in OPTIONAL:
            pytest.skip(f"optional dependency {error.name} is not installed")
        raise
