"""optax Dion (optimizers/experimental): closed-form single steps, orthonormalization, option errors, the optimized
version against the reference and both against the PyTorch DionReference, mixed precision, no recompilation under
jit, a Flax model, and 4 CPU devices (sharded and data-parallel replicas) against one."""
from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the optax Dion port needs jax (pip install .[jax])")
optax = pytest.importorskip("optax", reason="the optax Dion port needs optax (pip install .[jax])")
import jax.numpy as jnp  # noqa: E402

from optimizers.experimental import dion_optax, dion_reference_optax  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[3]
IMPLEMENTATIONS = [dion_reference_optax, dion_optax]
IMPLEMENTATION_IDS = ["reference", "optimized"]
BY_NAME = dict(zip(IMPLEMENTATION_IDS, IMPLEMENTATIONS))
# A tall, a wide (updated transposed), two of one shape (one batch in the optimized version) and a vector.
SHAPES = {"tall": (24, 10), "wide": (10, 24), "square_a": (16, 16), "square_b": (16, 16), "gain": (16,)}


def numpy_tree(seed: int, shapes=SHAPES) -> dict:
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for name, shape in shapes.items()}


_OPTIMIZERS = {}
_JITTED_UPDATES = {}


def make_dion(implementation, **options):
    """implementation.dion(**options), one object per distinct options, so that tests sharing options share the
    compiled update (compilation dominates the run time of these tests)."""
    key = (implementation.__name__, repr(sorted(options.items())))
    if key not in _OPTIMIZERS:
        _OPTIMIZERS[key] = implementation.dion(**options)
    return _OPTIMIZERS[key]


def run(tx, params, grads_list, state=None):
    """Jitted optax loop (one compilation per optimizer and tree); returns (params, state)."""
    state = tx.init(params) if state is None else state
    step = _JITTED_UPDATES.setdefault(tx.update, jax.jit(tx.update))
    for grads in grads_list:
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def dion_state(state):
    """The Dion part (count, [key,] momentum, Q) of a partitioned optimizer state."""
    return state.inner_states["dion"].inner_state[0]


def max_difference(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# ------------------------------------------------------------------------------------------------ options, labels
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS, ids=IMPLEMENTATION_IDS)
@pytest.mark.parametrize("key, value", [("qr_method", "svd"), ("rank_fraction", 0.0), ("rank_fraction", 1.5),
                                        ("mu", -0.1), ("power_iters", 0), ("rcqr_oversample", 0.5),
                                        ("scalar_algorithm", "sgd"), ("betas", (0.9, 1.0)), ("rank_multiple_of", 0),
                                        ("weight_layout", "row_major")])
def test_bad_option_raises_value_error_naming_the_key(implementation, key, value):
    with pytest.raises(ValueError, match=f"dion: {key}="):
        implementation.dion(0.01, **{key: value})


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS, ids=IMPLEMENTATION_IDS)
def test_unknown_label_raises_value_error_naming_the_leaf(implementation):
    with pytest.raises(ValueError, match=r"labels\['gain'\]='sgd'.*allowed: dion, adamw, lion"):
        implementation.dion(0.01, labels={"tall": "dion", "gain": "sgd"})


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS, ids=IMPLEMENTATION_IDS)
def test_dion_label_on_a_vector_raises_value_error(implementation):
    params = numpy_tree(0, {"tall": (24, 10), "gain": (16,)})
    tx = implementation.dion(0.01, labels={"tall": "dion", "gain": "dion"})
    with pytest.raises(ValueError, match=r"leaf \['gain'\] has shape \(16,\)"):
        tx.init(params)


def test_default_labels_send_matrices_to_dion_and_vectors_to_the_scalar_algorithm():
    params = numpy_tree(0, {"tall": (24, 10), "gain": (16,)})
    assert dion_reference_optax.default_labels(params, "lion") == {"tall": "dion", "gain": "lion"}


@pytest.mark.parametrize("shape, fraction, multiple, rank", [((64, 32), 0.5, 1, 16), ((32, 64), 0.3, 1, 10),
                                                             ((10, 30), 0.3, 1, 3), ((64, 32), 0.1, 8, 8),
                                                             ((8, 64), 1.0, 16, 8)])
def test_rank_rounds_up_to_the_multiple_and_caps_at_the_short_side(shape, fraction, multiple, rank):
    assert dion_reference_optax.matrix_rank(shape, fraction, multiple) == rank


# ------------------------------------------------------------------------------------------- orthonormalization
@pytest.mark.parametrize("qr_method", ["qr", "cqr", "rcqr"])
def test_every_qr_method_returns_the_positive_diagonal_q_factor(qr_method):
    # All methods return the Q of P = Q R with diag(R) > 0: orthonormal columns (1e-5), P = Q (Q^T P) and Q^T P
    # upper triangular with a positive diagonal.
    P = numpy_tree(1, {"P": (40, 8)})["P"]
    Q = jax.jit(dion_reference_optax.orthonormalize, static_argnums=(1, 4))(P, qr_method, jnp.array(True),
                                                                             jax.random.key(0), 1.25)
    R = Q.T @ P
    np.testing.assert_allclose(Q.T @ Q, np.eye(8), atol=1e-5)
    np.testing.assert_allclose(Q @ R, P, atol=1e-4)
    np.testing.assert_allclose(np.tril(R, -1), 0.0, atol=1e-4)
    assert np.all(np.diagonal(R) > 0)


# ---------------------------------------------------------------------------------------- closed-form first step
# Full rank (r = min(m, n)), Householder QR, AdamW on the gain; shared by the closed-form tests below.
CLOSED_FORM = dict(learning_rate=0.01, mu=0.9, weight_decay=0.1, qr_method="qr")
CLOSED_FORM_SHAPES = {"tall": (24, 10), "wide": (10, 24), "gain": (16,)}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS, ids=IMPLEMENTATION_IDS)
def test_full_rank_first_step_leaves_mu_times_gradient_in_momentum(implementation):
    # With r = min(m, n) and M = 0, P spans the columns of G (of G^T for the wide matrix), so P R^T = G and the
    # error feedback leaves M = G - (1 - mu) G = mu G (float32, 1e-5).
    params, grads = numpy_tree(0, CLOSED_FORM_SHAPES), numpy_tree(1, CLOSED_FORM_SHAPES)
    _, state = run(make_dion(implementation, **CLOSED_FORM), params, [grads])
    for name in ("tall", "wide"):
        np.testing.assert_allclose(dion_state(state).momentum[name], 0.9 * grads[name], atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS, ids=IMPLEMENTATION_IDS)
def test_first_step_update_has_frobenius_norm_lr_sqrt_mn_r(implementation):
    # X1 = X0 (1 - lr wd) - lr sqrt(m/n) P Q^T with orthonormal P and unit columns in Q: ||P Q^T||_F = sqrt(r)
    # (up to the eps in the column norm; relative 1e-5).
    params, grads = numpy_tree(0, CLOSED_FORM_SHAPES), numpy_tree(1, CLOSED_FORM_SHAPES)
    new, _ = run(make_dion(implementation, **CLOSED_FORM), params, [grads])
    for name in ("tall", "wide"):
        m, n = CLOSED_FORM_SHAPES[name]
        step = np.asarray(params[name]) * (1 - 0.01 * 0.1) - np.asarray(new[name])
        assert np.linalg.norm(step) == pytest.approx(0.01 * math.sqrt(m / n) * math.sqrt(min(m, n)), rel=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS, ids=IMPLEMENTATION_IDS)
@pytest.mark.parametrize("bad", [0.0, np.nan])
def test_zero_or_nan_gradient_skips_the_step_keeping_momentum_and_q(implementation, bad):
    # A zero or non-finite B = M + G: momentum and Q stay as they were, the matrix only decays (X (1 - lr wd)).
    params = numpy_tree(0, CLOSED_FORM_SHAPES)
    tx = make_dion(implementation, **CLOSED_FORM)
    warm_params, warm_state = run(tx, params, [numpy_tree(1, CLOSED_FORM_SHAPES)])
    bad_grads = {**numpy_tree(2, CLOSED_FORM_SHAPES), "tall": bad - dion_state(warm_state).momentum["tall"]}
    new, state = run(tx, warm_params, [bad_grads], state=warm_state)
    np.testing.assert_array_equal(dion_state(state).momentum["tall"], dion_state(warm_state).momentum["tall"])
    np.testing.assert_array_equal(dion_state(state).Q["tall"], dion_state(warm_state).Q["tall"])
    np.testing.assert_allclose(new["tall"], warm_params["tall"] * (1 - 0.01 * 0.1), rtol=1e-6)
    assert max_difference(new["wide"], warm_params["wide"] * (1 - 0.01 * 0.1)) > 1e-3  # the other matrix moved


def test_in_out_layout_updates_the_transpose_like_out_in():
    # A Flax kernel W (in x out) with weight_layout "in_out" follows the PyTorch weight W^T (out x in) with the
    # default "out_in": same fan-out / fan-in scale, transposed states (float32, 1e-6).
    params, grads = numpy_tree(0, {"w": (10, 24)}), [numpy_tree(seed, {"w": (10, 24)}) for seed in (1, 2)]
    transpose = lambda tree: {"w": tree["w"].T}
    in_out, _ = run(make_dion(dion_optax, learning_rate=0.01, weight_layout="in_out"), params, grads)
    out_in, _ = run(make_dion(dion_optax, learning_rate=0.01), transpose(params), [transpose(g) for g in grads])
    assert max_difference(in_out["w"].T, out_in["w"]) < 1e-6


# ------------------------------------------------------------------------------- optimized == reference == torch
# Five steps on a tall, a wide and two square matrices with a linear learning-rate schedule, AdamW on the gain and
# Lion on the bias. Householder QR at full rank; cqr (switching on after 2 warm-up steps) and rcqr (with 2 power
# iterations) at half rank, where P is well conditioned (cqr's error grows as cond(P)^2: at full rank on the square
# matrices, XLA's and LAPACK's roundings part by ~3e-5 after 5 steps).
COMPARED = {"qr": 1.0, "cqr": 0.5, "rcqr": 0.5}
POWER_ITERS = {"qr": 1, "cqr": 1, "rcqr": 2}
COMPARISON_SHAPES = {**SHAPES, "bias": (10,)}
COMPARISON_LABELS = {"tall": "dion", "wide": "dion", "square_a": "dion", "square_b": "dion", "gain": "adamw",
                     "bias": "lion"}
SCHEDULE = optax.linear_schedule(0.02, 0.005, 5)


def comparison_options(qr_method: str) -> dict:
    return dict(learning_rate=SCHEDULE, rank_fraction=COMPARED[qr_method], qr_method=qr_method, cqr_warmup_steps=2,
                power_iters=POWER_ITERS[qr_method], mu=0.9, weight_decay=0.1, scalar_learning_rate=0.003,
                labels=COMPARISON_LABELS)


def comparison_problem():
    return numpy_tree(0, COMPARISON_SHAPES), [numpy_tree(seed, COMPARISON_SHAPES) for seed in range(1, 6)]


@functools.lru_cache(maxsize=None)
def comparison_run(implementation_name: str, qr_method: str):
    """(initial state, final params, final state) of one implementation on the comparison problem (computed once)."""
    tx = make_dion(BY_NAME[implementation_name], **comparison_options(qr_method))
    params, grads = comparison_problem()
    initial_state = tx.init(params)
    final_params, final_state = run(tx, params, grads, initial_state)
    return initial_state, final_params, final_state


@pytest.mark.parametrize("qr_method", COMPARED)
def test_optimized_matches_reference_over_five_steps(qr_method):
    # Same options and initial Q; the rcqr sketches differ (the reference folds the step into its key, the optimized
    # version splits the key in its state) but every method returns the same basis. float32: 1e-5 on parameters of
    # size ~1 (observed ~1e-7), 1e-4 on Q and the momenta.
    reference_initial, reference, reference_state = comparison_run("reference", qr_method)
    optimized_initial, optimized, optimized_state = comparison_run("optimized", qr_method)
    params, _ = comparison_problem()
    np.testing.assert_array_equal(dion_state(reference_initial).Q["tall"], dion_state(optimized_initial).Q["tall"])
    assert max_difference(reference, optimized) < 1e-5
    assert max_difference(dion_state(reference_state).Q, dion_state(optimized_state).Q) < 1e-4
    assert max_difference(dion_state(reference_state).momentum, dion_state(optimized_state).momentum) < 1e-4
    assert max_difference(reference, params) > 0.02  # the parameters did move


@pytest.mark.parametrize("implementation_name", IMPLEMENTATION_IDS)
def test_jitted_update_compiles_once_over_five_steps(implementation_name):
    # cqr's warm-up switch, the step count, the schedule and the sketch keys are traced values, and the state keeps
    # its structure, shapes and dtypes: five jitted steps leave one compiled executable.
    comparison_run(implementation_name, "cqr")
    tx = make_dion(BY_NAME[implementation_name], **comparison_options("cqr"))
    assert _JITTED_UPDATES[tx.update]._cache_size() == 1


@pytest.mark.parametrize("implementation_name", IMPLEMENTATION_IDS)
@pytest.mark.parametrize("qr_method", COMPARED)
def test_matches_pytorch_dion_reference(implementation_name, qr_method):
    # optimizers.dion.reference.DionReference on the same inputs, initial Q (put into its state before the first
    # step), schedule (set in the groups each step) and scalar algorithms. float32: 1e-5 on parameters of size ~1
    # (observed ~1e-6); Q and momentum 1e-4 (every method returns the positive-diagonal basis, so they match too).
    torch = pytest.importorskip("torch")
    dion_reference = pytest.importorskip("optimizers.dion.reference",
                                         reason="the PyTorch Dion reference is not in this checkout")
    initial_state, jax_params, jax_state = comparison_run(implementation_name, qr_method)
    params, grads = comparison_problem()
    tensors = {name: torch.nn.Parameter(torch.tensor(np.asarray(value))) for name, value in params.items()}
    matrices = [name for name, label in COMPARISON_LABELS.items() if label == "dion"]
    options = comparison_options(qr_method)
    optimizer = dion_reference.DionReference(
        [dict(params=[tensors[name] for name in matrices]),
         dict(params=[tensors["gain"]], algorithm="adamw", lr=0.003),
         dict(params=[tensors["bias"]], algorithm="lion", lr=0.003)],
        lr=0.02, mu=0.9, weight_decay=0.1, rank_fraction=options["rank_fraction"], qr_method=qr_method,
        cqr_warmup_steps=2, power_iters=options["power_iters"])
    for name in matrices:
        optimizer.state[tensors[name]]["Q"] = torch.tensor(np.asarray(dion_state(initial_state).Q[name]))
        optimizer.state[tensors[name]]["momentum"] = torch.zeros(COMPARISON_SHAPES[name])
    for step, step_grads in enumerate(grads):
        optimizer.param_groups[0]["lr"] = float(SCHEDULE(step))
        for name, tensor in tensors.items():
            tensor.grad = torch.tensor(np.asarray(step_grads[name]))
        optimizer.step()
    torch_params = {name: tensor.detach().numpy() for name, tensor in tensors.items()}
    assert max_difference(jax_params, torch_params) < 1e-5
    for name in matrices:
        state = optimizer.state[tensors[name]]
        assert max_difference(dion_state(jax_state).Q[name], state["Q"].numpy()) < 1e-4, name
        assert max_difference(dion_state(jax_state).momentum[name], state["momentum"].numpy()) < 1e-4, name


def test_bfloat16_states_are_stored_in_bfloat16_and_track_float32():
    # momentum, Q and the AdamW moments in bfloat16, arithmetic in float32: within 2e-3 of the float32 run (the
    # comparison problem with qr) after 5 steps of lr <= 0.02 (bf16 keeps 8 bits: the states carry relative errors
    # ~4e-3 into updates of size ~0.01).
    _, full, _ = comparison_run("optimized", "qr")
    params, grads = comparison_problem()
    mixed, state = run(dion_optax.dion(**comparison_options("qr"), momentum_dtype=jnp.bfloat16,
                                       q_dtype=jnp.bfloat16, variance_dtype=jnp.bfloat16), params, grads)
    dion_part = dion_state(state)
    adamw_part = state.inner_states["adamw"].inner_state[0]
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves((dion_part.momentum, dion_part.Q, adamw_part.exp_avg,
                                                          adamw_part.exp_avg_sq))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree_util.tree_leaves(mixed)} == {jnp.dtype(jnp.float32)}
    assert max_difference(full, mixed) < 2e-3


# --------------------------------------------------------------------------------------------------------- Flax
def test_flax_mlp_trains_with_train_state():
    # A 2-layer Flax MLP fit to a fixed regression target through flax.training.train_state.TrainState: 40 steps
    # must bring the loss below 30% of its initial value.
    nn = pytest.importorskip("flax.linen", reason="the Flax example needs flax")
    from flax.training import train_state

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(nn.relu(nn.Dense(32)(x)))

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 8), dtype=np.float32))
    y = jnp.sin(x[:, :4] * 1.5)
    model = MLP()
    state = train_state.TrainState.create(apply_fn=model.apply, params=model.init(jax.random.key(0), x),
                                          tx=dion_optax.dion(0.02, rank_fraction=0.5, scalar_learning_rate=0.01,
                                                             weight_decay=0.0, weight_layout="in_out"))

    def loss_fn(params):
        return jnp.mean((model.apply(params, x) - y) ** 2)

    @jax.jit
    def train_step(state):
        return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

    initial = float(loss_fn(state.params))
    for _ in range(40):
        state = train_step(state)
    assert float(loss_fn(state.params)) < 0.3 * initial


# -------------------------------------------------------------------------------------------------- multi-device
def test_replica_state_specs_put_only_dion_momentum_on_the_replica_axis():
    from jax.sharding import PartitionSpec
    params = numpy_tree(0, {"tall": (24, 10), "gain": (16,)})
    tx = dion_optax.dion(0.01, replicate_axis="data")
    specs = dion_optax.replica_state_specs(jax.eval_shape(tx.init, params), "data")
    assert dion_state(specs).momentum["tall"] == PartitionSpec("data")
    assert dion_state(specs).Q["tall"] == PartitionSpec()
    adamw_specs = specs.inner_states["adamw"].inner_state[0]
    assert adamw_specs.exp_avg["gain"] == PartitionSpec() and adamw_specs.exp_avg_sq["gain"] == PartitionSpec()


@pytest.mark.slow
def test_four_cpu_devices_match_one_device():
    # multi_device_run.py (own process: the device count is fixed when JAX starts) trains an MLP for 4 steps with
    # rcqr on 1 device and on 4: parameters sharded over a 2 x 2 (data, model) mesh with the batch on the data axis,
    # with automatic and with explicit mesh axes; and 4 data-parallel replicas under shard_map, each with its own
    # gradient, Dion averaging P and R. float32 reductions run in another order: 1e-5 (observed ~2e-6) on
    # parameters that move by ~0.2. About 15 s of CPU, mostly compilation of the four layouts.
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("multi_device_run.py")), "rcqr"],
                            capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    differences = json.loads(result.stdout.strip().splitlines()[-1])
    assert differences["devices"] == 4
    assert differences["moved"] > 0.1
    for layout in ("sharded_auto", "sharded_explicit", "replicated"):
        assert differences[layout] < 1e-5, layout
