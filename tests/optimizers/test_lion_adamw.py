"""Reference tests of the spine's AdamW and Lion: AdamW equals torch.optim.AdamW (foreach and fused paths, state
dicts interchangeable both ways); Lion equals its closed-form update and lion-pytorch."""
from __future__ import annotations

import copy

import pytest
import torch
from lion_pytorch import Lion as ReferenceLion

from optimizers.adamw import AdamW
from optimizers.lion import Lion

SHAPES = [(8, 6), (6,), (3, 4, 5)]


def _twins(seed=0):
    torch.manual_seed(seed)
    base = [torch.randn(s) for s in SHAPES]
    return [p.clone().requires_grad_() for p in base], [p.clone().requires_grad_() for p in base]


def _groups(params):
    return [dict(params=params[:2], lr=1e-2, weight_decay=0.1), dict(params=params[2:], lr=3e-3, weight_decay=0.0)]


def _run(pairs, steps, seed=1, skip_last_from=None):
    """Same gradients for every (optimizer, params) pair; from step `skip_last_from` on, the last parameter gets no
    gradient (its step count must then fall behind the others')."""
    torch.manual_seed(seed)
    for step in range(steps):
        grads = [torch.randn(s) for s in SHAPES]
        for optimizer, params in pairs:
            for i, (p, g) in enumerate(zip(params, grads)):
                skip = skip_last_from is not None and step >= skip_last_from and i == len(params) - 1
                p.grad = None if skip else g.clone()
            optimizer.step()


@pytest.mark.parametrize("torch_foreach", [False, True])
def test_adamw_foreach_path_equals_torch_adamw(torch_foreach):
    # Same element-wise operations in the same order: tolerance 0 (bitwise), including a parameter that stops
    # receiving gradients (per-parameter step counts).
    ours_params, their_params = _twins()
    ours = AdamW(_groups(ours_params), betas=(0.9, 0.95), eps=1e-8, fused=False)
    theirs = torch.optim.AdamW(_groups(their_params), betas=(0.9, 0.95), eps=1e-8, foreach=torch_foreach)
    _run([(ours, ours_params), (theirs, their_params)], steps=6, skip_last_from=3)
    assert all(torch.equal(p, q) for p, q in zip(ours_params, their_params))


@pytest.mark.parametrize("fused", [None, True])
def test_adamw_fused_path_equals_torch_fused_adamw(fused):
    # The default (fused=None) takes torch's fused kernel for plain CPU tensors of one dtype, as fused=True does;
    # both equal torch's fused AdamW with tolerance 0, including a parameter that stops receiving gradients (the
    # kernel gets per-bucket step counts). Against the foreach path the kernel's arithmetic differs in the last
    # bits: atol 1e-6.
    ours_params, their_params = _twins()
    foreach_params, _ = _twins()
    ours = AdamW(_groups(ours_params), fused=fused)
    theirs = torch.optim.AdamW(_groups(their_params), fused=True)
    foreach = AdamW(_groups(foreach_params), fused=False)
    _run([(ours, ours_params), (theirs, their_params), (foreach, foreach_params)], steps=5, skip_last_from=3)
    assert all(torch.equal(p, q) for p, q in zip(ours_params, their_params))
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(ours_params, foreach_params))


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_adamw_state_dicts_are_interchangeable_with_torch(direction):
    # Train 3 steps with one implementation, load its state dict into the other, continue 3 steps: bitwise equal
    # to continuing with the first.
    first_params, _ = _twins()
    first = (torch.optim.AdamW if direction == "torch_to_ours" else AdamW)(_groups(first_params))
    _run([(first, first_params)], steps=3)
    second_params = [p.detach().clone().requires_grad_() for p in first_params]
    second = (AdamW if direction == "torch_to_ours" else torch.optim.AdamW)(_groups(second_params))
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    _run([(first, first_params), (second, second_params)], steps=3, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(first_params, second_params))


def test_lion_two_steps_closed_form():
    # m0 = 0:  p1 = p0 (1 - lr wd) - lr sign((1 - b1) g1),  m1 = (1 - b2) g1
    #          p2 = p1 (1 - lr wd) - lr sign(b1 m1 + (1 - b1) g2)
    torch.manual_seed(0)
    p0, g1, g2 = torch.randn(10), torch.randn(10), torch.randn(10)
    lr, wd, b1, b2 = 1e-2, 0.5, 0.9, 0.99
    p = p0.clone().requires_grad_()
    optimizer = Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    p.grad = g1.clone()
    optimizer.step()
    p1 = p0 * (1 - lr * wd) - lr * torch.sign(g1)
    assert torch.allclose(p.detach(), p1, atol=1e-7)
    p.grad = g2.clone()
    optimizer.step()
    m1 = (1 - b2) * g1
    p2 = p1 * (1 - lr * wd) - lr * torch.sign(b1 * m1 + (1 - b1) * g2)
    assert torch.allclose(p.detach(), p2, atol=1e-7)
    assert torch.allclose(optimizer.state[p]["exp_avg"], b2 * m1 + (1 - b2) * g2, atol=1e-7)


def test_lion_equals_lion_pytorch():
    # lion-pytorch updates the momentum with mul/add where ours uses lerp: the last bit of m may differ, which can
    # only flip a sign when the interpolation is ~0; atol 1e-6 on parameters after 8 steps.
    ours_params, their_params = _twins()
    ours = Lion(_groups(ours_params), betas=(0.9, 0.99))
    theirs = ReferenceLion(_groups(their_params), betas=(0.9, 0.99))
    _run([(ours, ours_params), (theirs, their_params)], steps=8)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(ours_params, their_params))
