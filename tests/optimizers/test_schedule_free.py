"""Schedule-Free AdamW: equality with schedulefree's fast and reference implementations, train()/eval() switching,
resume from a checkpoint taken in eval mode, and the registry builder."""
from __future__ import annotations

import copy

import pytest
import torch
from schedulefree import AdamWScheduleFree, AdamWScheduleFreeReference

from optimizers.registry import OPTIMIZERS, OptimizerContext, ScalarPolicy, build_optimizer
from optimizers.schedule_free import ScheduleFreeAdamW

OPTIONS = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, warmup_steps=3)


def _params(seed=0):
    torch.manual_seed(seed)
    return [torch.randn(8, 6, requires_grad=True), torch.randn(6, requires_grad=True)]


def _groups(params, lr=1e-2):
    return [dict(params=params[:1], lr=lr), dict(params=params[1:], lr=lr / 4)]


def _gradients(count, seed=1):
    torch.manual_seed(seed)
    return [[torch.randn(8, 6), torch.randn(6)] for _ in range(count)]


def _run(optimizer, params, gradients):
    for grads in gradients:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()


def test_matches_schedulefree_fast_implementation_exactly():
    # Same foreach arithmetic in the same order: tolerance 0, in train mode (y) and in eval mode (x).
    ours_params, their_params = _params(), _params()
    ours = ScheduleFreeAdamW(_groups(ours_params), **OPTIONS)
    theirs = AdamWScheduleFree(_groups(their_params), **OPTIONS)
    theirs.train()
    gradients = _gradients(8)
    _run(ours, ours_params, gradients)
    _run(theirs, their_params, gradients)
    assert all(torch.equal(p, q) for p, q in zip(ours_params, their_params))
    ours.eval()
    theirs.eval()
    assert all(torch.equal(p, q) for p, q in zip(ours_params, their_params))


def test_matches_schedulefree_reference_with_explicit_x_y_z():
    # The reference stores x, y, z and recomputes y = (1 - beta1) z + beta1 x: same math, different rounding;
    # atol 1e-6 on parameters of size ~1 after 8 steps.
    ours_params, their_params = _params(), _params()
    ours = ScheduleFreeAdamW(_groups(ours_params), **OPTIONS)
    theirs = AdamWScheduleFreeReference(_groups(their_params), **OPTIONS)
    theirs.train()
    gradients = _gradients(8)
    _run(ours, ours_params, gradients)
    _run(theirs, their_params, gradients)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(ours_params, their_params))
    ours.eval()
    assert all(torch.allclose(p, theirs.state[q]["x"], atol=1e-6) for p, q in zip(ours_params, their_params))


def test_eval_then_train_returns_to_the_training_point():
    params = _params()
    optimizer = ScheduleFreeAdamW(_groups(params), **OPTIONS)
    _run(optimizer, params, _gradients(4))
    y = [p.detach().clone() for p in params]
    optimizer.eval()
    assert not all(torch.allclose(p, q) for p, q in zip(params, y))
    optimizer.train()
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(params, y))


def test_resume_from_checkpoint_saved_in_eval_mode_continues_identically():
    # train.py saves after eval() (parameters = x) and calls train() afterwards; the resumed run loads x with
    # train_mode False and its first step switches to train mode itself: tolerance 0.
    params = _params()
    optimizer = ScheduleFreeAdamW(_groups(params), **OPTIONS)
    gradients = _gradients(6)
    _run(optimizer, params, gradients[:3])
    optimizer.eval()
    saved_params, saved_state = [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())
    optimizer.train()
    _run(optimizer, params, gradients[3:])

    resumed = [p.clone().requires_grad_() for p in saved_params]
    restored = ScheduleFreeAdamW(_groups(resumed), **OPTIONS)
    restored.load_state_dict(saved_state)
    _run(restored, resumed, gradients[3:])
    assert all(torch.equal(p, q) for p, q in zip(params, resumed))


def test_lowers_a_least_squares_loss_in_eval_mode():
    torch.manual_seed(0)
    target, inputs = torch.randn(4, 8), torch.randn(32, 8)
    weight = torch.zeros(4, 8, requires_grad=True)
    optimizer = ScheduleFreeAdamW([weight], lr=0.05, warmup_steps=5)

    def loss():
        return (inputs @ (weight - target).T).square().mean()

    start = loss().item()
    for _ in range(60):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    optimizer.eval()
    assert loss().item() < 0.1 * start


def test_build_takes_every_parameter_unless_a_scalar_optimizer_is_chosen():
    assert OPTIMIZERS["schedule_free_adamw"].scalar is ScalarPolicy.SAME
    torch.manual_seed(0)

    def context(**overrides):
        return OptimizerContext(matrix_params=[torch.randn(8, 8, requires_grad=True)],
                                embedding_params=[torch.randn(11, 8, requires_grad=True)], lm_head_params=[],
                                vector_params=[torch.ones(8, requires_grad=True)], model_dim=8, **overrides)

    everything = build_optimizer("schedule_free_adamw", context(options=dict(lr=3e-3, warmup_steps=10)))
    assert isinstance(everything, ScheduleFreeAdamW) and len(everything.param_groups) == 3
    assert everything.param_groups[0]["warmup_steps"] == 10
    composite = build_optimizer("schedule_free_adamw", context(scalar="lion"))
    assert [type(o).__name__ for o in composite.optimizers] == ["ScheduleFreeAdamW", "Lion"]
    composite.eval()
    assert composite.param_groups[0]["train_mode"] is False
    with pytest.raises(ValueError, match="not an option of optimizer 'schedule_free_adamw'"):
        build_optimizer("schedule_free_adamw", context(options=dict(warmup=10)))


def test_eval_before_the_first_step_leaves_the_state_empty_so_a_checkpoint_can_load_into_it():
    """DCP's get_state_dict initializes an optimizer only when its state is empty; an eval()/train() switch that
    indexed the state defaultdict created empty entries, and a resume then loaded no z or exp_avg_sq at all."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model = torch.nn.Linear(6, 8, bias=False)
    optimizer = ScheduleFreeAdamW(model.parameters(), lr=1e-2)
    optimizer.eval()
    optimizer.train()
    assert len(optimizer.state) == 0
    _, optimizer_state = get_state_dict(model, optimizer)
    assert set(optimizer_state["state"]["weight"]) == {"z", "exp_avg_sq"}
