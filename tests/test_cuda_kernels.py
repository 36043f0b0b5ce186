"""The CUDA kernels (csrc/*/*_cuda.cu) op by op, on the shapes where their tiles, warps and shared-memory
tables end: N = 1, D = 1, K = 1,000, rows and columns just past a tile, strided rows, every input
dtype. Run as ``simt`` (torch.ops.pfc_fast_simt on CPU tensors, every CI run) and as ``cuda`` on a
GPU, against float64 formulas written here and against the C++ CPU kernels."""
import math

import pytest
import torch

from pfc_fast import _ops, reference

from conftest import DEVICES, seed_for

GPU_KERNELS = [p for p in DEVICES if getattr(p, "values", [p])[0] != "cpu"]


@pytest.fixture(params=GPU_KERNELS)
def kernels(request):
    """(ops, device): the CUDA kernels' operators and the device of their tensors."""
    if request.param == "simt":
        from conftest import seed_simt_block_order
        seed_simt_block_order(request)
        return torch.ops.pfc_fast_simt, torch.device("cpu")
    return torch.ops.pfc_fast, torch.device("cuda")


def _problem(n, d, k, seed, dtype=torch.float32, row_stride=None):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=gen)
    feats = (torch.randn(k, d, generator=gen, dtype=torch.float64)[labels] * 2
             + torch.randn(n, d, generator=gen, dtype=torch.float64))
    feats = feats.to(dtype)
    if row_stride is not None:  # rows row_stride apart in a wider buffer, columns contiguous
        wide = torch.randn(n, row_stride, generator=gen).to(dtype)
        wide[:, :d] = feats
        feats = wide[:, :d]
    return feats, labels


def _to(device, tensors):
    """The tensors on ``device`` (None and numbers stay: the optional arguments and score_error of residual_stats)."""
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


def _expected_class_sums(feats, labels, k):
    sums = torch.zeros(k, feats.shape[1], dtype=torch.float64).index_add_(0, labels, feats.double())
    return sums, torch.bincount(labels, minlength=k)


NC_SHAPES = [  # (N, D, K): one sample, one feature, past a warp's 4 samples / a block's 32 / the
    (1, 1, 2), (1, 7, 3), (5, 1, 4), (33, 129, 5), (37, 3, 1000), (300, 40, 48), (300, 40, 49),  # 48-class table
    (129, 257, 10), (64, 4096, 3), (600, 40, 520),  # K >= 512: by BLAS products (nc_common.h)
]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,k", NC_SHAPES)
def test_class_sums(kernels, n, d, k, dtype):
    ops, device = kernels
    feats, labels = _problem(n, d, k, seed=n * 7 + d, dtype=dtype)
    sums, counts = ops.class_sums(feats.to(device), labels.to(device), k)
    expected_sums, expected_counts = _expected_class_sums(feats, labels, k)
    torch.testing.assert_close(sums.cpu(), expected_sums, rtol=1e-12, atol=1e-12)
    assert torch.equal(counts.cpu(), expected_counts)
    cpu_sums, _ = torch.ops.pfc_fast.class_sums(feats, labels, k)
    torch.testing.assert_close(sums.cpu(), cpu_sums, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("labellings", [1, 3, 5])
@pytest.mark.parametrize("n,d,k", [(1, 1, 2), (33, 129, 5), (300, 40, 12), (129, 257, 10), (37, 3, 1000)])
def test_class_sums_of_several_labellings(kernels, n, d, k, labellings):
    """labels (L, N): the sums and counts of each labelling (L x K x 128 doubles past the CUDA
    kernel's 48 KiB shared table at K = 12, L = 5: its atomics path), against each one alone and
    the CPU kernel."""
    ops, device = kernels
    feats, first = _problem(n, d, k, seed=n * 11 + d + labellings, dtype=torch.float32)
    gen = torch.Generator().manual_seed(n + labellings)
    labels = torch.stack([first] + [first[torch.randperm(n, generator=gen)] for _ in range(labellings - 1)])
    sums, counts = ops.class_sums(feats.to(device), labels.to(device), k)
    assert sums.shape == (labellings, k, d) and counts.shape == (labellings, k)
    for one, (expected_sums, expected_counts) in enumerate(_expected_class_sums(feats, y, k) for y in labels):
        torch.testing.assert_close(sums[one].cpu(), expected_sums, rtol=1e-12, atol=1e-12)
        assert torch.equal(counts[one].cpu(), expected_counts)
    cpu_sums, cpu_counts = torch.ops.pfc_fast.class_sums(feats, labels, k)
    torch.testing.assert_close(sums.cpu(), cpu_sums, rtol=1e-12, atol=1e-12)
    assert torch.equal(counts.cpu(), cpu_counts)
    with pytest.raises(RuntimeError, match="labels must be < num_classes"):
        ops.class_sums(feats.to(device), labels.clamp_min(1).to(device) + k - 1, k)


def _residual_inputs(feats, labels, k, mode, seed, rank=None):
    """means, proj, mean_coords, ncc_bias, score_error, logit_offset, predictions of residual_stats:
    the basis is the top ``rank`` (default min(K - 1, D)) right singular vectors of the centred means,
    and score_error the schema's bound (csrc/schemas.h) written out: the span defect plus
    (D + B + 8) sqrt(B) eps ||mean_coords[c]||, doubled."""
    gen = torch.Generator().manual_seed(seed)
    sums, counts = _expected_class_sums(feats, labels, k)
    means = sums / counts.clamp_min(1).unsqueeze(1)
    centred = means - means.mean(0)
    gram = centred @ centred.T
    sq = torch.diagonal(gram)
    ncc_bias = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    dim = feats.shape[1]
    rank = min(k - 1, dim) if rank is None else rank
    basis = torch.linalg.svd(centred, full_matrices=False)[2][:rank]
    coords = centred @ basis.T
    defect = (centred - coords @ basis).norm(dim=1)
    score_error = float((defect + 4 * (dim + rank + 8) * rank ** 0.5 * 2.2205e-16 * coords.norm(dim=1)).max())
    if mode == "classifier":
        weight = torch.randn(k, dim, generator=gen, dtype=torch.float64)
        bias = torch.randn(k, generator=gen, dtype=torch.float64)
        return means, torch.cat([basis, weight]), coords, ncc_bias, score_error, means @ weight.T + bias, None
    predictions = torch.randint(0, k, (feats.shape[0],), generator=gen) if mode == "predictions" else None
    return means, basis, coords, ncc_bias, score_error, None, predictions


def _expected_residual_stats(feats, labels, means, proj, mean_coords, ncc_bias, score_error, logit_offset,
                             predictions):
    """The schema's formulas (csrc/schemas.h) in float64; the decisions from term-by-term distances."""
    k, basis = means.shape[0], mean_coords.shape[1]
    r = feats.double() - means[labels]
    u = r @ proj.T
    basis_sq = (u[:, :basis] ** 2).sum(0)
    class_sq = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, (r * r).sum(1))
    distances = torch.cdist(feats.double(), means, compute_mode="donot_use_mm_for_euclid_dist")  # term by term
    ncc = torch.argmin(distances.masked_fill(torch.isinf(ncc_bias[labels]), float("inf")), dim=1)
    correct = int((ncc == labels).sum())
    if logit_offset is not None:
        disagree = int((ncc != torch.argmax(u[:, basis:] + logit_offset[labels], dim=1)).sum())
    elif predictions is not None:
        disagree = int((ncc != predictions).sum())
    else:
        disagree = 0
    return basis_sq, class_sq, torch.tensor([correct, disagree])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["classifier", "predictions", "none"])
@pytest.mark.parametrize("n,d,k", NC_SHAPES)
def test_residual_stats(kernels, n, d, k, mode, dtype):
    if k >= 520 and (dtype != torch.float32 or mode == "none"):
        pytest.skip("K >= 520 once per mode (the emulated warps take a while)")
    ops, device = kernels
    feats, labels = _problem(n, d, k, seed=n + 11 * d, dtype=dtype)
    inputs = _residual_inputs(feats, labels, k, mode, seed=k)
    on_device = _to(device, (feats, labels) + inputs)
    basis_sq, class_sq, decisions = (t.cpu() for t in ops.residual_stats(*on_device))
    expected = _expected_residual_stats(feats, labels, *inputs)
    scale = float(expected[0].abs().max()) + 1.0
    torch.testing.assert_close(basis_sq, expected[0], rtol=1e-10, atol=1e-12 * scale)
    torch.testing.assert_close(class_sq, expected[1], rtol=1e-10, atol=1e-12)
    assert decisions.tolist() == expected[2].tolist()
    cpu = torch.ops.pfc_fast.residual_stats(feats, labels, *inputs)
    torch.testing.assert_close(basis_sq, cpu[0], rtol=1e-10, atol=1e-12 * scale)
    assert decisions.tolist() == cpu[2].tolist()


def test_exact_ties_go_to_the_lowest_class(kernels):
    """Samples exactly halfway between two class means, and a classifier whose two logits are always
    equal: the nearest class centre and the classifier's decision are the lowest index, as
    torch.argmin / argmax and the CPU kernels choose (every value here is exact in float64)."""
    ops, device = kernels
    feats = torch.tensor([[-3.0], [0.0], [0.0], [1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])  # class means -1 and 1: the samples at 0 are a tie
    means, basis, coords, ncc_bias, score_error, _, _ = _residual_inputs(feats, labels, 2, "none", seed=0)
    weight, bias = torch.ones(2, 1, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    inputs = (means, torch.cat([basis, weight]), coords, ncc_bias, score_error, means @ weight.T + bias, None)
    on_device = _to(device, (feats, labels) + inputs)
    decisions = ops.residual_stats(*on_device)[2].cpu()
    assert decisions.tolist() == [4, 1]  # all nearest to their own class; the sample at 1 disagrees with logit 0
    assert decisions.tolist() == _expected_residual_stats(feats, labels, *inputs)[2].tolist()
    assert decisions.tolist() == torch.ops.pfc_fast.residual_stats(feats, labels, *inputs)[2].tolist()


@pytest.mark.parametrize("n,d,k", [(200, 16, 6), (700, 8, 600)])  # the fused kernel, the BLAS products
def test_a_basis_that_misses_directions(kernels, n, d, k):
    """A basis of 2 directions for means that span more: the scores miss the rest, score_error says by
    how much (the span defect), and the term-by-term distances of the contested classes still give
    the exact nearest class centre of every sample."""
    ops, device = kernels
    feats, labels = _problem(n, d, k, seed=d + k, dtype=torch.float32)
    inputs = _residual_inputs(feats, labels, k, "classifier", seed=5, rank=2)
    assert inputs[4] > 1e-3  # a large defect: most samples are decided on direct distances
    basis_sq, _, decisions = (t.cpu() for t in ops.residual_stats(*_to(device, (feats, labels) + inputs)))
    expected = _expected_residual_stats(feats, labels, *inputs)
    assert decisions.tolist() == expected[2].tolist()
    torch.testing.assert_close(basis_sq, expected[0], rtol=1e-10, atol=1e-12)


def test_more_basis_rows_than_a_tile(kernels):
    """600 basis rows (a full orthonormal basis of D = 600) for 3 classes: more than the fused CPU
    kernel's tile holds, so the op takes the BLAS products, with the numbers of the formulas."""
    ops, device = kernels
    feats, labels = _problem(20, 600, 3, seed=8, dtype=torch.float32)
    means, _, _, ncc_bias, _, _, _ = _residual_inputs(feats, labels, 3, "none", seed=6)
    basis = torch.linalg.qr(torch.randn(600, 600, generator=torch.Generator().manual_seed(9), dtype=torch.float64))[0].T
    centred = means - means.mean(0)
    inputs = (means, basis, centred @ basis.T, ncc_bias, 1e-10, None, None)
    basis_sq, class_sq, decisions = (t.cpu() for t in ops.residual_stats(*_to(device, (feats, labels) + inputs)))
    expected = _expected_residual_stats(feats, labels, *inputs)
    torch.testing.assert_close(basis_sq, expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(class_sq, expected[1], rtol=1e-10, atol=1e-12)
    assert decisions.tolist() == expected[2].tolist()


def test_strided_rows(kernels):
    """Rows 100 values apart in a wider buffer (a view with contiguous columns), read in place."""
    ops, device = kernels
    feats, labels = _problem(70, 33, 6, seed=3, row_stride=100)
    assert feats.stride() == (100, 1)
    inputs = _residual_inputs(feats, labels, 6, "classifier", seed=4)
    sums, _ = ops.class_sums(feats.to(device), labels.to(device), 6)
    torch.testing.assert_close(sums.cpu(), _expected_class_sums(feats, labels, 6)[0], rtol=1e-12, atol=1e-12)
    on_device = _to(device, (feats, labels) + inputs)
    basis_sq, class_sq, decisions = (t.cpu() for t in ops.residual_stats(*on_device))
    expected = _expected_residual_stats(feats, labels, *inputs)
    torch.testing.assert_close(basis_sq, expected[0], rtol=1e-10, atol=1e-9)
    assert decisions.tolist() == expected[2].tolist()


def test_empty_and_featureless_inputs(kernels):
    """N = 0 and D = 0 give zeros, as on the CPU (D = 0 once divided by zero on the host)."""
    ops, device = kernels
    labels = torch.zeros(5, dtype=torch.int64, device=device)
    sums, counts = ops.class_sums(torch.randn(5, 0, device=device), labels, 3)
    assert sums.shape == (3, 0) and counts.tolist() == [5, 0, 0]
    sums, counts = ops.class_sums(torch.randn(0, 4, device=device), labels[:0], 3)
    assert bool((sums == 0).all()) and counts.tolist() == [0, 0, 0]


SINKHORN_SHAPES = [  # (B, N, M, D): one point, past a 64-row / 64-column tile, past a 16-coordinate chunk
    (1, 1, 1, 1), (1, 1, 70, 3), (2, 65, 1, 2), (1, 64, 64, 16), (3, 63, 65, 17), (1, 130, 129, 33), (2, 40, 300, 5),
]


def _softmin_inputs(b, n, m, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(b, m, d, generator=gen, dtype=torch.float64) + 0.5
    h = torch.randn(b, m, generator=gen, dtype=torch.float64)
    log_w = torch.log_softmax(torch.randn(b, m, generator=gen, dtype=torch.float64), dim=1)
    cost = ((x[:, :, None] - y[:, None]) ** 2).sum(-1)
    return [t.to(dtype) for t in (x, y, h, log_w)], cost


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("b,n,m,d", SINKHORN_SHAPES)
def test_sinkhorn_softmin(kernels, b, n, m, d, dtype):
    ops, device = kernels
    (x, y, h, log_w), cost64 = _softmin_inputs(b, n, m, d, dtype, seed=n + m + d)
    eps = 0.4
    expected = -eps * torch.logsumexp(log_w.double()[:, None] + (h.double()[:, None] - cost64) / eps, dim=-1)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-10)
    cost = cost64.to(dtype)
    dev = [t.to(device) for t in (x, y, h, log_w, cost)]
    xd, yd, hd, wd, cd = dev
    online = ops.sinkhorn_softmin(xd, yd, None, hd, wd, eps)
    dense = ops.sinkhorn_softmin(None, None, cd, hd, wd, eps)
    columns = ops.sinkhorn_softmin(None, None, cd.transpose(1, 2).contiguous(), hd, wd, eps, None, True)
    for name, result in (("online", online), ("dense", dense), ("columns", columns)):
        torch.testing.assert_close(result.cpu().double(), expected, **tol, msg=name)
    cpu = torch.ops.pfc_fast.sinkhorn_softmin(x, y, None, h, log_w, eps)
    torch.testing.assert_close(online.cpu(), cpu, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("b,n,m,d", SINKHORN_SHAPES)
def test_sinkhorn_plan_sums(kernels, b, n, m, d, dtype):
    ops, device = kernels
    (x, y, g, log_b), cost64 = _softmin_inputs(b, n, m, d, dtype, seed=3 * n + m)
    gen = torch.Generator().manual_seed(d)
    f = torch.randn(b, n, generator=gen, dtype=torch.float64).to(dtype)
    log_a = torch.full((b, n), -float(torch.tensor(n).log()), dtype=dtype)
    eps = 0.7
    plan = torch.exp(log_a.double()[:, :, None] + log_b.double()[:, None]
                     + (f.double()[:, :, None] + g.double()[:, None] - cost64) / eps)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    xd, yd, fd, gd, ad, bd, cd = (t.to(device) for t in (x, y, f, g, log_a, log_b, cost64.to(dtype)))
    for name, (mass, row_cost) in (("online", ops.sinkhorn_plan_sums(xd, yd, None, fd, gd, ad, bd, eps)),
                                   ("dense", ops.sinkhorn_plan_sums(None, None, cd, fd, gd, ad, bd, eps))):
        torch.testing.assert_close(mass.cpu().double(), plan.sum(-1), **tol, msg=name)
        torch.testing.assert_close(row_cost.cpu().double(), (plan * cost64).sum(-1), **tol, msg=name)


def test_sinkhorn_empty_batch(kernels):
    """B = 0 problems give empty results, as on the CPU (an empty CUDA grid once failed to launch)."""
    ops, device = kernels
    x, y, h, w = (torch.randn(0, *shape, device=device) for shape in ((5, 3), (4, 3), (4,), (4,)))
    assert ops.sinkhorn_softmin(x, y, None, h, w, 0.5).shape == (0, 5)
    assert ops.sinkhorn_softmin(None, None, torch.randn(0, 5, 4, device=device), h, w, 0.5).shape == (0, 5)
    assert ops.sinkhorn_softmin(None, None, torch.randn(0, 4, 5, device=device), h, w, 0.5, None, True).shape == (0, 5)
    f = torch.randn(0, 5, device=device)
    mass, cost = ops.sinkhorn_plan_sums(x, y, None, f, h, f, w, 0.5)
    assert mass.shape == cost.shape == (0, 5)


def test_ops_for_routes_cpu_tensors_only_under_use_simt():
    import pfc_fast

    cpu = torch.zeros(1)
    assert _ops.ops_for(cpu) is torch.ops.pfc_fast
    if pfc_fast.build_info()["simt"]:
        with pfc_fast.use_simt():
            assert _ops.ops_for(cpu) is torch.ops.pfc_fast_simt
            assert _ops.ops_for(torch.zeros(1, device="meta")) is torch.ops.pfc_fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("b,n,m", [(1, 1, 1), (1, 33, 70), (2, 65, 31), (3, 40, 300), (1, 300, 7)])
def test_sinkhorn_scaling_step(kernels, b, n, m, dtype):
    """Against the float64 reference on fresh kernels with zero weights, past a 32-row block and a
    256-column stride; a row of zeros (its u' infinite) gives status inf, not NaN elsewhere."""
    ops, device = kernels
    gen = torch.Generator().manual_seed(seed_for("scaling", b, n, m, str(dtype)))
    kernel = torch.rand(b, n, m, generator=gen, dtype=torch.float64) * 2.0
    u, v = (torch.rand(b, k, generator=gen, dtype=torch.float64) + 0.5 for k in (n, m))
    a, w = (torch.rand(b, k, generator=gen, dtype=torch.float64) for k in (n, m))
    a[:, ::3], w[:, 1::4] = 0.0, 0.0  # zero weights
    w[:, 0] = 1.0
    inputs = [t.to(dtype) for t in (kernel, u, v, a, w)]
    expected = reference.sinkhorn_scaling_step(*inputs)
    got = [t.cpu() for t in ops.sinkhorn_scaling_step(*(t.to(device) for t in inputs))]
    tol = dict(rtol=2e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for name, mine, ref in zip(("u", "v", "status"), got, expected):
        torch.testing.assert_close(mine.double(), ref, **tol, msg=name)
    cpu = torch.ops.pfc_fast.sinkhorn_scaling_step(*inputs)
    for mine, theirs in zip(got, cpu):
        torch.testing.assert_close(mine, theirs, **tol)
    if n > 1:
        inputs[0][0, 1] = 0.0  # row 1 of problem 0: no mass, u' = inf
        status = ops.sinkhorn_scaling_step(*(t.to(device) for t in inputs))[2].cpu()
        assert status[0, 1] == math.inf and not status.isnan().any()
        torch.testing.assert_close(status[1:].double(), reference.sinkhorn_scaling_step(*inputs)[2][1:], **tol)

