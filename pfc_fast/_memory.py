"""Free memory of a device, for the checks that refuse work that would not fit (``SinkhornResult.plan``,
the benchmarks' skips)."""
import os

import torch


def free_bytes(device: torch.device) -> int:
    """Bytes free on ``device``: ``cudaMemGetInfo`` on CUDA; on the CPU ``MemAvailable`` of
    /proc/meminfo (free and reclaimable memory), else the free physical pages."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 34
