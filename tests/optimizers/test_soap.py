"""SOAP: equality with pytorch_optimizer.SOAP (a port of the authors' code) across preconditioner refreshes, the
max_precondition_dim fallback, dimension merging, the eigenbasis property, resume and the registry builder."""
from __future__ import annotations

import copy

import pytest
import torch
from pytorch_optimizer import SOAP as ReferenceSOAP

from optimizers.registry import OPTIMIZERS, OptimizerContext, ScalarPolicy, build_optimizer
from optimizers.soap import SOAP, merged_shape


def _twins(shapes, seed=0):
    torch.manual_seed(seed)
    base = [torch.randn(s) for s in shapes]
    return [p.clone().requires_grad_() for p in base], [p.clone().requires_grad_() for p in base]


def _run(pairs, steps, seed=1):
    """pairs: (optimizer, params) sharing the same gradients each step."""
    torch.manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn_like(p) for p in pairs[0][1]]
        for optimizer, params in pairs:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()


def test_matches_pytorch_optimizer_soap_with_refreshes_and_dimension_fallback():
    # 10 steps with precondition_frequency 3 (three QR refreshes); (12, 4) has one dimension above
    # max_precondition_dim = 10 (identity there); the 1D gain runs plain Adam. eigh/QR/tensordot see the same
    # inputs in both: atol 1e-5 on parameters of size ~1.
    shapes = [(8, 6), (12, 4), (6,)]
    ours_params, their_params = _twins(shapes)
    options = dict(lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=3, max_precondition_dim=10)
    ours = SOAP(ours_params, **options)
    theirs = ReferenceSOAP(their_params, **options)
    _run([(ours, ours_params), (theirs, their_params)], steps=10)
    assert all(torch.allclose(p, q, atol=1e-5) for p, q in zip(ours_params, their_params))
    assert ours.state[ours_params[1]]["factors"][0] is None and ours.state[ours_params[1]]["factors"][1] is not None


def test_matches_pytorch_optimizer_soap_with_merged_dimensions():
    # A 4D tensor (4, 3, 16, 16) with max_precondition_dim 50 is preconditioned as (12, 16, 16): atol 1e-5.
    ours_params, their_params = _twins([(4, 3, 16, 16)])
    options = dict(lr=3e-3, precondition_frequency=2, max_precondition_dim=50, merge_dims=True)
    ours = SOAP(ours_params, **options)
    theirs = ReferenceSOAP(their_params, **options)
    _run([(ours, ours_params), (theirs, their_params)], steps=5)
    assert [f.shape[0] for f in ours.state[ours_params[0]]["factors"]] == [12, 16, 16]
    assert torch.allclose(ours_params[0], their_params[0], atol=1e-5)


def test_merged_shape_examples():
    assert merged_shape(torch.Size([4, 3, 16, 16]), 50) == [12, 16, 16]
    assert merged_shape(torch.Size([768, 3072]), 10000) == [768, 3072]
    assert merged_shape(torch.Size([8, 6]), 100) == [48]
    assert merged_shape(torch.Size([60, 8]), 50) == [60, 8]


def test_first_step_only_initializes_and_bases_are_the_factor_eigenvectors():
    # Step 1: no parameter change; the bases are orthonormal and diagonalize the factors L = G G^T, R = G^T G
    # (off-diagonal mass of Q^T L Q below 1e-4 of its norm).
    torch.manual_seed(0)
    w = torch.randn(8, 6, requires_grad=True)
    start = w.detach().clone()
    optimizer = SOAP([w])
    w.grad = torch.randn(8, 6)
    optimizer.step()
    assert torch.equal(w.detach(), start)
    for factor, basis in zip(optimizer.state[w]["factors"], optimizer.state[w]["bases"]):
        assert torch.allclose(basis.T @ basis, torch.eye(basis.size(0)), atol=1e-5)
        rotated = basis.T @ factor @ basis
        off_diagonal = rotated - torch.diag(torch.diagonal(rotated))
        assert off_diagonal.norm() < 1e-4 * rotated.norm()


def test_lowers_a_least_squares_loss():
    torch.manual_seed(0)
    target, inputs = torch.randn(6, 8), torch.randn(64, 8)
    weight = torch.zeros(6, 8, requires_grad=True)
    optimizer = SOAP([weight], lr=0.1, weight_decay=0.0)

    def loss():
        return (inputs @ (weight - target).T).square().mean()

    start = loss().item()
    for _ in range(40):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.1 * start


def test_state_dict_round_trip_continues_identically():
    params, _ = _twins([(8, 6), (6,)])
    optimizer = SOAP(params, precondition_frequency=2)
    _run([(optimizer, params)], steps=3)
    saved_params, saved_state = [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())
    _run([(optimizer, params)], steps=3, seed=2)
    resumed = [p.clone().requires_grad_() for p in saved_params]
    restored = SOAP(resumed, precondition_frequency=2)
    restored.load_state_dict(saved_state)
    _run([(restored, resumed)], steps=3, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(params, resumed))


def test_build_uses_the_scalar_optimizer_for_non_matrix_parameters():
    assert OPTIMIZERS["soap"].scalar is ScalarPolicy.SEPARATE
    torch.manual_seed(0)
    ctx = OptimizerContext(matrix_params=[torch.randn(8, 8, requires_grad=True)],
                           embedding_params=[torch.randn(11, 8, requires_grad=True)], lm_head_params=[],
                           vector_params=[torch.ones(8, requires_grad=True)], model_dim=8,
                           options=dict(lr=3e-3, precondition_frequency=5))
    optimizer = build_optimizer("soap", ctx)
    assert [type(o).__name__ for o in optimizer.optimizers] == ["SOAP", "AdamW"]
    assert optimizer.param_groups[0]["precondition_frequency"] == 5
    with pytest.raises(ValueError, match="precondition_frequency must be >= 1"):
        SOAP([torch.zeros(2, 2, requires_grad=True)], precondition_frequency=0)
