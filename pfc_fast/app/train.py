"""``pfc-fast train``: train a ResNet and measure progressive feedforward collapse every epoch.

Each epoch: one pass of SGD (momentum, weight decay) over the training data with a progress bar;
the test accuracy and loss; the neural-collapse metrics of every layer (:class:`PFCMonitor`) on a
class-balanced probe set drawn from the training data (``--probe-per-class`` samples per class,
fixed for the run); for constant-width models, the line-shape score and the W-path ratio of the
blocks (``docs/spec.md`` section 5) on a class-balanced subset of the probe set. One
:class:`EpochRecord` per epoch is appended to ``OUT/metrics.jsonl`` and ``OUT/checkpoint.pt`` is
saved, both written atomically by :class:`RunDirectory`, so Ctrl-C at any moment leaves a
consistent run directory that ``--resume`` continues exactly: data order and augmentation depend
only on (seed, epoch), everything else is in the checkpoint. At the end ``pfc-fast report``
writes the figures to ``OUT/report/``.

Under ``torchrun --nproc_per_node=N -m pfc_fast train ...`` it trains with
DistributedDataParallel (gloo on CPU, NCCL on GPU) over a DistributedSampler, ``--batch-size``
being the global batch; the monitor all-reduces its statistics, so the metrics are those of one
process on the whole probe set. Rank 0 writes the run directory.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler
from tqdm import tqdm

from .. import __version__, geodesic
from ..monitor import PFCMonitor, PFCResult
from .config import AUGMENTATIONS, DATASETS, MODELS, POOLINGS, SCHEDULES, TrainConfig
from .data import augment, balanced_indices, load_dataset, to_float
from .flags import UsageError, non_negative_float, non_negative_int, positive_float, positive_int, seconds, seed
from .models import build_model
from .record import EpochRecord
from .report import write_report
from .run_directory import RunDirectory, RunDirectoryError, WriteError

#: Where ``--tensorboard`` without a value writes, inside the run directory.
TENSORBOARD_DIR = "tensorboard"
#: Seconds a process of a torchrun run waits for the others (``--dist-timeout``).
DIST_TIMEOUT = 300.0
#: The signals that stop a run cleanly (the epoch's writes finish first): Ctrl-C and ``kill``.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``pfc-fast train`` (training options default to None here, see :class:`TrainConfig`)."""
    d = TrainConfig()
    parser.add_argument("--model", choices=MODELS, help=f"network (default {d.model}; cwresnet: constant width)")
    parser.add_argument("--width", type=positive_int,
                        help=f"channels of the first stage (default {d.width}; torchvision's is 64)")
    parser.add_argument("--depth", type=positive_int, help="number of blocks of cwresnet (default 8)")
    parser.add_argument("--dataset", choices=DATASETS, help=f"(default {d.dataset}: Fashion-MNIST subset "
                        "inside the package)")
    parser.add_argument("--data-dir", help="directory of the dataset (torchvision's layout)")
    parser.add_argument("--epochs", type=positive_int, help=f"(default {d.epochs})")
    parser.add_argument("--batch-size", type=positive_int, help=f"global batch size (default {d.batch_size})")
    parser.add_argument("--lr", type=positive_float, help=f"SGD learning rate (default {d.lr})")
    parser.add_argument("--momentum", type=non_negative_float, help=f"SGD momentum (default {d.momentum})")
    parser.add_argument("--schedule", choices=SCHEDULES, help=f"learning-rate schedule per epoch (default "
                        f"{d.schedule}; step: x0.1 at 50%% and 75%% of the epochs)")
    parser.add_argument("--weight-decay", type=non_negative_float, help=f"(default {d.weight_decay})")
    parser.add_argument("--augment", choices=AUGMENTATIONS, help=f"training augmentation (default {d.augment})")
    parser.add_argument("--seed", type=seed, help=f"seed of weights, data order, augmentation, probe (default "
                        f"{d.seed})")
    parser.add_argument("--train-per-class", type=positive_int, help="train on a class-balanced subset of the "
                        "training set with this many samples per class, drawn with --seed (default: all of it)")
    parser.add_argument("--probe-per-class", type=positive_int, help=f"training samples per class on which PFC "
                        f"is measured (default {d.probe_per_class})")
    parser.add_argument("--pooling", choices=POOLINGS, help=f"features of a conv layer: flatten "
                        f"(D = C*h*w) or global average pooling (D = C) (default {d.pooling})")
    parser.add_argument("--null-permutations", type=non_negative_int, help=f"permutations of the probe labels "
                        f"whose metrics give every layer's null (null_mean, null_std in metrics.jsonl; the "
                        f"report's band) (default {d.null_permutations}; 0: off)")
    parser.add_argument("--geodesic-samples", type=non_negative_int, help=f"probe samples for LSS and the W-path "
                        f"ratio of cwresnet (default {d.geodesic_samples}; 0: off)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--out", help="run directory (default runs/DATASET-MODEL-wWIDTH-sSEED, then with -2, -3, "
                        "... if that holds a run; with --resume, the last of them)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    parser.add_argument("--dist-timeout", type=seconds, default=DIST_TIMEOUT, metavar="SECONDS",
                        help=f"under torchrun: how long a process waits for the others in a collective before "
                             f"the run stops with an error (default {DIST_TIMEOUT:g})")
    parser.add_argument("--no-report", action="store_true", help="do not write the figures at the end")
    parser.add_argument("--tensorboard", nargs="?", const=TENSORBOARD_DIR, metavar="DIR",
                        help=f"also write TensorBoard event files: every epoch's metrics (pfc/LAYER/METRIC, train/*, "
                             f"test/*) to DIR (default OUT/{TENSORBOARD_DIR}, beside metrics.jsonl); needs tensorboard "
                             "(pip install 'pfc_fast[tensorboard]')")
    return parser


class Stopped(KeyboardInterrupt):
    """A stop signal (``STOP_SIGNALS``) received: ``signum`` names it; the exit status is 128 + it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def _signals_handled(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """``handler`` for the stop signals inside the block (the main thread only; elsewhere Python
    cannot set handlers, and the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)


@contextlib.contextmanager
def _stop_signals_deferred() -> Iterator[None]:
    """A stop signal (Ctrl-C, SIGTERM) inside the block takes effect at its end, as :class:`Stopped`,
    so that an epoch's metrics line and its checkpoint are written together."""
    received: list[int] = []
    with _signals_handled(lambda signum, frame: received.append(signum)):
        yield
    if received:
        raise Stopped(received[0])


def _rng_states() -> dict[str, Any]:
    numpy_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]  # a tuple when legacy
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]], "python": random.getstate()}


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(tuple(tuple(part) if isinstance(part, list) else part for part in states["python"]))


def _epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The augmentation generator of (seed, epoch, rank): a resumed run replays the same draws."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, rank]).generate_state(2, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


class Distributed:
    """Rank, world size and the collectives of training (a no-op for one process): read from the
    environment ``torchrun`` sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = self.world > 1

    def start(self, device: torch.device, timeout: float = DIST_TIMEOUT) -> None:
        """Join the process group; a collective that waits longer than ``timeout`` seconds fails."""
        if self.active:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout))

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.active:
            return value
        shared = [value]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Sum a list of floats over the ranks (float64)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        if self.active:
            dist.all_reduce(tensor)
        result: list[float] = tensor.tolist()
        return result

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank: after an epoch of
        DDP each rank's last forward pass has updated its own, and the measurement needs one model."""
        if self.active:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def stop(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def _resolve_device(name: str, ddp: Distributed) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError("--device", f"{name!r} is not a device ({error})") from error
    if device.type not in ("cpu", "cuda"):
        raise UsageError("--device", f"{name!r}: pfc-fast train runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device", "CUDA is not available on this machine; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", ddp.local_rank if ddp.active else torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise UsageError("--device", f"{device} does not exist ({torch.cuda.device_count()} CUDA devices)")
        torch.cuda.set_device(device)
    return device


def _default_paths(config: TrainConfig) -> Iterator[str]:
    """``runs/DATASET-MODEL-wWIDTH-sSEED``, then with ``-2``, ``-3``, ..."""
    base = f"runs/{config.dataset}-{config.model}-w{config.width}-s{config.seed}"
    yield base
    for number in itertools.count(2):
        yield f"{base}-{number}"


def _locked(path: str, flag: str) -> tuple[RunDirectory, str | None]:
    """The run directory ``path``, locked by this process (see :meth:`RunDirectory.lock`); a
    directory that another run holds, or that cannot be made or written, is a :class:`UsageError`
    against ``flag``."""
    out = RunDirectory(path)
    try:
        note = out.lock()
    except RunDirectoryError as error:
        raise UsageError(flag, str(error)) from error
    except OSError as error:
        raise UsageError(flag, f"cannot use {path!r} as the run directory: {error.strerror}") from error
    return out, note


def _claim(args: argparse.Namespace, ddp: Distributed) -> tuple[RunDirectory, TrainConfig, str | None]:
    """The run directory, locked, and the training options: from OUT/config.json when resuming
    (flags given must agree), else the flags over the defaults. Without ``--out``: the first
    default directory that holds no run and no other process (the last that holds a run, with
    ``--resume``). Returns a note on a stale lock taken over, if any."""
    given = {key: getattr(args, key) for key in TrainConfig.option_names() if getattr(args, key) is not None}
    if args.out is not None and not args.out.strip():
        raise UsageError("--out", "is empty; give a directory, or leave --out out for the default one")
    flag = "--out" if args.out else "--resume"
    if args.resume:
        path = args.out
        if path is None:
            taken = list(itertools.takewhile(lambda p: RunDirectory(p).holds_run(),
                                             _default_paths(TrainConfig.from_options(given))))
            path = taken[-1] if taken else next(_default_paths(TrainConfig.from_options(given)))
        if not RunDirectory(path).holds_run():
            raise UsageError("--resume", f"{path} holds no run to resume (no {RunDirectory.CONFIG}); drop "
                                         "--resume to start one")
        out, note = _locked(path, flag)
        try:
            saved = out.config()
            for key, value in given.items():
                if getattr(saved, key) != value and key != "data_dir":  # the data may have moved
                    raise UsageError(f"--{key.replace('_', '-')}", f"the run in {out.path} has "
                                     f"{getattr(saved, key)!r}, not {value!r}; a resumed run keeps its options (use "
                                     "another --out for a new run)")
        except ValueError as error:  # a config.json that is not one, or cannot be read
            out.unlock()
            raise UsageError("--resume", str(error)) from error
        except BaseException:
            out.unlock()
            raise
        return out, dataclasses.replace(saved, **given), note
    config = TrainConfig.from_options(given)
    if config.depth is not None and config.model != "cwresnet":
        raise UsageError("--depth", f"applies to cwresnet only; {config.model} has a fixed depth")
    if config.batch_size < ddp.world:
        raise UsageError("--batch-size", f"{config.batch_size} is smaller than the number of processes "
                                         f"({ddp.world})")
    if args.out:
        out, note = _locked(args.out, "--out")
        if out.holds_run():
            out.unlock()
            raise UsageError("--out", f"{out.path} already holds a run; pass --resume to continue it, or choose "
                                      "another --out")
        return out, config, note
    for path in _default_paths(config):  # another run may be choosing at the same moment: the lock decides
        if RunDirectory(path).holds_run():
            continue
        try:
            out, note = _locked(path, "--out")
        except UsageError:
            if os.path.isdir(path):  # held by a run that is being started
                continue
            raise
        if not out.holds_run():
            return out, config, note
        out.unlock()
    raise AssertionError("unreachable: the default run directories are endless")


@contextlib.contextmanager
def _claimed(args: argparse.Namespace, ddp: Distributed) -> Iterator[tuple[RunDirectory, TrainConfig]]:
    """:func:`_claim` on rank 0, its result (or its error) on every rank; rank 0 holds the lock
    until the block ends."""
    out: RunDirectory | None = None
    claimed: tuple[str, Any, Any] | None = None  # ("ok", path, options) or ("error", flag, message)
    if ddp.rank == 0:
        try:
            out, config, note = _claim(args, ddp)
            if note:
                print(f"pfc-fast train: {out.path}: {note}", file=sys.stderr)
            claimed = ("ok", out.path, config.to_dict())
        except UsageError as error:
            claimed = ("error", error.argument, error.message)
    claimed = ddp.share(claimed)
    assert claimed is not None
    try:
        if claimed[0] == "error":
            raise UsageError(claimed[1], claimed[2])
        yield out or RunDirectory(claimed[1]), TrainConfig.from_options(claimed[2])
    finally:
        if out is not None:
            out.unlock()


class TrainingRun:
    """Data, network, optimiser, scheduler and monitor of one ``pfc-fast train`` run (one process of
    it), as its first epoch finds them: made by :func:`prepare` and :func:`restore`.

    ``network`` is the model (``model`` the same, wrapped in DistributedDataParallel under
    torchrun); ``monitor`` its :class:`PFCMonitor`; ``data`` the :class:`~pfc_fast.app.data.ImageData`
    (``train_images`` / ``train_labels`` and ``test_images`` / ``test_labels`` on the device);
    ``probe`` the indices of the probe set in the training data; ``geodesic`` those of the subset
    for the geodesic scores (``None`` unless the model keeps its width); ``directory`` where
    checkpoints go (``None``: nowhere). Bad options raise :class:`UsageError` naming the flag.
    """

    def __init__(self, config: TrainConfig, directory: RunDirectory | None, device: torch.device,
                 ddp: Distributed) -> None:
        self.config, self.directory, self.device, self.ddp = config, directory, device, ddp
        try:
            data = load_dataset(config.dataset, config.data_dir)
        except FileNotFoundError as error:
            raise UsageError("--data-dir", str(error)) from error
        except ValueError as error:  # a file that is not what its name says
            raise UsageError("--dataset", str(error)) from error
        if config.train_per_class is not None:
            try:
                subset = balanced_indices(data.train_labels, config.train_per_class, data.num_classes, config.seed,
                                          name="train_per_class")
            except ValueError as error:
                raise UsageError("--train-per-class", str(error)) from error
            data = dataclasses.replace(data, train_images=data.train_images[subset],
                                       train_labels=data.train_labels[subset])
        self.data = data
        try:
            probe = balanced_indices(data.train_labels, config.probe_per_class, data.num_classes, config.seed)
        except ValueError as error:
            raise UsageError("--probe-per-class", str(error)) from error
        self.mean, self.std = data.normalization()
        self.train_images, self.train_labels = data.train_images.to(device), data.train_labels.to(device)
        self.test_images, self.test_labels = data.test_images.to(device), data.test_labels.to(device)
        self.probe = probe.to(device)
        torch.manual_seed(config.seed)
        self.network = build_model(config.model, data.num_classes, data.channels, config.width,
                                   config.depth).to(device)
        self.model: torch.nn.Module = self.network
        if ddp.active:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.network, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.SGD(self.network.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scheduler = self._scheduler()
        # the sampler reads only the length of its "dataset": the indices of the training data
        indices = cast("Dataset[int]", range(len(self.train_labels)))
        self.sampler: DistributedSampler[int] = DistributedSampler(indices, num_replicas=ddp.world, rank=ddp.rank,
                                                                   shuffle=True, seed=config.seed)
        self.local_batch = config.batch_size // ddp.world
        self.monitor = PFCMonitor(self.model, num_classes=data.num_classes, pooling=config.pooling,
                                  null_permutations=config.null_permutations, null_seed=config.seed)
        self.geodesic = self._geodesic_subset()

    def _scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        epochs, kind = self.config.epochs, self.config.schedule
        if kind == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=epochs)
        if kind == "step":
            milestones = sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})
            return torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=milestones, gamma=0.1)
        return torch.optim.lr_scheduler.ConstantLR(self.optimizer, factor=1.0, total_iters=0)

    def _geodesic_subset(self) -> torch.Tensor | None:
        """Indices (into the training set) for LSS and the W-path ratio: a class-balanced subset of
        the probe set; ``None`` unless the model keeps its width (cwresnet)."""
        if self.config.model != "cwresnet" or self.config.geodesic_samples == 0:
            return None
        per_class = max(1, self.config.geodesic_samples // self.data.num_classes)
        per_class = min(per_class, self.config.probe_per_class)
        chosen = balanced_indices(self.train_labels[self.probe].cpu(), per_class, self.data.num_classes,
                                  self.config.seed)
        return self.probe[chosen.to(self.device)]

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images to the network's input (normalised with the training set's statistics)."""
        return to_float(images, self.mean, self.std)

    def sync(self) -> None:
        """Wait for the device (for timing)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_epoch(self, epoch: int, progress: bool) -> tuple[float, float]:
        """One epoch of SGD; returns (mean loss, accuracy) over the epoch, in train mode."""
        self.model.train()
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(self.sampler), device=self.device)
        generator = _epoch_generator(self.config.seed, epoch, self.ddp.rank)
        batches = order.split(self.local_batch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        bar = tqdm(batches, desc=f"epoch {epoch}/{self.config.epochs}", leave=False, disable=not progress,
                   unit="batch", dynamic_ncols=True)
        for step, index in enumerate(bar):
            images = augment(self.train_images[index], self.config.augment, generator)
            labels = self.train_labels[index]
            logits = self.model(self.inputs(images))
            loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach() * len(index)
            correct += (logits.argmax(1) == labels).sum()
            if progress and step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        self.scheduler.step()
        self.ddp.broadcast_buffers(self.network)
        total_loss, total_correct, count = self.ddp.sum([float(loss_sum), float(correct), len(order)], self.device)
        return total_loss / count, total_correct / count

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """(mean loss, accuracy) of the network in eval mode; each rank takes a shard."""
        mode = self.network.training
        self.network.eval()
        loss_sum = correct = 0.0
        shard = torch.arange(self.ddp.rank, len(labels), self.ddp.world, device=self.device)
        with torch.no_grad():
            for index in shard.split(512):
                logits = self.network(self.inputs(images[index]))
                loss_sum += float(F.cross_entropy(logits, labels[index], reduction="sum"))
                correct += float((logits.argmax(1) == labels[index]).sum())
        self.network.train(mode)
        total_loss, total_correct, count = self.ddp.sum([loss_sum, correct, len(shard)], self.device)
        return total_loss / count, total_correct / count

    def measure(self) -> PFCResult:
        """PFC metrics of every layer on this rank's shard of the probe set, all-reduced."""
        shard = self.probe[self.ddp.rank::self.ddp.world]
        loader = [(self.inputs(self.train_images[index]), self.train_labels[index]) for index in shard.split(512)]
        fc = None
        if self.config.model != "cwresnet" and self.config.pooling == "gap":
            fc = cast(torch.nn.Linear, self.network.fc)  # a torchvision ResNet's classifier
        return self.monitor.measure(loader, classifier=fc)

    def geodesic_scores(self) -> dict[str, float]:
        """LSS, OTS (stem against last block) and W-path ratio of the globally pooled features of
        the stem and every block (``pfc_fast.geodesic``), computed on the CPU (a few hundred samples)."""
        if self.geodesic is None:
            raise ValueError(f"the geodesic scores need a constant-width model (cwresnet) and geodesic_samples > 0; "
                             f"this run has {self.config.model} and {self.config.geodesic_samples}")
        images = self.inputs(self.train_images[self.geodesic])
        return geodesic.scores([t.double().cpu() for t in self.monitor.features(images, pooling="gap").values()])

    def _directory(self) -> RunDirectory:
        if self.directory is None:
            raise ValueError("this run has no run directory (prepare(..., out=None)); pass out=DIR")
        return self.directory

    def save_checkpoint(self, epoch: int) -> None:
        """Save the state after ``epoch`` to the run directory."""
        state = {"epoch": epoch, "model": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": _rng_states(), "config": self.config.to_dict()}
        self._directory().save_checkpoint(state)

    def load_checkpoint(self) -> int:
        """Restore the last saved epoch; returns it (0 when the run has no checkpoint yet)."""
        state = self._directory().load_checkpoint(self.device)
        if state is None:
            return 0
        self.network.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_states(state["rng"])
        epoch: int = state["epoch"]
        return epoch


def prepare(options: Mapping[str, Any] | TrainConfig | None = None, device: torch.device | str = "cpu",
            out: str | None = None) -> TrainingRun:
    """A run of ``pfc-fast train`` set up as its first epoch finds it, without training.

    ``options``: a :class:`TrainConfig`, or a mapping of its option names over the defaults. Loads
    the data, draws the probe set, builds the network (initialised with the seed), optimiser,
    scheduler and monitor. ``run.train_epoch(epoch, progress)`` and ``run.measure()`` are the epoch
    and the PFC measurement that ``pfc-fast train`` times; ``out`` is the run directory where a
    checkpoint would be saved. Bad values raise :class:`UsageError` naming the flag.
    """
    config = options if isinstance(options, TrainConfig) else TrainConfig.from_options(options)
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a device ({error})") from error
    return TrainingRun(config, RunDirectory(out) if out is not None else None, where, Distributed())


def restore(run_dir: str, device: torch.device | str = "cpu", checkpoint: bool = True) -> tuple[TrainingRun, int]:
    """The run in ``run_dir`` rebuilt from its ``config.json``: data, probe set, network, monitor.

    With ``checkpoint`` the network holds the weights of the last saved epoch, else those it was
    initialised with (the run's seed). Returns ``(run, epoch)`` (epoch 0 without a checkpoint), the
    network in eval mode; see :class:`TrainingRun` for what serves analyses of a finished run.
    """
    directory = RunDirectory(run_dir)
    if not directory.holds_run():
        raise ValueError(f"run_dir {run_dir!r} holds no pfc-fast run (no {RunDirectory.CONFIG})")
    run = prepare(directory.config(), device, run_dir)
    epoch = run.load_checkpoint() if checkpoint else 0
    run.network.eval()
    return run, epoch


def _environment(device: torch.device, ddp: Distributed) -> dict[str, Any]:
    return {"pfc_fast": __version__, "torch": torch.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "world_size": ddp.world}


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` (the flags of :func:`add_arguments`) say; returns the process exit status
    (130 after Ctrl-C)."""
    ddp = Distributed()
    device = _resolve_device(args.device, ddp)
    if args.tensorboard is not None:
        _summary_writer()  # before anything is written
    try:
        with _signals_handled(_raise_stopped):
            ddp.start(device, args.dist_timeout)
            with _claimed(args, ddp) as (out, config):
                return _train(args, config, out, device, ddp)
    except Stopped as stop:  # before the epochs began (the epochs report their own)
        if ddp.rank == 0:
            print(f"\n{signal.Signals(stop.signum).name}: stopped before training began", file=sys.stderr)
        return 128 + stop.signum
    except RuntimeError as error:  # gloo's and NCCL's timeouts are RuntimeErrors (DistError among them)
        if not (ddp.active and "timed out" in str(error).lower()):
            raise
        print(f"pfc-fast train: rank {ddp.rank} waited longer than --dist-timeout ({args.dist_timeout:g} s) for the "
              f"other processes of the run (one of them stopped or died?): {str(error).splitlines()[0]}",
              file=sys.stderr)
        return 1
    finally:
        ddp.stop()


def _resume_point(state: TrainingRun, out: RunDirectory, is_main: bool) -> tuple[int, list[EpochRecord]]:
    """The last saved epoch, its sha256 checked, and the records up to it (rank 0 drops a line
    written after the checkpoint from ``metrics.jsonl``: its epoch is redone); a damaged checkpoint
    or a ``metrics.jsonl`` whose epochs do not match it is a :class:`UsageError` against ``--resume``."""
    try:
        start = state.load_checkpoint()
        records = out.records()
        out.check_records(records, start, "Restore it from a backup, or start the run anew with another --out (the "
                                          "metrics of past epochs cannot be recomputed from the last checkpoint)")
    except ValueError as error:  # RunDirectoryError, or a line that is no epoch record
        raise UsageError("--resume", str(error)) from error
    kept = [r for r in records if r.epoch <= start]
    if is_main and len(kept) < len(records):  # a run stopped between the two writes of an epoch
        out.write_records(kept)
    return start, kept


def _held(out: RunDirectory, saved: int) -> str:
    epochs = {0: "no finished epoch", 1: "epoch 1"}.get(saved, f"epochs 1 to {saved}")
    return f"{out.path} holds {epochs}"


def _train(args: argparse.Namespace, config: TrainConfig, out: RunDirectory, device: torch.device,
           ddp: Distributed) -> int:
    """The epochs of the run (rank 0 writes ``out``); returns the exit status: 0, 1 (the training
    diverged, a measurement failed, or a write failed: the directory stays resumable), or 128 + the
    signal number after Ctrl-C or SIGTERM (the epoch being written is finished first)."""
    is_main = ddp.rank == 0
    saved = 0
    board: Any = None  # the SummaryWriter of --tensorboard
    with contextlib.ExitStack() as stack:  # closes the TensorBoard writer
        try:
            state = TrainingRun(config, out, device, ddp)
            if is_main and not args.resume:
                out.create(config, _environment(device, ddp))
            ddp.barrier()
            saved, records = _resume_point(state, out, is_main) if args.resume else (0, [])
            if is_main and args.tensorboard is not None:
                board = stack.enter_context(_tensorboard(args.tensorboard, out, saved))
            if is_main:
                data = state.data
                print(f"pfc-fast train: {config.dataset} ({len(data.train_labels)} train / {len(data.test_labels)} "
                      f"test, {data.num_classes} classes), {config.model} width {config.width}, "
                      f"{sum(p.numel() for p in state.network.parameters()):,} parameters, {device}"
                      f"{f' x {ddp.world} processes' if ddp.active else ''}; PFC of "
                      f"{len(state.monitor.layer_names)} layers on {len(state.probe)} probe samples; run directory "
                      f"{out.path}" + (f", resuming after epoch {saved}" if saved else ""), flush=True)
            for epoch in range(saved + 1, config.epochs + 1):
                record = _epoch(state, epoch, is_main)
                if is_main:
                    out.check_held()
                    with _stop_signals_deferred():
                        out.write_records([*records, record])
                        state.save_checkpoint(epoch)
                        records.append(record)
                        saved = epoch
                    if board is not None:
                        record.log(board, epoch)
                        board.flush()  # on disk with the epoch's files: a killed run loses no event
                    first, last = record.layers[0], record.layers[-1]
                    tqdm.write(f"epoch {epoch:3d}  train loss {record.train_loss:.4f} acc {record.train_acc:.4f}  "
                               f"test loss {record.test_loss:.4f} acc {record.test_acc:.4f}  nc1 {first['nc1']:.3g} "
                               f"({first['name']}) .. {last['nc1']:.3g} ({last['name']})  train "
                               f"{record.train_seconds:.1f}s  PFC {record.measure_seconds:.2f}s", file=sys.stdout)
                saved = epoch
                ddp.barrier()
            if is_main and not args.no_report:
                print(f"report: {write_report(out.path)}")
        except KeyboardInterrupt as stop:
            signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
            if is_main:
                print(f"\n{signal.Signals(signum).name}: stopped; {_held(out, saved)}: {_continue(out)}",
                      file=sys.stderr)
            return 128 + signum
        except BrokenPipeError:  # the standard output was closed (``| head``): stop as a signal would
            sys.stdout = open(os.devnull, "w")  # nothing more to the closed pipe, not even at exit
            if is_main:
                print(f"pfc-fast train: the standard output was closed: stopped; {_held(out, saved)}: {_continue(out)}",
                      file=sys.stderr)
            return 128 + signal.SIGPIPE
        except (_EpochFailed, RunDirectoryError) as failure:
            if is_main:
                print(f"pfc-fast train: {failure}. {_held(out, saved)}.", file=sys.stderr)
            return 1
        except WriteError as error:  # the run directory's writes (a full disk); each write is atomic
            if is_main:
                print(f"pfc-fast train: cannot write {error.filename}: {error.strerror}. {_held(out, saved)}: make "
                      f"room (or fix the cause), then {_continue(out)}", file=sys.stderr)
            return 1
    return 0


def _summary_writer() -> Any:
    """TensorBoard's ``SummaryWriter`` class; a :class:`UsageError` against ``--tensorboard`` where
    tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise UsageError("--tensorboard", f"needs tensorboard ({error}): pip install "
                                          "'pfc_fast[tensorboard]'") from error
    return SummaryWriter


@contextlib.contextmanager
def _tensorboard(path: str, out: RunDirectory, saved: int) -> Iterator[Any]:
    """A TensorBoard writer on ``path`` (``TENSORBOARD_DIR``: inside ``out``) for the epochs after
    ``saved``: the events a stopped run wrote past its checkpoint are purged (their epochs are redone)."""
    directory = os.path.join(out.path, path) if path == TENSORBOARD_DIR else path
    try:
        writer = _summary_writer()(log_dir=directory, purge_step=saved + 1)
    except OSError as error:
        raise UsageError("--tensorboard", f"cannot write to {directory!r}: {error.strerror}") from error
    try:
        yield writer
    finally:
        writer.close()


def _continue(out: RunDirectory) -> str:
    """How to go on with the run in ``out``: resume it, or start it again where nothing was kept."""
    if out.holds_run():
        return f"continue with --out {out.path} --resume"
    return "start it again with the same flags (nothing was kept)"


class _EpochFailed(Exception):
    """An epoch that cannot go on: the training diverged or the measurement failed."""


def _epoch(state: TrainingRun, epoch: int, is_main: bool) -> EpochRecord:
    """Train, measure and test one epoch; its record (timings included). :class:`_EpochFailed`
    where the training loss is not finite or the features of a layer are not."""
    config = state.config
    state.sync()
    tick = time.perf_counter()
    lr = state.optimizer.param_groups[0]["lr"]
    train_loss, train_acc = state.train_epoch(epoch, progress=is_main)
    if not math.isfinite(train_loss):
        raise _EpochFailed(f"the training diverged in epoch {epoch} (mean training loss {train_loss}); start a new "
                           f"run with a smaller --lr (this one has {config.lr:g}, --momentum {config.momentum:g}, "
                           f"--weight-decay {config.weight_decay:g})")
    state.sync()
    trained = time.perf_counter()
    try:
        pfc = state.measure()
    except ValueError as error:  # features that are not finite, named by the monitor with their layer
        raise _EpochFailed(f"the PFC measurement of epoch {epoch} failed: {error}") from error
    state.sync()
    measured = time.perf_counter()
    test_loss, test_acc = state.evaluate(state.test_images, state.test_labels)
    state.sync()
    tested = time.perf_counter()
    scores = state.geodesic_scores() if state.geodesic is not None and is_main else {}
    return EpochRecord(epoch=epoch, lr=lr, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                       test_acc=test_acc, probe_acc=pfc.accuracy, layers=pfc.to_list(), lss=scores.get("lss"),
                       ots=scores.get("ots"), w_path_ratio=scores.get("w_path_ratio"),
                       train_seconds=trained - tick, measure_seconds=measured - trained,
                       test_seconds=tested - measured, geodesic_seconds=time.perf_counter() - tested,
                       forward_passes=pfc.forward_passes)


def main(argv: Sequence[str] | None = None, prog: str = "pfc-fast train") -> int:
    """``pfc-fast train`` with the flags ``argv``; returns the exit status (bad flags: ``SystemExit(2)``)."""
    parser = add_arguments(argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0]))
    return run_cli(parser.parse_args(argv), parser)


def run_cli(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``run(args)`` with bad values reported by ``parser.error`` (exit status 2)."""
    try:
        return run(args)
    except UsageError as error:
        parser.error(str(error))
