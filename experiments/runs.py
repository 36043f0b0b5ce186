"""Training configurations of the experiments, and training them with ``pfc-fast train``.

A preset is a set of ``pfc-fast train`` flags. :func:`train_or_reuse` trains it into
``RUNS/NAME`` (with a seed: ``RUNS/NAME-sSEED``, as ``pfc-fast train`` names its default
directories) unless that directory already holds the finished run of the same options (then it
is read as it is), and resumes it when it holds an interrupted one, so an experiment can be rerun
to redraw its figures without training again. A finished run of other options (a preset whose
budget changed; where the experiment needs the null, a run made before it was measured) is
refused, not reused.
"""
import argparse
import os

from pfc_fast.app import train
from pfc_fast.app.config import TrainConfig
from pfc_fast.app.record import EpochRecord
from pfc_fast.app.run_directory import RunDirectory

#: name -> (flags of ``pfc-fast train``, what it is for). The CPU presets reach the terminal
#: phase (training accuracy 1) on a 2-core machine in minutes; ``cifar10-resnet18`` is the
#: paper's setting, for a GPU and a CIFAR-10 directory (``--data-dir``). Every preset measures
#: the permutation null (the default ``--null-permutations`` of ``pfc-fast train``), drawn from its
#: own seeded generator, so it leaves the training as it is.
#:
#: The budgets of ``fashion-mnist``, ``embedded`` and ``digits`` are those of the single-seed
#: experiment of claim (a). Shorter ones miss the terminal phase (15 epochs of ``embedded``'s
#: images end at training accuracy 0.9978, under ``pfc_depth.TERMINAL_ACCURACY``), and fewer
#: images cannot bring ``fashion-mnist`` to a third of its cost (its 10,000 test images,
#: evaluated every epoch, are a quarter of it), so ``experiments.pfc_depth`` trains three seeds
#: of ``embedded`` and ``digits`` by default and ``fashion-mnist`` on request
#: (``docs/reproduction.md``, claim (a)).
PRESETS = {
    "fashion-mnist": (["--dataset", "fashion-mnist", "--model", "resnet18", "--width", "16",
                       "--train-per-class", "1000", "--epochs", "30"],
                      "full Fashion-MNIST (Debian package dataset-fashion-mnist): 1,000 training images per class, "
                      "the 10,000 test images, ResNet-18 width 16"),
    "embedded": (["--dataset", "embedded", "--model", "resnet18", "--width", "16", "--epochs", "30"],
                 "the Fashion-MNIST subset inside the package (500 per class), ResNet-18 width 16"),
    "digits": (["--dataset", "digits", "--model", "resnet18", "--width", "16", "--epochs", "60",
                "--probe-per-class", "50"],
               "scikit-learn digits (8x8), ResNet-18 width 16"),
    "embedded-cwresnet": (["--dataset", "embedded", "--model", "cwresnet", "--width", "32", "--depth", "6",
                           "--train-per-class", "200", "--epochs", "40"],
                          "200 images per class of the embedded subset, constant-width ResNet (6 pre-activation "
                          "blocks of 32 channels at 28x28): the transparent model's setting"),
    "digits-cwresnet": (["--dataset", "digits", "--model", "cwresnet", "--width", "32", "--depth", "8",
                         "--epochs", "60", "--probe-per-class", "50"],
                        "scikit-learn digits (8x8), constant-width ResNet (8 pre-activation blocks of 32 channels)"),
    "cifar10-resnet18": (["--dataset", "cifar10", "--model", "resnet18", "--width", "64", "--epochs", "200",
                          "--augment", "crop-flip", "--lr", "0.1", "--probe-per-class", "100"],
                         "the paper's setting: CIFAR-10, ResNet-18 (width 64), 200 epochs; needs a GPU and "
                         "--data-dir"),
    "tiny": (["--dataset", "digits", "--model", "resnet18", "--width", "4", "--epochs", "2",
              "--probe-per-class", "10"], "two epochs of a width-4 ResNet-18 on digits (the tests)"),
    "tiny-cwresnet": (["--dataset", "digits", "--model", "cwresnet", "--width", "4", "--depth", "3",
                       "--epochs", "2", "--probe-per-class", "10", "--geodesic-samples", "40"],
                      "two epochs of a 3-block constant-width ResNet on digits (the tests)"),
}


def preset_flags(name: str) -> list[str]:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return list(PRESETS[name][0])


def _epochs(flags: list[str]) -> int:
    return int(flags[flags.index("--epochs") + 1])


def run_name(name: str, seed: int | None = None) -> str:
    """The run directory's name of preset ``name``: ``NAME``, with a seed ``NAME-sSEED``."""
    return name if seed is None else f"{name}-s{seed}"


def _train_flags(name: str, seed: int | None) -> list[str]:
    """The preset's flags, with ``--seed SEED`` where a seed is given."""
    flags = preset_flags(name)
    if seed is not None:
        if "--seed" in flags:
            raise ValueError(f"preset {name} fixes its --seed; train it without a seed")
        flags += ["--seed", str(seed)]
    return flags


def preset_config(name: str, seed: int | None = None) -> TrainConfig:
    """The options ``pfc-fast train`` takes from preset ``name`` (and ``--seed SEED``)."""
    args = train.add_arguments(argparse.ArgumentParser()).parse_args(_train_flags(name, seed))
    return TrainConfig.from_options({key: getattr(args, key) for key in TrainConfig.option_names()
                                     if getattr(args, key) is not None})


def _other_options(directory: RunDirectory, expected: TrainConfig, needs_null: bool) -> list[str]:
    """The options in which the run in ``directory`` differs from ``expected`` (not ``data_dir``:
    the data may have moved), as ``option: saved (preset: expected)``; with ``needs_null``, a run
    made before the null was measured (its ``config.json`` lacks ``null_permutations``) too."""
    saved, options = directory.config(), directory.saved_options()
    differ = [f"{key}: {getattr(saved, key)!r} (preset: {value!r})" for key, value in expected.to_dict().items()
              if key != "data_dir" and getattr(saved, key) != value]
    if needs_null and expected.null_permutations and "null_permutations" not in options:
        differ.append("null_permutations: not saved, the run was made before the null was measured "
                      f"(preset: {expected.null_permutations})")
    return differ


def train_or_reuse(name: str, runs_dir: str, device: str = "auto", data_dir: str | None = None,
                   seed: int | None = None, needs_null: bool = True) -> tuple[str, list[EpochRecord]]:
    """The run directory of preset ``name`` (with ``--seed SEED`` where ``seed`` is given) under
    ``runs_dir``, trained to its last epoch: ``RUNS/NAME``, with a seed ``RUNS/NAME-sSEED``.

    A directory holding the finished run of the preset's options is reused as it is; one holding
    an interrupted run is resumed; otherwise the preset is trained from scratch (``pfc-fast train``
    with the preset's flags, its progress bars and figures). A directory holding a run of other
    options, or with ``needs_null`` one made before the null was measured, is a ``SystemExit``
    naming them. Returns ``(run_dir, records)``, the
    :class:`EpochRecord` s of ``metrics.jsonl``.
    """
    flags = _train_flags(name, seed)
    label = run_name(name, seed)
    out = os.path.join(runs_dir, label)
    argv = flags + ["--out", out, "--device", device] + (["--data-dir", data_dir] if data_dir else [])
    directory = RunDirectory(out)
    records = directory.records()
    if directory.holds_run():
        differ = _other_options(directory, preset_config(name, seed), needs_null)
        if differ:
            raise SystemExit(f"{out} holds a run of other options than preset {name} ({'; '.join(differ)}): "
                             f"move it away, or pass another runs directory")
        if records and records[-1].epoch == _epochs(flags):
            print(f"{label}: reusing the finished run in {out}")
            return out, records
        argv.append("--resume")
    status = train.main(argv, prog=f"train {label}")
    if status != 0:
        raise SystemExit(f"training {label} stopped with status {status}; rerun to resume it")
    return out, directory.records()


def run_config(run_dir: str) -> TrainConfig:
    """The options of the run in ``run_dir`` (its ``config.json``)."""
    return RunDirectory(run_dir).config()
