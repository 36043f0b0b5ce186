"""The options of a ``pfc-fast train`` run: :class:`TrainConfig`, saved in ``OUT/config.json``."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Learning-rate schedules of ``--schedule``.
SCHEDULES = ("cosine", "step", "constant")


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

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The option names, in the order of ``config.json``."""
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None) -> TrainConfig:
        """The defaults with ``options`` (a mapping of option names) over them; an unknown name is a
        ``ValueError``."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise ValueError(f"options: {unknown} are not options of pfc-fast train "
                             f"({', '.join(cls.option_names())})")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """``{option: value}``, as ``config.json`` holds them."""
        return dataclasses.asdict(self)
