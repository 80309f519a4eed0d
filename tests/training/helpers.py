"""Run train.py in-process (fast) or under torchrun (distributed) on a tiny model and read its metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model_dim", "32", "--n_layer", "1", "--n_head", "2", "--sequence_length", "32", "--batch_size", "4",
        "--device_batch_size", "4", "--data.val_tokens", "512", "--val_loss_every", "0",
        "--schedule.warmdown_ratio", "0", "--logging.log_every", "1", "--logging.wandb", "false"]


def run_train(run_dir: Path, *args: str) -> int:
    import train
    return train.main(TINY + ["--run_dir", str(run_dir), *args])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(run_dir) if "train_loss" in r]


def torchrun(nproc: int, *args: str, nnodes: int = 1, timeout: int = 900, extra_env=None,
             launcher_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           **(extra_env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", *(launcher_args or ("--standalone",)),
               f"--nproc_per_node={nproc}", str(ROOT / "train.py"), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
