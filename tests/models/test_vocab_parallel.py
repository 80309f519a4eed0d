"""The vocab-parallel token embedding, LM head and cross-entropy of the GPT's TP plan, on 2 gloo ranks.

The worker (tests/models/vocab_parallel_worker.py) checks the sharded cross-entropy in float64 against
F.cross_entropy on the whole logits (closed form: softmax minus one-hot), the TP-parallelized GPT's loss, every
gradient and the gathered logits against an unsharded copy (float32 logits as in the model: ~1e-7 relative), and
that the head is really split: the LM head's output on a rank is vocab / 2 wide and no tensor saved for backward is
vocab wide, where the replicated head (parallel.vocab_parallel: false) saves the full (tokens, vocab) logits.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # multi-process (torchrun) runs: the quick subset leaves them out

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = REPO_ROOT / "tests/models/vocab_parallel_worker.py"
VOCAB = 96


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("vocab_parallel") / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                str(WORKER), str(output)], env=env, capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(output.read_text())


def test_sharded_cross_entropy_equals_the_full_one_in_float64(result):
    assert result["ce_loss"] < 1e-14
    assert result["ce_grad"] < 1e-14


@pytest.mark.parametrize("mode", ["replicated", "vocab", "vocab_chunked"])
def test_tensor_parallel_gpt_equals_the_unsharded_model(result, mode):
    measured = result[mode]
    assert measured["loss"] < 1e-6
    assert measured["gradients"] < 1e-5
    assert measured["logits_shape"] == [2, 12, VOCAB]  # without targets: the full logits on every rank
    assert measured["logits"] < 1e-5


@pytest.mark.parametrize("mode", ["vocab", "vocab_chunked"])
def test_vocab_parallel_head_holds_and_computes_half_the_vocabulary(result, mode):
    measured = result[mode]
    assert measured["embedding_rows"] == measured["head_rows"] == VOCAB // 2
    assert measured["head_output_width"] == VOCAB // 2
    assert measured["largest_saved_width"] < VOCAB


def test_replicated_head_saves_the_full_logits(result):
    """The measurement above can see the difference: the replicated head's forward keeps vocab-wide logits."""
    measured = result["replicated"]
    assert measured["embedding_rows"] == measured["head_rows"] == VOCAB
    assert measured["head_output_width"] == measured["largest_saved_width"] == VOCAB
