"""What the benchmarks share about the machine: wall-clock timing, the machine's name, the memory
free for a case, and the device rates that set the floors of the GPU tables."""
import math
import platform
import statistics
import time

import torch


def sync(device):
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_times(fn, device, repeat, budget=math.inf):
    """Wall times of up to ``repeat`` runs of ``fn`` after one warm-up run (synchronised on CUDA).

    Runs stop once ``budget`` seconds have gone by, the warm-up included; when the warm-up alone
    took the budget, its time is the only one returned (slow baselines are run once or twice).
    """
    if repeat < 1:
        raise ValueError(f"repeat must be a positive integer, got {repeat!r}")
    times = []
    for _ in range(repeat + 1):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if sum(times) >= budget:
            break
    return times[1:] or times


def timed(fn, device, repeat, budget=math.inf):
    """Median of :func:`run_times`."""
    return statistics.median(run_times(fn, device, repeat, budget))


def _status_bytes(field):
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def peak_memory(fn, device):
    """Bytes ``fn()`` takes at its peak beyond what was in use before it: on a GPU the peak of
    torch's allocator; on the CPU the process's peak resident set (``VmHWM``, reset through
    ``/proc/self/clear_refs``), so every allocation counts, torch's or not (Linux only)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak resident set back to the current one
    before = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - before)


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def device_name(device):
    """The GPU's name, or the CPU's model."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def machine_name(device):
    """The GPU's name, or the CPU model and the thread count, as a file-name-safe string
    (``AMD-EPYC-2t``, ``NVIDIA-H100-80GB-HBM3``)."""
    name = device_name(device)
    if device.type != "cuda":
        name = f"{name}-{torch.get_num_threads()}t"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.replace(" ", "-"))


def copy_bandwidth(device):
    """Bytes read + written per second by a device-to-device copy of 1 GiB."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, 10)
    return 2 * src.numel() * 4 / seconds


def fp32_fma_rate(device):
    """FMAs per second of a large float32 matrix product (TF32 off): the card's measured fp32 rate."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(8192, 8192, device=device)
        seconds = timed(lambda: a @ a, device, 5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 8192 ** 3 / seconds


def exp_rate(device):
    """exp evaluations per second of torch.exp on a 16 MiB (L2-resident on an H100) float32 tensor."""
    x = torch.randn(1 << 22, device=device)
    out = torch.empty_like(x)
    seconds = timed(lambda: [torch.exp(x, out=out) for _ in range(20)], device, 5)
    return 20 * x.numel() / seconds


def device_rates(device):
    """The measured rates the GPU floors are computed from (``None`` on the CPU)."""
    if device.type != "cuda":
        return None
    return {"copy_bytes_per_s": copy_bandwidth(device), "fma_per_s": fp32_fma_rate(device),
            "exp_per_s": exp_rate(device)}
