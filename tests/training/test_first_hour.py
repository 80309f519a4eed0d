"""The README's "Your first hour" block, run as a reader types it: every command in order, in one directory, with
a smaller model (the step counts, optimizers, layouts and run directories are the README's)."""
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.readme_blocks import code_blocks
from tests.training.helpers import ROOT

pytestmark = pytest.mark.slow  # multi-process (torchrun) runs: the quick subset leaves them out

SMALLER = ["--model_dim", "32", "--n_layer", "1", "--n_head", "2", "--sequence_length", "32",
           "--data.val_tokens", "1024"]


def first_hour_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Your first hour")
    line = text[:start].count("\n") + 1
    block = next(b for b in code_blocks(ROOT / "README.md", "bash") if b.line > line)
    return [shlex.split(command, comments=True) for command in block.source.splitlines() if command.strip()]


@pytest.mark.slow
def test_first_hour_commands_run_as_written(tmp_path):
    for name in ("train.py", "scripts", "configs", "data", "models", "optimizers", "trainer"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, tmp_path / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    for command in first_hour_commands():
        program = command[0]
        if program == "python":
            command = [sys.executable, *command[1:]]
        elif program == "torchrun":
            command = [sys.executable, "-m", "torch.distributed.run", *command[1:]]
        if "train.py" in command:
            command += SMALLER
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, (shlex.join(command), result.stderr[-3000:])
        if "generate.py" in command:
            assert "ROMEO:" in result.stdout
    for run in ("default", "adamw", "fsdp", "hsdp"):
        assert (tmp_path / "runs" / run / "metrics.jsonl").exists(), run
    steps = [line for line in (tmp_path / "runs/default/metrics.jsonl").read_text().splitlines()]
    assert '"step": 400' in steps[-1]
    assert (tmp_path / "runs/plots/first_hour_val_vs_step.png").exists()
