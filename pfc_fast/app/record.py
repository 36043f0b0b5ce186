"""One epoch of a ``pfc-fast train`` run: :class:`EpochRecord`, one line of ``OUT/metrics.jsonl``."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..metrics import NCMetrics
from ..monitor import PFCResult, ScalarWriter

#: The geodesic scores (constant-width runs only), :func:`pfc_fast.geodesic.scores`.
GEODESIC_FIELDS = ("lss", "ots", "w_path_ratio")
#: The seconds spent on each part of the epoch.
TIMING_FIELDS = ("train_seconds", "measure_seconds", "test_seconds", "geodesic_seconds")


@dataclass(kw_only=True)
class EpochRecord:
    """What ``pfc-fast train`` measured in one epoch (the fields in the order of the JSON line).

    ``layers`` is :meth:`pfc_fast.PFCResult.to_list`: per layer in forward order, its ``name`` and
    the fields of :class:`pfc_fast.NCMetrics`. ``lss``, ``ots`` and ``w_path_ratio`` are the
    geodesic scores of constant-width runs (``None``, and absent from the JSON line, otherwise; runs
    made before OTS was recorded lack ``ots``). Accuracies are fractions; times are in seconds.
    """

    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    probe_acc: float
    layers: list[dict[str, Any]]
    lss: float | None = None
    ots: float | None = None
    w_path_ratio: float | None = None
    train_seconds: float
    measure_seconds: float
    test_seconds: float
    geodesic_seconds: float
    forward_passes: int

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> EpochRecord:
        """The record of a parsed JSON line (``TypeError`` for missing or unknown fields)."""
        if not isinstance(fields, Mapping):
            raise TypeError(f"an epoch record is a JSON object, got {type(fields).__name__}")
        if type(fields.get("epoch")) is not int:
            raise TypeError(f"its epoch must be an integer, got {fields.get('epoch')!r}")
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the record (geodesic scores only where measured)."""
        return {key: value for key, value in dataclasses.asdict(self).items()
                if not (key in GEODESIC_FIELDS and value is None)}

    @property
    def layer_names(self) -> list[str]:
        """The layers' names, in forward order."""
        return [layer["name"] for layer in self.layers]

    def series(self, field: str) -> list[Any]:
        """``field`` (an :class:`pfc_fast.NCMetrics` field, e.g. ``"nc1"``) of every layer, in forward order."""
        return [layer[field] for layer in self.layers]

    @property
    def has_geodesic(self) -> bool:
        """Whether the epoch measured the geodesic scores (constant-width runs)."""
        return self.lss is not None

    def pfc_result(self) -> PFCResult:
        """The PFC measurement of the epoch, as :meth:`pfc_fast.PFCMonitor.measure` returned it."""
        layers = {layer["name"]: NCMetrics(**{k: v for k, v in layer.items() if k != "name"}) for layer in self.layers}
        return PFCResult(layers=layers, accuracy=self.probe_acc, forward_passes=self.forward_passes)

    def log(self, writer: ScalarWriter, step: int) -> None:
        """Write the epoch to a TensorBoard ``writer`` at ``step``: the PFC metrics as
        :meth:`pfc_fast.PFCResult.log` does (``pfc/LAYER/METRIC``, ``pfc/accuracy``: the probe
        accuracy), then ``train/loss``, ``train/accuracy``, ``test/loss``, ``test/accuracy``,
        ``train/lr``, the geodesic scores (``geodesic/lss``, ...) where measured and the timings
        (``seconds/train``, ...)."""
        self.pfc_result().log(writer, step)
        scalars = {"train/loss": self.train_loss, "train/accuracy": self.train_acc, "test/loss": self.test_loss,
                   "test/accuracy": self.test_acc, "train/lr": self.lr,
                   **{f"geodesic/{field}": getattr(self, field) for field in GEODESIC_FIELDS
                      if getattr(self, field) is not None},
                   **{f"seconds/{field.removesuffix('_seconds')}": getattr(self, field) for field in TIMING_FIELDS}}
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
