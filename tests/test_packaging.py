"""How pfc_fast is packaged: the sdist holds every source, the metadata has one source that
requirements.txt agrees with, a build without torch stops at once naming the fix, the version is
written once, and the core refuses a torch it was not built against."""
import os
import re
import subprocess
import sys
import tarfile

import pytest

import pfc_fast
from pfc_fast import _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tomllib = pytest.importorskip("tomllib")


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)


def _requirement_lines(path):
    with open(path) as handle:
        return [line.strip() for line in handle if line.strip() and not line.startswith("#")]


def _tracked(*folders):
    """The files git tracks under ``folders`` (the source checkout's, not the sdist's)."""
    listed = subprocess.run(["git", "ls-files", *folders], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout (an unpacked sdist): the tracked files are unknown")
    return [line for line in listed.stdout.splitlines() if line]


def test_requirements_txt_agrees_with_the_metadata():
    project = _pyproject()
    declared = list(project["project"]["dependencies"])
    for extra in project["project"]["optional-dependencies"].values():
        declared += extra
    declared += project["build-system"]["requires"]
    lines = _requirement_lines(os.path.join(ROOT, "requirements.txt"))
    assert set(declared) <= set(lines), sorted(set(declared) - set(lines))
    build_tools = {"pybind11", "ninja"}  # torch's extension builder, not the metadata's business
    assert set(lines) - set(declared) <= build_tools, sorted(set(lines) - set(declared) - build_tools)
    assert "torch>=2.11,<2.15" in project["project"]["dependencies"]


def test_the_version_is_written_once():
    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pfc_fast._version.__version__"}
    from pfc_fast._version import __version__
    assert pfc_fast.__version__ == __version__
    with open(os.path.join(ROOT, "CITATION.cff")) as handle:
        assert f"version: {__version__}\n" in handle.read()
    with open(os.path.join(ROOT, "CHANGELOG.md")) as handle:
        assert f"## {__version__} (" in handle.read()


def test_a_build_without_torch_stops_at_once_naming_the_fix():
    """What pip's default build isolation gives setup.py: no torch. The metadata and the sdist need
    none; a wheel build stops before compiling anything, with the command to use."""
    hide_torch = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py'] + sys.argv[1:]; __file__ = 'setup.py'; " \
                 "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))"
    wheel = subprocess.run([sys.executable, "-c", hide_torch, "bdist_wheel"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert wheel.returncode != 0
    assert "pip install --no-build-isolation ." in wheel.stderr
    metadata = subprocess.run([sys.executable, "-c", hide_torch, "--version"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    assert metadata.returncode == 0 and metadata.stdout.strip() == pfc_fast.__version__


def test_the_sdist_holds_every_source_and_the_metadata(tmp_path):
    """``python -m build --sdist`` (without isolation: the build tools are installed here): every
    tracked file of csrc/ (headers and CUDA files whatever the machine), the package data, the
    tests, the legal files; no compiled objects; the metadata's requirements, extras and licence."""
    pytest.importorskip("build")
    made = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    [archive] = [name for name in os.listdir(tmp_path) if name.endswith(".tar.gz")]
    assert archive == f"pfc_fast-{pfc_fast.__version__}.tar.gz"
    with tarfile.open(tmp_path / archive) as tar:
        top = f"pfc_fast-{pfc_fast.__version__}/"
        names = {name[len(top):] for name in tar.getnames()}
        metadata = tar.extractfile(top + "PKG-INFO").read().decode()
    wanted = _tracked("csrc", "pfc_fast", "tests", "docs") + [
        "setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "CITATION.cff", "CHANGELOG.md",
        "requirements.txt", "pytest.ini"]
    assert not set(wanted) - names, sorted(set(wanted) - names)
    assert any(name.endswith(".cu") for name in names) and any(name.endswith(".h") for name in names)
    assert not [name for name in names if name.endswith((".so", ".o", ".pyc"))]
    requires = set(re.findall(r"^Requires-Dist: (.+)$", metadata, re.M))
    assert "torch<2.15,>=2.11" in requires
    assert 'torchvision<0.30,>=0.26; extra == "app"' in requires and 'scikit-learn; extra == "app"' in requires
    assert 'pot; extra == "bench"' in requires
    assert re.search(r"^License-Expression: MIT$", metadata, re.M)


def test_a_core_built_against_another_torch_is_refused():
    _ops.check_torch_version((2, 14), "2.14.1+cu130")
    with pytest.raises(ImportError, match=r"built against torch 2\.11, but torch 2\.14\.1\+cu130 is imported"):
        _ops.check_torch_version((2, 11), "2.14.1+cu130")
    info = pfc_fast.build_info()
    assert info["torch"].rsplit(".", 1)[0] == ".".join(info["torch_runtime"].split("+")[0].split(".")[:2])
    assert isinstance(info["native"], bool)


def test_the_application_without_its_extra_names_the_pip_command():
    """torchvision hidden: ``pfc-fast`` says which extra to install and exits 1; the library imports."""
    hide = ("import sys, importlib.util; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda name, *a: None if name == 'torchvision' else real(name, *a); "
            "import pfc_fast; from pfc_fast.__main__ import main; sys.argv = ['pfc-fast', 'demo']; sys.exit(main())")
    ran = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 1
    assert 'pip install "pfc_fast[app]"' in ran.stderr and "torchvision" in ran.stderr
