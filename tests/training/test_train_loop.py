"""The training loop end to end on a tiny model: outputs, bit-exact resume, interrupted saves, non-finite loss."""
import json
import shutil

import pytest
import yaml

import trainer.checkpoint
from tests.training.helpers import read_metrics, run_train, train_losses
from trainer.checkpoint import latest_checkpoint


def test_run_writes_metrics_and_resolved_config(tmp_path, capsys):
    assert run_train(tmp_path, "--optimizer", "adamw", "--lr", "0.01", "--num_iterations", "4",
                     "--val_loss_every", "2") == 0
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    out = capsys.readouterr().out
    peak = float(out.split("mfu: against ")[1].split(" TFLOP/s per device (float32 matmul measured at start)")[0])
    for record in records[1:]:
        assert {"step", "train_loss", "lr", "tokens", "time", "grad_norm", "tflops"} <= set(record)
        # achieved TFLOP/s = tokens/s x training FLOPs per token (6 N + attention; 9.74 MFLOPs for this model)
        assert record["tflops"] == pytest.approx(record["tokens_per_second"] * 9_738_240 / 1e12, abs=1e-4)
        # on a CPU, against the float32 matmul rate measured at start (printed)
        assert 0 < record["mfu"] == pytest.approx(record["tflops"] / peak, rel=1e-2, abs=2e-4)
    assert records[4]["tokens"] == 4 * 4 * 32
    assert "val_loss" in records[0] and "val_loss" in records[2] and "val_loss" in records[4]
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["optimizer"]["name"] == "adamw" and saved["optimizer"]["lr"] == 0.01
    assert saved["schedule"]["num_iterations"] == 4 and saved["model"]["model_dim"] == 32
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000004"
    assert "parameters = 1,609,728 embedding + " in out and "MFLOPs/token (training); 128 tokens/step" in out
    assert f"outputs: {tmp_path / 'metrics.jsonl'}" in out


@pytest.mark.parametrize("optimizer", ["adamw", "lion", "muon", "normuon", "dion2", "nordion2"])
def test_resume_is_bit_exact(tmp_path, optimizer):
    args = ["--optimizer", optimizer, "--lr", "0.003", "--num_iterations", "6", "--schedule.warmup_ratio", "0.2",
            "--schedule.warmdown_ratio", "0.5", "--batch_size", "8", "--device_batch_size", "4",  # 2 micro-batches
            "--checkpoint_freq", "3"]
    assert run_train(tmp_path / "straight", *args) == 0
    expected = train_losses(tmp_path / "straight")
    assert len(expected) == 6
    # A run stopped after step 3: the same command resumes from the step-3 checkpoint.
    shutil.copytree(tmp_path / "straight", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step_00000006")
    assert run_train(tmp_path / "split", *args) == 0
    assert train_losses(tmp_path / "split") == expected


def test_finished_run_is_not_retrained(tmp_path, capsys):
    assert run_train(tmp_path, "--optimizer", "adamw", "--num_iterations", "2") == 0
    before = (tmp_path / "metrics.jsonl").read_text()
    assert run_train(tmp_path, "--optimizer", "adamw", "--num_iterations", "2") == 0
    assert "run already complete" in capsys.readouterr().out
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_kill_during_save_keeps_previous_checkpoint_loadable(tmp_path, monkeypatch):
    args = ["--optimizer", "adamw", "--num_iterations", "6", "--checkpoint_freq", "2"]
    real_save = trainer.checkpoint.dcp.save
    calls = {"n": 0}

    def dying_save(state, checkpoint_id):
        calls["n"] += 1
        if calls["n"] == 2:  # the save of step 4: write part of it, then die like a killed process
            real_save({"model": state["model"]}, checkpoint_id=checkpoint_id)
            raise KeyboardInterrupt
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(trainer.checkpoint.dcp, "save", dying_save)
    assert run_train(tmp_path / "run", *args) == 130  # interrupted (Ctrl-C) inside the save
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "step_00000004.tmp").exists()
    assert latest_checkpoint(checkpoints).name == "step_00000002"
    monkeypatch.setattr(trainer.checkpoint.dcp, "save", real_save)
    assert run_train(tmp_path / "run", *args) == 0  # resumes from step 2
    assert run_train(tmp_path / "straight", *args) == 0
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "straight")
    assert not (checkpoints / "step_00000004.tmp").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    from models.gpt import GPT
    real_forward = GPT.forward
    calls = {"n": 0}

    def forward_turning_nan(self, inputs, targets=None):
        calls["n"] += 1
        out = real_forward(self, inputs, targets)
        return out * float("nan") if calls["n"] > 3 else out  # the 4th training step diverges

    monkeypatch.setattr(GPT, "forward", forward_turning_nan)
    run_dir = tmp_path / "run"
    code = run_train(run_dir, "--optimizer", "adamw", "--num_iterations", "10", "--checkpoint_freq", "2")
    assert code == 3
    err = capsys.readouterr().err
    assert "error: non-finite training loss nan at step 4" in err and "Traceback" not in err
    good = latest_checkpoint(run_dir / "checkpoints")
    assert good.name == "step_00000002"
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    monkeypatch.setattr(GPT, "forward", real_forward)
    assert run_train(run_dir, "--optimizer", "adamw", "--num_iterations", "10", "--checkpoint_freq", "2") == 0
    assert f"resumed from {good} at step 2" in capsys.readouterr().out


def test_metrics_after_resume_drop_records_past_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    assert run_train(run_dir, "--optimizer", "adamw", "--num_iterations", "3", "--checkpoint_freq", "2") == 0
    # Pretend a crash after step 3 lost its checkpoint: only step 2 survives.
    shutil.rmtree(run_dir / "checkpoints" / "step_00000003")
    assert run_train(run_dir, "--optimizer", "adamw", "--num_iterations", "3", "--checkpoint_freq", "2") == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_wandb_offline_run_resumes_the_same_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = ["--optimizer", "adamw", "--logging.wandb", "true", "--num_iterations", "4", "--checkpoint_freq", "2"]
    assert run_train(tmp_path, *args, "--num_iterations", "2") == 0
    first = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(first) == 1
    # offline-run-<date>_<time>-<id>, with "-1" appended when both runs start within the same second
    run_id = first[0].name.split("-")[3]
    assert run_train(tmp_path, *args) == 0  # resumes at step 2 of 4
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {run.name.split("-")[3] for run in runs} == {run_id}


def test_resume_with_more_steps_and_a_new_lr_follows_the_new_config(tmp_path):
    """A finished 6-step run (linear warmdown to 0 at the end), rerun with num_iterations 10 and lr 0.005: the
    steps 7-10 run on the new 10-step schedule at the new peak, not at the checkpoint's final lr 0."""
    args = ["--optimizer", "adamw", "--checkpoint_freq", "6", "--schedule.warmdown_ratio", "0.5"]
    assert run_train(tmp_path, *args, "--num_iterations", "6", "--lr", "0.01") == 0
    assert run_train(tmp_path, *args, "--num_iterations", "10", "--lr", "0.005") == 0
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path) if "lr" in r}
    # 10 steps, warmdown 5: steps 1-5 at the peak, then 5/5 .. 1/5 of it (lr logged is the one the step used)
    assert [lrs[s] for s in (7, 8, 9, 10)] == pytest.approx([0.005 * f for f in (4 / 5, 3 / 5, 2 / 5, 1 / 5)])
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["optimizer"]["lr"] == 0.005 and saved["schedule"]["num_iterations"] == 10


def test_rerun_after_a_crash_before_any_checkpoint_logs_step_zero_once(tmp_path):
    args = ["--optimizer", "adamw", "--num_iterations", "2", "--val_loss_every", "2", "--checkpoint_freq", "0"]
    assert run_train(tmp_path, *args) == 0  # no checkpoint: a rerun starts over
    assert run_train(tmp_path, *args) == 0
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]


def test_diverging_run_warns_once(tmp_path, capsys):
    assert run_train(tmp_path, "--optimizer", "adamw", "--lr", "3.0", "--num_iterations", "6",
                     "--checkpoint_freq", "0") in (0, 3)
    err = capsys.readouterr().err
    assert err.count("warning: training loss") == 1 and "lower optimizer.lr (now 3)" in err


def test_ctrl_c_prints_where_the_run_stopped_and_exits_130(tmp_path):
    import re
    import signal
    import subprocess
    import sys
    import time

    from tests.training.helpers import ROOT, TINY
    command = [sys.executable, "train.py", *TINY, "--run_dir", str(tmp_path), "--optimizer", "adamw",
               "--num_iterations", "100000", "--checkpoint_freq", "2"]
    # A job started in the background (`cmd &`) ignores SIGINT, and an ignored signal stays ignored across exec, so
    # train.py would never see the Ctrl-C: handled here while the child starts, it is reset to the default on exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    checkpoints = tmp_path / "checkpoints"
    deadline = time.time() + 300
    # Any complete checkpoint (not step_00000004 itself: with checkpoint.keep 2 it is deleted when step 8 is saved,
    # and a poller on a loaded machine can miss it).
    while time.time() < deadline and not [path for path in checkpoints.glob("step_*") if not path.suffix]:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    line = [line for line in err.splitlines() if line.startswith("interrupted at step")]
    assert len(line) == 1 and "rerun the same command" in line[0], err[-2000:]
    last = re.search(r"last checkpoint: (step_\d{8});", line[0])
    assert last is not None and (checkpoints / last.group(1)).is_dir(), line[0]


def test_steps_that_do_not_log_make_no_host_sync(tmp_path, monkeypatch):
    """.item() (a host sync on GPUs) only on logging steps: 6 steps logged every 6, 3 and 1 steps make 1, 2 and 6
    times the syncs of one logging step, so a non-logging step makes none."""
    import torch
    calls = {"n": 0}
    real_item = torch.Tensor.item

    def counting_item(self):
        calls["n"] += 1
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    counts = {}
    for every in (6, 3, 1):
        calls["n"] = 0
        assert run_train(tmp_path / str(every), "--optimizer", "adamw", "--num_iterations", "6", "--checkpoint_freq",
                         "0", "--logging.log_every", str(every)) == 0
        counts[every] = calls["n"]
    assert counts[6] > 0 and counts[3] == 2 * counts[6] and counts[1] == 6 * counts[6], counts


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA GeForce RTX 3090", None)])
def test_mfu_peak_of_a_gpu_comes_from_its_datasheet_entry(monkeypatch, name, peak):
    import torch

    from trainer.metrics import peak_tflops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda", 0))[0] == peak


def test_mfu_peak_of_a_cpu_is_a_measured_matmul_rate():
    import torch

    from trainer.metrics import peak_tflops
    peak, source = peak_tflops(torch.device("cpu"))
    assert 1e-4 < peak < 100 and "measured" in source  # 2 CPU cores: tenths of a TFLOP/s
