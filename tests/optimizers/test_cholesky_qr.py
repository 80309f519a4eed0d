"""Cholesky-based orthonormalization ("cqr", "rcqr") on matrices of prescribed condition number and on
rank-deficient ones, in PyTorch (optimizers/dion/core.orthonormalize); the optax port has the same tests in
tests/optimizers/experimental/test_cholesky_qr_optax.py.

Float32 Cholesky QR in one pass leaves |Q^T Q - I| ~ eps cond(P)^2: 5e-3 at cond 1e3, 0.5 at cond 1e4 (64 x 64).
The cqr path runs CholeskyQR2 and falls back (rcqr, then Householder QR) when the first pass was not close to
orthonormal, so every result must be orthonormal to float32 round-off (1e-5) whatever the conditioning.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import optimizers.dion.core as dion_core
from optimizers.dion.core import QRMethod, orthonormalize
from optimizers.dion.distributed import matrix_layout, run_blocking

CONDITIONS = [1e1, 1e2, 1e3, 1e4, 1e6]
SHAPES = [(64, 64), (256, 64), (128, 16)]


def with_condition(rows: int, rank: int, condition: float, seed: int = 0) -> np.ndarray:
    """rows x rank float32 matrix U diag(s) V^T with singular values spaced logarithmically from 1 to 1/condition."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((rows, rank)))[0]
    V = np.linalg.qr(rng.standard_normal((rank, rank)))[0]
    return ((U * np.logspace(0, -np.log10(condition), rank)) @ V.T).astype(np.float32)


def rank_deficient(rows: int = 40, seed: int = 3) -> np.ndarray:
    """Columns [a, b, a, 0, c, b]: two duplicated columns and a zero one, exactly rank 3 in float32."""
    a, b, c = np.random.default_rng(seed).standard_normal((3, rows)).astype(np.float32)
    return np.stack([a, b, a, np.zeros(rows, np.float32), c, b], axis=1)


def torch_orthonormalize(P: np.ndarray, qr_method: QRMethod) -> torch.Tensor:
    rows = P.shape[0]
    out, valid = run_blocking(orthonormalize(torch.from_numpy(P)[None], qr_method,
                                             matrix_layout(torch.empty(rows, rows), None, None), sketch_seed=1,
                                             oversample=1.25))
    assert valid.all()
    return out[0]


def orthonormality_error(Q) -> float:
    Q = np.asarray(Q, dtype=np.float64)
    return float(np.abs(Q.T @ Q - np.eye(Q.shape[1])).max())


def span_error(Q, P: np.ndarray) -> float:
    """max |Q Q^T P - P| / max |P|: zero when Q's columns span P's."""
    Q = np.asarray(Q, dtype=np.float64)
    return float(np.abs(Q @ (Q.T @ P) - P).max() / np.abs(P).max())


@pytest.fixture
def householder_calls(monkeypatch):
    """Counts the Householder QR calls of dion_core.orthonormalize (the last fallback)."""
    calls = []
    real = dion_core.householder_orthonormalize

    def counting(P):
        calls.append(P.shape)
        return real(P)

    monkeypatch.setattr(dion_core, "householder_orthonormalize", counting)
    return calls


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("condition", CONDITIONS)
@pytest.mark.parametrize("qr_method", [QRMethod.CQR, QRMethod.RCQR])
def test_cholesky_methods_are_orthonormal_at_prescribed_condition_numbers(qr_method, condition, shape):
    P = with_condition(*shape, condition)
    Q = torch_orthonormalize(P, qr_method)
    assert orthonormality_error(Q) < 1e-5
    assert span_error(Q, P) < 1e-4


def test_cqr_keeps_the_cholesky_path_for_well_conditioned_p(monkeypatch, householder_calls):
    sketches = []
    real_sketch = dion_core.gaussian_sketch
    monkeypatch.setattr(dion_core, "gaussian_sketch", lambda *args: sketches.append(args) or real_sketch(*args))
    P = with_condition(256, 64, 1e2)
    Q = torch_orthonormalize(P, QRMethod.CQR)
    assert not sketches and not householder_calls  # no fallback was needed
    reference = torch_orthonormalize(P, QRMethod.QR)  # the positive-diagonal Q factor is unique
    assert (Q - reference).abs().max() < 1e-4


@pytest.mark.parametrize("qr_method", [QRMethod.CQR, QRMethod.RCQR])
def test_rank_deficient_p_reaches_the_householder_fallback_and_stays_orthonormal(qr_method, householder_calls):
    P = rank_deficient()
    Q = torch_orthonormalize(P, qr_method)
    assert householder_calls == [(1, 40, 6)]
    assert orthonormality_error(Q) < 1e-5
    assert span_error(Q, P) < 1e-5


def test_rcqr_sketch_changes_with_the_step_part_of_its_seed():
    # Dion seeds the sketch of step t with t * 2^32 + m; the CPU generator ignores bits above 32 unless folded in.
    from optimizers.dion.linalg import gaussian_sketch
    sketches = [gaussian_sketch(8, 5, (step << 32) + 5, torch.device("cpu"), torch.float32) for step in (1, 2, 3)]
    assert not torch.equal(sketches[0], sketches[1]) and not torch.equal(sketches[1], sketches[2])
    assert torch.equal(sketches[0], gaussian_sketch(8, 5, (1 << 32) + 5, torch.device("cpu"), torch.float32))


@pytest.mark.parametrize("qr_method", [QRMethod.CQR, QRMethod.RCQR])
def test_gram_and_sketch_products_run_in_full_float32_when_the_process_allows_tf32(qr_method):
    # train.py lets CUDA use TF32 for float32 products (set_float32_matmul_precision("high")); the products inside
    # the Cholesky-based orthonormalization must not: a 10-bit mantissa there costs orthonormality.
    from torch.overrides import TorchFunctionMode
    seen = []

    class RecordPrecision(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("matmul", "__matmul__", "bmm"):
                seen.append(torch.get_float32_matmul_precision())
            return func(*args, **(kwargs or {}))

    P = torch.randn(1, 300, 8, generator=torch.Generator().manual_seed(0))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with RecordPrecision():
            run_blocking(orthonormalize(P, qr_method, matrix_layout(torch.empty(300, 8), None, None), sketch_seed=1,
                                        oversample=1.25))
        assert torch.get_float32_matmul_precision() == "high"  # restored
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen and set(seen) == {"highest"}, seen
