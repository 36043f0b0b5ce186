"""The size preset of the pytest-benchmark suite: ``--bench-size tiny|quick|full`` (default: the
``PFC_BENCH_SIZE`` environment variable, else ``quick``, a few minutes on a 2-core CPU)."""
import os

from .cases import SIZES


def pytest_addoption(parser):
    parser.addoption("--bench-size", choices=SIZES, default=os.environ.get("PFC_BENCH_SIZE", "quick"),
                     help="size preset of benchmarks/ (tiny, quick, full; default quick or $PFC_BENCH_SIZE)")
