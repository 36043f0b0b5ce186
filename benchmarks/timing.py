"""What the benchmark scripts share: wall-clock timing, machine names, measured device rates and
the command line that writes ``benchmarks/results/<name>-<machine>.json``."""
import argparse
import json
import os
import platform
import time

import torch


def timed(fn, device, repeat):
    """Median wall time of ``fn`` over ``repeat`` runs after one warm-up (synchronised on CUDA)."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def machine_name(device):
    """The GPU's name, or the CPU model and the thread count, as a file-name-safe string."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model.replace(' ', '-')}-{torch.get_num_threads()}t"


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


def main(description, run, markdown, name, repeat=3):
    """Command line of a benchmark script: ``--device --threads --repeat --out``; ``run(device,
    repeat)`` returns the result dict (with ``machine``), printed with ``markdown`` and written as JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(torch.device(args.device), args.repeat)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{name}-{result['machine']}.json")
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2)
    print(markdown(result))
    print(f"\nwritten {path}")
