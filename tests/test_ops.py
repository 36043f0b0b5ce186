"""The compiled operators: torch.library.opcheck (schema, fake kernels, dispatch), torch.compile,
the build switches reported by build_info(), and that ``import pfc_fast`` loads the library only."""
import ast
import os
import subprocess
import sys

import pytest
import torch

import pfc_fast
from pfc_fast import _ops

from conftest import make_features


def _residual_args(feats, labels, k, classifier):
    sums, counts = _ops.class_sums(feats, labels, k)
    means = sums / counts.clamp_min(1).unsqueeze(1)
    centred = means - means.mean(0)
    gram = centred @ centred.T
    sq = torch.diagonal(gram)
    bias = sq[:, None] + sq[None, :] - 2 * gram
    basis = torch.linalg.svd(centred, full_matrices=False)[2][:k - 1]
    coords = centred @ basis.T
    if classifier is None:
        return (feats, labels, means, basis, coords, bias, 1e-10, None, labels.flip(0))
    weight = classifier.double()
    return (feats, labels, means, torch.cat([basis, weight]), coords, bias, 1e-10, means @ weight.T, None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_classifier", [False, True], ids=["predictions", "classifier"])
def test_opcheck(device, dtype, with_classifier):
    feats, labels = make_features(300, 40, 6, seed=31, device=device, dtype=dtype)
    classifier = torch.randn(6, 40, device=device) if with_classifier else None
    ops = _ops.ops_for(feats)  # pfc_fast, or pfc_fast_simt in the simt case
    torch.library.opcheck(ops.class_sums.default, (feats, labels, 6))
    torch.library.opcheck(ops.class_sums.default, (feats, torch.stack([labels, labels.flip(0)]), 6))  # labellings
    torch.library.opcheck(ops.residual_stats.default, _residual_args(feats, labels, 6, classifier))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck_sinkhorn(device, dtype):
    """plan sums and the scaling step (sinkhorn_softmin: tests/test_sinkhorn.py)."""
    gen = torch.Generator().manual_seed(33)
    cost = torch.cdist(torch.randn(2, 9, 3, generator=gen), torch.randn(2, 7, 3, generator=gen)).square()
    h, log_w = torch.randn(2, 7, generator=gen), torch.full((2, 7), 1.0).log_softmax(1)
    f, log_a = torch.randn(2, 9, generator=gen), torch.full((2, 9), 1.0).log_softmax(1)
    cost, h, log_w, f, log_a = (t.to(device, dtype) for t in (cost, h, log_w, f, log_a))
    ops = _ops.ops_for(h)
    torch.library.opcheck(ops.sinkhorn_plan_sums.default, (None, None, cost, f, h, log_a, log_w, 0.5))
    kernel = (-cost / 2).exp()
    torch.library.opcheck(ops.sinkhorn_scaling_step.default, (kernel, f.exp(), h.exp(), log_a.exp(), log_w.exp()))


def test_ops_trace_under_compile(device):
    feats, labels = make_features(200, 16, 4, seed=32, device=device)

    ops = _ops.ops_for(feats)

    def first_pass(x, y):
        sums, counts = ops.class_sums(x, y, 4)
        return sums / counts.unsqueeze(1)

    compiled = torch.compile(first_pass, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(feats, labels), first_pass(feats, labels))


def test_ops_reject_out_of_range_labels():
    feats = torch.randn(10, 3)
    with pytest.raises(RuntimeError, match="num_classes"):
        _ops.class_sums(feats, torch.full((10,), 5), 3)
    with pytest.raises(RuntimeError):
        _ops.class_sums(feats, torch.full((10,), -1), 3)


def test_build_info():
    info = pfc_fast.build_info()
    assert set(info) >= {"cuda", "openmp", "torch"}
    assert info["torch"] == torch.__version__.split("+")[0]
    assert info["openmp"] is True
    assert isinstance(info["cuda"], bool)


def test_import_loads_the_library_only():
    """``import pfc_fast`` brings in none of the application (pfc-fast's commands, data, models, loop,
    plots) and none of its dependencies (torchvision, matplotlib, scikit-learn)."""
    script = ("import sys, pfc_fast; print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('pfc_fast', 'torchvision', 'matplotlib', 'sklearn'))))")
    loaded = set(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                check=True).stdout.split())
    application = {m for m in loaded if m == "pfc_fast.app" or m.startswith("pfc_fast.app.")}
    assert not application, f"import pfc_fast loaded {sorted(application)}"
    assert not {m for m in loaded if not m.startswith("pfc_fast")}, f"import pfc_fast loaded {sorted(loaded)}"
    assert "pfc_fast.metrics" in loaded  # the check itself sees the library


def test_the_library_never_imports_the_application():
    """No module of the library (``pfc_fast/*.py``) imports ``pfc_fast.app``, at any depth of its code
    (``__main__.py``, the ``python -m pfc_fast`` entry point of the application, aside)."""
    package = os.path.dirname(pfc_fast.__file__)
    for name in sorted(os.listdir(package)):
        if not name.endswith(".py") or name == "__main__.py":
            continue
        with open(os.path.join(package, name)) as handle:
            tree = ast.parse(handle.read(), name)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = f"{'.' * node.level}{node.module or ''}"
                targets = [base] + [f"{base}.{alias.name}" if node.module else base + alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                assert target not in (".app", "pfc_fast.app") and not target.startswith((".app.", "pfc_fast.app.")), \
                    f"pfc_fast/{name}:{node.lineno} imports the application ({target})"
