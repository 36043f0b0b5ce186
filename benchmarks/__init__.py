"""Benchmarks of pfc_fast against published baselines, POT and pure PyTorch (not installed with the
package; run from the repository root). ``report``: ``python -m benchmarks`` (``__main__``); ``cases``: what is timed;
``nc_metrics_bench``, ``sinkhorn_bench``, ``monitor_bench``: the groups; ``baselines``: the
baselines; ``timing``: the machine; ``render``, ``plot``, ``readme``: the results' markdown, PNG
and README section; ``test_benchmarks``: the pytest-benchmark suite; ``gpu_check.sh``: the GPU
machine's check."""
