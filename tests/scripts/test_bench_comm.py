"""scripts/bench_comm.py at 2 and 4 gloo ranks on a tiny GPT: the bytes each collective moves per step against the
formulas it prints, and issue 15's acceptance (Dion's HSDP matrix P/R bytes per rank over the replicas within 10% of
(m + n) r / fs, recomputed here from the model's shapes). No timings."""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_comm  # noqa: E402

from trainer.build import build_model  # noqa: E402
from trainer.config import build_config  # noqa: E402

pytestmark = pytest.mark.slow  # torchrun at 2 and 4 processes

TINY = ["--model_dim", "64", "--n_layer", "1", "--n_head", "2", "--sequence_length", "16", "--model.vocab_size", "512"]
CASES = ["adamw ddp", "dion r1 own sync", "dion r1/4 own sync", "dion_reference r1/4 own sync",
         "dion_async r1/4 own sync"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> tuple[list[dict], str]:
    output = tmp_path_factory.mktemp("bench_comm") / "rows.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert bench_comm.main(["--ranks", "2", "4", "--cases", *CASES, "--json", str(output), "--", *TINY]) == 0
    return json.loads(output.read_text()), printed.getvalue()


def row(rows: list[dict], case: str, ranks: int) -> dict:
    return next(r for r in rows if r["case"] == case and r["ranks"] == ranks)


def matrix_pr_bytes_per_rank(fs: int) -> float:
    """4 sum over the GPT's Dion matrices of (m + n) r / fs, r = ceil(min(m, n) / 4) (rank fraction 1/4)."""
    model = build_model(build_config(TINY))
    total = 0
    for p in model.param_groups()["matrix"]:
        m, n = p.shape
        r = -(-min(m, n) // 4)
        assert (m + n) * r < m * n  # compressed: the replicas average P and R
        total += (m + n) * r
    return 4 * total / fs


@pytest.mark.parametrize("case", ["dion r1/4 own sync", "dion_reference r1/4 own sync"])
def test_dion_hsdp_matrix_bytes_per_rank_within_ten_percent_of_m_plus_n_r_over_fs(measured, case):
    rows, printed = measured
    result = row(rows, case, 4)
    assert (result["dp"], result["fs"]) == (2, 2)
    expected = matrix_pr_bytes_per_rank(fs=2)
    assert result["formula"]["step/replicas"] == pytest.approx(expected)
    step_replicas = bench_comm.totals(result, "step/replicas/")
    assert abs(step_replicas - expected) <= 0.1 * expected, (step_replicas, expected)
    # The table prints the measurement beside that formula.
    line = next(line for line in printed.splitlines() if line.startswith(f"| {case} | 4 |"))
    assert f"{step_replicas / bench_comm.MB:.3f} / {expected / bench_comm.MB:.3f}" in line


def test_every_printed_formula_matches_the_measurement_within_ten_percent(measured):
    rows, _ = measured
    checked = 0
    for result in rows:
        for key, expected in result["formula"].items():
            got = bench_comm.totals(result, key)
            assert abs(got - expected) <= 0.1 * expected, (result["case"], result["ranks"], key, got, expected)
            checked += 1
    assert checked >= 2 * len(rows)


def test_dion_own_full_gradient_sync_is_issued_during_backward(measured):
    rows, printed = measured
    # Rank 1: no matrix is compressed, so all of Dion's replica sync is full gradients, started from the hooks.
    for ranks in (2, 4):
        assert bench_comm.own_sync_share_in_backward(row(rows, "dion r1 own sync", ranks)) == 1.0
    assert "| dion r1 own sync | 4 | 2 x 2 |" in printed
    # Rank 1/4: the compressed P and R follow in step(), the rest before backward ends.
    share = bench_comm.own_sync_share_in_backward(row(rows, "dion r1/4 own sync", 4))
    assert 0.0 < share < 1.0
