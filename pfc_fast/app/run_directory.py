"""The run directory of ``pfc-fast train``: :class:`RunDirectory`, the only code that reads or writes
its files.

- ``config.json``: the run's :class:`TrainConfig` and, under ``"environment"``, where it ran;
- ``metrics.jsonl``: one :class:`EpochRecord` per finished epoch;
- ``checkpoint.pt``: the state after the last finished epoch (``torch.save`` of a dict of tensors
  and plain values, loaded with ``weights_only=True``);
- ``report/``: the figures of ``pfc-fast report``.

Every write is atomic (a temporary file, then ``os.replace``), so a reader, or a run killed at any
moment, never sees a partial file.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .config import TrainConfig
from .record import EpochRecord


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)``, then ``os.replace`` onto ``path``: readers never see a partial file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write(text)
    _atomic_write(path, write)


class RunDirectory:
    """The files of one ``pfc-fast train`` run in the directory ``path``."""

    CONFIG = "config.json"
    METRICS = "metrics.jsonl"
    CHECKPOINT = "checkpoint.pt"
    REPORT = "report"

    def __init__(self, path: str) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"RunDirectory({self.path!r})"

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @classmethod
    def default(cls, config: TrainConfig, resume: bool) -> RunDirectory:
        """``runs/DATASET-MODEL-wWIDTH-sSEED``, or with ``-2``, ``-3``, ... when that holds a run
        already: the first free one for a new run, the last taken one for a resumed run."""
        base = f"runs/{config.dataset}-{config.model}-w{config.width}-s{config.seed}"
        taken = [base] if cls(base).holds_run() else []
        while taken and cls(f"{base}-{len(taken) + 1}").holds_run():
            taken.append(f"{base}-{len(taken) + 1}")
        if resume:
            return cls(taken[-1] if taken else base)
        return cls(f"{base}-{len(taken) + 1}" if taken else base)

    @property
    def report_dir(self) -> str:
        """Where ``pfc-fast report`` writes by default."""
        return self._file(self.REPORT)

    def holds_run(self) -> bool:
        """Whether a run was started here (it has a ``config.json``)."""
        return os.path.exists(self._file(self.CONFIG))

    def create(self, config: TrainConfig, environment: dict[str, Any]) -> None:
        """Make the directory and write ``config.json``: ``config`` and, under ``"environment"``,
        where the run is made."""
        os.makedirs(self.path, exist_ok=True)
        saved = {**config.to_dict(), "environment": environment}
        _write_text(self._file(self.CONFIG), json.dumps(saved, indent=1) + "\n")

    def _saved_config(self) -> dict[str, Any]:
        if not self.holds_run():
            raise FileNotFoundError(f"{self.path} holds no pfc-fast run (no {self.CONFIG})")
        with open(self._file(self.CONFIG)) as handle:
            try:
                saved = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{self._file(self.CONFIG)} is not a pfc-fast config ({error})") from error
        if not isinstance(saved, dict):
            raise ValueError(f"{self._file(self.CONFIG)} is not a pfc-fast config (not a JSON object)")
        return saved

    def config(self) -> TrainConfig:
        """The run's options (those a run of an older version did not save take their defaults);
        ``FileNotFoundError`` where no run was started."""
        saved = self._saved_config()
        try:
            return TrainConfig.from_options({key: saved[key] for key in TrainConfig.option_names() if key in saved})
        except (TypeError, ValueError) as error:
            raise ValueError(f"{self._file(self.CONFIG)}: {error}") from error

    def saved_options(self) -> dict[str, Any]:
        """The options as ``config.json`` holds them (without the environment)."""
        return {key: value for key, value in self._saved_config().items() if key != "environment"}

    def environment(self) -> dict[str, Any] | None:
        """Where the run was made (versions, device, processes), or ``None`` where not saved."""
        environment: dict[str, Any] | None = self._saved_config().get("environment")
        return environment

    def records(self) -> list[EpochRecord]:
        """The finished epochs of ``metrics.jsonl``, in order (empty without the file)."""
        if not os.path.exists(self._file(self.METRICS)):
            return []
        records = []
        with open(self._file(self.METRICS)) as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        records.append(EpochRecord.from_dict(json.loads(line)))
                    except (TypeError, ValueError) as error:  # JSONDecodeError is a ValueError
                        raise ValueError(f"{self._file(self.METRICS)}, line {number}: not an epoch record of "
                                         f"pfc-fast train ({error})") from error
        return records

    def write_records(self, records: Sequence[EpochRecord]) -> None:
        """Rewrite ``metrics.jsonl`` with ``records``, atomically."""
        _write_text(self._file(self.METRICS), "".join(json.dumps(r.to_dict()) + "\n" for r in records))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write ``checkpoint.pt`` (``torch.save(state)``), atomically."""
        _atomic_write(self._file(self.CHECKPOINT), lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, map_location: torch.device | str = "cpu") -> dict[str, Any] | None:
        """The state of ``checkpoint.pt`` (tensors on ``map_location``), or ``None`` before the first
        finished epoch."""
        if not os.path.exists(self._file(self.CHECKPOINT)):
            return None
        state: dict[str, Any] = torch.load(self._file(self.CHECKPOINT), map_location=map_location,
                                           weights_only=True)
        return state
