"""The run directory of ``pfc-fast train``: :class:`RunDirectory`, the only code that reads or writes
its files.

- ``config.json``: the run's :class:`TrainConfig` and, under ``"environment"``, where it ran;
- ``metrics.jsonl``: one :class:`EpochRecord` per finished epoch;
- ``checkpoint.pt``: the state after the last finished epoch (``torch.save`` of a dict of tensors
  and plain values, loaded with ``weights_only=True``);
- ``checksums.json``: the sha256 of the last two checkpoints with their epochs (the one in place
  and the one being replaced), checked by every load;
- ``train.lock``: present while a ``pfc-fast train`` process holds the directory;
- ``report/``: the figures of ``pfc-fast report``.

Every write is atomic (a temporary file ``NAME.tmpPID``, flushed to disk, then ``os.replace``), so a
reader, or a run killed at any moment, never sees a partial file. The lock is an exclusive
``flock`` of ``train.lock``, held for the life of the run: the kernel releases it when the process
dies, so a lock file left by a killed process is recognised as stale (not locked) and taken over,
and the temporary files such a process left are removed.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .config import TrainConfig
from .record import EpochRecord

_TEMPORARY = re.compile(r"\.tmp\d+$")


class RunDirectoryError(ValueError):
    """A run directory whose files do not agree (a checkpoint that fails its checksum, a
    ``metrics.jsonl`` whose epochs do not match the checkpoint), or that another process holds."""


def _atomic_write(path: str, write: Callable[[Any], None], mode: str = "w") -> None:
    """``write(handle)`` on ``PATH.tmpPID``, flushed to disk, then ``os.replace`` onto ``path``:
    readers never see a partial file. An ``OSError`` (a full disk: ``ENOSPC``) leaves ``path`` as it
    was and names it."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        raise OSError(error.errno, error.strerror, path) from error
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda handle: handle.write(text))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RunDirectory:
    """The files of one ``pfc-fast train`` run in the directory ``path``."""

    CONFIG = "config.json"
    METRICS = "metrics.jsonl"
    CHECKPOINT = "checkpoint.pt"
    CHECKSUMS = "checksums.json"
    LOCK = "train.lock"
    REPORT = "report"

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock: int | None = None
        self._made = False

    def __repr__(self) -> str:
        return f"RunDirectory({self.path!r})"

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def report_dir(self) -> str:
        """Where ``pfc-fast report`` writes by default."""
        return self._file(self.REPORT)

    def holds_run(self) -> bool:
        """Whether a run was started here (it has a ``config.json``)."""
        return os.path.exists(self._file(self.CONFIG))

    # -- the lock ------------------------------------------------------------------------------

    def lock(self) -> str | None:
        """Take the exclusive lock of the directory (made if missing) for this process.

        Returns a note on a stale lock taken over (its process was killed), else ``None``; removes
        the temporary files a killed process left. :class:`RunDirectoryError` where another process
        holds the lock; ``OSError`` where the directory cannot be made or written (a file, a
        read-only place)."""
        if self._lock is not None:
            return None
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise NotADirectoryError(errno.ENOTDIR, "a file, not a directory", self.path)
        made = not os.path.exists(self.path)
        os.makedirs(self.path, exist_ok=True)
        path = self._file(self.LOCK)
        while True:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(descriptor)
                os.close(descriptor)
                raise RunDirectoryError(f"{self.path} is in use by another pfc-fast train ({holder}); wait for it "
                                        "to end, or choose another directory") from None
            except OSError:
                os.close(descriptor)
                raise
            try:  # the file may have been removed by its holder between open and flock: lock the new one
                same = os.path.samestat(os.fstat(descriptor), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(descriptor)
        stale = _read_holder(descriptor) if os.fstat(descriptor).st_size else None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                         "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._lock, self._made = descriptor, made
        for name in os.listdir(self.path):
            if _TEMPORARY.search(name):
                os.remove(self._file(name))
        return f"took over the stale lock of {stale}, which no longer runs" if stale else None

    def unlock(self) -> None:
        """Release the lock (removing ``train.lock``, and the directory if :meth:`lock` made it and
        nothing was written); nothing if this process does not hold it."""
        if self._lock is not None:
            os.remove(self._file(self.LOCK))
            os.close(self._lock)
            self._lock = None
            if self._made and not os.listdir(self.path):
                os.rmdir(self.path)

    # -- the files ------------------------------------------------------------------------------

    def create(self, config: TrainConfig, environment: dict[str, Any]) -> None:
        """Write ``config.json``: ``config`` and, under ``"environment"``, where the run is made."""
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

    def _checksums(self) -> list[dict[str, Any]] | None:
        """The entries ``{"epoch", "sha256"}`` of ``checksums.json`` (``None`` without the file: a
        run directory of a version before 0.2.0)."""
        path = self._file(self.CHECKSUMS)
        if not os.path.exists(path):
            return None
        with open(path) as handle:
            try:
                entries = json.load(handle).get(self.CHECKPOINT)
            except (json.JSONDecodeError, AttributeError) as error:
                raise RunDirectoryError(f"{path} is not a pfc-fast checksum file ({error})") from error
        if not isinstance(entries, list):
            raise RunDirectoryError(f"{path} is not a pfc-fast checksum file (no list of {self.CHECKPOINT} entries)")
        return entries

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write ``checkpoint.pt`` (``torch.save(state)``, ``state["epoch"]`` its epoch) and record its
        sha256, atomically: the checksum first (beside the previous one), then the file, so a run
        killed between the two still verifies."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        # the entry of the checkpoint in place (the epoch before), kept until the new file replaces it
        previous = [entry for entry in self._checksums() or [] if entry.get("epoch") != state["epoch"]][-1:]
        entries = [*previous, {"epoch": state["epoch"], "sha256": _sha256(data)}]
        _write_text(self._file(self.CHECKSUMS), json.dumps({self.CHECKPOINT: entries}, indent=1) + "\n")
        _atomic_write(self._file(self.CHECKPOINT), lambda handle: handle.write(data), mode="wb")

    def _checkpoint_bytes(self) -> tuple[bytes, int | None] | None:
        """The bytes of ``checkpoint.pt`` and the epoch its recorded sha256 gives (``None`` for a
        checkpoint older than checksums), or ``None`` without a checkpoint; a checkpoint that
        matches no recorded sha256 is a :class:`RunDirectoryError`."""
        path = self._file(self.CHECKPOINT)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as handle:  # read before the checksums: a run writes them in the other order
            data = handle.read()
        entries = self._checksums()
        if entries is None:
            return data, None
        digest = _sha256(data)
        for entry in entries:
            if isinstance(entry, dict) and entry.get("sha256") == digest:
                return data, int(entry["epoch"])
        recorded = ", ".join(f"epoch {entry.get('epoch')}" for entry in entries if isinstance(entry, dict))
        raise RunDirectoryError(f"{path} does not match the sha256 recorded in {self._file(self.CHECKSUMS)} "
                                f"(for {recorded or 'no checkpoint'}): the file is damaged. Restore it from a "
                                "backup, or start the run anew in another directory")

    def verified_epoch(self) -> int | None:
        """The epoch of ``checkpoint.pt`` after checking its sha256 (``None`` without a checkpoint, or
        for one older than checksums); :class:`RunDirectoryError` for a damaged one."""
        checkpoint = self._checkpoint_bytes()
        return None if checkpoint is None else checkpoint[1]

    def load_checkpoint(self, map_location: torch.device | str = "cpu") -> dict[str, Any] | None:
        """The state of ``checkpoint.pt`` (tensors on ``map_location``), its sha256 checked, or
        ``None`` before the first finished epoch."""
        checkpoint = self._checkpoint_bytes()
        if checkpoint is None:
            return None
        data, epoch = checkpoint
        state: dict[str, Any] = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        if epoch is not None and state.get("epoch") != epoch:
            raise RunDirectoryError(f"{self._file(self.CHECKPOINT)} holds epoch {state.get('epoch')!r}, its "
                                    f"recorded sha256 says epoch {epoch}")
        return state

    def check_records(self, records: Sequence[EpochRecord], checkpoint_epoch: int, what_to_do: str) -> None:
        """``RunDirectoryError`` unless ``records`` are the epochs ``1..checkpoint_epoch``, or one more
        (a run stopped between writing an epoch's line and its checkpoint)."""
        epochs = [record.epoch for record in records]
        if epochs in (list(range(1, checkpoint_epoch + 1)), list(range(1, checkpoint_epoch + 2))):
            return
        held = _epoch_ranges(epochs) if epochs else "no epochs"
        raise RunDirectoryError(f"{self._file(self.METRICS)} holds {held}, but {self.CHECKPOINT} is after epoch "
                                f"{checkpoint_epoch}: the metrics file was cut short or edited. {what_to_do}")


def _epoch_ranges(epochs: Sequence[int]) -> str:
    """``"epochs 1 to 3, 5"``: runs of consecutive epochs."""
    parts: list[str] = []
    start = previous = epochs[0]
    for epoch in [*epochs[1:], None]:
        if epoch is not None and epoch == previous + 1:
            previous = epoch
            continue
        parts.append(f"{start}" if start == previous else f"{start} to {previous}")
        if epoch is not None:
            start = previous = epoch
    return ("epoch " if len(epochs) == 1 else "epochs ") + ", ".join(parts)


def _read_holder(descriptor: int) -> str:
    """``"process PID on HOST, started TIME"`` from the lock file (what is known of it)."""
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0).decode())
        return f"process {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "a process that left no details"
