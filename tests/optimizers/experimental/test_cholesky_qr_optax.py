"""The optax port's Cholesky-based orthonormalization on matrices of prescribed condition number and on
rank-deficient ones (the PyTorch twin and the reasons are in tests/optimizers/test_cholesky_qr.py)."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from tests.optimizers.test_cholesky_qr import orthonormality_error, rank_deficient, span_error, with_condition

jax = pytest.importorskip("jax", reason="the optax Dion port needs jax (pip install .[jax])")
import jax.numpy as jnp  # noqa: E402

from optimizers.experimental import dion_optax, dion_reference_optax  # noqa: E402

CONDITIONS = [1e1, 1e3, 1e4, 1e6]


@functools.cache
def jitted(qr_method: str, implementation: str):
    """One compiled orthonormalization per method and implementation (every test matrix is 256 x 64 or 40 x 6)."""
    if implementation == "reference":
        return jax.jit(lambda P: dion_reference_optax.orthonormalize(P, qr_method, jnp.array(True),
                                                                     jax.random.key(0), 1.25))
    options = dion_reference_optax.DionOptions(qr_method=qr_method)
    return jax.jit(lambda P: dion_optax.orthonormalize_batch(P[None], jnp.array([True]),
                                                             jax.random.split(jax.random.key(0), 1),
                                                             jnp.array(True), options)[0])


def jax_orthonormalize(P: np.ndarray, qr_method: str, implementation: str) -> np.ndarray:
    return np.asarray(jitted(qr_method, implementation)(jnp.asarray(P)))


@pytest.mark.parametrize("implementation", ["reference", "optimized"])
@pytest.mark.parametrize("condition", CONDITIONS)
@pytest.mark.parametrize("qr_method", ["cqr", "rcqr"])
def test_optax_cholesky_methods_are_orthonormal_at_prescribed_condition_numbers(qr_method, condition,
                                                                                implementation):
    P = with_condition(256, 64, condition)
    Q = jax_orthonormalize(P, qr_method, implementation)
    assert orthonormality_error(Q) < 1e-5
    assert span_error(Q, P) < 1e-4


def test_optax_cholesky_qr2_accepts_well_conditioned_and_refuses_ill_conditioned_p():
    # 64 x 64 at cond 1e4: the case where the single-pass guard accepted |Q^T Q - I| = 0.5.
    well = jnp.asarray(with_condition(64, 64, 1e2))
    Q, usable = dion_reference_optax.cholesky_qr2(well)
    assert bool(usable) and orthonormality_error(Q) < 1e-5
    _, usable = dion_reference_optax.cholesky_qr2(jnp.asarray(with_condition(64, 64, 1e4)))
    assert not bool(usable)


@pytest.mark.parametrize("implementation", ["reference", "optimized"])
@pytest.mark.parametrize("qr_method", ["cqr", "rcqr"])
def test_optax_rank_deficient_p_reaches_the_householder_fallback(qr_method, implementation):
    P = rank_deficient()
    # Both Cholesky-based factorizations refuse this P, so the result is the Householder one.
    assert not bool(dion_reference_optax.cholesky_qr2(jnp.asarray(P))[1])
    assert not bool(dion_reference_optax.randomized_cholesky_qr(jnp.asarray(P), jax.random.key(0), 1.25)[1])
    Q = jax_orthonormalize(P, qr_method, implementation)
    np.testing.assert_array_equal(Q, np.asarray(dion_reference_optax.householder_orthonormalize(jnp.asarray(P))))
    assert orthonormality_error(Q) < 1e-5
    assert span_error(Q, P) < 1e-5
