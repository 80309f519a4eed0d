"""Closed-form and property checks of each feature of the advanced family: factored states (shape, sign packing,
rank-1 factorization, memory, equality with dense states when exact), OrthoGrad, cautious mask, Grams, atan2,
stochastic rounding, AdEMAMix schedules, the feature compatibility matrix and option validation."""
from __future__ import annotations

import math

import pytest
import torch

from optimizers.advanced import (Adam_Adv, Adopt_Adv, Features, Lion_Adv, Prodigy_Adv, Prodigy_Lion_Adv,
                                 Simplified_AdEMAMix)
from optimizers.advanced.factored import (Moment, effective_shape, factorize_rank1, pack_signs, reconstruct_rank1,
                                          unpack_signs)
from optimizers.advanced.transforms import (ademamix_alpha, ademamix_beta3, cautious_mask_, copy_stochastic_, grams_,
                                            normalize, orthogonalize_gradient)

ALL_CLASSES = [Adam_Adv, Adopt_Adv, Prodigy_Adv, Simplified_AdEMAMix, Lion_Adv, Prodigy_Lion_Adv]

# The compatibility matrix of the issue (y = accepted).
MATRIX = {
    "factored": "yyyyyy",
    "use_AdEMAMix": "yyy---",
    "orthogonal_gradient": "yyyyyy",
    "cautious_mask": "yyy-yy",
    "grams": "yyy---",
    "use_atan2": "yyy---",
    "stochastic_rounding": "yyyyyy",
}


def state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


# --- factored states ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("numel, expected", [(0, (0, 0)), (1, (1, 1)), (48, (8, 6)), (6144, (96, 64)), (13, (13, 1)),
                                             (768 * 3072, (1536, 1536))])
def test_effective_shape_is_the_most_square_factorization(numel, expected):
    assert effective_shape(numel) == expected


@pytest.mark.parametrize("cols", [0, 1, 7, 8, 13, 64])
def test_sign_packing_round_trip(cols):
    generator = torch.Generator().manual_seed(cols)
    negative = torch.rand(9, cols, generator=generator) < 0.5
    packed = pack_signs(negative)
    assert packed.dtype == torch.uint8 and packed.shape == (9, -(-cols // 8))
    assert torch.equal(unpack_signs(packed, cols), negative)


def test_rank1_factorization_is_exact_for_rank1_and_preserves_sums():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(10, generator=generator), torch.rand(7, generator=generator)
    rank1 = torch.outer(a, b)
    torch.testing.assert_close(reconstruct_rank1(*factorize_rank1(rank1)), rank1)
    general = torch.rand(10, 7, generator=generator)
    approx = reconstruct_rank1(*factorize_rank1(general))
    # The closed form keeps every row sum and column sum of the original.
    torch.testing.assert_close(approx.sum(dim=1), general.sum(dim=1))
    torch.testing.assert_close(approx.sum(dim=0), general.sum(dim=0))


def test_factored_signed_moment_round_trip_of_a_rank1_magnitude():
    generator = torch.Generator().manual_seed(0)
    magnitude = torch.outer(torch.rand(8, generator=generator) + 0.1, torch.rand(6, generator=generator) + 0.1)
    signs = torch.where(torch.rand(8, 6, generator=generator) < 0.5, -1.0, 1.0)
    moment, state, param = Moment("m", signed=True, factored=True), {}, torch.zeros(6, 8)
    moment.init(state, param, param)
    moment.store(state, (magnitude * signs).view(6, 8))
    torch.testing.assert_close(moment.load(state, param.shape), (magnitude * signs).view(6, 8))


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_factored_states_accept_an_empty_tensor(cls):
    # An FSDP shard can be empty (fewer rows than ranks).
    empty, other = torch.nn.Parameter(torch.zeros(0, 5)), torch.nn.Parameter(torch.randn(3))
    optimizer = cls([empty, other], factored=True)
    for _ in range(2):
        empty.grad, other.grad = torch.zeros(0, 5), torch.randn(3)
        optimizer.step()
    assert torch.isfinite(other).all()


def test_factored_state_memory_is_vectors_plus_one_bit_per_entry():
    param = torch.nn.Parameter(torch.randn(64, 96))  # effective shape (96, 64)
    param.grad = torch.randn_like(param)
    optimizer = Adam_Adv([param], factored=True)
    optimizer.step()
    first_moment = (96 + 64) * 4 + 96 * (64 // 8)
    second_moment = (96 + 64) * 4
    assert state_bytes(optimizer) == first_moment + second_moment
    dense = Adam_Adv([torch.nn.Parameter(torch.randn(64, 96))])
    dense.param_groups[0]["params"][0].grad = torch.randn(64, 96)
    dense.step()
    assert state_bytes(dense) == 2 * 64 * 96 * 4


def _factored_and_dense_params(cls, options, steps, seed=0):
    """Repeats one gradient whose magnitude is rank 1 in the effective shape (8, 6), for which the factored states
    are exact; returns (factored param, dense param)."""
    generator = torch.Generator().manual_seed(seed)
    magnitude = torch.outer(torch.rand(8, generator=generator) + 0.5, torch.rand(6, generator=generator) + 0.5)
    signs = torch.where(torch.rand(8, 6, generator=generator) < 0.5, -1.0, 1.0)
    grad = (magnitude * signs).reshape(6, 8)
    start = torch.randn(6, 8, generator=generator)
    results = []
    for factored in (True, False):
        param = torch.nn.Parameter(start.clone())
        optimizer = cls([param], factored=factored, **options)
        for _ in range(steps):
            param.grad = grad.clone()
            optimizer.step()
        results.append(param.detach())
    return results


@pytest.mark.parametrize("cls, options", [
    (Adam_Adv, dict(lr=1e-2, use_AdEMAMix=True)), (Adopt_Adv, dict(lr=1e-2, use_AdEMAMix=True)),
    (Prodigy_Adv, dict(d0=1e-2, use_AdEMAMix=True)), (Simplified_AdEMAMix, dict(lr=1e-3, alpha=2.0)),
    (Lion_Adv, dict(lr=1e-2)), (Prodigy_Lion_Adv, dict(d0=1e-2))])
def test_factored_equals_dense_when_gradient_magnitude_is_rank1(cls, options):
    factored, dense = _factored_and_dense_params(cls, options, steps=4)
    torch.testing.assert_close(factored, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [Adam_Adv, Adopt_Adv, Prodigy_Adv])
def test_factored_without_first_moment_keeps_only_the_second_moment(cls):
    options = dict(betas=(0.0, 0.99)) if cls is not Prodigy_Adv else dict(betas=(0.0, 0.99), d0=1e-2)
    factored, dense = _factored_and_dense_params(cls, options, steps=3)
    torch.testing.assert_close(factored, dense, rtol=1e-5, atol=1e-6)
    param = torch.nn.Parameter(torch.randn(6, 8))
    optimizer = cls([param], factored=True, **options)
    param.grad = torch.randn(6, 8)
    optimizer.step()
    assert not any(key.startswith("exp_avg_") and not key.startswith("exp_avg_sq") for key in optimizer.state[param])
    assert torch.isfinite(param).all()


# --- OrthoGrad, cautious, Grams, atan2 ---------------------------------------------------------------------------

def test_orthogonal_gradient_is_orthogonal_to_the_weights_and_keeps_the_norm():
    generator = torch.Generator().manual_seed(0)
    weight, grad = torch.randn(30, 20, generator=generator), torch.randn(30, 20, generator=generator)
    grad = grad + 0.5 * weight  # a sizeable parallel component to remove
    result = orthogonalize_gradient(weight, grad)
    assert abs((result * weight).sum().item()) < 1e-4 * result.norm().item() * weight.norm().item()
    assert result.norm().item() == pytest.approx(grad.norm().item(), rel=1e-5)


def test_orthogonal_gradient_leaves_the_gradient_of_zero_weights_unchanged():
    grad = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(orthogonalize_gradient(torch.zeros(5, 4), grad), grad)


def test_optimizer_step_uses_the_orthogonalized_gradient():
    # Lion's first step is -lr sign(g'): the parameter moves along the sign of the orthogonalized gradient.
    generator = torch.Generator().manual_seed(0)
    start, grad = torch.randn(8, 8, generator=generator), torch.randn(8, 8, generator=generator)
    param = torch.nn.Parameter(start.clone())
    param.grad = grad.clone()
    Lion_Adv([param], lr=0.1, orthogonal_gradient=True).step()
    expected = start - 0.1 * orthogonalize_gradient(start, grad).sign()
    torch.testing.assert_close(param.detach(), expected)


def test_cautious_mask_zeroes_disagreeing_entries_and_rescales_by_the_kept_fraction():
    update = torch.tensor([1.0, -2.0, 3.0, -4.0])
    grad = torch.tensor([0.5, 0.5, 0.5, -0.5])
    # Kept: entries 0, 2, 3 (3 of 4), so the survivors are scaled by 4 / 3.
    torch.testing.assert_close(cautious_mask_(update, grad), torch.tensor([4 / 3, 0.0, 4.0, -16 / 3]))


def test_grams_takes_the_sign_of_the_gradient_and_the_magnitude_of_the_update():
    update = torch.tensor([1.0, -2.0, 3.0])
    grad = torch.tensor([-0.1, -5.0, 2.0])
    torch.testing.assert_close(grams_(update, grad), torch.tensor([-1.0, -2.0, 3.0]))


def test_atan2_normalization_is_bounded_and_equals_one_at_unit_ratio():
    numerator = torch.tensor([1.0, -3.0, 1e6, 0.0, 2.0])
    denominator = torch.tensor([1.0, 3.0, 1e-6, 1.0, 0.0])
    result = normalize(numerator, denominator, epsilon=1e-8, use_atan2=True)
    torch.testing.assert_close(result, 4 / math.pi * torch.atan2(numerator, denominator))
    assert result.abs().max() <= 2.0
    assert result[0].item() == pytest.approx(1.0) and result[1].item() == pytest.approx(-1.0)


def test_adam_adv_atan2_first_step_moves_every_entry_by_lr():
    # Step 1: m_hat = g and sqrt(v_hat) = |g|, so u = (4/pi) atan2(g, |g|) = sign(g).
    generator = torch.Generator().manual_seed(0)
    start, grad = torch.randn(4, 5, generator=generator), torch.randn(4, 5, generator=generator)
    param = torch.nn.Parameter(start.clone())
    param.grad = grad
    Adam_Adv([param], lr=0.01, use_atan2=True).step()
    torch.testing.assert_close(param.detach(), start - 0.01 * grad.sign())


def test_adam_adv_grams_first_step_has_the_gradient_sign_and_adam_magnitude():
    generator = torch.Generator().manual_seed(0)
    start, grad = torch.randn(4, 5, generator=generator), torch.randn(4, 5, generator=generator)
    param = torch.nn.Parameter(start.clone())
    param.grad = grad
    Adam_Adv([param], lr=0.01, eps=1e-8, grams=True).step()
    torch.testing.assert_close(param.detach(), start - 0.01 * grad.sign() * grad.abs() / (grad.abs() + 1e-8))


def test_adam_adv_cautious_step_moves_only_where_momentum_agrees_with_the_gradient():
    param = torch.nn.Parameter(torch.zeros(4))
    optimizer = Adam_Adv([param], lr=0.1, betas=(0.9, 0.999), cautious_mask=True)
    param.grad = torch.tensor([1.0, 1.0, 1.0, 1.0])
    optimizer.step()
    before = param.detach().clone()
    # m = 0.1 after step 1; with g = -0.5 it becomes 0.9 * 0.1 - 0.05 = 0.04 > 0, disagreeing on entries 0 and 1.
    param.grad = torch.tensor([-0.5, -0.5, 1.0, 1.0])
    optimizer.step()
    moved = (param.detach() - before).abs() > 0
    assert moved.tolist() == [False, False, True, True]


# --- AdEMAMix schedules ------------------------------------------------------------------------------------------

def test_ademamix_schedules_start_at_beta1_and_zero_and_reach_their_targets():
    assert ademamix_alpha(5.0, 0, 100) == 0.0
    assert ademamix_alpha(5.0, 50, 100) == pytest.approx(2.5)
    assert ademamix_alpha(5.0, 500, 100) == 5.0
    assert ademamix_beta3(0.9, 0.9999, 0, 100) == pytest.approx(0.9)
    assert ademamix_beta3(0.9, 0.9999, 100, 100) == 0.9999
    half_lives = [math.log(0.5) / math.log(ademamix_beta3(0.9, 0.9999, t, 100)) for t in (0, 50, 99)]
    assert half_lives[0] < half_lives[1] < half_lives[2]
    assert ademamix_alpha(5.0, 1, 0) == 5.0 and ademamix_beta3(0.9, 0.9999, 1, 0) == 0.9999


# --- stochastic rounding -----------------------------------------------------------------------------------------

def test_stochastic_rounding_is_unbiased_and_lands_on_the_two_neighbours():
    torch.manual_seed(0)
    values = torch.tensor([1.0 + 2 ** -9, -3.3, 0.1234567, 1000.37])
    draws = 20000
    source = values.repeat(draws, 1)
    target = torch.empty_like(source, dtype=torch.bfloat16)
    copy_stochastic_(target, source)
    rounded = target.float()
    # Neighbours: the float32 bit pattern truncated to bf16 (toward zero) and the next bf16 away from zero.
    truncated_bits = values.view(torch.int32) & -65536
    truncated, away = truncated_bits.view(torch.float32), (truncated_bits + 65536).view(torch.float32)
    ulp = (away - truncated).abs()
    assert ((rounded == truncated) | (rounded == away)).all()
    # Mean within 5 standard errors of the exact value (a Bernoulli spread of one ulp per draw).
    standard_error = ulp / (2 * math.sqrt(draws))
    assert ((rounded.mean(dim=0) - values).abs() < 5 * standard_error).all()
    assert ((truncated != values) & (away != values)).all()  # the values are not representable in bf16


def test_stochastic_rounding_accumulates_updates_smaller_than_half_a_bf16_ulp():
    # bf16 spacing at 1.0 is 2^-7 ~ 0.0078; 100 Lion steps of 1e-4 are lost by round-to-nearest but kept on average
    # by stochastic rounding.
    torch.manual_seed(0)
    results = {}
    for stochastic in (False, True):
        param = torch.nn.Parameter(torch.ones(4000, dtype=torch.bfloat16))
        optimizer = Lion_Adv([param], lr=1e-4, stochastic_rounding=stochastic)
        for _ in range(100):
            param.grad = torch.ones_like(param)
            optimizer.step()
        results[stochastic] = param.detach().float()
    assert torch.equal(results[False], torch.ones(4000))
    assert results[True].mean().item() == pytest.approx(1.0 - 100 * 1e-4, abs=1e-3)


# --- compatibility matrix and options ----------------------------------------------------------------------------

@pytest.mark.parametrize("feature", list(MATRIX))
@pytest.mark.parametrize("column, cls", list(enumerate(ALL_CLASSES)))
def test_compatibility_matrix(cls, column, feature):
    param = torch.nn.Parameter(torch.randn(4, 4))
    if MATRIX[feature][column] == "y":
        assert feature in cls.SUPPORTED_FEATURES
        optimizer = cls([param], **{feature: True})
        param.grad = torch.randn(4, 4)
        optimizer.step()
        optimizer.step()
        assert torch.isfinite(param).all()
    else:
        with pytest.raises(ValueError, match=f"unsupported feature\\(s\\) {feature}"):
            cls([param], **{feature: True})


def test_every_feature_switch_is_a_keyword_of_every_class():
    import inspect
    for cls in ALL_CLASSES:
        assert set(Features.names()) <= set(inspect.signature(cls).parameters)


def test_grams_with_cautious_mask_is_rejected():
    with pytest.raises(ValueError, match="cautious_mask has no effect together with grams"):
        Adam_Adv([torch.nn.Parameter(torch.randn(2))], grams=True, cautious_mask=True)


@pytest.mark.parametrize("cls, options, key", [
    (Adam_Adv, dict(betas=(0.9, 1.0)), "betas"), (Adam_Adv, dict(lr=-1.0), "lr"),
    (Adopt_Adv, dict(eps=0.0), "eps"), (Prodigy_Adv, dict(d0=0.0), "d0"),
    (Prodigy_Adv, dict(growth_rate=0.5), "growth_rate"), (Prodigy_Lion_Adv, dict(slice_p=0), "slice_p"),
    (Simplified_AdEMAMix, dict(alpha=-1.0), "alpha"), (Lion_Adv, dict(weight_decay=-0.1), "weight_decay"),
    (Adam_Adv, dict(betas=(0.0, 0.9), use_AdEMAMix=True, ademamix_warmup_steps=10), "betas\\[0\\]"),
    (Adam_Adv, dict(factored="yes"), "factored")])
def test_bad_option_raises_value_error_naming_the_key(cls, options, key):
    with pytest.raises(ValueError, match=f"{cls.__name__}: {key} must be"):
        cls([torch.nn.Parameter(torch.randn(2))], **options)
