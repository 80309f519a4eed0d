"""Dion, single process: closed-form steps, properties of Algorithm 1 (orthonormal P, error feedback), robustness
(zero / NaN gradients, rank-deficient P), QR methods, mixed precision, state-dict resume, options and the registry
builder, and DionReference == Dion == DionAsync. Distributed layouts: test_dion_distributed.py."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from optimizers.dion.batched import Dion
from optimizers.dion.core import DionMixedPrecisionConfig, QRMethod, orthonormalize
from optimizers.dion.distributed import matrix_layout, run_blocking
from optimizers.dion.linalg import low_rank_dim
from optimizers.dion.overlapped import DionAsync
from optimizers.dion.reference import DionReference
from optimizers.registry import OPTIMIZERS, OptimizerContext, build_optimizer

CLASSES = [DionReference, Dion, DionAsync]
# Tall, wide, square and repeated shapes (batched together in Dion / DionAsync).
SHAPES = [(24, 16), (16, 24), (24, 16), (20, 20), (8, 30), (24, 16)]
BF16_STATES = DionMixedPrecisionConfig(momentum_dtype=torch.bfloat16, Q_dtype=torch.bfloat16,
                                       variance_dtype=torch.float32)


def make_params(shapes=SHAPES, dtype=torch.float64, seed=0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype)) for s in shapes]


def set_grads(params, step: int, nan_index: int | None = None) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        if i == nan_index:
            p.grad[0, 0] = torch.nan


def train(cls, params, steps: int = 3, groups=None, **options):
    optimizer = cls(groups or params, **options)
    for step in range(steps):
        set_grads(params, step)
        optimizer.step()
    return optimizer


def max_difference(xs, ys) -> float:
    """Largest |x - y| over the tensors; NaN counts as infinite."""
    worst = torch.stack([(x.detach().double() - y.detach().double()).abs().max() for x, y in zip(xs, ys)])
    return worst.nan_to_num(nan=torch.inf).max().item()


def single_layout(shape):
    return matrix_layout(torch.empty(shape), None, None)


def numpy_dion_step(X, M, G, Q, lr, mu, weight_decay, epsilon):
    """Algorithm 1 written out in numpy (float64), Householder QR with diag(R) > 0."""
    m, n = X.shape
    transposed = m < n
    B = M + G
    A = B.T if transposed else B
    P, R_factor = np.linalg.qr(A @ Q)
    P = P * np.where(np.diag(R_factor) < 0, -1.0, 1.0)
    R = A.T @ P
    feedback = P @ R.T
    M_new = B - (1 - mu) * (feedback.T if transposed else feedback)
    Q_new = R / (np.linalg.norm(R, axis=0, keepdims=True) + epsilon)
    update = P @ Q_new.T
    X_new = X * (1 - lr * weight_decay) - lr * math.sqrt(m / n) * (update.T if transposed else update)
    return X_new, M_new, Q_new


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("shape,rank_fraction", [((12, 8), 0.5), ((8, 12), 0.5), ((10, 10), 1.0)])
def test_one_step_equals_hand_computed_step_in_float64(cls, shape, rank_fraction):
    generator = torch.Generator().manual_seed(1)
    m, n = shape
    r = low_rank_dim(m, n, rank_fraction, 1)
    X, M, G = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    Q = torch.randn((min(m, n), r), generator=generator, dtype=torch.float64)
    param = torch.nn.Parameter(X.clone())
    optimizer = cls([param], lr=0.1, mu=0.9, weight_decay=0.05, epsilon=1e-8, rank_fraction=rank_fraction,
                    qr_method="qr")
    optimizer.state[param]["momentum"] = M.clone()
    optimizer.state[param]["Q"] = Q.clone()
    param.grad = G.clone()
    optimizer.step()
    X_new, M_new, Q_new = numpy_dion_step(X.numpy(), M.numpy(), G.numpy(), Q.numpy(), 0.1, 0.9, 0.05, 1e-8)
    state = optimizer.state[param]
    np.testing.assert_allclose(param.detach().numpy(), X_new, rtol=0, atol=1e-12)
    np.testing.assert_allclose(state["momentum"].numpy(), M_new, rtol=0, atol=1e-12)
    np.testing.assert_allclose(state["Q"].numpy(), Q_new, rtol=0, atol=1e-12)


@pytest.mark.parametrize("qr_method", list(QRMethod))
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_orthonormalize_gives_orthonormal_p_with_the_same_span_for_each_qr_method(qr_method, dtype, tolerance):
    generator = torch.Generator().manual_seed(2)
    P = torch.randn((3, 40, 6), generator=generator, dtype=dtype)
    layout = single_layout((40, 30))
    out, valid = run_blocking(orthonormalize(P, qr_method, layout, sketch_seed=1, oversample=1.25))
    assert valid.all()
    eye = torch.eye(6, dtype=out.dtype)
    assert (out.mT @ out - eye).abs().max() < tolerance
    # Same span as P, and the positive-diagonal triangular factor makes every method return the same matrix.
    reference = torch.linalg.qr(P.double()).Q
    reference = reference * torch.sign(torch.linalg.qr(P.double()).R.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)
    assert (out.double() - reference).abs().max() < 10 * tolerance


@pytest.mark.parametrize("qr_method", list(QRMethod))
def test_orthonormalize_flags_zero_and_non_finite_matrices_as_invalid(qr_method):
    P = torch.randn((3, 20, 4), generator=torch.Generator().manual_seed(4))
    P[1] = 0.0
    P[2, 3, 1] = torch.inf
    out, valid = run_blocking(orthonormalize(P, qr_method, single_layout((20, 10)), sketch_seed=1, oversample=1.25))
    assert valid.tolist() == [True, False, False]
    assert (out[0].mT @ out[0] - torch.eye(4)).abs().max() < 1e-5


@pytest.mark.parametrize("cls", CLASSES)
def test_error_feedback_keeps_what_the_low_rank_step_did_not_use(cls):
    # M_new = B - (1 - mu) P P^T B, with P P^T the projector onto the column space of the update P Q^T.
    generator = torch.Generator().manual_seed(5)
    M, G = (torch.randn((16, 10), generator=generator, dtype=torch.float64) for _ in range(2))
    param = torch.nn.Parameter(torch.zeros((16, 10), dtype=torch.float64))
    optimizer = cls([param], lr=1.0, mu=0.8, weight_decay=0.0, rank_fraction=0.3)
    optimizer.state[param]["momentum"] = M.clone()
    param.grad = G
    optimizer.step()
    update = -param.detach() / math.sqrt(16 / 10)
    rank = optimizer.state[param]["Q"].shape[1]
    U = torch.linalg.svd(update).U[:, :rank]
    B = M + G
    expected = B - (1 - 0.8) * U @ U.T @ B
    assert (optimizer.state[param]["momentum"] - expected).abs().max() < 1e-12
    assert (optimizer.state[param]["momentum"] - B).abs().max() > 1e-2


@pytest.mark.parametrize("cls", CLASSES)
def test_full_rank_error_feedback_is_plain_momentum_decay(cls):
    # rank_fraction 1: P P^T B = B, so M_new = mu (M + G).
    params = make_params([(16, 10), (10, 16)])
    optimizer = cls(params, rank_fraction=1.0, mu=0.7)
    set_grads(params, 0)
    grads = [p.grad.clone() for p in params]
    optimizer.step()
    for p, g in zip(params, grads):
        assert (optimizer.state[p]["momentum"] - 0.7 * g).abs().max() < 1e-12


@pytest.mark.parametrize("cls", CLASSES)
def test_full_rank_qr_update_converges_to_the_orthogonal_polar_factor_with_power_iterations(cls):
    # With enough power iterations P -> U and Q -> V (B = U S V^T), so the update P Q^T is U V^T: every singular
    # value of the update direction is 1 (Muon's direction).
    generator = torch.Generator().manual_seed(6)
    U = torch.linalg.qr(torch.randn((12, 6), generator=generator, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn((6, 6), generator=generator, dtype=torch.float64)).Q
    G = U @ torch.diag(torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ V.T
    param = torch.nn.Parameter(torch.zeros((12, 6), dtype=torch.float64))
    optimizer = cls([param], lr=1.0, weight_decay=0.0, rank_fraction=1.0, qr_method="qr", power_iters=60)
    param.grad = G
    optimizer.step()
    direction = -param.detach() / math.sqrt(12 / 6)
    assert (direction - U @ V.T).abs().max() < 1e-8
    assert (torch.linalg.svdvals(direction) - 1.0).abs().max() < 1e-8


@pytest.mark.parametrize("cls", CLASSES)
def test_zero_gradient_keeps_q_and_momentum_and_only_decays_weights(cls):
    params = make_params([(12, 8), (12, 8)])
    start = [p.detach().clone() for p in params]
    optimizer = cls(params, lr=0.1, weight_decay=0.5)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p, x in zip(params, start):
        state = optimizer.state[p]
        assert torch.equal(p.detach(), x * (1 - 0.1 * 0.5))
        assert torch.equal(state["momentum"], torch.zeros_like(x))
        assert torch.isfinite(state["Q"]).all() and state["Q"].abs().sum() > 0
    # A later real gradient trains normally.
    set_grads(params, 1)
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("cls", CLASSES)
def test_nan_gradient_leaves_its_matrix_state_alone_and_does_not_touch_the_others(cls):
    nan_run = make_params()
    clean_run = make_params()
    nan_optimizer = cls(nan_run, lr=0.1, weight_decay=0.0)
    clean_optimizer = cls(clean_run, lr=0.1, weight_decay=0.0)
    set_grads(nan_run, 0)
    set_grads(clean_run, 0)
    nan_optimizer.step()
    clean_optimizer.step()
    before = copy.deepcopy(nan_optimizer.state[nan_run[2]])
    weight_before = nan_run[2].detach().clone()
    set_grads(nan_run, 1, nan_index=2)  # matrix 2 shares its shape (and batch) with matrices 0 and 5
    set_grads(clean_run, 1)
    nan_optimizer.step()
    clean_optimizer.step()
    after = nan_optimizer.state[nan_run[2]]
    assert torch.equal(after["momentum"], before["momentum"]) and torch.equal(after["Q"], before["Q"])
    assert torch.equal(nan_run[2].detach(), weight_before)
    others = [i for i in range(len(SHAPES)) if i != 2]
    assert max_difference([nan_run[i] for i in others], [clean_run[i] for i in others]) < 1e-12


@pytest.mark.parametrize("cls", CLASSES)
def test_qr_methods_give_the_same_training_run(cls):
    runs = {method: make_params() for method in QRMethod}
    for method, params in runs.items():
        train(cls, params, rank_fraction=0.5, qr_method=method.value, cqr_warmup_steps=1)
    assert max_difference(runs[QRMethod.QR], runs[QRMethod.CQR]) < 1e-10
    assert max_difference(runs[QRMethod.QR], runs[QRMethod.RCQR]) < 1e-10


def run_all_classes(dtype, **options) -> list[list[torch.Tensor]]:
    """3 steps of each class on SHAPES plus an AdamW vector; returns params, vector and Qs per class."""
    runs = []
    for cls in CLASSES:
        params = make_params(dtype=dtype)
        vector = torch.nn.Parameter(torch.linspace(-1, 1, 5, dtype=dtype))
        groups = [dict(params=params), dict(params=[vector], algorithm="adamw", lr=0.01)]
        optimizer = cls(groups, lr=0.05, **options)
        for step in range(3):
            set_grads(params + [vector], step)
            optimizer.step()
        runs.append(params + [vector] + [optimizer.state[p]["Q"] for p in params])
    assert max_difference(runs[0][:1], make_params(dtype=dtype)[:1]) > 1e-2
    return runs


@pytest.mark.parametrize("options", [dict(rank_fraction=0.5), dict(rank_fraction=1.0, qr_method="cqr",
                                                                   cqr_warmup_steps=1),
                                     dict(rank_fraction=0.3, rank_multiple_of=4, power_iters=2, qr_method="qr")])
def test_reference_dion_and_dion_async_agree_in_float64(options):
    # Batched vs one-at-a-time matmuls differ in summation order only; full-rank Cholesky QR amplifies that by
    # cond(P)^2, hence 1e-10 rather than 1e-14.
    reference, dion, dion_async = run_all_classes(torch.float64, **options)
    assert max_difference(reference, dion) < 1e-10
    assert max_difference(reference, dion_async) < 1e-10


def test_reference_dion_and_dion_async_agree_in_float32():
    # float32 with the default rcqr at rank fraction 0.5: 2e-5 absolute on weights and Qs of order 1.
    reference, dion, dion_async = run_all_classes(torch.float32, rank_fraction=0.5)
    assert max_difference(reference, dion) < 2e-5
    assert max_difference(reference, dion_async) < 2e-5


@pytest.mark.parametrize("cls", CLASSES)
def test_mixed_precision_keeps_bf16_momentum_and_q_and_fp32_variance_and_tracks_fp32(cls):
    params, full = make_params(dtype=torch.float32), make_params(dtype=torch.float32)
    vector, vector_full = (torch.nn.Parameter(torch.ones(5)) for _ in range(2))
    mixed = cls([dict(params=params), dict(params=[vector], algorithm="adamw")], lr=0.02,
                mixed_precision_config=BF16_STATES)
    plain = cls([dict(params=full), dict(params=[vector_full], algorithm="adamw")], lr=0.02)
    for step in range(3):
        set_grads(params + [vector], step)
        set_grads(full + [vector_full], step)
        mixed.step()
        plain.step()
    for p in params:
        assert p.dtype == torch.float32
        assert mixed.state[p]["momentum"].dtype == torch.bfloat16
        assert mixed.state[p]["Q"].dtype == torch.bfloat16
    assert mixed.state[vector]["momentum"].dtype == torch.bfloat16
    assert mixed.state[vector]["variance"].dtype == torch.float32
    # Values, relative to the float32-state run: bf16 keeps 8 bits (0.4% per stored value). Observed: matrices 3% of
    # their movement (Dion's orthonormalization amplifies the rounded momentum), the AdamW vector 0.04%, momenta 0.65%
    # of their size, the float32 variance 0.
    def relative(x, y, scale):
        return ((x.detach().float() - y.detach().float()).abs().max() / scale.abs().max()).item()
    for p, q, start in zip(params, full, make_params(dtype=torch.float32)):
        assert relative(p, q, q.detach() - start) < 0.06
    assert relative(vector, vector_full, vector_full.detach() - 1.0) < 0.005
    for p, q in zip(params + [vector], full + [vector_full]):
        assert relative(mixed.state[p]["momentum"], plain.state[q]["momentum"], plain.state[q]["momentum"]) < 0.02
    assert relative(mixed.state[vector]["variance"], plain.state[vector_full]["variance"],
                    plain.state[vector_full]["variance"]) < 1e-5


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("mixed_precision", [None, BF16_STATES])
def test_state_dict_round_trip_continues_identically(cls, mixed_precision):
    params = make_params(dtype=torch.float32)
    vector = torch.nn.Parameter(torch.ones(5))

    def groups(ps, v):
        return [dict(params=ps), dict(params=[v], algorithm="lion", lr=0.01)]
    optimizer = cls(groups(params, vector), lr=0.05, rank_fraction=0.5, mixed_precision_config=mixed_precision)
    for step in range(2):
        set_grads(params + [vector], step)
        optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed_vector = torch.nn.Parameter(vector.detach().clone())
    resumed = cls(groups(resumed_params, resumed_vector), lr=0.05, rank_fraction=0.5,
                  mixed_precision_config=mixed_precision)
    resumed.load_state_dict(saved)
    for step in range(2, 4):
        set_grads(params + [vector], step)
        set_grads(resumed_params + [resumed_vector], step)
        optimizer.step()
        resumed.step()
    for p, q in zip(params + [vector], resumed_params + [resumed_vector]):
        assert torch.equal(p, q)
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, resumed.state[q][key]) and value.dtype == resumed.state[q][key].dtype


@pytest.mark.parametrize("cls", CLASSES)
def test_initial_q_is_seeded_gaussian_in_the_short_orientation(cls):
    # A zero gradient makes A Q zero, a step Dion skips keeping M and Q: the state after it is Q_0.
    params = make_params([(12, 8), (8, 12), (96, 64)])
    optimizer = cls(params, lr=0.02, rank_fraction=0.5)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    Qs = [optimizer.state[p]["Q"] for p in params]
    assert [tuple(Q.shape) for Q in Qs] == [(8, 4), (8, 4), (64, 32)]  # min(m, n) x r
    for i, Q in enumerate(Qs):  # matrix i: float32 N(0, 1) from a generator seeded with i
        expected = torch.randn(Q.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float32)
        assert torch.equal(Q.float(), expected)
    samples = Qs[2].double()  # 2048 draws: mean and std within 0.05 of N(0, 1)'s
    assert abs(samples.mean()) < 0.05 and abs(samples.std() - 1) < 0.05


@pytest.mark.parametrize("cls", CLASSES)
def test_per_group_options_override_the_defaults(cls):
    # Two groups in one optimizer == one optimizer per group with those options as defaults (same initial Qs).
    overrides = dict(lr=0.1, mu=0.8, weight_decay=0.2, epsilon=1e-6, rank_fraction=0.25, betas=(0.5, 0.6))
    together, first, second = make_params(), make_params(), make_params()
    combined = cls([dict(params=together[:3], **overrides), dict(params=together[3:])], lr=0.02, rank_fraction=0.5)
    separate = [cls(first[:3], **overrides), cls(second[3:], lr=0.02, rank_fraction=0.5)]
    for step in range(2):
        for params in (together, first, second):
            set_grads(params, step)
        if step == 0:
            for i, (p, q) in enumerate(zip(together, first[:3] + second[3:])):
                rank = low_rank_dim(*p.shape, 0.25 if i < 3 else 0.5, 1)
                initial = torch.randn((min(p.shape), rank), generator=torch.Generator().manual_seed(i),
                                      dtype=p.dtype)
                combined.state[p]["Q"] = initial.clone()
                separate[0 if i < 3 else 1].state[q]["Q"] = initial.clone()
        combined.step()
        for optimizer in separate:
            optimizer.step()
    assert max_difference(together, first[:3] + second[3:]) < 1e-12
    assert combined.state[together[0]]["Q"].shape[1] == 4 and combined.state[together[3]]["Q"].shape[1] == 10


def test_low_rank_dim_rounds_up_to_the_multiple_and_caps_at_the_short_side():
    assert low_rank_dim(10, 20, 0.3, 1) == 3
    assert low_rank_dim(768, 3072, 0.5, 1) == 384
    assert low_rank_dim(768, 3072, 0.1, 32) == 96
    assert low_rank_dim(10, 12, 0.95, 8) == 10
    assert low_rank_dim(64, 64, 1.0, 1) == 64


def test_dion_loss_decreases_on_a_least_squares_problem():
    generator = torch.Generator().manual_seed(8)
    inputs, targets = torch.randn(64, 16, generator=generator), torch.randn(64, 8, generator=generator)
    layer = torch.nn.Linear(16, 8, bias=False)
    optimizer = Dion([layer.weight], lr=0.02, rank_fraction=0.5, weight_decay=0.0)

    def loss():
        return (layer(inputs) - targets).square().mean()
    start = loss().item()
    for _ in range(40):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.8 * start


def test_scalar_groups_match_torch_adamw():
    params = make_params([(7,), (3, 4)], dtype=torch.float32)
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    dion = Dion([dict(params=params, algorithm="adamw", lr=0.01, weight_decay=0.1)], betas=(0.8, 0.9), epsilon=1e-6)
    adamw = torch.optim.AdamW(reference, lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    for step in range(3):
        set_grads(params, step)
        set_grads(reference, step)
        dion.step()
        adamw.step()
    assert max_difference(params, reference) < 1e-6


@pytest.mark.parametrize("options,message", [
    (dict(qr_method="svd"), "qr_method='svd' is invalid; allowed: qr, cqr, rcqr"),
    (dict(rank_fraction=0.0), "rank_fraction=0.0 is invalid"),
    (dict(rank_multiple_of=0), "rank_multiple_of=0 is invalid"),
    (dict(power_iters=0), "power_iters=0 is invalid"),
    (dict(mu=1.5), "mu=1.5 is invalid"),
    (dict(rcqr_oversample=0.5), "rcqr_oversample=0.5 is invalid"),
    (dict(mixed_precision_config=dict(momentum="bfloat16")), "unknown key(s) momentum"),
    (dict(mixed_precision_config=dict(Q_dtype="int8")), "Q_dtype='int8' is invalid"),
])
def test_bad_options_raise_value_errors_naming_the_key(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Dion(make_params(), **options)


def test_non_matrix_in_a_dion_group_and_unknown_algorithm_are_rejected():
    with pytest.raises(ValueError, match=r"shape \(5,\) is in an algorithm='dion' group"):
        Dion([torch.nn.Parameter(torch.ones(5))])
    with pytest.raises(ValueError, match="algorithm='sgd' is invalid; allowed: dion, lion, adamw"):
        Dion([dict(params=make_params(), algorithm="sgd")])


def test_prepopulated_q_of_the_wrong_shape_is_rejected():
    param = make_params([(12, 8)])[0]
    optimizer = Dion([param], rank_fraction=0.5)
    optimizer.state[param]["Q"] = torch.zeros(12, 4, dtype=torch.float64)
    param.grad = torch.ones_like(param)
    with pytest.raises(ValueError, match=r"state\['Q'\] .* has shape \(12, 4\); expected \(8, 4\)"):
        optimizer.step()


@pytest.mark.parametrize("name,cls", [("dion_reference", DionReference), ("dion", Dion), ("dion_async", DionAsync)])
def test_registry_builds_dion_with_scalar_groups_and_mixed_precision(name, cls):
    matrices = make_params([(16, 8), (8, 16)], dtype=torch.float32)
    embedding, head = torch.nn.Parameter(torch.randn(32, 8)), torch.nn.Parameter(torch.randn(32, 8))
    gain = torch.nn.Parameter(torch.ones(8))
    ctx = OptimizerContext(matrix_params=matrices, embedding_params=[embedding], lm_head_params=[head],
                           vector_params=[gain], model_dim=8, scalar="adamw", state_dtype=torch.bfloat16,
                           options=dict(lr=0.02, rank_fraction=0.5, power_iters=2))
    spec = OPTIMIZERS[name]
    assert spec.syncs_replicate_grads and spec.supports_tensor_parallel
    optimizer = build_optimizer(name, ctx)
    assert type(optimizer) is cls
    assert [g["algorithm"] for g in optimizer.param_groups] == ["dion", "adamw", "adamw", "adamw"]
    assert optimizer.param_groups[0]["rank_fraction"] == 0.5 and optimizer._power_iters == 2
    for p in matrices + [embedding, head, gain]:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert optimizer.state[matrices[0]]["Q"].dtype == torch.bfloat16
    assert optimizer.state[gain]["variance"].dtype == torch.float32
    with pytest.raises(ValueError, match=f"not an option of optimizer '{name}'"):
        build_optimizer(name, OptimizerContext(matrix_params=matrices, embedding_params=[], lm_head_params=[],
                                               vector_params=[], model_dim=8, options=dict(rank=4)))


@pytest.mark.parametrize("qr_method", ["rcqr", "cqr"])
def test_dion_async_reads_each_fallback_flag_only_after_the_next_batch_was_issued(monkeypatch, qr_method):
    # The Cholesky fallback decision is a host read; DionAsync must yield it like a pending collective so that the
    # other batches in flight are issued before the host waits (on CUDA the read would otherwise stall the pipeline).
    import optimizers.dion.distributed as dion_distributed
    events = []
    real_init, real_wait = dion_distributed.HostFlag.__init__, dion_distributed.HostFlag.wait

    def init(flag, value):
        events.append(("flag", id(flag)))
        real_init(flag, value)

    def wait(flag):
        events.append(("wait", id(flag)))
        real_wait(flag)

    monkeypatch.setattr(dion_distributed.HostFlag, "__init__", init)
    monkeypatch.setattr(dion_distributed.HostFlag, "wait", wait)
    params = make_params([(40, 16), (24, 12)], dtype=torch.float32)
    train(DionAsync, params, steps=1, qr_method=qr_method, cqr_warmup_steps=0)
    created = [event for event in events if event[0] == "flag"]
    assert len(created) >= 2, events  # one decision per batch at least
    first = created[0][1]
    between = events[events.index(("flag", first)) + 1:events.index(("wait", first))]
    assert ("flag", created[1][1]) in between, events  # the second batch got as far as its own flag first
