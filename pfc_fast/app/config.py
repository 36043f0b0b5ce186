"""The options of a ``pfc-fast train`` run: :class:`TrainConfig`, saved in ``OUT/config.json``."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._inputs import check_choice, finite_number, positive_int
from .flags import SEED_LIMIT

#: The allowed values of the options with a fixed set of them (``--model``, ``--dataset``, ...).
MODELS = ("resnet18", "resnet34", "resnet50", "cwresnet")
DATASETS = ("embedded", "fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "stl10", "digits")
AUGMENTATIONS = ("none", "crop", "crop-flip")
SCHEDULES = ("cosine", "step", "constant")
POOLINGS = ("flatten", "gap")


@dataclass(frozen=True)
class TrainConfig:
    """The training options and their defaults (each is the flag of the same name, ``_`` for ``-``).

    A resumed run takes them from ``OUT/config.json``; options that a run directory made by an
    older version lacks take their defaults here.
    """

    model: str = "resnet18"
    width: int = 16
    depth: int | None = None
    dataset: str = "embedded"
    data_dir: str | None = None
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    schedule: str = "cosine"
    weight_decay: float = 5e-4
    augment: str = "none"
    seed: int = 0
    train_per_class: int | None = None
    probe_per_class: int = 50
    pooling: str = "flatten"
    geodesic_samples: int = 200
    null_permutations: int = 4

    def __post_init__(self) -> None:
        """Every option checked: ``ValueError`` / ``TypeError`` naming it."""
        for name, choices in (("model", MODELS), ("dataset", DATASETS), ("augment", AUGMENTATIONS),
                              ("schedule", SCHEDULES), ("pooling", POOLINGS)):
            check_choice(getattr(self, name), name, choices)
        for name in ("width", "epochs", "batch_size", "probe_per_class"):
            positive_int(getattr(self, name), name)
        for name in ("depth", "train_per_class"):
            if getattr(self, name) is not None:
                positive_int(getattr(self, name), name)
        positive_int(self.geodesic_samples, "geodesic_samples", minimum=0)
        positive_int(self.null_permutations, "null_permutations", minimum=0)
        if positive_int(self.seed, "seed", minimum=0) >= SEED_LIMIT:
            raise ValueError(f"seed must be an integer from 0 to 2**32 - 1, got {self.seed!r}")
        finite_number(self.lr, "lr", positive=True)
        finite_number(self.momentum, "momentum")
        finite_number(self.weight_decay, "weight_decay")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise TypeError(f"data_dir must be a path (str) or None, got {self.data_dir!r}")

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The option names, in the order of ``config.json``."""
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None) -> TrainConfig:
        """The defaults with ``options`` (a mapping of option names) over them; an unknown name is a
        ``ValueError``."""
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"options must be a mapping of option names, got {type(options).__name__}")
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise ValueError(f"options: {unknown} are not options of pfc-fast train "
                             f"({', '.join(cls.option_names())})")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """``{option: value}``, as ``config.json`` holds them."""
        return dataclasses.asdict(self)
