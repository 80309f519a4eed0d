"""Faults and bad input on long jobs (issue 19): non-finite state, corrupt or stray checkpoints, incompatible
resumes, two writers, bad shards, a full disk, SIGTERM. Each test runs train.py as a user would (in-process through
`main`, or as a subprocess where signals or a second process are involved) and checks the one-line error."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import trainer.checkpoint
from data import write_shard
from tests.training.helpers import ROOT, TINY, read_metrics, run_train, torchrun, train_losses
from trainer.checkpoint import complete_checkpoints, latest_checkpoint

sys.path.insert(0, str(ROOT / "scripts"))
from fault_drill import alive, children_of  # noqa: E402

ADAMW = ["--optimizer", "adamw", "--lr", "0.003"]


def one_error_line(err: str) -> str:
    """The single `error:` line of a failed run (after tqdm's progress, which ends without a newline), asserting
    there is no traceback."""
    assert "Traceback" not in err, err
    lines = ["error:" + line.split("error:", 1)[1] for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def checkpoint_tensors(path: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    target = path.parent / (path.name + ".pt")
    dcp_to_torch_save(str(path), str(target))
    state = torch.load(target, weights_only=False)
    target.unlink()
    return state


def non_finite_names(state, prefix="") -> list[str]:
    if isinstance(state, dict):
        return [n for k, v in state.items() for n in non_finite_names(v, f"{prefix}.{k}")]
    if isinstance(state, torch.Tensor) and state.is_floating_point() and not torch.isfinite(state).all():
        return [prefix]
    return []


def test_diverging_run_never_checkpoints_non_finite_state(tmp_path, capsys):
    """The reproduction of issue 19: with lr 1e6 the loss stays finite while the optimizer state turns NaN."""
    run_dir = tmp_path / "run"
    assert run_train(run_dir, "--optimizer", "adamw", "--lr", "1e6", "--num_iterations", "10",
                     "--checkpoint_freq", "1") == 3
    line = one_error_line(capsys.readouterr().err)
    assert "non-finite weights or optimizer state" in line and "checkpoint not written" in line
    kept = complete_checkpoints(run_dir / "checkpoints")
    assert kept, "the newest healthy checkpoint was pruned"
    for path in kept:
        assert non_finite_names(checkpoint_tensors(path)) == [], path


class _NanGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN backward: the optimizer state turns NaN in one step."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_restart_with_a_lower_lr_resumes_from_the_newest_healthy_checkpoint(tmp_path, capsys, monkeypatch):
    from models.gpt import GPT
    real_forward = GPT.forward
    calls = {"n": 0}

    def poisoned_fifth_step(self, inputs, targets=None):
        calls["n"] += 1
        out = real_forward(self, inputs, targets)
        return _NanGradient.apply(out) if calls["n"] == 5 else out

    monkeypatch.setattr(GPT, "forward", poisoned_fifth_step)
    run_dir = tmp_path / "run"
    args = ["--optimizer", "adamw", "--num_iterations", "8", "--checkpoint_freq", "1", "--keep_checkpoints", "1"]
    assert run_train(run_dir, *args, "--lr", "0.01") == 3
    line = one_error_line(capsys.readouterr().err)
    healthy = run_dir / "checkpoints" / "step_00000004"
    assert "at step 5 (model.embed.weight" in line and f"the newest healthy one is {healthy}" in line
    assert complete_checkpoints(run_dir / "checkpoints") == [healthy]
    monkeypatch.setattr(GPT, "forward", real_forward)
    assert run_train(run_dir, *args, "--lr", "0.001") == 0
    assert f"resumed from {healthy} at step 4" in capsys.readouterr().out
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(r["lr"] == pytest.approx(0.01) for r in records[:4])
    assert all(r["lr"] == pytest.approx(0.001) for r in records[4:])  # the new lr takes effect at once


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run of 6 steps that kept its checkpoints of steps 4 and 6, and its losses."""
    base = tmp_path_factory.mktemp("base")
    assert run_train(base / "run", *ADAMW, "--num_iterations", "6", "--checkpoint_freq", "2") == 0
    return base / "run", train_losses(base / "run")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _random_bytes_in_metadata(path: Path) -> None:
    data = bytearray(path.parent.joinpath(".metadata").read_bytes())
    data[100:140] = np.random.default_rng(0).integers(0, 256, 40, dtype=np.uint8).tobytes()
    path.parent.joinpath(".metadata").write_bytes(bytes(data))


def _flip_one_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [_truncate, _random_bytes_in_metadata, _flip_one_bit, Path.unlink],
                         ids=["truncated-distcp", "random-metadata", "bit-flip-in-data", "missing-data-file"])
def test_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(two_checkpoints, corrupt,
                                                                                    tmp_path, capsys):
    source, expected = two_checkpoints
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    newest = run_dir / "checkpoints" / "step_00000006"
    corrupt(newest / "__0_0.distcp")
    assert run_train(run_dir, *ADAMW, "--num_iterations", "6", "--checkpoint_freq", "2") == 0
    out = capsys.readouterr().out
    assert f"checkpoint {newest} is corrupt" in out and "moved to step_00000006.corrupt" in out
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000004'} at step 4" in out
    assert (run_dir / "checkpoints" / "step_00000006.corrupt").is_dir()  # kept for inspection, never deleted
    assert train_losses(run_dir) == expected


def test_no_good_checkpoint_fails_with_one_line(two_checkpoints, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints[0], run_dir)
    for path in complete_checkpoints(run_dir / "checkpoints"):
        _flip_one_bit(path / "__0_0.distcp")
    assert run_train(run_dir, *ADAMW, "--num_iterations", "6") == 2
    assert "no usable checkpoint" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000004.corrupt",
                                                                         "step_00000006.corrupt"]


def test_stray_directories_are_reported_never_counted_and_leftovers_cleaned(two_checkpoints, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints[0], run_dir)
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000006")  # resume from step 4 and save step 6 again
    stray = checkpoints / "step_00000009"  # what a kill during the old pruning left: .metadata only
    stray.mkdir()
    shutil.copy(checkpoints / "step_00000004" / ".metadata", stray)
    half_deleted = checkpoints / "step_00000001.deleting"
    half_deleted.mkdir()
    assert run_train(run_dir, *ADAMW, "--num_iterations", "6", "--checkpoint_freq", "2") == 0
    out = capsys.readouterr().out
    assert f"{stray} is not a complete checkpoint" in out and "resumed from" in out and "at step 4" in out
    # keep_checkpoints 2 counts complete checkpoints only: steps 4 and 6 survive the save at step 6.
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step_00000004", "step_00000006"]
    assert stray.is_dir() and not half_deleted.exists()


def test_pruning_renames_before_deleting(two_checkpoints, tmp_path, monkeypatch):
    """A kill in the middle of removing an old checkpoint leaves `step_N.deleting`, never a `step_N` that looks
    like a checkpoint."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints[0], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000006")

    def killed_midway(path, ignore_errors=False):
        if path.name.endswith(".deleting") and path.exists():
            (path / "__0_0.distcp").unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, ignore_errors=ignore_errors)

    real_rmtree = shutil.rmtree
    monkeypatch.setattr(trainer.checkpoint.shutil, "rmtree", killed_midway)
    assert run_train(run_dir, *ADAMW, "--num_iterations", "6", "--checkpoint_freq", "2",
                     "--keep_checkpoints", "1") == 130  # interrupted inside the pruning
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step_00000004.deleting", "step_00000006"]


@pytest.mark.parametrize("change, words", [
    (["--model_dim", "64", "--n_head", "4"], ["model.model_dim (32 -> 64)", "model.n_head (2 -> 4)"]),
    (["--optimizer", "lion"], ["optimizer.name ('adamw' -> 'lion')"]),
    (["--sequence_length", "16"], ["model.sequence_length (32 -> 16)"]),
    (["--optimizer.betas", "0.8,0.9"], ["optimizer.betas ([0.9, 0.95] -> [0.8, 0.9])"]),
], ids=["model", "optimizer", "sequence", "betas"])
def test_resume_with_a_changed_config_names_the_keys_before_loading(two_checkpoints, change, words, tmp_path,
                                                                    capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints[0], run_dir)
    assert run_train(run_dir, *ADAMW, "--num_iterations", "6", *change) == 2
    line = one_error_line(capsys.readouterr().err)
    for word in words:
        assert word in line
    assert "only these may change on resume" in line and "schedule.*" in line


def test_resume_may_extend_num_iterations_and_change_the_schedule(two_checkpoints, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints[0], run_dir)
    assert run_train(run_dir, *ADAMW, "--num_iterations", "8", "--schedule.name", "constant", "--val_loss_every",
                     "3") == 0
    assert "resumed from" in capsys.readouterr().out


def _shards(directory: Path, train_sizes, val_sizes, bad=None) -> Path:
    rng = np.random.default_rng(0)
    for split, sizes in (("train", train_sizes), ("val", val_sizes)):
        for index, size in enumerate(sizes):
            tokens = rng.integers(0, 50257, size)
            if bad is not None and bad[0] == split and bad[1] == index:
                tokens[bad[2]] = 60000
            write_shard(directory / f"fineweb_{split}_{index:06d}.bin", tokens)
    return directory


@pytest.mark.parametrize("shards, args, words", [
    (([4096, 4096], [2048], ("train", 1, 777)), [], ["fineweb_train_000001.bin: token id 60000 at position 777",
                                                     ">= vocab_size 50304"]),
    (([4096], [2048], ("val", 0, 5)), ["--val_loss_every", "2"], ["fineweb_val_000000.bin: token id 60000"]),
    (([4096, 100], [2048], None), [], ["fineweb_train_000001.bin: shard has 100 tokens"]),
    (([4096], [100], None), ["--val_loss_every", "2"], ["fineweb_val_000000.bin: shard has 100 tokens"]),
    (([4096], [2048], None), ["--val_loss_every", "2", "--data.val_tokens", "1"], ["val_tokens: 1 is less than"]),
], ids=["train-token-beyond-vocab", "val-token-beyond-vocab", "short-train-shard", "short-val-shard",
        "val-tokens-below-a-batch"])
def test_bad_data_fails_before_training_with_one_line(tmp_path, shards, args, words, capsys):
    data_dir = _shards(tmp_path / "data", *shards)
    run_dir = tmp_path / "run"
    assert run_train(run_dir, *ADAMW, "--num_iterations", "40", "--data_dir", str(data_dir), *args) == 2
    line = one_error_line(capsys.readouterr().err)
    for word in words:
        assert word in line
    assert not (run_dir / "metrics.jsonl").exists()  # nothing trained


def test_token_scan_covers_only_the_shards_the_run_reads(tmp_path):
    """A bad id in a shard the run never reaches does not stop it (the scan is bounded by num_iterations)."""
    data_dir = _shards(tmp_path / "data", [4096, 4096], [2048], ("train", 1, 10))
    assert run_train(tmp_path / "run", *ADAMW, "--num_iterations", "3", "--data_dir", str(data_dir)) == 0


def test_sequence_length_longer_than_the_default_corpus_fails_with_one_line(tmp_path, capsys):
    assert run_train(tmp_path, "--sequence_length", "100000", "--val_loss_every", "50") == 2
    assert "fewer than one global batch needs" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("key", ["logging.run_dir", "checkpoint.dir"])
def test_directory_that_is_a_file_fails_with_one_line(tmp_path, key, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    args = ["--checkpoint_dir", str(a_file)] if key == "checkpoint.dir" else []
    run_dir = a_file if key == "logging.run_dir" else tmp_path / "run"
    assert run_train(run_dir, *ADAMW, "--num_iterations", "2", *args) == 2
    assert one_error_line(capsys.readouterr().err) == f"error: {key}: {a_file} is a file, not a directory"


def test_failed_save_says_so_keeps_the_previous_checkpoint_and_stops(tmp_path, monkeypatch, capsys):
    real_save = trainer.checkpoint.dcp.save
    calls = {"n": 0}

    def disk_full_on_second_save(state, checkpoint_id):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(checkpoint_id).mkdir(parents=True, exist_ok=True)
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(trainer.checkpoint.dcp, "save", disk_full_on_second_save)
    run_dir = tmp_path / "run"
    assert run_train(run_dir, *ADAMW, "--num_iterations", "6", "--checkpoint_freq", "2") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "checkpoint of step 4 could not be written" in line and "No space left on device" in line
    assert "free, about" in line and "needed" in line and "step_00000002) is kept; stopping" in line
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000002"]
    assert [r["step"] for r in read_metrics(run_dir)][-1] == 4  # stopped, did not train on without checkpoints


def test_save_is_refused_when_the_disk_lacks_room(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer.checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 1000))
    assert run_train(tmp_path, *ADAMW, "--num_iterations", "2") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "checkpoint of step 2 not saved" in line and "has 1000 B free, it needs about" in line


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs (root on Linux only), unmounted afterwards."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_real_full_disk_fails_with_one_line(small_tmpfs, tmp_path, capsys):
    assert run_train(tmp_path / "run", *ADAMW, "--num_iterations", "2", "--checkpoint_dir",
                     str(small_tmpfs / "checkpoints")) == 2
    assert "checkpoint of step 2 not saved" in one_error_line(capsys.readouterr().err)


def test_read_only_checkpoint_dir_fails_at_start(small_tmpfs, tmp_path, capsys):
    (small_tmpfs / "checkpoints").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    assert run_train(tmp_path / "run", *ADAMW, "--num_iterations", "2", "--checkpoint_dir",
                     str(small_tmpfs / "checkpoints")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: checkpoint.dir:") and "Read-only file system" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _start(run_dir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, "--run_dir", str(run_dir), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.2)
    raise AssertionError("run made no progress")


@pytest.mark.slow
def test_second_writer_is_refused_naming_the_holder_and_sigterm_saves(tmp_path):
    run_dir = tmp_path / "run"
    args = [*ADAMW, "--num_iterations", "100000", "--checkpoint_freq", "100000"]  # the SIGTERM save is the only one
    first = _start(run_dir, *args)
    try:
        _wait_for_step(run_dir, 2, first)
        second = _start(run_dir, *args)
        _, err = second.communicate(timeout=600)
        assert second.returncode == 2
        line = one_error_line(err)
        assert f"run_dir: {run_dir} is in use by another run (pid {first.pid} on " in line
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 143
    stopped = ["stopped" + line.split("stopped", 1)[1] for line in err.replace("\r", "\n").splitlines()
               if "stopped by SIGTERM" in line]
    assert len(stopped) == 1 and "checkpoint saved" in stopped[0], err
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{step:08d}"
    assert not (run_dir / ".lock").exists()  # released on exit


def test_a_checkpoint_dir_shared_with_a_live_run_is_refused(tmp_path, capsys):
    from trainer.runlock import RunLock
    shared = tmp_path / "shared_checkpoints"
    holder = RunLock(shared, "checkpoint_dir")
    holder.acquire()  # another run, with its own run_dir, writing to the same checkpoint_dir
    try:
        assert run_train(tmp_path / "run", *ADAMW, "--num_iterations", "2", "--checkpoint_dir", str(shared)) == 2
    finally:
        holder.release()
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: checkpoint.dir: {shared} is in use by another run (pid {os.getpid()} on ")
    assert not (tmp_path / "run" / ".lock").exists()  # the run_dir lock taken first was released


def test_sigterm_without_time_for_a_save_stops_at_once_and_keeps_the_previous_checkpoint(tmp_path, capsys,
                                                                                        monkeypatch):
    from models.gpt import GPT
    real_forward = GPT.forward
    calls = {"n": 0}

    def terminated_during_step_3(self, inputs, targets=None):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(self, inputs, targets)

    monkeypatch.setattr(GPT, "forward", terminated_during_step_3)
    assert run_train(tmp_path, *ADAMW, "--num_iterations", "10", "--checkpoint_freq", "2",
                     "--checkpoint.sigterm_grace_seconds", "0") == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 3 without saving: no time within checkpoint.sigterm_grace_seconds=0.0" in err
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000002"
    assert [r["step"] for r in read_metrics(tmp_path)][-1] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handler is gone with the run


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(json.dumps({"host": "gone", "pid": 999999, "started": "earlier"}))
    assert run_train(run_dir, *ADAMW, "--num_iterations", "2") == 0
    assert "took over the stale lock of a run that is gone (pid 999999 on gone" in capsys.readouterr().out


@pytest.mark.parametrize("optimizer", ["schedule_free_adamw"])
def test_schedule_free_resumes_exactly(tmp_path, optimizer):
    args = ["--optimizer", optimizer, "--lr", "0.003", "--num_iterations", "6", "--checkpoint_freq", "3",
            "--schedule.name", "constant", "--val_loss_every", "2"]
    assert run_train(tmp_path / "straight", *args) == 0
    shutil.copytree(tmp_path / "straight", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step_00000006")
    assert run_train(tmp_path / "split", *args) == 0
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "straight")


@pytest.mark.slow
def test_two_ranks_agree_on_the_fallback_checkpoint_and_print_once(tmp_path):
    args = [*TINY, "--device_batch_size", "2", "--run_dir", str(tmp_path), *ADAMW, "--checkpoint_freq", "2"]
    assert torchrun(2, *args, "--num_iterations", "4").returncode == 0
    _flip_one_bit(tmp_path / "checkpoints" / "step_00000004" / "__1_0.distcp")  # rank 1's shard only
    result = torchrun(2, *args, "--num_iterations", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("is corrupt (__1_0.distcp does not match its checksum)") == 1
    assert result.stdout.count("resumed from") == 1 and "at step 2" in result.stdout


@pytest.mark.slow
def test_workers_exit_when_the_launcher_is_killed(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(ROOT / "train.py"), *TINY, "--device_batch_size", "2", "--run_dir", str(tmp_path),
                                 *ADAMW,
                                 "--num_iterations", "100000"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        _wait_for_step(tmp_path, 2, launcher)
        workers = children_of(launcher.pid)
        assert len(workers) == 2
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in workers)
    finally:
        launcher.kill()
        for pid in workers:  # orphans, when the test fails
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_resume_at_another_world_size_is_refused_in_one_line_printed_once(tmp_path):
    args = [*TINY, "--device_batch_size", "2", "--run_dir", str(tmp_path), *ADAMW]
    assert run_train(tmp_path, "--device_batch_size", "2", *ADAMW, "--num_iterations", "2") == 0
    result = torchrun(2, *args, "--num_iterations", "4")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr.split("elastic/multiprocessing")[0]  # torchrun's own report follows
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(lines) == 1 and "data-parallel ranks (1 -> 2)" in lines[0], result.stderr


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_one_checkpoint_on_both_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(ROOT / "train.py"), *TINY, "--device_batch_size", "2", "--run_dir", str(tmp_path),
                                 *ADAMW, "--num_iterations", "100000"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(tmp_path, 2, launcher)
        launcher.send_signal(signal.SIGTERM)  # torchrun forwards it to the workers, SIGKILL 30 s later
        _, err = launcher.communicate(timeout=600)
    finally:
        launcher.kill()
    stopped = [line for line in err.replace("\r", "\n").splitlines() if "stopped by SIGTERM" in line]
    assert len(stopped) == 1 and "checkpoint saved" in stopped[0], err
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    saved = latest_checkpoint(tmp_path / "checkpoints")
    assert saved.name == f"step_{step:08d}" and {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in saved.iterdir()}
