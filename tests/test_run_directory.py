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

from conftest import interrupt_on_call

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


def test_a_lock_removed_during_the_run_stops_it_before_it_writes(tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")
    epoch = train._epoch

    def remove_lock_in_epoch_2(state, number, is_main):
        if number == 2:
            os.remove(os.path.join(run, "train.lock"))  # as a user who takes it for stale
        return epoch(state, number, is_main)
    monkeypatch.setattr(train, "_epoch", remove_lock_in_epoch_2)
    assert train.main([*TINY, "--epochs", "3", "--out", run]) == 1
    assert "train.lock was removed or replaced while this run held" in capsys.readouterr().err
    assert [r["epoch"] for r in _records(run)] == [1] and RunDirectory(run).verified_epoch() == 1


def _first_format(run):
    """Make ``run`` look like a run of pfc_fast 0.1.0: no checksums.json, that version in config.json."""
    os.remove(os.path.join(run, "checksums.json"))
    with open(os.path.join(run, "config.json")) as handle:
        config = json.load(handle)
    config["environment"]["pfc_fast"] = "0.1.0"
    with open(os.path.join(run, "config.json"), "w") as handle:
        json.dump(config, handle)


def test_a_first_format_run_stopped_inside_its_first_checksummed_save_resumes(tmp_path, monkeypatch, capsys,
                                                                               straight):
    run = str(tmp_path / "run")
    monkeypatch.setattr(train, "_epoch", interrupt_on_call(train._epoch, 3))  # Ctrl-C in epoch 3
    assert train.main([*TINY, "--epochs", "4", "--augment", "crop", "--out", run]) == 130
    monkeypatch.undo()
    _first_format(run)
    write = run_directory._atomic_write

    def crash_before_the_checkpoint(path, *args, **kwargs):
        if path.endswith("checkpoint.pt"):  # checksums.json written, the checkpoint not replaced
            raise KeyboardInterrupt
        write(path, *args, **kwargs)
    monkeypatch.setattr(run_directory, "_atomic_write", crash_before_the_checkpoint)
    assert train.main(["--out", run, "--resume"]) == 130
    monkeypatch.undo()
    assert "SIGINT: stopped; " + run + " holds epochs 1 to 2" in capsys.readouterr().err
    assert RunDirectory(run).verified_epoch() == 2  # the checkpoint in place was recorded before the new one
    assert train.main(["--out", run, "--resume"]) == 0
    assert _records(run) == straight


def test_a_signal_during_the_writes_reports_the_epoch_they_saved(tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")
    # SIGTERM in epoch 2's save, deferred until the writes are done
    monkeypatch.setattr(RunDirectory, "save_checkpoint", interrupt_on_call(RunDirectory.save_checkpoint, 2,
                                                                           signal.SIGTERM))
    assert train.main([*TINY, "--epochs", "4", "--out", run]) == 143
    assert f"SIGTERM: stopped; {run} holds epochs 1 to 2: continue with --out {run} --resume" in \
        capsys.readouterr().err
    assert RunDirectory(run).verified_epoch() == 2


def test_a_signal_while_the_run_is_set_up_removes_what_it_made(tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "run")
    monkeypatch.setattr(train, "load_dataset", interrupt_on_call(train.load_dataset, 1, signal.SIGTERM))
    assert train.main([*TINY, "--epochs", "1", "--out", run]) == 143
    assert "SIGTERM: stopped; " + run + " holds no finished epoch: start it again with the same flags" in \
        capsys.readouterr().err
    assert not os.path.exists(run)


def test_a_closed_standard_output_stops_the_run_cleanly(tmp_path):
    run = tmp_path / "run"
    process = _start([*TINY, "--epochs", "30", "--out", str(run)], tmp_path)
    assert process.stdout.readline().startswith("pfc-fast train:")
    process.stdout.close()  # as `| head -1` does
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGPIPE, err[-2000:]
    assert "the standard output was closed: stopped; " in err and "Traceback" not in err
    assert RunDirectory(str(run)).verified_epoch() >= 1


def _damage(run, what):
    path = {"checkpoint": "checkpoint.pt", "checksums": "checksums.json", "metrics": "metrics.jsonl",
            "config": "config.json"}[what.split()[0]]
    path = os.path.join(run, path)
    if what == "checkpoint removed":
        os.remove(path)
    elif what == "checkpoint truncated, first format":
        _first_format(run)
        os.truncate(path, 1000)
    elif what == "checksums removed":
        os.remove(path)
    elif what == "checksums with a text epoch":
        with open(path, "w") as handle:
            json.dump({"checkpoint.pt": [{"epoch": "four", "sha256": "0" * 64}]}, handle)
    elif what == "metrics with a text epoch":
        lines = open(path).read().splitlines()
        lines[-1] = lines[-1].replace('"epoch": 2', '"epoch": "2"')
        open(path, "w").write("\n".join(lines) + "\n")
    elif what == "metrics not UTF-8":
        with open(path, "ab") as handle:
            handle.write(b"\xff\xfe\n")
    elif what == "config a directory":
        os.remove(path)
        os.mkdir(path)


@pytest.mark.parametrize("what,message", [
    ("checkpoint removed", "checkpoint.pt is missing, though checksums.json records it after epoch 2"),
    ("checkpoint truncated, first format", "checkpoint.pt is not a checkpoint of pfc-fast train"),
    ("checksums removed", "checksums.json is missing, though the run was made by pfc_fast 0."),
    ("checksums with a text epoch", "checksums.json is not a pfc-fast checksum file"),
    ("metrics with a text epoch", "metrics.jsonl, line 2: not an epoch record of pfc-fast train (its epoch must be an "
                                  "integer, got '2')"),
    ("metrics not UTF-8", "metrics.jsonl is not a text file of pfc-fast train"),
    ("config a directory", "config.json: Is a directory"),
])
def test_damaged_run_directory_files_are_named(tmp_path, capsys, what, message):
    run = str(tmp_path / "run")
    assert train.main([*TINY, "--epochs", "2", "--out", run]) == 0
    capsys.readouterr()
    _damage(run, what)
    err = _usage_error(capsys, ["--out", run, "--resume"])
    assert "argument --resume: " in err and message in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(run, "train.lock"))
    if what != "config a directory":
        assert message in _usage_error(capsys, ["report", run], cli.main)


def test_odd_run_directory_paths(tmp_path, capsys):
    assert "argument --out: is empty" in _usage_error(capsys, [*TINY, "--out", ""])
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    err = _usage_error(capsys, [*TINY, "--out", str(tmp_path / "dangling")])
    assert f"a symbolic link to '{tmp_path / 'nowhere'}', which does not exist" in err
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.lock").mkdir()
    assert "d/train.lock)" in _usage_error(capsys, [*TINY, "--out", str(tmp_path / "d")])
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "s").mkdir()
    os.symlink(victim, tmp_path / "s" / "train.lock")
    assert "s/train.lock)" in _usage_error(capsys, [*TINY, "--out", str(tmp_path / "s")])
    assert victim.read_text() == "precious"
    assert "argument --dist-timeout: must be a number of seconds from 1 to 604800" in \
        _usage_error(capsys, [*TINY, "--dist-timeout", "1e15"])


def test_a_line_past_the_checkpoint_is_dropped_on_resume(tmp_path):
    run = str(tmp_path / "run")
    assert train.main([*TINY, "--epochs", "2", "--out", run]) == 0
    lines = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    extra = json.loads(lines[-1])
    extra["epoch"] = 3
    with open(os.path.join(run, "metrics.jsonl"), "a") as handle:
        handle.write(json.dumps(extra) + "\n")
    assert train.main(["--out", run, "--resume"]) == 0  # nothing left to train
    assert [r["epoch"] for r in _records(run)] == [1, 2]
