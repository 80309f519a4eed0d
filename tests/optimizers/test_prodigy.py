"""Prodigy: equality with the authors' prodigyopt on a least-squares problem where d grows over tenfold,
per-group LRs, state-dict resume and the registry builder."""
from __future__ import annotations

import copy

import pytest
import torch
from prodigyopt import Prodigy as ReferenceProdigy

from optimizers.prodigy import Prodigy, prodigy_d_estimate
from optimizers.registry import OPTIMIZERS, OptimizerContext, ScalarPolicy, build_optimizer

VARIANTS = {
    "defaults": dict(),
    "bias_correction_safeguard_slice_growth": dict(use_bias_correction=True, safeguard_warmup=True,
                                                   weight_decay=0.1, slice_p=3, growth_rate=1.5, d_coef=2.0),
    "no_momentum_coupled_decay": dict(betas=(0.0, 0.99), weight_decay=0.1, decouple=False, d0=1e-5),
}


def _problem(seed=0):
    torch.manual_seed(seed)
    return torch.randn(6, 8), torch.randn(48, 8)


def _params():
    # A zero tensor exercises the scalar p0 the reference stores for all-zero initial parameters.
    torch.manual_seed(1)
    return [(0.1 * torch.randn(6, 8)).requires_grad_(), torch.zeros(6, requires_grad=True)]


def _loss(params, problem):
    target, inputs = problem
    weight, bias = params
    return (inputs @ (weight - target).T + bias).square().mean()


def _train(optimizer, params, problem, steps):
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = _loss(params, problem)
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    return losses


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_prodigyopt(variant):
    # The reference accumulates the estimate's sums parameter by parameter in Python floats; ours sums on device
    # (float64 over float32 per-tensor terms): rtol 1e-5 on d and atol 1e-5 on parameters after 25 steps.
    problem = _problem()
    ours_params, their_params = _params(), _params()
    ours = Prodigy(ours_params, **VARIANTS[variant])
    theirs = ReferenceProdigy(their_params, **VARIANTS[variant])
    _train(ours, ours_params, problem, 25)
    _train(theirs, their_params, problem, 25)
    d = ours.param_groups[0]["d"]
    assert d > 10 * ours.param_groups[0]["d0"]
    assert d == pytest.approx(theirs.param_groups[0]["d"], rel=1e-5)
    assert all(torch.allclose(p, q, atol=1e-5) for p, q in zip(ours_params, their_params))


def test_d_estimate_closed_form():
    # First growth jumps to d_hat; afterwards growth is capped by growth_rate and d never decreases.
    assert prodigy_d_estimate(1e-6, 1e-6, 1e-6, 3.0, 1.0, d_coef=0.5, growth_rate=float("inf")) == (1.5, 1.5, 1.5)
    assert prodigy_d_estimate(1.0, 1.0, 1e-6, 4.0, 1.0, d_coef=1.0, growth_rate=2.0) == (2.0, 4.0, 4.0)
    assert prodigy_d_estimate(2.0, 4.0, 1e-6, 1.0, 1.0, d_coef=1.0, growth_rate=2.0) == (4.0, 4.0, 1.0)


def test_group_lr_scales_that_groups_step():
    # With a group at lr 0.5 the d estimate changes, but each step of that group is exactly half the d-scaled
    # Adam step of the full-lr group for identical data (the two groups hold identical parameters and gradients).
    # Zero start, so the ~1e-6 first step is not lost to float32 rounding of the parameter.
    a, b = torch.zeros(5, requires_grad=True), torch.zeros(5, requires_grad=True)
    optimizer = Prodigy([dict(params=[a], lr=1.0), dict(params=[b], lr=0.5)])
    a.grad = torch.ones(5)
    b.grad = torch.ones(5)
    optimizer.step()
    assert a.abs().min() > 0
    assert torch.allclose(b, 0.5 * a, rtol=1e-6)


def test_lowers_the_loss():
    problem = _problem()
    params = _params()
    losses = _train(Prodigy(params), params, problem, 60)
    assert losses[-1] < 0.1 * losses[0]


def test_state_dict_round_trip_continues_identically():
    problem = _problem()
    params = _params()
    optimizer = Prodigy(params, weight_decay=0.1, use_bias_correction=True)
    _train(optimizer, params, problem, 5)
    saved_params, saved_state = [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())
    _train(optimizer, params, problem, 5)
    resumed = [p.clone().requires_grad_() for p in saved_params]
    restored = Prodigy(resumed, weight_decay=0.1, use_bias_correction=True)
    restored.load_state_dict(saved_state)
    _train(restored, resumed, problem, 5)
    assert restored.param_groups[0]["d"] == optimizer.param_groups[0]["d"]
    assert all(torch.equal(p, q) for p, q in zip(params, resumed))


def test_build_takes_every_parameter_unless_a_scalar_optimizer_is_chosen():
    assert OPTIMIZERS["prodigy"].scalar is ScalarPolicy.SAME
    torch.manual_seed(0)

    def context(**overrides):
        return OptimizerContext(matrix_params=[torch.randn(8, 8, requires_grad=True)], embedding_params=[],
                                lm_head_params=[torch.zeros(11, 8, requires_grad=True)],
                                vector_params=[torch.ones(8, requires_grad=True)], model_dim=8, **overrides)

    everything = build_optimizer("prodigy", context(options=dict(lr=1.0, d_coef=0.5)))
    assert isinstance(everything, Prodigy) and len(everything.param_groups) == 3
    assert everything.param_groups[0]["d_coef"] == 0.5
    composite = build_optimizer("prodigy", context(scalar="adamw"))
    assert [type(o).__name__ for o in composite.optimizers] == ["Prodigy", "AdamW"]
    with pytest.raises(ValueError, match="not an option of optimizer 'prodigy'"):
        build_optimizer("prodigy", context(options=dict(fsdp_in_use=True)))
    with pytest.raises(ValueError, match="slice_p must be >= 1"):
        Prodigy([torch.zeros(2, requires_grad=True)], slice_p=0)
