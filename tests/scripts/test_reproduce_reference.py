"""scripts/reproduce_reference.py without the reference checkout (which is never in this repository): the weight
transplant covers every parameter, the CPU patches apply or name what is missing, the corpus is re-cut without a
token lost, and the comparison pairs the reference's step numbers with ours."""
from __future__ import annotations

import numpy as np
import pytest

from data.corpus import ensure_embedded_corpus
from data.loader import find_shards
from data.shards import read_shard
from scripts import reproduce_reference as harness
from trainer.build import build_model
from trainer.config import build_config


@pytest.mark.parametrize("name", ["dion", "muon", "dion2", "normuon"])
def test_transplant_names_every_parameter_of_the_reference_model(name):
    config = build_config(["--config", f"configs/reference/{name}_160m.yaml", "--data.dir", "null",
                           "--model.model_dim", "64", "--model.n_layer", "3", "--model.n_head", "2"])
    names = harness.reference_names(config.model.n_layer)
    ours = build_model(config).state_dict()
    assert set(names) == set(ours)  # no norm gains, nothing left untransplanted
    assert len(set(names.values())) == len(names)
    # the reference's GPT: transformer.wte, transformer.h.{i}.attn.c_q/c_k/c_v/c_proj, .mlp.c_fc/c_proj, lm_head
    assert names["blocks.2.attn.o.weight"] == "transformer.h.2.attn.c_proj.weight"
    assert names["blocks.0.mlp.proj.weight"] == "transformer.h.0.mlp.c_proj.weight"


def fake_reference(root):
    """A tree holding each patched text once, inside other lines."""
    files = {}
    for relative, text, _, _ in harness.CPU_PATCHES:
        files.setdefault(relative, []).append(f"before\n{text}\nafter\n")
    for relative, parts in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(parts))
    (root / ".git").mkdir()


def test_cpu_patches_apply_to_every_text_and_name_a_missing_one(tmp_path):
    fake_reference(tmp_path / "ref")
    applied = harness.patch_reference(tmp_path / "ref", tmp_path / "copy")
    assert len(applied) == len(harness.CPU_PATCHES)
    train = (tmp_path / "copy" / "train.py").read_text()
    assert "cuda" not in train.replace("torch.cuda.is_available", "") and 'backend="gloo"' in train
    assert "cuda" not in (tmp_path / "copy" / "models" / "gpt_utils.py").read_text()
    assert not (tmp_path / "copy" / ".git").exists()
    assert "cuda" in (tmp_path / "ref" / "train.py").read_text()  # the checkout itself is untouched
    (tmp_path / "ref" / "models" / "gpt_utils.py").write_text("return x.to(device), y.to(device)\n")
    with pytest.raises(SystemExit, match=r"models/gpt_utils.py has no 'x.cuda\(\), y.cuda\(\)'"):
        harness.patch_reference(tmp_path / "ref", tmp_path / "copy2")


def test_shards_hold_the_corpus_in_order(tmp_path):
    harness.cut_shards(tmp_path / "data", 50_000)
    corpus = ensure_embedded_corpus()
    train = np.concatenate([read_shard(p) for p in find_shards(corpus, "train")])
    shards = find_shards(tmp_path / "data", "train")
    assert [p.name for p in shards[:2]] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert len(shards) == -(-len(train) // 50_000)
    assert np.array_equal(np.concatenate([read_shard(p) for p in shards]), train)
    assert {len(read_shard(p)) for p in shards[:-1]} == {50_000}


def test_compare_pairs_reference_step_s_with_our_step_s_plus_1():
    # The reference logs the training loss of update s as step s (0-based); ours as s + 1; validation at the same
    # step numbers in both.
    ours = [dict(step=0, val_loss=5.0), dict(step=1, train_loss=4.0, val_loss=3.0),
            dict(step=2, train_loss=2.5, val_loss=2.0)]
    theirs = [{"val/loss": 5.0, "step": 0}, {"train/loss": 4.0 + 1e-6, "step": 0}, {"val/loss": 3.0, "step": 1},
              {"train/loss": 2.5, "step": 1}, {"val/loss": 2.0 + 3e-6, "step": 2}]
    result = harness.compare(ours, theirs, train_loss=True)
    assert result["val_max_diff"] == pytest.approx(3e-6) and result["val_step0_diff"] == 0.0
    assert result["train_max_diff"] == pytest.approx(1e-6)
    with pytest.raises(SystemExit, match="validation steps differ"):
        harness.compare(ours, theirs[:-1], train_loss=False)
