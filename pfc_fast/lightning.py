"""PFCCallback: the progressive-feedforward-collapse metrics of every layer, measured by a Lightning
``Trainer`` at the end of training epochs.

Progressive feedforward collapse (Wang, Gai & Zhang, arXiv:2405.00985; ``docs/spec.md`` section 2):
for each monitored layer ``l``, in forward order,

    PFC1(l) = nc1 = Tr(Sigma_W Sigma_B^+) / K,   PFC2(l) = nc2_etf,   PFC3(l) = nc4,

``nc4`` being the fraction of probe samples whose nearest class centre at layer ``l`` differs from
the network's prediction. The callback measures them (and every other metric of
:class:`pfc_fast.NCMetrics`) on a probe set with :class:`pfc_fast.PFCMonitor`, logs them to the
trainer's loggers as ``pfc/<layer>/<metric>`` and keeps each epoch's :class:`pfc_fast.PFCResult`.
``lightning`` is an optional dependency: ``pip install "pfc_fast[lightning]"``.

Example::

    import lightning.pytorch as pl
    from pfc_fast.lightning import PFCCallback

    # module: a LightningModule whose self.net is a ResNet-18 (default layers: stem, layer1.0, ..., layer4.1)
    pfc = PFCCallback(probe_loader, num_classes=10, pooling="gap", classifier=lambda m: m.net.fc)  # nc3 at layer4.1
    trainer = pl.Trainer(max_epochs=50, callbacks=[pfc])      # any loggers: TensorBoard, CSV, W&B
    trainer.fit(module, train_loader)                         # logs pfc/layer1.0/nc1, ..., pfc/accuracy
    pfc.results[49].layers["layer4.1"].nc1                    # {epoch: PFCResult}
    pfc.to_frame()                                            # pandas: a row per (epoch, layer)
    pfc.plot().savefig("pfc.png")                             # PFC1-3 against the layer, a line per epoch
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sized
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler, RandomSampler

try:
    import lightning.pytorch as pl
except ImportError as error:
    raise ImportError("pfc_fast.lightning needs lightning, an optional dependency of pfc_fast: "
                      'pip install lightning (or pip install "pfc_fast[lightning]")') from error

from . import _inputs
from .metrics import NCMetrics
from .monitor import Classifier, LayerNames, ModelInputs, PFCMonitor, PFCResult, _abbreviated, split_batch

if TYPE_CHECKING:  # pandas is optional and ships no type information; matplotlib has none
    import pandas  # type: ignore[import-untyped, import-not-found, unused-ignore]
    from matplotlib.figure import Figure

#: ``classifier``: fixed, or read from the LightningModule at each measurement (``lambda m: m.net.fc``).
ClassifierSource = Union[Classifier, Callable[["pl.LightningModule"], Optional[Classifier]]]

#: The classifiers given as such (any other callable is a function of the LightningModule).
_FIXED_CLASSIFIERS = (nn.Linear, torch.Tensor, tuple, list)
#: The metrics :meth:`PFCCallback.plot` can draw: the numeric fields of :class:`NCMetrics`.
_PLOTTABLE = tuple(field.name for field in dataclasses.fields(NCMetrics)
                   if field.name not in ("class_counts", "per_class"))
_AXIS_LABELS = {"nc1": "PFC1 = nc1", "nc2_etf": "PFC2 = nc2_etf", "nc4": "PFC3 = nc4"}


class _Shard:
    """Batches ``rank, rank + world, ...`` of ``loader``; re-iterable, as a second pass of
    :meth:`PFCMonitor.measure` needs."""

    def __init__(self, loader: Iterable[Any], rank: int, world: int) -> None:
        self.loader, self.rank, self.world = loader, rank, world

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(self.loader, self.rank, None, self.world)


@contextlib.contextmanager
def _buffers_of_rank_zero(module: nn.Module, group: Optional[Any]) -> Iterator[None]:
    """``module``'s buffers (BatchNorm running statistics) replaced by rank 0's, restored on exit:
    DDP keeps the parameters equal on every rank, not the buffers updated since the last forward."""
    buffers = list(module.buffers())
    saved = [buffer.clone() for buffer in buffers]
    for buffer in buffers:
        dist.broadcast(buffer, group=group, group_src=0)
    try:
        yield
    finally:
        for buffer, value in zip(buffers, saved):
            buffer.copy_(value)


class PFCCallback(pl.Callback):
    """Measures the NC metrics of every monitored layer at the end of every ``every_n_epochs``-th
    training epoch, logs them and keeps them.

    Args:
        probe_loader: the probe set, a re-iterable of ``(inputs, labels)`` batches (a list, a
            ``DataLoader``) read at each measurement; not a trainer dataloader, so Lightning gives
            it no ``DistributedSampler``. Under DDP it must yield the same batches on every rank
            (no shuffling, no ``DistributedSampler``) and have ``len(probe_loader) >= world_size``:
            rank ``r`` measures batches ``r, r + world_size, ...`` and the metrics are those of
            the whole probe set, each sample once.
        num_classes: the number of classes ``K`` of the labels.
        layers: module names of the LightningModule (``"net.layer1.0"``; a list or
            ``{display name: module name}``), or ``None``: :func:`pfc_fast.monitor.default_layers`
            of the LightningModule (e.g. a ResNet inside it).
        every_n_epochs: measure after epochs ``n - 1, 2n - 1, ...`` (0-based, Lightning's
            ``current_epoch``; as ``check_val_every_n_epoch``).
        pooling: ``"flatten"`` or ``"gap"``, as :class:`PFCMonitor` takes it.
        classifier: ``None``, the final layer as :meth:`PFCMonitor.measure` takes it (``nn.Linear``,
            weight, ``(weight, bias)``), or a function of the LightningModule returning one, called
            at each measurement, as the weights change (``lambda m: m.net.fc``; under ``ddp_spawn``,
            which pickles the callbacks, a function defined at module level).
        prefix: the first part of the logged names, ``f"{prefix}/{layer}/{metric}"`` and
            ``f"{prefix}/accuracy"`` (:meth:`PFCResult.to_scalars`); also names the callback's
            state in checkpoints.
        **monitor_options: the other arguments of :class:`PFCMonitor` (``global_mean``,
            ``cache_bytes``, ``group``, ``batch_transform``, ``output_transform``,
            ``layer_transform``).

    The network measured is the LightningModule itself: ``module(inputs)`` must give the logits
    (or pass ``output_transform``); the probe inputs are converted by the trainer's precision
    plugin, as its training batches are (``precision="bf16-true"``: bfloat16). The monitor is built at ``on_fit_start``, on the model's final
    device, so that bad layer names stop the fit before its first step. Sanity checking runs no
    training epoch, so it measures nothing.

    Logging: ``module.log_dict(result.to_scalars(prefix), on_epoch=True)`` on every rank, so the
    values go to every logger of the trainer (written by rank 0, at one step per measurement, in
    Lightning's float32) and to ``trainer.callback_metrics`` on every rank, where ``ModelCheckpoint``
    and ``EarlyStopping`` find them (with a validation loop, give them
    ``save_on_train_epoch_end=True`` / ``check_on_train_epoch_end=True``: the metrics come at the
    end of training epochs; between measurements ``callback_metrics`` keeps the last ones, so give
    ``ModelCheckpoint`` the same ``every_n_epochs``). Every rank holds the same result, so the
    values are synchronised with ``reduce_fx="max"``, which leaves them as they are. Degenerate
    layers may give ``inf`` (see :class:`NCMetrics`); it is logged as such.

    Results: :attr:`results` ``{epoch: PFCResult}`` in the order measured, on every rank (in the
    processes ``ddp_spawn`` starts, not the one that launched them), kept in checkpoints
    (:meth:`state_dict`); :meth:`to_frame` and :meth:`plot`.
    """

    def __init__(self, probe_loader: Iterable[Any], num_classes: int, layers: Optional[LayerNames] = None,
                 every_n_epochs: int = 1, pooling: str = "flatten", classifier: Optional[ClassifierSource] = None,
                 prefix: str = "pfc", **monitor_options: Any) -> None:
        if not isinstance(probe_loader, Iterable) or isinstance(probe_loader, Iterator):
            what = "a one-shot iterator" if isinstance(probe_loader, Iterator) else "not iterable"
            raise TypeError(f"probe_loader must be a re-iterable of (inputs, labels) batches (a list, a DataLoader), "
                            f"read at every measurement; got a {type(probe_loader).__name__}, {what}")
        self.num_classes = _inputs.positive_int(num_classes, "num_classes", minimum=2)
        self.every_n_epochs = _inputs.positive_int(every_n_epochs, "every_n_epochs")
        _inputs.check_choice(pooling, "pooling", _inputs.POOLINGS)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if not prefix or prefix.endswith("/"):
            raise ValueError(f"prefix must be a non-empty name without a trailing '/', got {prefix!r}")
        fixed = classifier is None or isinstance(classifier, _FIXED_CLASSIFIERS)
        if not fixed and (isinstance(classifier, nn.Module) or not callable(classifier)):
            raise TypeError(f"classifier must be None, an nn.Linear, a weight tensor, a (weight, bias) pair or a "
                            f"function of the LightningModule returning one (lambda m: m.net.fc), "
                            f"got {type(classifier).__name__}")
        try:
            inspect.signature(PFCMonitor).bind(None, layers=layers, num_classes=num_classes, pooling=pooling,
                                               **monitor_options)
        except TypeError as error:
            raise TypeError(f"monitor_options (the other arguments of PFCMonitor): {error}") from None
        self.probe_loader = probe_loader
        self.layers = layers
        self.pooling = pooling
        self.classifier = classifier
        self.prefix = prefix
        self.monitor_options = monitor_options
        self.results: Dict[int, PFCResult] = {}
        self._monitor: Optional[PFCMonitor] = None

    def __repr__(self) -> str:
        layers = "default" if self.layers is None else _abbreviated(list(self.layers))
        return (f"PFCCallback(num_classes={self.num_classes}, layers: {layers}, every_n_epochs={self.every_n_epochs}, "
                f"pooling={self.pooling!r}, {len(self.results)} result(s))")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        split = self.monitor_options.get("batch_transform", split_batch)
        convert = trainer.precision_plugin.convert_input  # the trainer's precision ("bf16-true": bfloat16 inputs)

        def converted(batch: Any) -> Tuple[ModelInputs, torch.Tensor]:
            inputs, labels = split(batch)
            return convert(inputs), labels

        options = {**self.monitor_options, "batch_transform": converted}
        self._monitor = PFCMonitor(pl_module, layers=self.layers, num_classes=self.num_classes, pooling=self.pooling,
                                   **options)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs:
            return
        result = self._measure(pl_module)
        self.results[epoch] = result
        pl_module.log_dict(result.to_scalars(self.prefix), on_step=False, on_epoch=True, sync_dist=True,
                           reduce_fx="max")

    def _measure(self, pl_module: pl.LightningModule) -> PFCResult:
        monitor = self._monitor
        assert monitor is not None, "on_fit_start builds the monitor"
        source = self.classifier
        classifier = source if source is None or isinstance(source, _FIXED_CLASSIFIERS) else source(pl_module)
        if not (dist.is_available() and dist.is_initialized()):
            return monitor.measure(self.probe_loader, classifier)
        with _buffers_of_rank_zero(pl_module, monitor.group):
            return monitor.measure(self._shard(pl_module.device, monitor.group), classifier)

    def _shard(self, device: torch.device, group: Optional[Any]) -> _Shard:
        """This rank's batches of the probe set, after checking that every rank holds the same
        number of them, at least one per rank (on every rank alike, so that all raise together)."""
        sampler = getattr(self.probe_loader, "sampler", None)
        if isinstance(sampler, (DistributedSampler, RandomSampler)):
            raise ValueError(f"probe_loader has a {type(sampler).__name__}: under torch.distributed every rank must "
                             "read the whole probe set in the same order (PFCCallback shards it by batch); give it "
                             "no sampler and shuffle=False")
        try:
            count = len(cast(Sized, self.probe_loader))  # a TypeError where it has none
        except TypeError:
            raise TypeError("probe_loader must have a len() under torch.distributed, to be shared out by batch over "
                            "the ranks: pass a list of batches or a DataLoader of a map-style dataset") from None
        counts = torch.tensor([count, -count], device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
        most, fewest = counts[0].item(), -counts[1].item()
        if most != fewest:
            raise ValueError(f"probe_loader has {fewest} to {most} batches on the ranks: every rank must hold the "
                             "same probe set")
        world = dist.get_world_size(group)
        if count < world:
            raise ValueError(f"probe_loader has {count} batch(es) for {world} ranks: rank r measures batches r, "
                             f"r + {world}, ..., so len(probe_loader) must be >= {world} (use smaller batches)")
        return _Shard(self.probe_loader, dist.get_rank(group), world)

    def state_dict(self) -> Dict[str, Any]:
        """``{"results": [{"epoch", "layers" (PFCResult.to_list()), "accuracy", "forward_passes"}, ...]}``:
        plain data, which ``torch.load(weights_only=True)`` reads."""
        return {"results": [{"epoch": epoch, "layers": result.to_list(), "accuracy": result.accuracy,
                             "forward_passes": result.forward_passes} for epoch, result in self.results.items()]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """The results of :meth:`state_dict` (those of a checkpoint when a fit resumes), replacing these."""
        self.results = {}
        for entry in state_dict["results"]:
            layers = OrderedDict((layer["name"], NCMetrics(**{k: v for k, v in layer.items() if k != "name"}))
                                 for layer in entry["layers"])
            self.results[entry["epoch"]] = PFCResult(layers, entry["accuracy"], entry["forward_passes"])

    def to_frame(self) -> "pandas.DataFrame":
        """The results as one pandas DataFrame: a row per ``(epoch, layer)`` (a MultiIndex, in the
        order measured), a column per metric, as :meth:`PFCResult.to_frame`.

        Raises:
            ValueError: nothing measured yet.
            ImportError: pandas is not installed (it is optional: ``pip install pandas``).
        """
        if not self.results:
            raise ValueError("no results yet: the callback measures at the end of training epochs")
        frames = {epoch: result.to_frame() for epoch, result in self.results.items()}  # ImportError without pandas
        import pandas  # type: ignore[import-untyped, import-not-found, unused-ignore]
        return pandas.concat(frames, names=["epoch", "layer"])

    def plot(self, metrics: Sequence[str] = ("nc1", "nc2_etf", "nc4")) -> "Figure":
        """A matplotlib Figure: a panel per metric against the layer (forward order), a line per
        epoch measured (marked, coloured from dark to light with the epoch); ``nc1`` on a log scale.
        ``None`` values (``nc3`` away from the classifier's width) are gaps."""
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        if not metrics:
            raise ValueError("metrics is empty")
        for metric in metrics:
            _inputs.check_choice(metric, "metrics", _PLOTTABLE)
        if not self.results:
            raise ValueError("no results yet: the callback measures at the end of training epochs")
        from matplotlib import colormaps
        from matplotlib.figure import Figure

        figure = Figure(figsize=(4 * len(metrics), 3.5), layout="constrained")
        axes = figure.subplots(1, len(metrics), squeeze=False)[0]
        names: List[str] = list(next(iter(self.results.values())).layers)
        colours = colormaps["viridis"]
        for axis, metric in zip(axes, metrics):
            for i, (epoch, result) in enumerate(self.results.items()):
                values = [math.nan if (value := getattr(m, metric)) is None else value for m in result.layers.values()]
                axis.plot(range(len(values)), values, marker="o", label=f"epoch {epoch}",
                          color=colours(i / max(1, len(self.results) - 1)))
            axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize="small")
            axis.set_xlabel("layer")
            axis.set_ylabel(_AXIS_LABELS.get(metric, metric))
            if metric == "nc1":
                axis.set_yscale("log")
        axes[-1].legend(fontsize="small")
        return figure
