"""The training loop end to end on a tiny model: outputs, bit-exact resume, interrupted saves, non-finite loss."""
import json
import math
import shutil

import pytest
import yaml

import trainer.checkpoint
from tests.training.helpers import read_metrics, run_train, train_losses
from trainer.checkpoint import latest_checkpoint


def test_run_writes_metrics_and_resolved_config(tmp_path):
    assert run_train(tmp_path, "--optimizer", "adamw", "--lr", "0.01", "--num_iterations", "4",
                     "--val_loss_every", "2") == 0
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    for record in records[1:]:
        assert {"step", "train_loss", "lr", "tokens", "time", "grad_norm"} <= set(record)
    assert records[4]["tokens"] == 4 * 4 * 32
    assert "val_loss" in records[0] and "val_loss" in records[2] and "val_loss" in records[4]
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["optimizer"] == "adamw" and saved["num_iterations"] == 4 and saved["model_dim"] == 32
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000004"


@pytest.mark.parametrize("optimizer", ["adamw", "lion", "muon", "normuon", "dion2", "nordion2"])
def test_resume_is_bit_exact(tmp_path, optimizer):
    args = ["--optimizer", optimizer, "--lr", "0.003", "--num_iterations", "6", "--warmup_ratio", "0.2",
            "--warmdown_ratio", "0.5", "--batch_size", "8", "--device_batch_size", "4",  # 2 micro-batches
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
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path / "run", *args)
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
    assert capsys.readouterr().out.startswith(f"resumed from {good} at step 2")


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
    args = ["--optimizer", "adamw", "--no_wandb", "false", "--num_iterations", "4", "--checkpoint_freq", "2"]
    assert run_train(tmp_path, *args, "--num_iterations", "2") == 0
    first = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(first) == 1
    # offline-run-<date>_<time>-<id>, with "-1" appended when both runs start within the same second
    run_id = first[0].name.split("-")[3]
    assert run_train(tmp_path, *args) == 0  # resumes at step 2 of 4
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {run.name.split("-")[3] for run in runs} == {run_id}
