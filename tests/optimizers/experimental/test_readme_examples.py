"""Every ```python block of optimizers/experimental/README.md runs as pasted, in order, in one session."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.readme_blocks import code_blocks, run_python_blocks

pytest.importorskip("optax")
pytest.importorskip("flax")

README = Path(__file__).resolve().parents[3] / "optimizers" / "experimental" / "README.md"


def test_the_readme_has_python_examples():
    assert len(code_blocks(README, "python")) >= 4


def test_every_python_block_of_the_readme_runs_as_pasted(capsys):
    namespace = run_python_blocks(README)
    assert math.isfinite(float(capsys.readouterr().out.split()[0]))  # the optax example's loss after 3 steps
    assert int(namespace["state"].step) == 1  # the Flax example stepped
    assert namespace["params"]["w1"].shape == (64, 32)  # the replica example stepped the same parameters
