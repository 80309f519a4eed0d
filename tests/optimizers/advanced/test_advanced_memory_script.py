"""scripts/optimizer_memory.py on a small GPT: the model's parameter groups, state byte counting, feature
combinations."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from models import GPT, GPTConfig
from optimizers.advanced import Lion_Adv, Simplified_AdEMAMix

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "optimizer_memory.py"


@pytest.fixture(scope="module")
def memory_script():
    spec = importlib.util.spec_from_file_location("optimizer_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=32, n_layer=1, n_head=2, model_dim=16, sequence_length=8))


def test_the_models_param_groups_cover_every_parameter_once(model):
    groups = model.param_groups()
    ids = [id(p) for params in groups.values() for p in params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert {id(p) for p in groups["matrix"]} == {id(p) for p in model.blocks.parameters() if p.ndim == 2}
    assert [len(groups[k]) for k in ("embedding", "lm_head")] == [1, 1]


def test_adamw_state_is_eight_bytes_per_parameter_plus_step_counters(memory_script, model):
    parameters = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    # exp_avg and exp_avg_sq in float32, plus a float32 scalar `step` per parameter tensor (as torch keeps it).
    assert memory_script.measure(model, "adamw", {}) == 8 * parameters + 4 * tensors


def test_factored_adam_adv_state_is_counted_at_packed_size(memory_script, model):
    parameters = sum(p.numel() for p in model.parameters())
    factored = memory_script.measure(model, "adam_adv", dict(factored=True))
    # 1 bit per entry for the signs plus two float32 vectors per moment: far below AdamW's 8 bytes per parameter.
    assert parameters / 8 < factored < 8 * parameters / 4


def test_feature_combinations_follow_the_supported_features(memory_script):
    lion = memory_script.feature_combinations(Lion_Adv)
    assert lion[0] == {} and {"grams": True} not in lion
    assert lion[-1] == dict(factored=True, orthogonal_gradient=True, cautious_mask=True, stochastic_rounding=True)
    assert {"use_AdEMAMix": True} not in memory_script.feature_combinations(Simplified_AdEMAMix)
