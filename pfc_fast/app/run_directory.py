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
    ``metrics.jsonl`` whose epochs do not match the checkpoint) or cannot be read, or that another
    process holds."""


class WriteError(OSError):
    """A write of the run directory failed (``filename``: the file; a full disk: ``ENOSPC``); the
    file is as it was before."""


def _atomic_write(path: str, write: Callable[[Any], None], mode: str = "w") -> None:
    """``write(handle)`` on ``PATH.tmpPID``, flushed to disk, then ``os.replace`` onto ``path``:
    readers never see a partial file. A failure (a full disk) leaves ``path`` as it was and is a
    :class:`WriteError` naming it."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        raise WriteError(error.errno, error.strerror, path) from error
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def _read(path: str, mode: str = "r") -> Any:
    """The contents of ``path`` (text: UTF-8); a file that cannot be read is a
    :class:`RunDirectoryError` naming it."""
    try:
        with open(path, mode) as handle:
            return handle.read()
    except OSError as error:
        raise RunDirectoryError(f"cannot read {path}: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise RunDirectoryError(f"{path} is not a text file of pfc-fast train ({error})") from error


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
        if os.path.islink(self.path) and not os.path.exists(self.path):
            raise FileNotFoundError(errno.ENOENT, f"a symbolic link to {os.readlink(self.path)!r}, which does not "
                                                  "exist", self.path)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise NotADirectoryError(errno.ENOTDIR, "a file, not a directory", self.path)
        made = not os.path.exists(self.path)
        os.makedirs(self.path, exist_ok=True)
        path = self._file(self.LOCK)
        while True:
            try:  # never through a symbolic link: the lock file is written
                descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as error:
                raise OSError(error.errno, f"{error.strerror} ({path})", self.path) from error
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

    def _holds_lock_file(self) -> bool:
        """Whether ``train.lock`` is still the file this process locked (not removed or replaced)."""
        assert self._lock is not None
        try:
            return os.path.samestat(os.fstat(self._lock), os.stat(self._file(self.LOCK), follow_symlinks=False))
        except FileNotFoundError:
            return False

    def check_held(self) -> None:
        """:class:`RunDirectoryError` unless this process holds the lock and ``train.lock`` is still
        its file: one removed or replaced during the run may have let another run in."""
        if self._lock is None or not self._holds_lock_file():
            raise RunDirectoryError(f"{self._file(self.LOCK)} was removed or replaced while this run held "
                                    f"{self.path}, so another run may be writing there: this one stops without "
                                    "writing. Never remove the lock of a running pfc-fast train")

    def unlock(self) -> None:
        """Release the lock (removing ``train.lock`` if it is still this process's, and the directory
        if :meth:`lock` made it and nothing was written); nothing if this process does not hold it."""
        if self._lock is not None:
            if self._holds_lock_file():
                os.remove(self._file(self.LOCK))
            os.close(self._lock)
            self._lock = None
            if self._made and os.path.isdir(self.path) and not os.listdir(self.path):
                os.rmdir(self.path)

    # -- the files ------------------------------------------------------------------------------

    def create(self, config: TrainConfig, environment: dict[str, Any]) -> None:
        """Write ``config.json``: ``config`` and, under ``"environment"``, where the run is made."""
        saved = {**config.to_dict(), "environment": environment}
        _write_text(self._file(self.CONFIG), json.dumps(saved, indent=1) + "\n")

    def _saved_config(self) -> dict[str, Any]:
        if not self.holds_run():
            raise FileNotFoundError(f"{self.path} holds no pfc-fast run (no {self.CONFIG})")
        try:
            saved = json.loads(_read(self._file(self.CONFIG)))
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
        for number, line in enumerate(_read(self._file(self.METRICS)).splitlines(), 1):
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
        """The entries ``{"epoch", "sha256"}`` of ``checksums.json``, ``None`` without the file (before
        the first checkpoint, or in a run made before checksums: ``pfc_fast`` < 0.2.0)."""
        path = self._file(self.CHECKSUMS)
        if not os.path.exists(path):
            return None
        try:
            entries = json.loads(_read(path)).get(self.CHECKPOINT)
        except (json.JSONDecodeError, AttributeError) as error:
            raise RunDirectoryError(f"{path} is not a pfc-fast checksum file ({error})") from error
        if not (isinstance(entries, list) and entries and all(
                isinstance(entry, dict) and type(entry.get("epoch")) is int and entry["epoch"] >= 1
                and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64 for entry in entries)):
            raise RunDirectoryError(f"{path} is not a pfc-fast checksum file (not a list of {{epoch, sha256}} for "
                                    f"{self.CHECKPOINT})")
        return entries

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write ``checkpoint.pt`` (``torch.save(state)``, ``state["epoch"]`` its epoch) and record its
        sha256, atomically: the checksum first (beside the previous one), then the file, so a run
        killed between the two still verifies."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        # the entry of the checkpoint in place (the epoch before), kept until the new file replaces it
        recorded = self._checksums()
        if recorded is None and os.path.exists(self._file(self.CHECKPOINT)):  # a run made before checksums
            recorded = [{"epoch": state["epoch"] - 1, "sha256": _sha256(_read(self._file(self.CHECKPOINT), "rb"))}]
        previous = [entry for entry in recorded or [] if entry["epoch"] != state["epoch"]][-1:]
        entries = [*previous, {"epoch": state["epoch"], "sha256": _sha256(data)}]
        _write_text(self._file(self.CHECKSUMS), json.dumps({self.CHECKPOINT: entries}, indent=1) + "\n")
        _atomic_write(self._file(self.CHECKPOINT), lambda handle: handle.write(data), mode="wb")

    def _checkpoint_bytes(self) -> tuple[bytes, int | None] | None:
        """The bytes of ``checkpoint.pt`` and the epoch its recorded sha256 gives (``None`` for a
        checkpoint older than checksums), or ``None`` without a checkpoint; a checkpoint that
        matches no recorded sha256, or is missing where one was recorded after epoch 1, is a
        :class:`RunDirectoryError`."""
        path = self._file(self.CHECKPOINT)
        if not os.path.lexists(path):
            last = max((entry["epoch"] for entry in self._checksums() or []), default=0)
            if last > 1:  # epoch 1's entry alone: a run stopped before its first checkpoint replaced nothing
                raise RunDirectoryError(f"{path} is missing, though {self.CHECKSUMS} records it after epoch {last}: "
                                        "restore it from a backup, or start the run anew in another directory")
            return None
        data: bytes = _read(path, "rb")  # before the checksums: a run writes them in the other order
        entries = self._checksums()
        if entries is None:
            made_by = (self.environment() or {}).get("pfc_fast", "0") if self.holds_run() else "0"
            if _version(made_by) >= (0, 2):
                raise RunDirectoryError(f"{self._file(self.CHECKSUMS)} is missing, though the run was made by "
                                        f"pfc_fast {made_by}, which records the sha256 of {self.CHECKPOINT} there: "
                                        "restore it from a backup, or start the run anew in another directory")
            return data, None
        digest = _sha256(data)
        for entry in entries:
            if entry["sha256"] == digest:
                return data, entry["epoch"]
        recorded = ", ".join(f"epoch {entry['epoch']}" for entry in entries)
        raise RunDirectoryError(f"{path} does not match the sha256 recorded in {self._file(self.CHECKSUMS)} "
                                f"(for {recorded}): the file is damaged. Restore it from a backup, or start the run "
                                "anew in another directory")

    def verified_epoch(self) -> int | None:
        """The epoch of ``checkpoint.pt`` after checking its sha256 (one older than checksums is
        loaded instead), ``None`` without a checkpoint; :class:`RunDirectoryError` for a damaged one."""
        checkpoint = self._checkpoint_bytes()
        if checkpoint is None:
            return None
        if checkpoint[1] is None:
            state = self.load_checkpoint()
            assert state is not None
            return int(state["epoch"])
        return checkpoint[1]

    def load_checkpoint(self, map_location: torch.device | str = "cpu") -> dict[str, Any] | None:
        """The state of ``checkpoint.pt`` (tensors on ``map_location``), its sha256 checked, or
        ``None`` before the first finished epoch."""
        checkpoint = self._checkpoint_bytes()
        if checkpoint is None:
            return None
        data, epoch = checkpoint
        try:
            state: dict[str, Any] = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as error:  # torch's reader raises RuntimeError, pickle's UnpicklingError, EOFError, ...
            raise RunDirectoryError(f"{self._file(self.CHECKPOINT)} is not a checkpoint of pfc-fast train "
                                    f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): "
                                    "restore it from a backup, or start the run anew in another directory") from error
        if not isinstance(state, dict) or (epoch is not None and state.get("epoch") != epoch):
            raise RunDirectoryError(f"{self._file(self.CHECKPOINT)} does not hold the state after epoch {epoch} that "
                                    f"its recorded sha256 says")
        return state

    def check_records(self, records: Sequence[EpochRecord], checkpoint_epoch: int, what_to_do: str) -> None:
        """``RunDirectoryError`` unless ``records`` are the epochs ``1..checkpoint_epoch``, or one more
        (a run stopped between writing an epoch's line and its checkpoint)."""
        epochs = [record.epoch for record in records]
        if epochs in (list(range(1, checkpoint_epoch + 1)), list(range(1, checkpoint_epoch + 2))):
            return
        held = _epoch_ranges(epochs) if epochs else "no epochs"
        if checkpoint_epoch == 0:
            raise RunDirectoryError(f"{self._file(self.METRICS)} holds {held}, but there is no {self.CHECKPOINT}: "
                                    f"it was removed. {what_to_do}")
        raise RunDirectoryError(f"{self._file(self.METRICS)} holds {held}, but {self.CHECKPOINT} is after epoch "
                                f"{checkpoint_epoch}: the metrics file was cut short or edited. {what_to_do}")


def _version(text: object) -> tuple[int, ...]:
    """``(major, minor)`` of a version string such as ``"0.2.0"`` (``(0,)`` for what is not one)."""
    numbers = re.match(r"(\d+)\.(\d+)", text) if isinstance(text, str) else None
    return (int(numbers[1]), int(numbers[2])) if numbers else (0,)


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
