"""``pfc-fast train`` and ``pfc-fast report`` on tiny data (scikit-learn's digits): the recorded
metrics against the checkpoint's model measured by hand; Ctrl-C and --resume against an
uninterrupted run; torchrun with two processes; bad arguments."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import pfc_fast
from pfc_fast.app import cli, train
from pfc_fast.app.config import TrainConfig
from pfc_fast.app.run_directory import RunDirectory
from pfc_fast.app.data import balanced_indices, load_dataset, to_float
from pfc_fast.app.models import build_model

from conftest import assert_metrics_close, interrupt_on_call, resnet_by_hand

TINY = ["--dataset", "digits", "--width", "4", "--probe-per-class", "10"]
TIMING = ("train_seconds", "measure_seconds", "test_seconds", "geodesic_seconds")


def _records(run):
    with open(os.path.join(run, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def _check_against_checkpoint(run, record, probe_per_class, pooling="flatten"):
    """The record's PFC metrics and test accuracy equal those of the checkpoint's model, measured
    by hand: explicit forward through the layers, then nc_metrics on the whole probe set."""
    data = load_dataset("digits")
    state = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    assert state["epoch"] == record["epoch"]
    model = build_model("resnet18", 10, 1, width=4)
    model.load_state_dict(state["model"])
    model.eval()
    mean, std = data.normalization()
    probe = balanced_indices(data.train_labels, probe_per_class, 10, seed=0)
    with torch.no_grad():
        feats, logits = resnet_by_hand(model, to_float(data.train_images[probe], mean, std))
        predictions = logits.argmax(1)
        test_predictions = model(to_float(data.test_images, mean, std)).argmax(1)
    labels = data.train_labels[probe]
    assert record["probe_acc"] == pytest.approx(float((predictions == labels).double().mean()))
    assert record["test_acc"] == pytest.approx(float((test_predictions == data.test_labels).double().mean()))
    assert [layer["name"] for layer in record["layers"]] == ["stem"] + [f"layer{s}.{b}" for s in range(1, 5)
                                                                        for b in range(2)]
    for layer, h in zip(record["layers"], feats):
        # with gap pooling, the layers whose width is fc's input get nc3 against fc (the last block feeds it)
        fc = {"classifier": model.fc.weight, "bias": model.fc.bias} if pooling == "gap" and h.shape[1] == 32 else {}
        expected = pfc_fast.nc_metrics(h, labels, num_classes=10, predictions=predictions, pooling=pooling, **fc)
        fields = {key: value for key, value in layer.items() if key != "name"}
        assert_metrics_close(pfc_fast.NCMetrics(**fields), expected.to_dict(), rtol=1e-9)


def test_one_epoch_cli_run(tmp_path):
    run = str(tmp_path / "run")
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", run]) == 0
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "checksums.json", "config.json", "metrics.jsonl", "report"]
    (record,) = _records(run)
    for field in ("epoch", "train_acc", "test_acc", "train_loss", "test_loss", "probe_acc", "lr", *TIMING):
        assert isinstance(record[field], (int, float)), field
    assert record["epoch"] == 1 and 0 <= record["train_acc"] <= 1
    _check_against_checkpoint(run, record, probe_per_class=10)
    with open(os.path.join(run, "config.json")) as handle:
        config = json.load(handle)
    assert config["dataset"] == "digits" and config["weight_decay"] == 5e-4 and config["environment"]["world_size"] == 1
    report = os.path.join(run, "report")
    for figure in ("pfc_vs_depth.png", "pfc_vs_epoch.png", "training.png"):
        with open(os.path.join(report, figure), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(report, "summary.md")) as handle:
        summary = handle.read()
    assert "| PFC1 (nc1) |" in summary and "| layer4.1 |" in summary


def test_report_command(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert train.main([*TINY, "--epochs", "2", "--out", run, "--no-report", "--pooling", "gap"]) == 0
    assert not os.path.exists(os.path.join(run, "report"))
    assert cli.main(["report", run, "--out", str(tmp_path / "figs")]) == 0
    assert sorted(os.listdir(tmp_path / "figs")) == ["pfc_vs_depth.png", "pfc_vs_epoch.png", "summary.md",
                                                      "training.png"]
    records = _records(run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["layers"][-1]["nc3"] is not None  # gap: the last block feeds fc
    _check_against_checkpoint(run, records[-1], probe_per_class=10, pooling="gap")
    with pytest.raises(SystemExit):
        cli.main(["report", str(tmp_path / "nothing")])
    assert "argument run_dir: run directory" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["mid-epoch", "SIGTERM mid-epoch", "crash-between-writes"])
def test_interrupt_and_resume_equal_an_uninterrupted_run(tmp_path, monkeypatch, capsys, where):
    options = [*TINY, "--epochs", "3", "--augment", "crop", "--no-report"]
    straight = str(tmp_path / "straight")
    assert train.main([*options, "--out", straight]) == 0

    resumed = str(tmp_path / "resumed")
    if where.endswith("mid-epoch"):  # digits: 12 batches an epoch; stop at batch 5 of epoch 2
        signum = signal.SIGTERM if where.startswith("SIGTERM") else None
        monkeypatch.setattr(train, "augment", interrupt_on_call(train.augment, 17, signum))
    else:  # epoch 2's metrics line written, its checkpoint not (Ctrl-C is deferred there; a crash is not)
        monkeypatch.setattr(train.TrainingRun, "save_checkpoint",
                            interrupt_on_call(train.TrainingRun.save_checkpoint, 2))
    assert train.main([*options, "--out", resumed]) == (143 if where.startswith("SIGTERM") else 130)
    name = "SIGTERM" if where.startswith("SIGTERM") else "SIGINT"
    assert f"{name}: stopped; {resumed} holds epoch 1: continue with --out {resumed} --resume" in \
        capsys.readouterr().err
    assert torch.load(os.path.join(resumed, "checkpoint.pt"), weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in _records(resumed)] == ([1] if where.endswith("mid-epoch") else [1, 2])
    monkeypatch.undo()
    assert train.main(["--out", resumed, "--resume", "--no-report"]) == 0

    expected, ours = _records(straight), _records(resumed)
    assert [r["epoch"] for r in ours] == [1, 2, 3]
    for a, b in zip(expected, ours):
        for field in TIMING:
            a.pop(field), b.pop(field)
        assert a == b  # bit for bit: same data order, augmentation, weights, metrics


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_signals_wait_for_the_epoch_writes(signum):
    # Python's handler, as in a terminal, even when the tests were started with SIGINT ignored (a
    # background job of a non-interactive shell)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    finished = []
    try:
        with train._signals_handled(train._raise_stopped):
            with pytest.raises(train.Stopped) as stopped:
                with train._stop_signals_deferred():
                    os.kill(os.getpid(), signum)
                    finished.append("metrics")  # still runs: the signal waits for the end of the block
                    finished.append("checkpoint")
            assert finished == ["metrics", "checkpoint"] and stopped.value.signum == signum
            with pytest.raises(train.Stopped):
                os.kill(os.getpid(), signum)  # the run's handler is back
                time.sleep(1)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # and outside the run, the usual one
    finally:
        signal.signal(signal.SIGINT, outer)


def test_torchrun_two_processes_equal_one_process_on_the_checkpoint(tmp_path):
    run = str(tmp_path / "ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "pfc_fast", "train", *TINY, "--probe-per-class", "11", "--epochs", "1", "--out", run,
               "--no-report"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = _records(run)
    with open(os.path.join(run, "config.json")) as handle:
        assert json.load(handle)["environment"]["world_size"] == 2
    _check_against_checkpoint(run, record, probe_per_class=11)  # 110 probe samples, 55 per rank


def test_constant_width_run_on_a_training_subset(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert train.main(["--dataset", "digits", "--model", "cwresnet", "--width", "4", "--depth", "3", "--epochs", "1",
                       "--train-per-class", "30", "--probe-per-class", "10", "--geodesic-samples", "40",
                       "--out", run]) == 0
    assert "digits (300 train / " in capsys.readouterr().out
    (record,) = _records(run)
    assert record["lss"] >= 1.0 and 0.0 <= record["ots"] <= 1.0 and 0.0 < record["w_path_ratio"] <= 1.0 + 1e-9
    assert [layer["name"] for layer in record["layers"]] == ["stem", "block1", "block2", "block3"]
    with open(os.path.join(run, "report", "summary.md")) as handle:
        assert f"OTS {record['ots']:.4g}" in handle.read()
    assert os.path.exists(os.path.join(run, "report", "geodesic.png"))


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet'"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/dir"], "argument --data-dir: data_dir '/nonexistent/dir' "
                                                                 "does not exist"),
    (["--dataset", "cifar10"], "argument --data-dir: dataset 'cifar10' is read from a directory"),
    (["--dataset", "digits", "--probe-per-class", "1000"], "argument --probe-per-class: probe_per_class = 1000 is "
                                                           "larger than the training data allows"),
    (["--dataset", "digits", "--train-per-class", "500"], "argument --train-per-class: train_per_class = 500 is "
                                                          "larger than the training data allows"),
    (["--epochs", "0"], "argument --epochs: must be a positive integer"),
    (["--lr", "-1"], "argument --lr: must be a finite number > 0"),
    (["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
    (["--momentum", "inf"], "argument --momentum: must be a finite number >= 0"),
    (["--weight-decay", "nan"], "argument --weight-decay: must be a finite number >= 0"),
    (["--seed", str(2**70)], "argument --seed: must be an integer from 0 to 2**32 - 1"),
    (["--seed", "-1"], "argument --seed: must be an integer from 0 to 2**32 - 1"),
    (["--device", "meta"], "argument --device: 'meta': pfc-fast train runs on cpu or cuda, not meta"),
    (["--device", "mps"], "argument --device: 'mps': pfc-fast train runs on cpu or cuda, not mps"),
    (["--dist-timeout", "0"], "argument --dist-timeout: must be a number of seconds from 1 to 604800"),
    (["--device", "cuda:99"], "argument --device:"),
    (["--device", "tpu"], "argument --device: 'tpu' is not a device"),
    (["--model", "resnet18", "--depth", "4"], "argument --depth: applies to cwresnet only"),
])
def test_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *argv, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


def test_missing_dataset_files_in_an_existing_directory(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--dataset", "svhn", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "argument --data-dir: dataset 'svhn' not found" in err and str(tmp_path / "train_32x32.mat") in err


def test_default_run_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = [*TINY, "--epochs", "1", "--no-report"]
    assert train.main(options) == 0
    assert train.main(options) == 0  # the main job can be run again: a new directory
    assert sorted(os.listdir("runs")) == ["digits-resnet18-w4-s0", "digits-resnet18-w4-s0-2"]
    os.remove("runs/digits-resnet18-w4-s0-2/checkpoint.pt")  # as if stopped before its first epoch ended
    assert train.main([*options, "--resume"]) == 0  # resumes the last one
    assert len(_records("runs/digits-resnet18-w4-s0-2")) == 1
    assert os.path.exists("runs/digits-resnet18-w4-s0-2/checkpoint.pt")
    assert sorted(os.listdir("runs")) == ["digits-resnet18-w4-s0", "digits-resnet18-w4-s0-2"]


def test_existing_run_and_resume_arguments(tmp_path, capsys):
    run = str(tmp_path / "run")
    with pytest.raises(SystemExit):
        train.main(["--out", run, "--resume"])
    assert "argument --resume: " in capsys.readouterr().err
    assert train.main([*TINY, "--epochs", "1", "--out", run, "--no-report"]) == 0
    with pytest.raises(SystemExit):
        train.main([*TINY, "--epochs", "1", "--out", run])
    assert f"argument --out: {run} already holds a run; pass --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--out", run, "--resume", "--lr", "0.5"])
    assert "argument --lr: the run in" in capsys.readouterr().err
    assert train.main(["--out", run, "--resume", "--no-report", "--dataset", "digits"]) == 0  # nothing left to do
    assert len(_records(run)) == 1


def test_prepare_is_the_first_epoch_of_a_run():
    run = train.prepare({"dataset": "digits", "width": 4, "train_per_class": 20, "probe_per_class": 5})
    assert len(run.train_labels) == 200 and len(run.probe) == 50
    assert run.config == TrainConfig(dataset="digits", width=4, train_per_class=20, probe_per_class=5)
    with pytest.raises(ValueError, match=r"options: \['widht'\] are not options of pfc-fast train"):
        train.prepare({"widht": 4})


def test_demo_prints_every_layer(capsys):
    """``pfc-fast demo`` on the digits: one line per measured epoch with nc1 of each layer."""
    assert cli.main(["demo", "--epochs", "2", "--every", "1", "--width", "16", "--depth", "2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert [line.split()[1] for line in lines] == ["1", "2"]
    assert all(len(line.split("[")[1].split("]")[0].split()) == 3 for line in lines)  # stem + 2 blocks


def test_a_run_directory_of_the_first_format_resumes(tmp_path, monkeypatch, capsys):
    """Run directories of the first release lack ``train_per_class`` in config.json and ``ots`` in
    metrics.jsonl: such a run, stopped after epoch 1, resumes to the records of an uninterrupted
    run, its report is written, and a flag for an option it never saved is checked against the default."""
    options = ["--dataset", "digits", "--model", "cwresnet", "--width", "4", "--depth", "2", "--probe-per-class", "10",
               "--geodesic-samples", "40", "--epochs", "2", "--no-report"]
    straight, old = str(tmp_path / "straight"), str(tmp_path / "old")
    assert train.main([*options, "--out", straight]) == 0
    monkeypatch.setattr(train.TrainingRun, "save_checkpoint",
                        interrupt_on_call(train.TrainingRun.save_checkpoint, 2))
    assert train.main([*options, "--out", old]) == 130
    monkeypatch.undo()
    with open(os.path.join(old, "config.json")) as handle:
        config = json.load(handle)
    del config["train_per_class"]
    with open(os.path.join(old, "config.json"), "w") as handle:
        json.dump(config, handle)
    records = _records(old)
    for record in records:
        del record["ots"]
    with open(os.path.join(old, "metrics.jsonl"), "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)

    with pytest.raises(SystemExit):
        train.main(["--out", old, "--resume", "--train-per-class", "20"])
    assert "argument --train-per-class: the run in" in capsys.readouterr().err
    assert train.main(["--out", old, "--resume"]) == 0
    expected, ours = _records(straight), _records(old)
    assert [r["epoch"] for r in ours] == [1, 2] and "ots" not in ours[0] and "ots" in ours[1]
    expected[0].pop("ots")
    for a, b in zip(expected, ours):
        for field in TIMING:
            a.pop(field), b.pop(field)
        assert a == b
    with open(os.path.join(old, "report", "summary.md")) as handle:
        assert f"OTS {ours[1]['ots']:.4g}" in handle.read()


def test_epoch_records_and_configs_round_trip(tmp_path):
    """:class:`EpochRecord` and :class:`TrainConfig` read what pfc-fast train wrote and write it back
    unchanged (the same JSON, key for key and in order)."""
    run = str(tmp_path / "run")
    assert train.main([*TINY, "--epochs", "1", "--out", run, "--no-report"]) == 0
    directory = RunDirectory(run)
    with open(os.path.join(run, "metrics.jsonl")) as handle:
        lines = handle.read().splitlines()
    assert [json.dumps(record.to_dict()) for record in directory.records()] == lines
    assert directory.records()[0].lss is None and not directory.records()[0].has_geodesic
    with open(os.path.join(run, "config.json")) as handle:
        saved = json.load(handle)
    assert list(directory.config().to_dict().items()) == [(k, v) for k, v in saved.items() if k != "environment"]
    assert directory.environment() == saved["environment"]
    with pytest.raises(FileNotFoundError, match="holds no pfc-fast run"):
        RunDirectory(str(tmp_path / "nothing")).config()


@pytest.mark.parametrize("options,error,message", [
    ({"augment": "bogus"}, ValueError, "augment must be one of 'none', 'crop', 'crop-flip', got 'bogus'"),
    ({"schedule": "bogus"}, ValueError, "schedule must be one of"),
    ({"width": -3}, ValueError, "width must be >= 1, got -3"),
    ({"width": "x"}, TypeError, "width must be an integer"),
    ({"epochs": 0}, ValueError, "epochs must be >= 1"),
    ({"geodesic_samples": -5}, ValueError, "geodesic_samples must be >= 0"),
    ({"lr": 0.0}, ValueError, "lr must be a finite number > 0"),
    ({"lr": math.inf}, ValueError, "lr must be a finite number > 0"),
    ({"momentum": -0.5}, ValueError, "momentum must be a finite number >= 0"),
    ({"seed": 2**70}, ValueError, r"seed must be an integer from 0 to 2\*\*32 - 1"),
    ({"seed": -1}, ValueError, "seed must be >= 0"),
    ({"model": "bogus"}, ValueError, "model must be one of"),
    ([("width", 4)], TypeError, "options must be a mapping"),
])
def test_train_config_checks_every_option(options, error, message):
    with pytest.raises(error, match=message):
        TrainConfig.from_options(options)
    with pytest.raises(ValueError, match="device 'bogus' is not a device"):
        train.prepare({"dataset": "digits"}, device="bogus")


def test_malformed_run_directory_files_are_named(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{not json")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 1: not an epoch record"):
        RunDirectory(str(run)).records()
    with pytest.raises(ValueError, match=r"config.json is not a pfc-fast config"):
        RunDirectory(str(run)).config()
    with pytest.raises(SystemExit):
        cli.main(["report", str(run)])
    err = capsys.readouterr().err
    assert "argument run_dir: " in err and "metrics.jsonl, line 1" in err
    with pytest.raises(SystemExit):
        train.main(["--out", str(run), "--resume"])
    assert "argument --resume: " in capsys.readouterr().err


def _events(directory):
    """``{tag: [(step, value), ...]}`` of the TensorBoard event files in ``directory``."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(directory, size_guidance={accumulator.SCALARS: 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_equal_the_records_across_a_resume(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    run = str(tmp_path / "run")
    options = [*TINY, "--epochs", "3", "--no-report", "--tensorboard"]
    monkeypatch.setattr(train, "augment", interrupt_on_call(train.augment, 17))  # Ctrl-C in epoch 2
    assert train.main([*options, "--out", run]) == 130
    monkeypatch.undo()
    assert train.main(["--out", run, "--resume", "--tensorboard"]) == 0
    events = _events(os.path.join(run, "tensorboard"))
    records = _records(run)
    for layer in ("stem", "layer4.1"):
        for metric in ("nc1", "nc2_etf", "nc4"):
            expected = [(r["epoch"], next(l[metric] for l in r["layers"] if l["name"] == layer)) for r in records]
            assert [step for step, _ in events[f"pfc/{layer}/{metric}"]] == [1, 2, 3]  # epoch 2 once
            assert [v for _, v in events[f"pfc/{layer}/{metric}"]] == pytest.approx([v for _, v in expected],
                                                                                   rel=1e-6)  # float32 events
    assert [v for _, v in events["train/loss"]] == pytest.approx([r["train_loss"] for r in records], rel=1e-6)
    assert [v for _, v in events["pfc/accuracy"]] == pytest.approx([r["probe_acc"] for r in records], rel=1e-6)
    assert {"test/accuracy", "train/lr", "seconds/measure"} <= set(events)


def test_tensorboard_missing_is_a_flag_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as where tensorboard is not installed
    with pytest.raises(SystemExit):
        train.main([*TINY, "--epochs", "1", "--out", str(tmp_path / "run"), "--tensorboard"])
    assert "argument --tensorboard: needs tensorboard" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")
