"""scripts/memory_report.py in a tiny form (not timed): the table's structure, and a saving it must show.

On the tiny shape (8 blocks of width 64, 8 sequences of 1024 tokens per rank, a 512-token vocabulary) the blocks'
activations are most of the step's memory, so full activation checkpointing, which keeps only each block's input,
must lower the peak by far more than RSS noise (measured: 0.36 of the baseline above startup; the two ranks agree
to 1 MiB)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.training.helpers import ROOT

pytestmark = pytest.mark.slow  # launches torchrun


def test_activation_checkpointing_lowers_the_peak_and_the_table_lists_every_row(tmp_path):
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "memory_report.py"), "--shape", "tiny", "--steps",
                             "1", "--rows", "ac_full", "tp_vocab_parallel", "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    tiny = json.loads(out.read_text())["tiny"]
    assert set(tiny) == {"baseline", "ac_full", "tp_baseline", "tp_vocab_parallel"}
    for name in ("baseline", "ac_full"):
        ranks = tiny[name]["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1]
        assert all(r["step_peak"] >= r["init_peak"] >= r["startup"] > 0 for r in ranks)
        assert all(r["micro_batches"] == 2 for r in ranks)
    need = {name: max(r["step_peak"] - r["startup"] for r in tiny[name]["ranks"]) for name in ("baseline", "ac_full")}
    assert need["ac_full"] < 0.8 * need["baseline"], need
    # Same weights, same tokens: recomputation changes no loss.
    assert [r["loss"] for r in tiny["ac_full"]["ranks"]] == pytest.approx(
        [r["loss"] for r in tiny["baseline"]["ranks"]], rel=1e-5)
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| baseline", "| ac_full", "| tp_baseline",
                                                             "| tp_vocab_parallel"]
    assert table[1].split(" | ")[-2] == "1.00"  # the baseline against itself
    from scripts.memory_report import vocab_parallel_available
    if not vocab_parallel_available():
        assert "not available" in table[-1]
