"""PFCMonitor: the neural-collapse metrics of every layer of a network, from the same forward passes.

Progressive feedforward collapse (Wang, Gai & Zhang, arXiv:2405.00985; ``docs/spec.md``
section 2): for layer ``l`` (the stem output, then every residual block output, in forward order)

    PFC1(l) = nc1 = Tr(Sigma_W Sigma_B^+) / K,   PFC2(l) = nc2_etf,   PFC3(l) = nc4,

where ``nc4`` is the fraction of probe samples whose nearest class centre at layer ``l`` differs
from the network's own prediction. The monitor hooks the layers, pushes a probe set through the
network in eval mode under ``torch.no_grad``, and feeds one :class:`pfc_fast.NCAccumulator` per
layer: the exact two-pass method, with a single forward pass when the features of all layers fit
``cache_bytes`` (both accumulator passes then read the cache) and two forward passes otherwise.
Under ``torch.distributed`` every pass ends with ``NCAccumulator.all_reduce``, so every rank gets
the metrics of the whole probe set (the union of the ranks' shards).

Other model families: :func:`default_layers` finds torchvision and timm ResNets (also inside a
wrapper such as a LightningModule) and ViT-style block lists; ``batch_transform``,
``output_transform`` and ``layer_transform`` adapt dict batches, dict outputs (``"logits"``) and
layers that return tuples or token sequences.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Protocol,
                    Sequence, Tuple, Union)

import torch
import torch.distributed as dist
from torch import nn

from . import _inputs
from ._inputs import TensorLike
from .metrics import NCAccumulator, NCMetrics

if TYPE_CHECKING:  # pandas is optional (PFCResult.to_frame) and ships no type information
    import pandas  # type: ignore[import-untyped, import-not-found, unused-ignore]

#: What :meth:`PFCMonitor.measure` takes as the classifier: an ``nn.Linear``, a weight, or ``(weight, bias)``.
Classifier = Union[nn.Linear, torch.Tensor, Tuple[TensorLike, Optional[TensorLike]]]
#: The layers to monitor: module names (``model.named_modules()``), or ``{display name: module name}``.
LayerNames = Union[List[str], Tuple[str, ...], Dict[str, str]]
#: One pass's ``(features of every layer, labels, predictions)`` per batch.
_Batch = Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]
#: A model's inputs: one tensor (``model(x)``) or keyword arguments (``model(**x)``).
ModelInputs = Union[torch.Tensor, Mapping[str, Any]]
#: ``batch -> (inputs, labels)`` for loaders whose batches are not ``(x, y, ...)`` or dicts.
BatchTransform = Callable[[Any], Tuple[ModelInputs, torch.Tensor]]
#: ``model output -> logits (B, num_classes)`` for models that return something else than logits.
OutputTransform = Callable[[Any], torch.Tensor]
#: ``(layer display name, module output) -> features`` (before pooling), e.g. a ViT's class token.
LayerTransform = Callable[[str, Any], torch.Tensor]

#: The keys under which dict batches hold the labels, and the one input a model takes, by default.
LABEL_KEYS = ("labels", "label", "targets", "target", "y")
INPUT_KEYS = ("pixel_values", "images", "image", "inputs", "input", "x")

#: Default budget for caching the probe features of all layers (one forward pass instead of two).
DEFAULT_CACHE_BYTES = 1 << 30


class ScalarWriter(Protocol):
    """What :meth:`PFCResult.log` writes to: ``torch.utils.tensorboard.SummaryWriter``, or any
    object with an ``add_scalar(tag, value, global_step)`` method."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int, /) -> Any: ...


def _abbreviated(names: Sequence[str], shown: int = 3, width: int = 20) -> str:
    """``"a, b, ..., z"``: the first ``shown - 1`` names and the last one when there are more than
    ``shown``, each cut to ``width`` characters (for one-line reprs)."""
    kept = list(names) if len(names) <= shown else [*names[:shown - 1], "...", names[-1]]
    return ", ".join(name if len(name) <= width else name[:width - 3] + "..." for name in kept)


@dataclass(frozen=True)
class PFCResult:
    """What :meth:`PFCMonitor.measure` returns.

    ``layers``: ``{layer name: NCMetrics}`` in forward order; ``accuracy``: the network's accuracy
    on the probe set; ``forward_passes``: 1 (features cached) or 2.

    For logging from a training loop: :meth:`to_scalars` (a flat ``{tag: float}`` dict),
    :meth:`log` (to a TensorBoard ``SummaryWriter``) and :meth:`to_frame` (a pandas DataFrame).
    """

    layers: Dict[str, NCMetrics]
    accuracy: float
    forward_passes: int

    def __repr__(self) -> str:
        """One line: the number of layers, their names abbreviated, the accuracy (4 digits)."""
        return (f"PFCResult({len(self.layers)} layers: {_abbreviated(list(self.layers))}, "
                f"accuracy={self.accuracy:.4g}, forward_passes={self.forward_passes})")

    def to_list(self) -> List[Dict[str, Any]]:
        """The layers as JSON-ready dicts in forward order: ``{"name": ..., **NCMetrics.to_dict()}``."""
        return [{"name": name, **metrics.to_dict()} for name, metrics in self.layers.items()]

    def to_scalars(self, prefix: str = "pfc") -> Dict[str, float]:
        """Every numeric metric of every layer as a flat ``{tag: float}`` dict, for loggers.

        Keys are ``f"{prefix}/{layer}/{metric}"`` (layers in forward order, metrics in the field
        order of :class:`NCMetrics`, the counts ``num_samples``, ``num_classes`` and ``dim``
        included), then ``f"{prefix}/accuracy"`` (the network's probe accuracy); ``prefix=""``
        drops the leading ``"{prefix}/"``. Metrics that are ``None`` at a layer (``nc3`` without a
        classifier of that width, ``nc5`` without OOD features, ...) are left out, and so are the
        fields that are not numbers: ``class_counts`` (a list) and ``per_class`` (per-class
        tensors; read them from ``result.layers[name].per_class``). Degenerate values stay as
        they are (``float("inf")``, see :class:`NCMetrics`). With the permutation null, each
        metric of ``null_mean`` / ``null_std`` follows as ``f"{layer}/{metric}_null_mean"`` and
        ``f"{layer}/{metric}_null_std"``.

        This is the single source of :meth:`log` and :meth:`to_frame`.
        """
        head = f"{prefix}/" if prefix else ""
        scalars: Dict[str, float] = {}
        for layer, metrics in self.layers.items():
            for field in dataclasses.fields(metrics):
                value = getattr(metrics, field.name)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    scalars[f"{head}{layer}/{field.name}"] = float(value)
            for suffix, null in (("null_mean", metrics.null_mean), ("null_std", metrics.null_std)):
                for metric, value in (null or {}).items():
                    scalars[f"{head}{layer}/{metric}_{suffix}"] = float(value)
        scalars[f"{head}accuracy"] = float(self.accuracy)
        return scalars

    def log(self, writer: ScalarWriter, step: int, prefix: str = "pfc") -> None:
        """Write :meth:`to_scalars` to ``writer`` at ``global_step=step``, one ``add_scalar`` per tag.

        ``writer``: a ``torch.utils.tensorboard.SummaryWriter`` (``pip install tensorboard``), or
        any object with ``add_scalar(tag, value, global_step)``. Flushing is the writer's business.
        """
        for tag, value in self.to_scalars(prefix).items():
            writer.add_scalar(tag, value, step)

    def to_frame(self) -> "pandas.DataFrame":
        """The metrics as a pandas DataFrame, built from :meth:`to_scalars`: one row per layer
        (index ``"layer"``, forward order), one float column per metric (in the field order of
        :class:`NCMetrics`, then, where the null was measured, their ``_null_mean`` and then their
        ``_null_std`` columns), ``NaN`` where a layer has no value (e.g. ``nc3`` away from the
        classifier's width). The network's ``accuracy`` is not a layer's: it stays on the result.

        Raises:
            ImportError: pandas is not installed (it is optional: ``pip install pandas``).
        """
        try:
            import pandas  # type: ignore[import-untyped, import-not-found, unused-ignore]
        except ImportError as error:
            raise ImportError("PFCResult.to_frame() needs pandas, an optional dependency of pfc_fast: "
                              "pip install pandas") from error
        rows: Dict[str, Dict[str, float]] = {layer: {} for layer in self.layers}
        for tag, value in self.to_scalars(prefix="").items():
            layer, slash, metric = tag.rpartition("/")  # metric names have no "/", layer names may
            if slash:  # not "accuracy", the network's
                rows[layer][metric] = value
        order = {field.name: i for i, field in enumerate(dataclasses.fields(NCMetrics))}

        def position(column: str) -> Tuple[int, int]:  # the metrics, then their null means, then the stds
            for rank, suffix in enumerate(("_null_mean", "_null_std"), start=1):
                if column.endswith(suffix):
                    return rank, order[column[:-len(suffix)]]
            return 0, order[column]

        columns = sorted({metric for row in rows.values() for metric in row}, key=position)
        frame = pandas.DataFrame.from_dict(rows, orient="index", columns=columns, dtype=float)
        frame.index.name = "layer"
        return frame


def default_layers(model: nn.Module) -> OrderedDict[str, str]:
    """``{display name: module name}`` of the layers to monitor, found in ``model`` or in the first
    submodule (``model.named_modules()`` order) that qualifies, in forward order:

    1. a ``pfc_layers()`` method (e.g. :class:`pfc_fast.app.models.ConstantWidthResNet`): what it
       returns (module names under the submodule that has it);
    2. a ResNet: children ``layer1, layer2, ...`` that are sequences of blocks (torchvision, timm,
       :func:`pfc_fast.app.models.small_image_resnet`): ``"stem"``, the child registered just before
       ``layer1`` (``maxpool``: the input of the first block), then every block, ``"layer1.0"``,
       ``"layer1.1"``, ..., ``"layer4.{last}"``;
    3. otherwise the model's one block list, an ``nn.Sequential`` / ``nn.ModuleList`` of two or
       more modules of one type that have submodules of their own (a ViT's ``blocks`` in timm,
       ``encoder.layers`` in torchvision): every block, named ``"{list}.{block}"`` (e.g.
       ``"blocks.0"``, ``"layers.encoder_layer_0"``). Several such lists, none inside another
       (the stages of a ConvNeXt or a Swin, heads beside a backbone), raise a ``ValueError`` that
       names them: which make the depth is the caller's choice.

    Display names leave out the path to the submodule found (``net.layer1.0`` in a wrapper, such as
    a LightningModule, is ``"layer1.0"``). A model with none of these raises a ``ValueError`` that
    lists candidate module names for ``layers=``.
    """
    modules = list(model.named_modules())
    for path, module in modules:
        head = f"{path}." if path else ""
        pfc_layers = getattr(module, "pfc_layers", None)
        if callable(pfc_layers):
            return OrderedDict((display, head + name) for display, name in pfc_layers().items())
        stages = _resnet_stages(module)
        if stages:
            children = [name for name, _ in module.named_children()]
            before = children.index("layer1") - 1
            names = [("stem", head + children[before])] if before >= 0 else []
            for stage in stages:
                names += [(f"{stage}.{block}", f"{head}{stage}.{block}")
                          for block, _ in getattr(module, stage).named_children()]
            return OrderedDict(names)
    lists = [path for path, module in modules if _is_block_list(module)]
    lists = [path for path in lists if not any(path.startswith(f"{other}.") for other in lists)]  # outermost
    if len(lists) > 1:  # stages of a hierarchical model (ConvNeXt, Swin), or heads beside a backbone
        raise ValueError(f"layers: a {type(model).__name__} has {len(lists)} lists of blocks "
                         f"({_abbreviated(lists, shown=6, width=40)}), so which of them make its depth is not "
                         "clear; pass layers=[module names], e.g. the blocks of every stage in forward order")
    if lists:
        path = lists[0]
        short = path.rpartition(".")[2]
        return OrderedDict((f"{short}.{block}", f"{path}.{block}")
                           for block, _ in dict(modules)[path].named_children())
    candidates = [path for path, module in modules
                  if path and isinstance(module, (nn.Sequential, nn.ModuleList))] or [path for path, _ in modules[1:]]
    raise ValueError(f"layers: no default layers for a {type(model).__name__} (no ResNet stages layer1, layer2, ..., "
                     "no list of blocks of one type, no pfc_layers() method); pass layers=[module names], e.g. "
                     f"of the containers {_abbreviated(candidates, shown=8, width=40) or '(none)'}")


def _resnet_stages(module: nn.Module) -> List[str]:
    """The names ``layer1, layer2, ...`` of ``module``'s children that are sequences of modules,
    consecutive from ``layer1`` (``[]`` where there is no ``layer1``)."""
    children = dict(module.named_children())
    stages: List[str] = []
    while isinstance(children.get(f"layer{len(stages) + 1}"), (nn.Sequential, nn.ModuleList)):
        stages.append(f"layer{len(stages) + 1}")
    return stages


def _is_block_list(module: nn.Module) -> bool:
    """An ``nn.Sequential`` / ``nn.ModuleList`` of two or more modules of one type, each with
    submodules of its own (blocks, not single layers such as ``nn.Linear``)."""
    if not isinstance(module, (nn.Sequential, nn.ModuleList)) or len(module) < 2:
        return False
    blocks = list(module.children())
    return len({type(block) for block in blocks}) == 1 and next(blocks[0].children(), None) is not None


def _resolve_layers(model: nn.Module,
                    layers: Optional[LayerNames]) -> OrderedDict[str, nn.Module]:
    """``{display name: module}`` from ``None`` (defaults), a list of module names or a dict."""
    if layers is None:
        layers = default_layers(model)
    elif isinstance(layers, (list, tuple)):
        layers = OrderedDict((name, name) for name in layers)
    elif not isinstance(layers, dict):
        raise TypeError(f"layers must be None, a list of module names or a dict {{name: module name}}, "
                        f"got {type(layers).__name__}")
    if not layers:
        raise ValueError("layers is empty")
    modules = dict(model.named_modules())
    resolved = OrderedDict()
    for display, module_name in layers.items():
        if not isinstance(module_name, str) or module_name not in modules:
            raise ValueError(f"layers: {module_name!r} is not a module of the model; module names look like "
                             f"{', '.join(repr(n) for n in list(modules)[1:4])}")
        resolved[display] = modules[module_name]
    return resolved


def _classifier(classifier: Optional[Classifier]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(weight, bias)`` detached from an ``nn.Linear``, a weight tensor or a ``(weight, bias)`` pair."""
    if classifier is None:
        return None, None
    if isinstance(classifier, nn.Linear):
        return classifier.weight.detach(), None if classifier.bias is None else classifier.bias.detach()
    if isinstance(classifier, (tuple, list)) and len(classifier) == 2:
        weight, bias = classifier
        return _inputs.as_tensor(weight, "classifier"), None if bias is None else _inputs.as_tensor(bias, "bias")
    if isinstance(classifier, torch.Tensor):
        return classifier.detach(), None
    raise TypeError(f"classifier must be an nn.Linear, a weight tensor or a (weight, bias) pair, "
                    f"got {type(classifier).__name__}")


def split_batch(batch: Any) -> Tuple[ModelInputs, torch.Tensor]:
    """The default ``batch_transform`` of :class:`PFCMonitor`: ``(inputs, labels)`` of a batch.

    ``(x, y, ...)`` (a tuple or list, as a ``DataLoader`` of a dataset of pairs gives): ``(x, y)``.
    A dict (Hugging Face style): the labels under the first of :data:`LABEL_KEYS` present, the
    inputs under the first of :data:`INPUT_KEYS` present, else every other entry, as keyword
    arguments of the model (``model(**inputs)``, e.g. ``input_ids`` and ``attention_mask``).
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        label_key = next((key for key in LABEL_KEYS if key in batch), None)
        if label_key is None:
            raise TypeError(f"loader yields dicts with the keys {', '.join(map(repr, batch))}, none of which holds the "
                            f"labels ({', '.join(map(repr, LABEL_KEYS))}); pass batch_transform=lambda batch: "
                            "(inputs, labels)")
        input_key = next((key for key in INPUT_KEYS if key in batch), None)
        if input_key is not None:
            return batch[input_key], batch[label_key]
        return {key: value for key, value in batch.items() if key != label_key}, batch[label_key]
    raise TypeError(f"loader must yield (inputs, labels) batches or dicts with labels, got a {type(batch).__name__}; "
                    "pass batch_transform=lambda batch: (inputs, labels)")


def logits_of(output: Any) -> torch.Tensor:
    """The default ``output_transform`` of :class:`PFCMonitor`: the logits in a model's output.

    A tensor: itself. A dict holding ``"logits"`` (timm / Hugging Face ``ModelOutput`` are dicts):
    that entry. An object with a tensor attribute ``logits``: that attribute.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        raise TypeError(f"the model returned a {type(output).__name__} with the keys {', '.join(map(repr, output))} "
                        "and no 'logits'; pass output_transform=lambda output: <the logits in output>")
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"the model returned a {type(output).__name__}, not logits; pass "
                    "output_transform=lambda output: <the logits (B, num_classes) in output>")


def _to_device(inputs: ModelInputs, device: torch.device) -> ModelInputs:
    """``inputs`` on ``device``: a tensor, or the tensors of a dict of keyword arguments."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in inputs.items()}


class _FeatureCache:
    """Per-batch features of every layer, labels and predictions, up to ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.batches: List[_Batch] = []
        self.size = 0
        self.complete = True

    def add(self, feats: List[torch.Tensor], labels: torch.Tensor, predictions: torch.Tensor) -> None:
        if not self.complete:
            return
        self.size += sum(f.numel() * f.element_size() for f in feats)
        if self.size > self.budget:
            self.batches, self.complete = [], False
            return
        self.batches.append((feats, labels, predictions))


class PFCMonitor:
    """Neural-collapse metrics of every layer of ``model`` on a probe set.

    Args:
        model: an ``nn.Module`` returning logits ``(B, num_classes)`` (a
            ``DistributedDataParallel`` wrapper is unwrapped: measuring runs the local module, so
            ranks may hold different numbers of probe batches).
        layers: ``None`` (the stem and every residual block of a ResNet, the blocks of a ViT-style
            block list, see :func:`default_layers`), a list of module names
            (``model.named_modules()``), or ``{display name: module name}``.
            Each must run exactly once per forward pass and return a tensor.
        num_classes: number of classes ``K`` of the labels (required; refused where the ``K x K``
            statistics of the layers would not fit the memory free on the model's device).
        pooling: ``"flatten"`` (``D = C*h*w``) or ``"gap"`` (global average pooling, ``D = C``).
        global_mean: ``"unweighted"`` (Papyan) or ``"weighted"``, as in :func:`pfc_fast.nc_metrics`.
        cache_bytes: keep the features of all layers up to this many bytes and measure with one
            forward pass; beyond it, a second forward pass (0: always two).
        group: the ``torch.distributed`` process group to all-reduce over (default: the world).
        batch_transform: ``batch -> (inputs, labels)`` for each batch of the loader; ``inputs`` is
            a tensor (``model(inputs)``) or a dict (``model(**inputs)``). Default
            :func:`split_batch`: ``(x, y, ...)`` tuples, or dicts with ``"labels"`` (or ``"label"``,
            ``"target"``, ...) and ``"pixel_values"`` (or ``"image"``, ``"x"``, ...; else the other
            entries as keyword arguments).
        output_transform: ``model output -> logits (B, num_classes)``. Default :func:`logits_of`:
            a tensor, a dict's ``"logits"`` (Hugging Face, timm), or an ``output.logits`` attribute.
        null_permutations: ``R``, the permutations of the labels whose metrics give each layer's
            ``NCMetrics.null_mean`` and ``null_std`` (the metrics of labels that carry no
            information; 0: none). The labels are permuted within each batch, so the probe
            batches should mix the classes; the features are read once per pass for all ``R + 1``
            labellings. Default 4: the monitor measures layers whose ``D`` may exceed the probe
            size, where the raw metrics of any labels look collapsed (docs/spec.md section 2).
        null_seed: the seed of the permutations (the same seed, the same permutations).
        layer_transform: ``(layer name, module output) -> features`` applied to each monitored
            layer's output before pooling: for layers that return tuples (``lambda name, out:
            out[0]``) or token sequences ``(B, S, C)``, e.g. a ViT's class token ``lambda name, out:
            out[:, 0]`` (``pooling="gap"`` averages the dimensions after the second, so it suits
            ``(B, C, h, w)`` maps, not ``(B, S, C)`` tokens).

    Example::

        monitor = PFCMonitor(model, num_classes=10)
        result = monitor.measure(probe_loader)         # loader of (x, y) batches
        for name, m in result.layers.items():
            print(name, m.nc1, m.nc2_etf, m.nc4)       # PFC1, PFC2, PFC3
    """

    def __init__(self, model: nn.Module, layers: Optional[LayerNames] = None,
                 num_classes: Optional[int] = None, pooling: str = "flatten", global_mean: str = "unweighted",
                 cache_bytes: int = DEFAULT_CACHE_BYTES, group: Optional[Any] = None,
                 batch_transform: BatchTransform = split_batch, output_transform: OutputTransform = logits_of,
                 layer_transform: Optional[LayerTransform] = None, null_permutations: int = 4,
                 null_seed: int = 0) -> None:
        for name, transform in (("batch_transform", batch_transform), ("output_transform", output_transform),
                                ("layer_transform", layer_transform)):
            if transform is not None and not callable(transform):
                raise TypeError(f"{name} must be callable, got {type(transform).__name__}")
        self.batch_transform, self.output_transform = batch_transform, output_transform
        self.layer_transform = layer_transform
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if num_classes is None:
            raise TypeError("num_classes is required (the number of classes of the labels)")
        self.num_classes = _inputs.positive_int(num_classes, "num_classes", minimum=2)
        _inputs.check_choice(pooling, "pooling", _inputs.POOLINGS)
        _inputs.check_choice(global_mean, "global_mean", _inputs.GLOBAL_MEANS)
        self.cache_bytes = _inputs.positive_int(cache_bytes, "cache_bytes", minimum=0)
        self.null_permutations = _inputs.positive_int(null_permutations, "null_permutations", minimum=0)
        self.null_seed = _inputs.positive_int(null_seed, "null_seed", minimum=0)
        self.network = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        if self._device().type == "meta":
            raise ValueError("model is on the meta device (its parameters hold no data); materialise it first, "
                             "e.g. model.to_empty(device=...) and load its weights")
        self.layers = _resolve_layers(self.network, layers)
        # the K x K statistics alone (D = 0); measure() checks again with the layers' dimensions
        _inputs.class_statistics_fit(self.num_classes, [0] * len(self.layers), self._device(),
                                     f"the {len(self.layers)} monitored layer(s) (the K x K matrices alone, whatever D)",
                                     null_permutations=self.null_permutations)
        self.pooling = pooling
        self.global_mean = global_mean
        self.group = group

    def __repr__(self) -> str:
        """One line: the model's class, the layers (names abbreviated), ``num_classes``, ``pooling``."""
        return (f"PFCMonitor({type(self.network).__name__}, {len(self.layers)} layers: "
                f"{_abbreviated(self.layer_names)}, num_classes={self.num_classes}, pooling={self.pooling!r})")

    @property
    def layer_names(self) -> List[str]:
        """The display names of the monitored layers, in the order given (forward order by default)."""
        return list(self.layers)

    @contextlib.contextmanager
    def _hooked(self, pooling: str) -> Iterator[Dict[str, torch.Tensor]]:
        """Hooks on the layers (removed on exit, also on errors), eval mode and no_grad; the
        modules' train/eval flags are restored on exit. Yields the dict the hooks fill."""
        outputs: Dict[str, torch.Tensor] = {}

        def hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
            def store(module: nn.Module, inputs: Any, output: Any) -> None:
                if name in outputs:
                    raise ValueError(f"layers: {name!r} ran more than once in one forward pass; name a module "
                                     "that runs once (e.g. a block, not a shared activation)")
                if self.layer_transform is not None:
                    output = self.layer_transform(name, output)
                if not isinstance(output, torch.Tensor) and self.layer_transform is not None:
                    raise TypeError(f"layer_transform returned a {type(output).__name__} for layer {name!r}, "
                                    "not a tensor")
                if not isinstance(output, torch.Tensor):
                    raise TypeError(f"layers: {name!r} returned a {type(output).__name__}, not a tensor; pass "
                                    "layer_transform=lambda name, output: <the features in output>")
                # pooled copy, taken now: later modules may modify the output in place (ReLU(inplace))
                feats = _inputs.features(output, pooling, name=f"features of layer {name!r}")
                shared = feats.untyped_storage().data_ptr() == output.untyped_storage().data_ptr()
                outputs[name] = feats.clone() if shared else feats
            return store

        modes = [(module, module.training) for module in self.network.modules()]
        handles = []
        try:
            for name, module in self.layers.items():
                handles.append(module.register_forward_hook(hook(name)))
            self.network.eval()
            with torch.no_grad():
                yield outputs
        finally:
            for handle in handles:
                handle.remove()
            for module, training in modes:
                module.training = training

    def _forward(self, inputs: ModelInputs,
                 outputs: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Logits' argmax and the hooked features (list in layer order) of one batch."""
        outputs.clear()
        logits = self.output_transform(self.network(inputs) if isinstance(inputs, torch.Tensor) else
                                       self.network(**inputs))
        missing = [name for name in self.layers if name not in outputs]
        if missing:
            raise ValueError(f"layers: {', '.join(map(repr, missing))} did not run in the forward pass")
        for name in self.layers:
            if isinstance(logits, torch.Tensor) and logits.dim() >= 1 and outputs[name].shape[0] != logits.shape[0]:
                raise ValueError(f"layers: {name!r} gives {outputs[name].shape[0]} rows of features for a batch of "
                                 f"{logits.shape[0]} samples (its output has the samples in another dimension, e.g. "
                                 "sequence-first); pass layer_transform=lambda name, output: <(B, ...) features>")
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] != self.num_classes:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            source = "the model" if self.output_transform is logits_of else "output_transform"
            raise ValueError(f"{source} must return logits of shape (B, num_classes = {self.num_classes}), "
                             f"got {shape}")
        return logits.argmax(1), [outputs[name] for name in self.layers]

    def _device(self) -> torch.device:
        parameter = next(self.network.parameters(), None)
        return torch.device("cpu") if parameter is None else parameter.device

    def _batches(self, loader: Iterable[Any]) -> Iterator[Tuple[ModelInputs, torch.Tensor]]:
        """``(inputs, labels)`` on the model's device from the loader's batches, by ``batch_transform``."""
        device = self._device()
        for batch in loader:
            split = self.batch_transform(batch)
            if not (isinstance(split, tuple) and len(split) == 2):
                raise TypeError(f"batch_transform must return (inputs, labels), got a {type(split).__name__}")
            inputs, labels = split
            if not (isinstance(inputs, torch.Tensor) or (isinstance(inputs, Mapping) and inputs)):
                raise TypeError(f"the inputs of a batch must be a tensor or a non-empty dict of the model's keyword "
                                f"arguments, got a {type(inputs).__name__}; pass batch_transform=lambda batch: "
                                "(inputs, labels)")
            if not isinstance(labels, torch.Tensor):
                raise TypeError(f"the labels of a batch must be a tensor, got a {type(labels).__name__}")
            yield _to_device(inputs, device), labels.to(device, non_blocking=True)

    def _check_every_rank_has_batches(self, has_batches: bool) -> None:
        """Under ``torch.distributed``: raise on every rank together where some rank's loader
        yielded no batch (alone, it would leave the others waiting in the pass's all-reduce)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        flag = torch.tensor([int(has_batches)], device=self._device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        if has_batches and not bool(flag.item()):
            raise ValueError("loader yielded no batches on another rank: under torch.distributed every rank must "
                             "measure at least one batch of the probe set")
        if not has_batches:
            raise ValueError("loader yielded no batches on this rank: under torch.distributed every rank must "
                             "measure at least one batch of the probe set")

    def _end_pass(self, accumulators: List[NCAccumulator]) -> None:
        if dist.is_available() and dist.is_initialized():
            for accumulator in accumulators:
                accumulator.all_reduce(self.group)

    def _accumulators(self, feats: List[torch.Tensor], classifier: Optional[Classifier]) -> List[NCAccumulator]:
        """One accumulator per layer, its features named by the layer in its messages; the
        classifier goes to the layers of matching dimension."""
        weight, bias = _classifier(classifier)
        matches = [weight is not None and weight.shape[-1] == f.shape[1] for f in feats]
        dims = [f.shape[1] for f in feats]
        if weight is not None and not any(matches):
            raise ValueError(f"classifier has D = {weight.shape[-1]} inputs but the layers have D = "
                             f"{', '.join(map(str, dims))} (pooling = {self.pooling!r}; the last block matches a "
                             "ResNet's fc with 'gap')")
        _inputs.class_statistics_fit(self.num_classes, dims, feats[0].device,
                                     f"the {len(dims)} monitored layer(s) (D = {', '.join(map(str, dims))})",
                                     null_permutations=self.null_permutations)
        accumulators = []
        for name, match in zip(self.layers, matches):
            accumulator = NCAccumulator(self.num_classes, weight if match else None, bias if match else None,
                                        self.global_mean, null_permutations=self.null_permutations,
                                        null_seed=self.null_seed)
            accumulator._name = f"features of layer {name!r}"  # as the hooks name them
            accumulators.append(accumulator)
        return accumulators

    def _forward_again(self, loader: Iterable[Any], outputs: Dict[str, torch.Tensor]) -> Iterator[_Batch]:
        """The second pass's ``(feats, labels, predictions)`` when the cache overflowed."""
        if iter(loader) is loader:
            raise ValueError("the probe features exceed cache_bytes, so a second pass over loader is needed, but "
                             "loader is a one-shot iterator; pass a list or a DataLoader, or raise cache_bytes")
        for inputs, labels in self._batches(loader):
            predictions, feats = self._forward(inputs, outputs)
            yield feats, labels, predictions

    def measure(self, loader: Iterable[Any], classifier: Optional[Classifier] = None) -> PFCResult:
        """The NC metrics of every layer on the samples of ``loader``.

        Args:
            loader: an iterable of ``(inputs, labels)`` batches (a DataLoader, a list); read once
                when the features fit ``cache_bytes``, else twice (then it must be re-iterable and
                yield the same samples both times).
            classifier: ``None``, or the last linear layer (``nn.Linear``, weight tensor, or
                ``(weight, bias)``) for ``nc3``/``nc3_etf``, computed at the layers whose feature
                dimension equals its input dimension (``None`` at the others).

        Returns:
            :class:`PFCResult`. ``nc4`` (PFC3) compares each layer's nearest class centre with the
            network's own prediction ``argmax(model(x))``.
        """
        accumulators = None
        cache = _FeatureCache(self.cache_bytes)
        score = torch.zeros(2, dtype=torch.int64, device=self._device())  # correct, total
        with self._hooked(self.pooling) as outputs:
            for inputs, labels in self._batches(loader):
                predictions, feats = self._forward(inputs, outputs)
                if accumulators is None:
                    accumulators = self._accumulators(feats, classifier)
                for accumulator, f in zip(accumulators, feats):
                    accumulator.update(f, labels)
                cache.add(feats, labels, predictions)
                score[0] += (predictions == labels).sum()
                score[1] += labels.shape[0]
            self._check_every_rank_has_batches(accumulators is not None)
            if accumulators is None:
                raise ValueError("loader yielded no batches")
            self._end_pass(accumulators)
            for accumulator in accumulators:
                accumulator.next_pass()
            second = cache.batches if cache.complete else self._forward_again(loader, outputs)
            for feats, labels, predictions in second:
                for accumulator, f in zip(accumulators, feats):
                    accumulator.update(f, labels, predictions)
            self._end_pass(accumulators)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(score, group=self.group)
        correct, total = score.tolist()
        layers = OrderedDict((name, acc.compute()) for name, acc in zip(self.layers, accumulators))
        return PFCResult(layers, correct / total, 1 if cache.complete else 2)

    def features(self, inputs: ModelInputs, pooling: Optional[str] = None) -> OrderedDict[str, torch.Tensor]:
        """``{layer name: (B, D) features}`` of one batch ``inputs`` (a tensor, or a dict of the
        model's keyword arguments; eval mode, no_grad), pooled with ``pooling`` (default: the
        monitor's); e.g. the tracks of :mod:`pfc_fast.geodesic`."""
        pooling = self.pooling if pooling is None else pooling
        _inputs.check_choice(pooling, "pooling", _inputs.POOLINGS)
        if not isinstance(inputs, (torch.Tensor, Mapping)):
            raise TypeError(f"inputs must be a tensor or a dict of the model's keyword arguments, got "
                            f"{type(inputs).__name__}")
        with self._hooked(pooling) as outputs:
            _, feats = self._forward(_to_device(inputs, self._device()), outputs)
        return OrderedDict(zip(self.layers, feats))
