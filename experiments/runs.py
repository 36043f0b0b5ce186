"""Training configurations of the experiments, and training them with ``pfc-fast train``.

A preset is a set of ``pfc-fast train`` flags. :func:`train_or_reuse` trains it into
``RUNS/NAME`` unless that directory already holds the finished run (then it is read as it is),
and resumes it when it holds an interrupted one, so an experiment can be rerun to redraw its
figures without training again.
"""
import os

from pfc_fast.app import train
from pfc_fast.app.config import TrainConfig
from pfc_fast.app.record import EpochRecord
from pfc_fast.app.run_directory import RunDirectory

#: name -> (flags of ``pfc-fast train``, what it is for). The CPU presets reach the terminal
#: phase (training accuracy 1) on a 2-core machine in minutes; ``cifar10-resnet18`` is the
#: paper's setting, for a GPU and a CIFAR-10 directory (``--data-dir``).
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


def train_or_reuse(name: str, runs_dir: str, device: str = "auto",
                   data_dir: str | None = None) -> tuple[str, list[EpochRecord]]:
    """The run directory of preset ``name`` under ``runs_dir``, trained to its last epoch.

    A directory holding the finished run is reused as it is; one holding an interrupted run is
    resumed; otherwise the preset is trained from scratch (``pfc-fast train`` with the preset's
    flags, its progress bars and figures). Returns ``(run_dir, records)``, the
    :class:`EpochRecord` s of ``metrics.jsonl``.
    """
    flags = preset_flags(name)
    out = os.path.join(runs_dir, name)
    argv = flags + ["--out", out, "--device", device] + (["--data-dir", data_dir] if data_dir else [])
    directory = RunDirectory(out)
    records = directory.records()
    if directory.holds_run():
        if records and records[-1].epoch == _epochs(flags):
            print(f"{name}: reusing the finished run in {out}")
            return out, records
        argv.append("--resume")
    status = train.main(argv, prog=f"train {name}")
    if status != 0:
        raise SystemExit(f"training {name} stopped with status {status}; rerun to resume it")
    return out, directory.records()


def run_config(run_dir: str) -> TrainConfig:
    """The options of the run in ``run_dir`` (its ``config.json``)."""
    return RunDirectory(run_dir).config()
