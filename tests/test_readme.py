"""Every code block of README.md is checked as a reader would use it. The "first hour" block is run in full by
tests/training/test_first_hour.py; here, each train.py / torchrun command of the other blocks must resolve to a
valid config for its number of processes (FineWeb data directories replaced by the embedded corpus: the shards
are downloaded on demand), the YAML example must be a valid config, every script named must answer --help, and the
set-up commands must name the pinned torch and files that exist."""
import shlex
import subprocess
import sys

import pytest
import yaml

from tests.readme_blocks import code_blocks
from tests.training.helpers import ROOT
from trainer.config import build_config

README = ROOT / "README.md"


def commands(block) -> list[list[str]]:
    """Shell commands of a bash block: continuation lines joined, comments and #SBATCH lines dropped."""
    text = block.source.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def train_arguments(words: list[str]) -> tuple[int, list[str]] | None:
    """(processes, train.py arguments) of a `python train.py ...` or `[srun] torchrun ... train.py ...` command."""
    if "train.py" not in words:
        return None
    index = words.index("train.py")
    nproc = 1
    for word, value in zip(words, words[1:]):
        if word == "--nproc_per_node":
            nproc = int(value)
    for word in words:
        if word.startswith("--nproc_per_node="):
            nproc = int(word.split("=")[1])
    nodes = next((int(v) for w, v in zip(words, words[1:]) if w == "--nnodes" and v.isdigit()), 1)
    if "$SLURM_NNODES" in words:
        nodes = 4  # the SLURM example asks for 4 nodes
    return nproc * nodes, words[index + 1:]


BASH = [b for b in code_blocks(README, "bash")]


@pytest.mark.parametrize("block", BASH, ids=lambda b: f"line{b.line}")
def test_every_train_command_resolves_for_its_process_count(block):
    from trainer.distributed import mesh_sizes
    for words in commands(block):
        parsed = train_arguments(words)
        if parsed is None or "--help" in words:
            continue
        processes, args = parsed
        config = build_config([*args, "--data_dir", "null"])
        dp, fs, tp = mesh_sizes(config, processes)
        assert dp * fs * tp == processes, words


@pytest.mark.parametrize("block", BASH, ids=lambda b: f"line{b.line}")
def test_every_script_and_file_named_exists_and_answers_help(block):
    for words in commands(block):
        for word in words:
            if word.endswith((".py", ".yaml", ".txt")) and not word.startswith("-"):
                assert (ROOT / word).exists(), word
        scripts = [w for w in words if w.startswith("scripts/") and w.endswith(".py")]
        for script in scripts:
            result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                                    timeout=600)
            assert result.returncode == 0, (script, result.stderr[-1000:])
        if words[:2] == ["pip", "install"]:
            assert "torch==2.13.0" in words


def test_yaml_example_is_a_valid_config(tmp_path):
    (block,) = code_blocks(README, "yaml")
    path = tmp_path / "example.yaml"
    path.write_text(block.source)
    config = build_config(["--config", str(path)])
    assert yaml.safe_load(block.source)["optimizer"]["name"] == config.optimizer.name == "dion"
