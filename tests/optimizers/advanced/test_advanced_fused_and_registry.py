"""Fused backward pass equal to the normal step, state_dict resume, registry builders, and loss decrease on a tiny
GPT for every member of the advanced family."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models import GPT, GPTConfig
from optimizers import CompositeOptimizer, build_optimizer
from optimizers.advanced import Adam_Adv, Adopt_Adv, Lion_Adv, Prodigy_Adv, Prodigy_Lion_Adv, Simplified_AdEMAMix
from optimizers.registry import OPTIMIZERS, OptimizerContext, ScalarPolicy

# Every feature a class accepts, except stochastic rounding (it draws random numbers in hook order, and the test
# models are float32, for which it is a no-op) and cautious_mask where grams is on (they exclude each other).
FEATURE_SETS = {
    Adam_Adv: dict(lr=1e-2, factored=True, use_AdEMAMix=True, orthogonal_gradient=True, grams=True,
                   use_atan2=True),
    Adopt_Adv: dict(lr=1e-2, factored=True, use_AdEMAMix=True, orthogonal_gradient=True, cautious_mask=True),
    Prodigy_Adv: dict(d0=1e-3, factored=True, use_AdEMAMix=True, orthogonal_gradient=True, cautious_mask=True,
                      use_atan2=True),
    Simplified_AdEMAMix: dict(lr=1e-3, alpha=1.0, factored=True, orthogonal_gradient=True),
    Lion_Adv: dict(lr=1e-3, factored=True, orthogonal_gradient=True, cautious_mask=True),
    Prodigy_Lion_Adv: dict(d0=1e-3, factored=True, orthogonal_gradient=True, cautious_mask=True),
}
NAMES = {Adam_Adv: "adam_adv", Adopt_Adv: "adopt_adv", Prodigy_Adv: "prodigy_adv",
         Simplified_AdEMAMix: "simplified_ademamix", Lion_Adv: "lion_adv", Prodigy_Lion_Adv: "prodigy_lion_adv"}


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 3))


def batch(step: int):
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(32, 12, generator=generator), torch.randn(32, 3, generator=generator)


def train(model, optimizer, steps: int, fused: bool, start_step: int = 0) -> None:
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + step))
    if fused:
        optimizer.register_fused_backward_hooks()
    for step in range(start_step, start_step + steps):
        inputs, targets = batch(step)
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        if fused:
            assert all(p.grad is None for p in model.parameters())  # freed inside the hooks
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


@pytest.mark.parametrize("cls", list(FEATURE_SETS), ids=lambda cls: cls.__name__)
def test_fused_backward_gives_the_same_parameters_as_the_normal_step(cls):
    # Same per-parameter arithmetic in a different order; tolerance 1e-6 covers Prodigy's float64 sums of d.
    normal, fused = small_model(), small_model()
    normal_optimizer = cls(normal.parameters(), **FEATURE_SETS[cls])
    fused_optimizer = cls(fused.parameters(), **FEATURE_SETS[cls])
    train(normal, normal_optimizer, steps=4, fused=False)
    train(fused, fused_optimizer, steps=4, fused=True)
    for a, b in zip(normal.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert normal_optimizer.param_groups[0].get("d") == pytest.approx(fused_optimizer.param_groups[0].get("d"))


def test_step_with_hooks_registered_initializes_state_from_gradients_set_by_hand():
    # torch.distributed.checkpoint's get_state_dict fills an empty optimizer state by setting zero gradients and
    # calling step() with lr 0; that must create the state (and change nothing) even with the hooks registered.
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = Prodigy_Adv(model.parameters(), factored=True)
    optimizer.register_fused_backward_hooks()
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert len(optimizer.state) == len(before)
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)


def test_fused_backward_hooks_cannot_be_registered_twice():
    optimizer = Adam_Adv(small_model().parameters())
    optimizer.register_fused_backward_hooks()
    with pytest.raises(RuntimeError, match="already registered"):
        optimizer.register_fused_backward_hooks()


@pytest.mark.parametrize("cls", list(FEATURE_SETS), ids=lambda cls: cls.__name__)
def test_state_dict_resume_is_bit_exact(cls):
    model = small_model()
    optimizer = cls(model.parameters(), **FEATURE_SETS[cls])
    train(model, optimizer, steps=3, fused=False)
    resumed_model = copy.deepcopy(model)
    resumed_optimizer = cls(resumed_model.parameters(), **FEATURE_SETS[cls])
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert resumed_optimizer.param_groups[0].get("d") == optimizer.param_groups[0].get("d")
    first_state = resumed_optimizer.state[next(resumed_model.parameters())]
    assert first_state["exp_avg_sign"].dtype == torch.uint8  # not cast to the parameter's dtype
    for original, resumed in ((model, optimizer), (resumed_model, resumed_optimizer)):
        for step in range(3, 5):
            inputs, targets = batch(step)
            nn.functional.mse_loss(original(inputs), targets).backward()
            resumed.step()
            resumed.zero_grad()
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_composite_resume_of_factored_states_is_bit_exact():
    # CompositeOptimizer loads state through torch's Optimizer.load_state_dict, which casts the packed uint8 signs
    # to the parameter's dtype; the factored moments read them back losslessly.
    def build(model):
        return CompositeOptimizer([Lion_Adv([model[0].weight, model[3].weight], lr=1e-2, factored=True),
                                   torch.optim.AdamW([model[0].bias, model[2].weight, model[2].bias,
                                                      model[3].bias], lr=1e-2)])
    model = small_model()
    optimizer = build(model)
    train(model, optimizer, steps=3, fused=False)
    resumed_model = copy.deepcopy(model)
    resumed_optimizer = build(resumed_model)
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert resumed_optimizer.state[resumed_model[0].weight]["exp_avg_sign"].dtype == torch.float32
    for original, resumed in ((model, optimizer), (resumed_model, resumed_optimizer)):
        inputs, targets = batch(3)
        nn.functional.mse_loss(original(inputs), targets).backward()
        resumed.step()
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- registry builders on a tiny GPT -----------------------------------------------------------------------------

TINY = GPTConfig(vocab_size=32, n_layer=1, n_head=2, model_dim=16, sequence_length=8)


def gpt_context(model: GPT, **overrides) -> OptimizerContext:
    matrix = [p for p in model.blocks.parameters() if p.ndim == 2]
    vector = [p for p in model.parameters() if p.ndim == 1]
    return OptimizerContext(matrix_params=matrix, embedding_params=[model.embed.weight],
                            lm_head_params=[model.lm_head.weight], vector_params=vector,
                            model_dim=TINY.model_dim, **overrides)


def test_advanced_names_take_every_parameter_by_default():
    for name in NAMES.values():
        assert OPTIMIZERS[name].scalar is ScalarPolicy.SAME


@pytest.mark.parametrize("cls", list(NAMES), ids=lambda cls: cls.__name__)
def test_builder_takes_every_parameter_without_an_explicit_scalar_optimizer(cls):
    model = GPT(TINY)
    optimizer = build_optimizer(NAMES[cls], gpt_context(model, options=dict(factored=True)))
    assert type(optimizer) is cls and optimizer.features.factored
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert owned == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("cls", list(NAMES), ids=lambda cls: cls.__name__)
def test_builder_with_explicit_scalar_optimizer_takes_the_matrices_only(cls):
    model = GPT(TINY)
    context = gpt_context(model, scalar="adamw")
    optimizer = build_optimizer(NAMES[cls], context)
    assert isinstance(optimizer, CompositeOptimizer) and type(optimizer.optimizers[0]) is cls
    assert {id(p) for g in optimizer.optimizers[0].param_groups for p in g["params"]} == \
        {id(p) for p in context.matrix_params}


def test_builder_rejects_an_unknown_option_and_an_unsupported_feature():
    model = GPT(TINY)
    with pytest.raises(ValueError, match="factorized: not an option of optimizer 'lion_adv'"):
        build_optimizer("lion_adv", gpt_context(model, options=dict(factorized=True)))
    with pytest.raises(ValueError, match="unsupported feature\\(s\\) grams"):
        build_optimizer("lion_adv", gpt_context(model, options=dict(grams=True)))


TRAINING = {
    "adam_adv": dict(lr=1e-2, options=dict(factored=True, cautious_mask=True)),
    "adopt_adv": dict(lr=1e-2, options=dict(factored=True, use_atan2=True)),
    "prodigy_adv": dict(lr=1.0, options=dict(factored=True, d0=1e-2)),
    "simplified_ademamix": dict(lr=1e-3, options=dict(factored=True, alpha=1.0)),
    "lion_adv": dict(lr=1e-2, options=dict(factored=True, orthogonal_gradient=True)),
    "prodigy_lion_adv": dict(lr=1.0, options=dict(factored=True, d0=1e-2)),
}


@pytest.mark.parametrize("name", list(TRAINING))
def test_tiny_gpt_loss_decreases_with_factored_states_and_fused_backward(name):
    torch.manual_seed(0)
    model = GPT(TINY)
    optimizer = build_optimizer(name, gpt_context(model, options=dict(weight_decay=0.0, lr=TRAINING[name]["lr"],
                                                                      **TRAINING[name]["options"])))
    optimizer.register_fused_backward_hooks()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY.vocab_size, (2, TINY.sequence_length + 1), generator=generator)
    losses = []
    for _ in range(12):
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
