"""The run directory of ``pfc-fast train`` under faults: its lock (a directory another run holds, a
stale lock of a killed process, two runs started together), the checkpoint's sha256, a
``metrics.jsonl`` that disagrees with the checkpoint, temporary files, a full disk, a diverging
run, a stalled torchrun rank, and random kills (SIGKILL and SIGTERM) against an uninterrupted run."""
import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from pfc_fast.app import cli, run_directory, train
from pfc_fast.app.run_directory import RunDirectory

TINY = ["--dataset", "digits", "--width", "4", "--probe-per-class", "10", "--no-report"]
TIMING = ("train_seconds", "measure_seconds", "test_seconds", "geodesic_seconds")
DEFAULT_DIR = "runs/digits-resnet18-w4-s0"


def _records(run):
    with open(os.path.join(run, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    for record in records:
        for field in TIMING:
            record.pop(field)
    return records


def _usage_error(capsys, argv, command=train.main):
    with pytest.raises(SystemExit) as exit_info:
        command(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The records of an uninterrupted 4-epoch run (with augmentation: its draws must be replayed)."""
    run = str(tmp_path_factory.mktemp("straight") / "run")
    assert train.main([*TINY, "--epochs", "4", "--augment", "crop", "--out", run]) == 0
    return _records(run)


def test_a_held_directory_is_refused_and_a_default_run_takes_the_next(tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")
    holder = RunDirectory(run)
    assert holder.lock() is None
    err = _usage_error(capsys, [*TINY, "--epochs", "1", "--out", run])
    assert f"argument --out: {run} is in use by another pfc-fast train (process {os.getpid()} on " in err
    assert os.listdir(run) == ["train.lock"]
    holder.unlock()
    assert not os.path.exists(run)  # made by the lock, nothing written: removed with it

    monkeypatch.chdir(tmp_path)
    busy = RunDirectory(DEFAULT_DIR)
    busy.lock()  # as a run that is being started there
    assert train.main([*TINY, "--epochs", "1"]) == 0
    assert sorted(os.listdir("runs")) == ["digits-resnet18-w4-s0", "digits-resnet18-w4-s0-2"]
    assert len(_records(f"{DEFAULT_DIR}-2")) == 1 and not busy.holds_run()
    err = _usage_error(capsys, [*TINY, "--out", DEFAULT_DIR, "--resume"])
    assert "holds no run to resume" in err
    busy.unlock()
    assert sorted(os.listdir(f"{DEFAULT_DIR}-2")) == ["checkpoint.pt", "checksums.json", "config.json",
                                                       "metrics.jsonl"]


def _start(argv, cwd):
    return subprocess.Popen([sys.executable, "-m", "pfc_fast", "train", *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_runs_started_together_never_share_a_directory(tmp_path):
    """Two runs without --out started at the same moment get a directory each; two on one --out:
    one runs, the other is refused; each directory's files come from one run."""
    first, second = (_start([*TINY, "--epochs", "1"], tmp_path) for _ in range(2))
    assert [p.wait(timeout=300) for p in (first, second)] == [0, 0], first.stderr.read() + second.stderr.read()
    assert sorted(os.listdir(tmp_path / "runs")) == ["digits-resnet18-w4-s0", "digits-resnet18-w4-s0-2"]
    seeds = [7, 8]
    processes = [_start([*TINY, "--epochs", "2", "--seed", str(s), "--out", "shared"], tmp_path) for s in seeds]
    codes = [p.wait(timeout=300) for p in processes]
    assert sorted(codes) == [0, 2], [p.stderr.read() for p in processes]
    loser = processes[codes.index(2)].stderr.read()
    assert "is in use by another pfc-fast train" in loser or "already holds a run" in loser
    winner = seeds[codes.index(0)]
    shared = RunDirectory(str(tmp_path / "shared"))
    assert shared.config().seed == winner and shared.verified_epoch() == 2
    assert [r["epoch"] for r in _records(shared.path)] == [1, 2]
    assert shared.load_checkpoint()["config"]["seed"] == winner


def test_a_stale_lock_and_temporary_files_are_cleaned_up(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "then"}))
    (run / "checkpoint.pt.tmp4242").write_bytes(b"\0" * 1000)  # what a killed write leaves
    (run / "metrics.jsonl.tmp17").write_text("{")
    assert train.main([*TINY, "--epochs", "1", "--out", str(run)]) == 0
    assert "took over the stale lock of process 999999 on gone, started then, which no longer runs" in \
        capsys.readouterr().err
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "checksums.json", "config.json", "metrics.jsonl"]


def _flip_byte(path, where):
    with open(path, "r+b") as handle:
        handle.seek(where)
        byte = handle.read(1)
        handle.seek(where)
        handle.write(bytes([byte[0] ^ 0x10]))


def test_a_damaged_checkpoint_is_refused_by_resume_and_report(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert train.main([*TINY, "--epochs", "2", "--out", run]) == 0
    checkpoint = os.path.join(run, "checkpoint.pt")
    _flip_byte(checkpoint, os.path.getsize(checkpoint) // 2)  # inside a tensor: torch.load would take it
    for argv, command, argument in (([*TINY, "--out", run, "--resume"], train.main, "--resume"),
                                    (["report", run], cli.main, "run_dir")):
        err = _usage_error(capsys, argv, command)
        assert f"argument {argument}: {checkpoint} does not match the sha256 recorded in" in err
        assert "(for epoch 1, epoch 2): the file is damaged" in err
    assert _records(run)[-1]["epoch"] == 2  # nothing was written


@pytest.mark.parametrize("damage,message", [
    ("last line removed", "holds epochs 1 to 2, but checkpoint.pt is after epoch 3"),
    ("middle line removed", "holds epochs 1, 3, but checkpoint.pt is after epoch 3"),
    ("last line cut", "metrics.jsonl, line 3: not an epoch record"),
])
def test_metrics_that_disagree_with_the_checkpoint_are_refused(tmp_path, capsys, damage, message):
    run = str(tmp_path / "run")
    assert train.main([*TINY, "--epochs", "3", "--out", run]) == 0
    path = os.path.join(run, "metrics.jsonl")
    with open(path) as handle:
        lines = handle.readlines()
    lines = {"last line removed": lines[:2], "middle line removed": [lines[0], lines[2]],
             "last line cut": [*lines[:2], lines[2][:100]]}[damage]
    with open(path, "w") as handle:
        handle.writelines(lines)
    err = _usage_error(capsys, ["--out", run, "--resume"])
    assert "argument --resume: " in err and message in err
    if damage != "last line cut":
        assert "Restore it from a backup, or start the run anew with another --out" in err
    assert message in _usage_error(capsys, ["report", run], cli.main)


@contextlib.contextmanager
def _small_disk(path, size):
    """A tmpfs of ``size`` mounted on ``path`` (skips where mounting is not allowed)."""
    os.makedirs(path)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _fsync_failing_at(call):
    """``os.fsync`` that fails as a full disk does (ENOSPC) on its ``call``-th call."""
    calls = []
    real = os.fsync

    def fsync(descriptor):
        calls.append(descriptor)
        if len(calls) == call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(descriptor)
    return fsync


@pytest.mark.parametrize("disk", ["tmpfs of 256 KiB", "fsync of epoch 2's checkpoint fails"])
def test_a_full_disk_is_named_and_the_run_resumes_exactly(tmp_path, monkeypatch, capsys, straight, disk):
    where = tmp_path / "disk"
    options = [*TINY, "--epochs", "4", "--augment", "crop"]
    with contextlib.ExitStack() as stack:
        if disk.startswith("tmpfs"):
            stack.enter_context(_small_disk(where, "256k"))  # config and metrics fit, a checkpoint (430 KB) not
            held = "holds no finished epoch"
        else:
            where.mkdir()
            # fsyncs: config, then per epoch metrics, checksums, checkpoint: the 7th is epoch 2's checkpoint
            monkeypatch.setattr(run_directory.os, "fsync", _fsync_failing_at(7))
            held = "holds epoch 1"
        run = str(where / "run")
        assert train.main([*options, "--out", run]) == 1
        err = capsys.readouterr().err
        assert f"cannot write {run}/checkpoint.pt: No space left on device. {run} {held}: make room" in err
        assert f"continue with --out {run} --resume" in err
        assert not [name for name in os.listdir(run) if ".tmp" in name or name == "train.lock"]
        if disk.startswith("tmpfs"):
            subprocess.run(["mount", "-o", "remount,size=8m", str(where)], check=True)
        monkeypatch.undo()
        assert train.main(["--out", run, "--resume"]) == 0
        assert _records(run) == straight


def test_a_diverging_run_stops_with_a_message(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert train.main([*TINY, "--epochs", "2", "--lr", "1e10", "--out", run]) == 1
    err = capsys.readouterr().err
    assert "the training diverged in epoch 1 (mean training loss nan); start a new run with a smaller --lr " \
           "(this one has 1e+10" in err and f"{run} holds no finished epoch" in err
    assert sorted(os.listdir(run)) == ["config.json"]


def test_an_out_that_is_a_file_or_read_only(tmp_path, capsys):
    afile = tmp_path / "file"
    afile.write_text("x")
    err = _usage_error(capsys, [*TINY, "--out", str(afile)])
    assert f"argument --out: cannot use '{afile}' as the run directory: a file, not a directory" in err
    err = _usage_error(capsys, [*TINY, "--out", str(afile / "run")])
    assert "as the run directory: Not a directory" in err
    read_only = tmp_path / "read-only"
    if os.geteuid() != 0:
        read_only.mkdir(mode=0o500)
        reason = "Permission denied"
    else:  # root writes anywhere the permissions forbid: a read-only mount
        read_only.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(read_only)]).returncode:
            pytest.skip("cannot mount a read-only tmpfs here")
        reason = "Read-only file system"
    try:
        err = _usage_error(capsys, [*TINY, "--out", str(read_only / "run")])
        assert f"argument --out: cannot use '{read_only / 'run'}' as the run directory: {reason}" in err
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(read_only)], check=True)


def _rank_processes(parent, rank):
    """The pids of the torchrun workers of ``parent`` with ``RANK=rank``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{name}/environ", "rb") as handle:
                    environment = handle.read().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if ppid == parent and f"RANK={rank}".encode() in environment:
                found.append(int(name))
    return found


def test_a_stopped_rank_ends_the_run_after_dist_timeout(tmp_path):
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pfc_fast",
         "train", *TINY, "--epochs", "100", "--out", str(run), "--dist-timeout", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.jsonl").exists():
            assert time.monotonic() < deadline and launcher.poll() is None, launcher.stderr.read()[-3000:]
            time.sleep(0.2)
        (stopped,) = _rank_processes(launcher.pid, 1)
        (waiting,) = _rank_processes(launcher.pid, 0)
        os.kill(stopped, signal.SIGSTOP)
        started = time.monotonic()
        while os.path.exists(f"/proc/{waiting}") and time.monotonic() - started < 120:
            time.sleep(0.2)
        waited = time.monotonic() - started
        os.kill(stopped, signal.SIGKILL)  # torchrun would wait 30 s before it does
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0 and 4 <= waited < 60
    assert "pfc-fast train: rank 0 waited longer than --dist-timeout (4 s) for the other processes" in err
    assert RunDirectory(str(run)).verified_epoch() >= 1  # rank 0 released the directory consistent


def test_random_kills_resume_exactly(tmp_path, straight):
    """SIGKILL or SIGTERM at random moments of the epochs (seeded), then --resume, until the run is
    done: its records equal those of the uninterrupted run, bit for bit but the timings."""
    rng = random.Random(14)
    run = str(tmp_path / "run")
    options = [*TINY, "--epochs", "4", "--augment", "crop", "--out", run]
    kills = []
    for attempt in range(12):
        process = _start([*options, "--resume"] if attempt else options, tmp_path)
        if attempt < 6:
            epochs_done = len(_records(run)) if os.path.exists(os.path.join(run, "metrics.jsonl")) else 0
            deadline = time.monotonic() + 120
            while process.poll() is None and time.monotonic() < deadline:  # wait for training to begin
                line = process.stdout.readline()
                if line.startswith("pfc-fast train:"):
                    break
            time.sleep(rng.uniform(0.0, 1.0))
            signum = rng.choice([signal.SIGKILL, signal.SIGTERM])
            if process.poll() is None:
                process.send_signal(signum)
                kills.append((signal.Signals(signum).name, epochs_done))
        code = process.wait(timeout=300)
        err = process.stderr.read()
        # SIGTERM outside the epochs (starting, exiting) ends the process as by default
        assert code in (0, -signal.SIGKILL, -signal.SIGTERM, 128 + signal.SIGTERM), err[-3000:]
        if code == 128 + signal.SIGTERM:
            assert f"SIGTERM: stopped; {run} holds " in err and "--resume" in err
        if code == 0 and attempt >= 6:
            break
    assert len(kills) >= 4 and {"SIGKILL", "SIGTERM"} <= {name for name, _ in kills}
    assert _records(run) == straight
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "checksums.json", "config.json", "metrics.jsonl"]
