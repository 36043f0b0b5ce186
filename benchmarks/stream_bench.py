"""The ImageNet-scale streaming benchmark: :class:`pfc_fast.NCAccumulator` over ``N`` rows that arrive
in batches of ``BATCH`` = 4,096 (as from a data loader over ImageNet's 1,281,167 training images,
pooled ResNet-50 features D = 2,048, K = 1,000 classes), against Wu & Papyan's algorithm on the
same stream (:func:`benchmarks.baselines.published_nc_metrics_stream`, float64 and its package's
float32), with the time and the peak memory of each.

Each batch is made when it is asked for, from a seed of its index (``h_i = mu_{y_i} + noise``,
unit Gaussian class means and noise, labels uniform, float32 on the device), so the two passes see
the same rows and nothing of size N is ever held; the times include making the batches twice,
which the reference row ("making the batches") times alone. The GPU runs the full ImageNet size,
the CPU a scaled-down N (the cost is linear in N).
"""
import torch

import pfc_fast

from . import baselines
from .cases import Case, Contender, Table, check_size

#: Rows per batch (a data loader's batch at ImageNet scale).
BATCH = 4096
#: ImageNet-1k's training set.
IMAGENET_N = 1_281_167

TABLES = {"stream": Table("`NCAccumulator` on a stream of batches of 4,096 rows (ImageNet scale), time and peak "
                          "memory", (("N", "N"), ("D", "D"), ("K", "K")), with_memory=True)}

CONTENDERS = {
    "ours": Contender("NCAccumulator", "ours"),
    "wu_papyan": Contender(
        "Wu & Papyan (re-impl., f64)", "baseline",
        memory=lambda p: 7 * p["D"] ** 2 * 8, memory_text="D x D float64 matrices",
        work=lambda p: p["N"] * (p["D"] + p["K"]) * p["D"], work_limit={"cpu": 1e12, "cuda": 1e16},
        work_text="N (D + K) D (GEMMs, cdist)"),
    "wu_papyan_f32": Contender(
        "Wu & Papyan package defaults (f32)", "baseline",
        memory=lambda p: 7 * p["D"] ** 2 * 4, memory_text="D x D float32 matrices",
        work=lambda p: p["N"] * (p["D"] + p["K"]) * p["D"], work_limit={"cpu": 1e12, "cuda": 1e16},
        work_text="N (D + K) D (GEMMs, cdist)"),
    "batches": Contender("making the batches (2 passes)", "reference"),
}
TARGETS = []

#: ``{size: {device type: [params]}}``.
_GRIDS = {
    "tiny": {device: [{"N": 3 * 512, "D": 32, "K": 10}] for device in ("cpu", "cuda")},
    "quick": {"cpu": [{"N": 16 * BATCH, "D": 2048, "K": 1000}],
              "cuda": [{"N": IMAGENET_N, "D": 2048, "K": 1000}]},
    "full": {"cpu": [{"N": 16 * BATCH, "D": 2048, "K": 1000}, {"N": 64 * BATCH, "D": 2048, "K": 1000}],
             "cuda": [{"N": IMAGENET_N, "D": 2048, "K": 1000}]},
}


def cases(device_type, size):
    return [Case("stream", "stream", params, (), tuple(CONTENDERS)) for params in _GRIDS[check_size(size)][device_type]]


class Stream:
    """The batches of a case, each made from a seed of its index: ``stream()`` iterates them."""

    def __init__(self, case, device, seed=0):
        self.rows, self.dim, self.classes = case.params["N"], case.params["D"], case.params["K"]
        self.batch = min(BATCH, self.rows)
        self.device, self.seed = device, seed
        gen = torch.Generator(device=device).manual_seed(seed)
        self.means = torch.randn(self.classes, self.dim, generator=gen, device=device)

    def __call__(self):
        for index, start in enumerate(range(0, self.rows, self.batch)):
            rows = min(self.batch, self.rows - start)
            gen = torch.Generator(device=self.device).manual_seed(self.seed + 1 + index)
            labels = torch.randint(0, self.classes, (rows,), generator=gen, device=self.device)
            feats = self.means[labels] + torch.randn(rows, self.dim, generator=gen, device=self.device)
            yield feats, labels


def make_inputs(case, device, seed=0):
    """``{"stream": Stream}``: nothing of size N is made."""
    return {"stream": Stream(case, device, seed)}


def accumulate(stream):
    """The metrics of the stream by :class:`pfc_fast.NCAccumulator`, both passes."""
    accumulator = pfc_fast.NCAccumulator(stream.classes)
    for feats, labels in stream():
        accumulator.update(feats, labels)
    accumulator.next_pass()
    for feats, labels in stream():
        accumulator.update(feats, labels)
    return accumulator.compute()


def _batches_only(stream):
    for _ in range(2):
        for _ in stream():
            pass


def runner(case, inputs, name):
    """The timed call of contender ``name``; it returns what the contender computes."""
    stream = inputs["stream"]
    calls = {
        "ours": lambda: accumulate(stream),
        "wu_papyan": lambda: baselines.published_nc_metrics_stream(stream, stream.classes, stream.dim, stream.device),
        "wu_papyan_f32": lambda: baselines.published_nc_metrics_stream(stream, stream.classes, stream.dim,
                                                                       stream.device, torch.float32),
        "batches": lambda: _batches_only(stream),
    }
    return calls[name]


def floor(case, name, rates):
    """No floor: the batches are made on the fly."""
    return None
