"""The SIMT layer itself (csrc/simt): small CUDA kernels with known answers (csrc/simt/probes.cpp,
torch.ops.pfc_simt_probe), against CUDA's documented semantics, and each misuse it must raise on
where a GPU would hang or return undefined values.

Shuffle semantics: CUDA C++ Programming Guide, "Warp Shuffle Functions" (width groups, what lanes
out of range receive), and PTX ISA "shfl.sync" (only the low five bits of the lane argument count).
"""
import pytest
import torch

import pfc_fast

pytestmark = [
    pytest.mark.simt,
    pytest.mark.skipif(not pfc_fast.build_info()["simt"], reason="pfc_fast built without the SIMT layer: not run"),
]

if pfc_fast.build_info()["simt"]:
    from pfc_fast import _simt

probe = torch.ops.pfc_simt_probe
FULL = 0xFFFFFFFF
WIDTHS = [1, 2, 4, 8, 16, 32]
DTYPES = [torch.int32, torch.int64, torch.float32, torch.float64]


def expected_source(op, lane, arg, width):
    """The lane whose value ``lane`` receives, as the Programming Guide describes each shuffle."""
    arg &= 31  # PTX: bval[4:0] = b[4:0]
    base = lane // width * width
    if op == "idx":
        return base + arg % width
    if op == "up":
        return lane - arg if lane - base >= arg else lane
    if op == "down":
        return lane + arg if lane - base + arg < width else lane
    if op == "xor":
        source = lane ^ arg
        return source if source < base + width else lane  # earlier groups are reachable, later ones not
    return lane  # sync


def _values(n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    return torch.randint(-2**30, 2**30, (n,), generator=gen).to(dtype)


def _shuffle(values, op, args, width=32, mask=FULL, exit_mask=0, diverge_mask=0):
    return probe.shuffle(values, op, args, width, mask, exit_mask, diverge_mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("op", ["idx", "up", "down", "xor", "sync"])
def test_shuffle_every_width(op, width, dtype):
    threads = 64  # two warps: lanes are numbered within each
    values = _values(threads, dtype, seed=width)
    for arg in range(32):
        args = torch.full((threads,), arg, dtype=torch.int64)
        out = _shuffle(values, op, args, width)
        expected = [values[t // 32 * 32 + expected_source(op, t % 32, arg, width)] for t in range(threads)]
        assert torch.equal(out, torch.stack(expected)), f"{op} width {width} arg {arg}"


@pytest.mark.parametrize("op", ["idx", "up", "down", "xor"])
def test_shuffle_per_lane_arguments_and_out_of_range(op):
    """Each lane its own argument, including negative ones and ones of 32 and more."""
    gen = torch.Generator().manual_seed(7)
    values = _values(96, torch.float64, seed=8)
    for width in WIDTHS:
        args = torch.randint(-70, 70, (96,), generator=gen)
        out = _shuffle(values, op, args, width)
        expected = [values[t // 32 * 32 + expected_source(op, t % 32, int(args[t]), width)] for t in range(96)]
        assert torch.equal(out, torch.stack(expected)), f"{op} width {width}"


def test_partial_mask_and_independent_groups():
    """Lanes outside the mask skip the shuffle; a half-warp shuffle needs only its half."""
    values = _values(32, torch.int64, seed=9)
    args = torch.arange(32).flip(0)  # lane l reads lane 31 - l ... within the mask's half
    out = _shuffle(values, "xor", torch.full((32,), 1), width=32, mask=0x0000FFFF)
    assert torch.equal(out[:16], values[:16].view(8, 2).flip(1).flatten())
    assert torch.equal(out[16:], values[16:])
    out = _shuffle(values, "idx", args % 16, width=16, mask=0xFFFF0000)
    assert torch.equal(out[16:], values[16:].flip(0))
    assert torch.equal(out[:16], values[:16])


def test_partial_last_warp():
    """A block of 40 threads: its second warp has lanes 0-7, and a mask of those works."""
    values = _values(40, torch.float32, seed=10)
    out = _shuffle(values, "down", torch.ones(40, dtype=torch.int64), width=8, mask=0xFF)
    assert torch.equal(out[:8], torch.cat([values[1:8], values[7:8]]))
    assert torch.equal(out[8:32], values[8:32])
    assert torch.equal(out[32:], torch.cat([values[33:40], values[39:40]]))
    with pytest.raises(RuntimeError, match=r"names lanes 8-31 that this block of 40 threads does not have"):
        _shuffle(values, "down", torch.ones(40, dtype=torch.int64))


@pytest.mark.parametrize("case,kwargs,match", [
    ("exited", {"exit_mask": 1 << 5}, r"names lanes 5 that have exited|lane 5 of warp 0 .* exited while"),
    ("diverged", {"diverge_mask": 0xFFFF0000}, r"diverged"),
    ("not in mask", {"mask": 0x0000FFFF, "op": "idx", "args": 20}, r"lane 0 reads lane 20, which is not in the mask"),
    ("bad width", {"width": 12}, r"width must be a power of 2"),
])
def test_warp_operation_errors(case, kwargs, match):
    kwargs = dict(kwargs)
    op = kwargs.pop("op", "down")
    args = torch.full((32,), kwargs.pop("args", 1), dtype=torch.int64)
    with pytest.raises(RuntimeError, match=match):
        _shuffle(_values(32, torch.float64, seed=11), op, args, **kwargs)


@pytest.mark.parametrize("exit_mask", [1 << 31, 1, 0x0000FF00])
def test_syncwarp_waits_only_for_lanes_that_have_not_exited(exit_mask):
    """Programming Guide: all non-exited threads named in mask must execute a __syncwarp."""
    values = _values(32, torch.int32, seed=12)
    out = _shuffle(values, "sync", torch.zeros(32, dtype=torch.int64), exit_mask=exit_mask)
    assert torch.equal(out, values)  # exited lanes keep the value out started with: their own


def test_syncwarp_at_different_calls_meets():
    """On sm_70 and later a __syncwarp meets any __syncwarp of the same mask."""
    values = _values(32, torch.int64, seed=13)
    out = _shuffle(values, "sync", torch.zeros(32, dtype=torch.int64), diverge_mask=0xFFFF0000)
    assert torch.equal(out, values)


def test_syncwarp_in_a_partial_warp():
    values = _values(20, torch.float32, seed=14)
    assert torch.equal(_shuffle(values, "sync", torch.zeros(20, dtype=torch.int64)), values)


def test_shared_variables_stay_distinct():
    """Two __shared__ arrays on one line, one declaration in two template instances of one size."""
    assert probe.shared_variables().tolist() == [12, 3, 4]


def _ring_expected(values, rounds):
    """v <- 0.5 * v[t + 1 (mod n)] + t, every round, in every block (float64, exact as on the layer)."""
    v = values.clone()
    t = torch.arange(values.shape[1], dtype=torch.float64)
    for _ in range(rounds):
        v = 0.5 * v.roll(-1, dims=1) + t
    return v


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("blocks,threads", [(1, 1), (3, 33), (5, 256), (2, 1024)])
def test_barriers_and_shared_memory(blocks, threads, dynamic):
    values = torch.randn(blocks, threads, generator=torch.Generator().manual_seed(threads), dtype=torch.float64)
    out = probe.ring(values, 7, dynamic, "none")
    torch.testing.assert_close(out, _ring_expected(values, 7), rtol=0, atol=0)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_shared_memory_starts_poisoned_in_every_block(dynamic):
    """Each block gets its own shared memory, and what it reads before writing is NaN, not the last block's."""
    probe.ring(torch.ones(4, 64, dtype=torch.float64), 3, dynamic, "none")
    out = probe.ring(torch.ones(4, 64, dtype=torch.float64), 3, dynamic, "read_first")
    assert bool(out.isnan().all())


@pytest.mark.parametrize("fault,match", [
    ("divergent", r"wait at different barriers: .* at probes.cpp:\d+, thread \(\d+,0,0\) at __syncthreads at probes.cpp:\d+"),
    ("barrier_in_warp_op", r"lane 0 of mask 0xffffffff waits at __syncthreads|reached __syncthreads at .* wait for it"),
])
def test_barrier_errors(fault, match):
    with pytest.raises(RuntimeError, match=match):
        probe.ring(torch.ones(2, 64, dtype=torch.float64), 2, False, fault)


def test_layer_still_works_after_an_error():
    with pytest.raises(RuntimeError):
        probe.ring(torch.ones(2, 64, dtype=torch.float64), 2, False, "divergent")
    values = torch.randn(2, 64, dtype=torch.float64)
    torch.testing.assert_close(probe.ring(values, 2, False, "none"), _ring_expected(values, 2), rtol=0, atol=0)


@pytest.mark.parametrize("grid,block", [([1, 1, 1], [1, 1, 1]), ([3, 2, 2], [4, 3, 2]), ([7, 1, 1], [1024, 1, 1]),
                                        ([2, 3, 1], [2, 2, 64]), ([1, 300, 1], [32, 1, 1])])
def test_every_block_and_thread_runs_once(grid, block):
    out = probe.indices(grid, block, 0)
    blocks, threads = grid[0] * grid[1] * grid[2], block[0] * block[1] * block[2]
    assert out.shape == (blocks * threads, 9)
    idx = out[:, :6]
    linear_block = idx[:, 0] + grid[0] * (idx[:, 1] + grid[1] * idx[:, 2])
    linear_thread = idx[:, 3] + block[0] * (idx[:, 4] + block[1] * idx[:, 5])
    assert torch.equal(linear_block * threads + linear_thread, torch.arange(blocks * threads))
    assert bool((out[:, 6] == threads).all()) and bool((out[:, 7] == blocks).all())
    for d in range(3):
        assert bool((idx[:, d] < grid[d]).all()) and bool((idx[:, 3 + d] < block[d]).all())
    tickets = out[::threads, 8]
    assert torch.equal(tickets.sort().values, torch.arange(blocks))  # each block ran once


def test_block_order_is_shuffled_and_seeded():
    def order(seed):
        _simt.set_block_order_seed(seed)
        return probe.indices([64, 1, 1], [2, 1, 1], 0)[::2, 8]

    first, again, other = order(123), order(123), order(124)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, torch.arange(64))


def test_dynamic_shared_memory_up_to_the_limit():
    """The indices kernel has 4 bytes of static shared memory; with the dynamic bytes, 48 KiB in all."""
    out = probe.indices([2, 1, 1], [32, 1, 1], 48 * 1024 - 4)  # the kernel touches the last byte
    assert out[:, 8].unique().tolist() == [0, 1]


@pytest.mark.parametrize("grid,block,shared,match", [
    ([1, 1, 1], [1025, 1, 1], 0, r"1025 threads per block; CUDA allows 1024"),
    ([1, 1, 1], [32, 32, 2], 0, r"2048 threads per block"),
    ([1, 1, 1], [1, 1, 65], 0, r"blockDim.z = 65; CUDA allows at most 64"),
    ([1, 65536, 1], [1, 1, 1], 0, r"gridDim.y and gridDim.z are at most 65535"),
    ([1, 1, 65536], [1, 1, 1], 0, r"gridDim.y and gridDim.z are at most 65535"),
    ([0, 1, 1], [1, 1, 1], 0, r"an empty grid or block"),
    ([1, 1, 1], [0, 1, 1], 0, r"an empty grid or block"),
    ([1, 1, 1], [32, 1, 1], 48 * 1024 + 1, r"49153 bytes of dynamic shared memory, more than the 49152"),
])
def test_launch_limits(grid, block, shared, match):
    with pytest.raises(RuntimeError, match=match):
        probe.indices(grid, block, shared)


def test_grids_larger_than_the_layer_emulates():
    """2^24 + 1 blocks: a legal CUDA grid that this layer refuses, saying so (not a CUDA error)."""
    with pytest.raises(RuntimeError, match=r"16777217 blocks: CUDA allows this grid, but the SIMT layer emulates "
                                           r"at most 2\^24$"):
        probe.ring(torch.zeros(2**24 + 1, 1, dtype=torch.float64), 1, False, "none")


def test_static_and_dynamic_shared_memory_together_over_the_limit():
    with pytest.raises(RuntimeError, match=r"block uses 49153 bytes of shared memory \(4 static, 49149 dynamic\)"):
        probe.indices([1, 1, 1], [32, 1, 1], 48 * 1024 - 3)


@pytest.mark.parametrize("blocks,threads", [(1, 1), (4, 100), (13, 1024)])
def test_atomics(blocks, threads):
    old, totals = probe.atomics(blocks, threads)
    n = blocks * threads
    assert torch.equal(old.sort().values, torch.arange(n))  # every add saw a distinct old value
    expected = [0.25 * n, 0.5 * n * (n - 1) / 2, 3.0 * n, float(n) * 2**40, float(n)]
    assert totals.tolist() == expected


def test_statistics_count_the_launches():
    before = _simt.stats()
    probe.indices([3, 1, 1], [64, 1, 1], 0)
    after = _simt.stats()
    assert after["launches"] - before["launches"] == 1
    assert after["blocks"] - before["blocks"] == 3
    assert after["threads"] - before["threads"] == 192
    assert after["switches"] - before["switches"] > 192  # all but the last thread of a block stop at its barrier
    assert _simt.multiprocessors == 132


def test_use_simt_routes_the_library():
    gen = torch.Generator().manual_seed(5)
    feats, labels = torch.randn(200, 8, generator=gen), torch.randint(0, 3, (200,), generator=gen)
    before = _simt.stats()["launches"]
    plain = pfc_fast.nc_metrics(feats, labels)
    assert _simt.stats()["launches"] == before
    with pfc_fast.use_simt():
        assert pfc_fast.build_info()["simt_active"]
        emulated = pfc_fast.nc_metrics(feats, labels)
        with pfc_fast.use_simt(False):
            assert not pfc_fast.build_info()["simt_active"]
    assert not pfc_fast.build_info()["simt_active"]
    assert _simt.stats()["launches"] >= before + 3  # class sums, projections, decisions
    assert emulated.nc1 == pytest.approx(plain.nc1, rel=1e-12)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        pfc_fast.use_simt("yes")
