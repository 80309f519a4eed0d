"""scripts/estimate.py: the command line (a per-rank report, a clean error for an impossible layout) and the memory
tracker's side of trainer/estimate.py on a cut-down 1B shape (activations shrink with checkpointing, the peak holds
at least the parameters and one forward's activations), and the table of docs/scaling.md built from valid
configs. The 7B checks are tests/training/test_estimate.py."""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import estimate  # noqa: E402  (scripts/estimate.py)

from trainer.estimate import estimate_config, simulate, table_config, table_rows  # noqa: E402

SMALL_1B = ["--model.preset", "1b", "--model.n_layer", "2", "--model.sequence_length", "512"]
# Block activations dominate: a small vocabulary (small logits), bfloat16 FSDP gathers (no autocast weight copies).
BLOCKS_1B = ["--model.preset", "1b", "--model.n_layer", "4", "--model.sequence_length", "1024",
             "--model.vocab_size", "4096", "--precision.param_dtype", "bfloat16"]


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = estimate.main(argv)
    return status, out.getvalue(), err.getvalue()


@pytest.mark.slow  # two fresh processes, about 20 s idle
def test_prints_each_simulated_rank_with_its_collectives():
    status, out, _ = run_main(["--world", "16", "--dp", "2", "--fs", "8", "--no-memory", "--ranks", "0", "15", "--",
                               *SMALL_1B, "--optimizer", "dion", "--optimizer.rank_fraction", "0.25"])
    assert status == 0
    assert "rank 0 of 16 (dp 2 x fs 8 x tp 1)" in out and "rank 15 of 16" in out
    for line in ("parameters", "state Q", "state momentum", "step/replicas/all_reduce",
                 "formula, replica sync with compressed"):
        assert line in out
    assert "HELD WHOLE" not in out


def test_a_layout_that_does_not_multiply_to_the_world_is_one_clean_error():
    status, _, err = run_main(["--world", "64", "--dp", "8", "--fs", "4", "--no-memory", "--", *SMALL_1B])
    assert status == 2
    assert "dp_size x fs_size x tp_size = 8 x 4 x 1 = 32 must equal the number of processes (64)" in err


def test_a_ddp_layout_is_refused_with_the_reason():
    status, _, err = run_main(["--world", "8", "--no-memory", "--", *SMALL_1B, "--optimizer", "adamw"])
    assert status == 2
    assert "DDP layouts" in err and "needs real storage" in err


def test_checkpointing_shrinks_the_activations_and_the_peak_holds_a_forward():
    config = estimate_config([*BLOCKS_1B, "--optimizer", "adamw"], 8, 1, 8, 1)
    rank = simulate(config, 8)
    assert 0 < rank.activations["full"] < 0.5 * rank.activations["none"]
    assert rank.peak >= rank.parameters + rank.activations["none"]


def test_every_row_of_the_scaling_table_is_a_valid_config():
    for preset, world, layout, optimizer, extra in table_rows():
        table_config(preset, world, layout, optimizer, extra)
