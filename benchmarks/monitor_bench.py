"""The monitor benchmark: the per-epoch cost of :meth:`pfc_fast.PFCMonitor.measure` (the NC metrics
of every layer on the probe set) against one training epoch, i.e. the overhead of measuring PFC in
``pfc-fast train``.

Both are ``pfc-fast train``'s own (:func:`pfc_fast.app.train.prepare`): its default options
(:class:`pfc_fast.app.config.TrainConfig`: SGD with momentum and weight decay, batch 128, no
augmentation) on the Fashion-MNIST subset inside the package (28x28 images), ``train_per_class``
training images per class, the class-balanced probe set of ``probe_per_class`` images per class
drawn from them, and the model of the case; the epoch is ``run.train_epoch`` and the measurement
``run.measure()`` of the :class:`pfc_fast.app.train.TrainingRun` (flattened features:
``D = width * 28 * 28`` at the stem). ``ours`` measures with the permutation null of ``pfc-fast
train``'s default (``null_permutations = 4``), ``no_null`` without it (``null_permutations = 0``):
their ratio is the null's cost.
"""
from pfc_fast.app.train import prepare

from .cases import Case, Contender, Table, check_size

TABLES = {"monitor": Table("`PFCMonitor.measure` against a training epoch (embedded Fashion-MNIST subset)",
                           (("model", "model"), ("width", "width"), ("depth", "blocks"),
                            ("train_per_class", "train / class"), ("probe_per_class", "probe / class")))}
CONTENDERS = {"train_epoch": Contender("training epoch", "reference"),
              "ours": Contender("PFCMonitor.measure", "ours"),
              "no_null": Contender("PFCMonitor.measure, no null", "baseline")}
TARGETS = []

_RESNET18 = {"model": "resnet18", "width": 16, "depth": None, "train_per_class": 500, "probe_per_class": 50}
_CWRESNET = {"model": "cwresnet", "width": 16, "depth": 8, "train_per_class": 500, "probe_per_class": 50}
#: ``{size: {device type: [params]}}``.
_GRIDS = {
    "tiny": {device: [{"model": "cwresnet", "width": 4, "depth": 2, "train_per_class": 20, "probe_per_class": 5}]
             for device in ("cpu", "cuda")},
    "quick": {"cpu": [_RESNET18], "cuda": [_RESNET18]},
    "full": {"cpu": [_RESNET18, _CWRESNET],
             "cuda": [_RESNET18, {**_RESNET18, "width": 64}, _CWRESNET, {**_CWRESNET, "width": 32}]},
}


def cases(device_type, size):
    return [Case("monitor", "monitor", params, (), tuple(CONTENDERS)) for params in _GRIDS[check_size(size)][device_type]]


def make_inputs(case, device):
    """``{"run": the prepared pfc-fast train run, "plain": the same without the null}`` on ``device``."""
    options = {"dataset": "embedded", "geodesic_samples": 0, **case.params}
    return {"run": prepare(options, device), "plain": prepare({**options, "null_permutations": 0}, device)}


def runner(case, inputs, name):
    """The timed call of contender ``name``."""
    run = inputs["run"]
    return {"train_epoch": lambda: run.train_epoch(1, progress=False), "ours": run.measure,
            "no_null": inputs["plain"].measure}[name]


def floor(case, name, rates):
    """No floor: the cost is the network's forward pass."""
    return None
