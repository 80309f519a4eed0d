"""Dion (arXiv 2504.05295) as an optax GradientTransformation, optimized for jit and many devices.

Same algorithm and options as `dion_reference_optax` (its slow twin, which the tests compare against), plus:
- batching: the Dion matrices are grouped by (shape, dtype, sharding) and each group is updated as one stacked
  batch (batched matmuls and `jax.vmap` over the per-matrix factorizations and sketches), so a transformer with L
  identical blocks runs a handful of large kernels instead of many small ones. Shapes are static: no recompilation.
- explicit RNG: the state carries a PRNG key, split every step for the randomized-QR sketches.
- mixed precision: momentum, Q and the AdamW/Lion states may be stored in a smaller dtype (bfloat16); the arithmetic
  always runs in float32.
- sharding: parameters may be sharded over any `jax.sharding.Mesh` (FSDP rows, tensor-parallel columns, batch over a
  data axis); the update runs under jit with the states sharded like the parameters (`init` follows the parameters'
  shardings) and XLA inserts the collectives (P^T P, B^T P and the column norms reduce over the sharded axes).
  Meshes with explicit axis types are supported.
- data-parallel replicas with compressed synchronization (`replicate_axis`): inside `jax.shard_map` over a data
  axis, each replica passes its own (unsynchronized) gradient; Dion averages the low-rank P = B Q and R = B^T P
  over the axis instead of the full gradient (the paper's Algorithm 3), the scalar gradients are averaged, and each
  replica keeps its own momentum. By linearity the parameters equal those of a single device fed the mean gradient.
  `replica_state_specs` gives the shard_map specs of the state (momentum per replica, the rest replicated).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from optimizers.experimental.dion_reference_optax import (DionOptions, check_matrices, cholesky_qr2, column_normalize,
                                                           householder_orthonormalize, initial_q, matrix_rank,
                                                           nonzero_and_finite, randomized_cholesky_qr, resolve_labels,
                                                           seed_keys, update_scale)


def _fp32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def _swap(x: jax.Array) -> jax.Array:
    """Transpose the two matrix axes of a stack [batch, m, n]."""
    return jnp.swapaxes(x, -1, -2)


def _mean_over(x: jax.Array, axis_name: str | None) -> jax.Array:
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


def orthonormalize_batch(P: jax.Array, valid: jax.Array, keys: jax.Array, use_cqr: jax.Array,
                         options: DionOptions) -> jax.Array:
    """`dion_reference_optax.orthonormalize` on a float32 stack P [batch, m, r] (invalid matrices zeroed).

    The per-matrix factorizations are vmapped; the fallbacks are decided per matrix, as in the reference, but the
    branches are taken per batch (lax.cond outside the vmap), so a batch pays for a fallback only when one of its
    valid matrices needs it.
    """
    rows, rank = P.shape[-2:]
    householder = lambda: jax.vmap(householder_orthonormalize)(P)
    if options.qr_method == "qr":
        return householder()

    def with_fallback(Q, usable, fallback):
        needed = valid & ~usable
        return jax.lax.cond(jnp.any(needed), lambda: jnp.where(needed[:, None, None], fallback(), Q), lambda: Q)

    def rcqr():
        if rows <= rank:
            return householder()
        Q, usable = jax.vmap(randomized_cholesky_qr, in_axes=(0, 0, None))(P, keys, options.rcqr_oversample)
        return with_fallback(Q, usable, householder)

    if options.qr_method == "rcqr":
        return rcqr()

    def cqr():
        Q, usable = jax.vmap(cholesky_qr2)(P)
        return with_fallback(Q, usable, rcqr)

    return jax.lax.cond(use_cqr, cqr, rcqr)


def dion_batch_update(G: jax.Array, M: jax.Array, Q: jax.Array, keys: jax.Array, use_cqr: jax.Array,
                      options: DionOptions, replicate_axis: str | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dion (Algorithm 1) on a float32 stack of same-shape matrices X [batch, m, n]: the equations of
    `dion_reference_optax.dion_direction`, with the replica averages of Algorithm 3 when replicate_axis is set:

        P = orth(mean_replicas(A Q));  R = mean_replicas(A^T P)       (power_iters times, Q <- R in between)
        M <- B - (1 - mu) P R^T;  Q <- ColumnNormalize(R);  direction = sqrt(fan_out / fan_in) P Q^T

    A matrix whose averaged A Q is zero or non-finite keeps M and Q and gets a zero direction; every replica takes
    the same decision since it is made on the averaged P.
    Returns (direction [batch, m, n], new momentum [batch, m, n], new Q [batch, min(m, n), r]).
    """
    m, n = G.shape[-2:]
    transposed = m < n
    B = M + G
    A = _swap(B) if transposed else B
    R = Q
    valid = jnp.ones(G.shape[0], dtype=bool)
    for _ in range(options.power_iters):
        P = _mean_over(A @ R, replicate_axis)
        valid = valid & jax.vmap(nonzero_and_finite)(P)
        P = orthonormalize_batch(jnp.where(valid[:, None, None], P, 0.0), valid, keys, use_cqr, options)
        R = _mean_over(_swap(A) @ P, replicate_axis)
    valid = valid[:, None, None]
    P = jnp.where(valid, P, 0.0)
    Q_new = jnp.where(valid, column_normalize(R, options.epsilon), Q)
    feedback = P @ _swap(R)
    M_new = jnp.where(valid, B - (1.0 - options.mu) * (_swap(feedback) if transposed else feedback), M)
    update = P @ _swap(Q_new)
    direction = update_scale((m, n), options.weight_layout) * (_swap(update) if transposed else update)
    return direction, M_new, Q_new


class ScaleByDionState(NamedTuple):
    count: jax.Array  # int32 scalar: steps taken
    key: jax.Array  # PRNG key of the rcqr sketches, split every step
    momentum: Any  # pytree like the Dion leaves, in momentum_dtype (per replica under replicate_axis)
    Q: Any  # pytree: min(m, n) x r per Dion leaf, in q_dtype


def _sharding_key(x) -> str:
    return str(jax.typeof(x).sharding.spec)


def _has_explicit_axes(tree) -> bool:
    return any(AxisType.Explicit in jax.typeof(x).sharding.mesh.axis_types for x in jax.tree_util.tree_leaves(tree))


def _as_auto_axes(function, args: tuple, out_like):
    """Run `function(*args)` with the mesh axes in automatic mode (XLA picks the layouts of the factorizations), its
    outputs taking the shardings of `out_like`. Only needed when the arrays live on a mesh with explicit axes."""
    if not _has_explicit_axes(args):
        return function(*args)
    out_sharding = jax.tree_util.tree_map(lambda x: jax.typeof(x).sharding, out_like)
    return jax.sharding.auto_axes(function, out_sharding=out_sharding)(*args)


def _replicated_on_mesh_of(x: jax.Array, like: jax.Array) -> jax.Array:
    """x replicated over the mesh that `like` is sharded on (unchanged when `like` has no mesh): the small Q
    matrices live on the same devices as their parameter, which jit and explicit-axis meshes require."""
    if isinstance(like, jax.core.Tracer):
        mesh = jax.typeof(like).sharding.mesh  # non-empty on meshes with explicit axes only
        return x if mesh.empty else jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec()))
    if isinstance(like.sharding, NamedSharding):
        return jax.device_put(x, NamedSharding(like.sharding.mesh, PartitionSpec()))
    return x


def scale_by_dion(options: DionOptions, seed: int = 0, momentum_dtype=None, q_dtype=None,
                  replicate_axis: str | None = None) -> optax.GradientTransformation:
    """The Dion direction sqrt(fan_out / fan_in) P Q^T of every leaf (all 2D), batched over same-shape leaves.

    State: step count, PRNG key, momentum (momentum_dtype, default: the leaf's dtype) and Q (q_dtype, default: the
    leaf's dtype). Q starts as in the reference (`initial_q`), so both implementations begin from the same Q.
    """

    q_key, sketch_key = seed_keys(seed)

    def init(params):
        check_matrices(params)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        momentum = [jnp.zeros_like(x, dtype=momentum_dtype or x.dtype) for x in leaves]
        Q = [_replicated_on_mesh_of(initial_q(q_key, i, x.shape, matrix_rank(x.shape, options.rank_fraction,
                                                                             options.rank_multiple_of),
                                              q_dtype or x.dtype), x) for i, x in enumerate(leaves)]
        unflatten = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
        return ScaleByDionState(jnp.zeros([], jnp.int32), sketch_key, unflatten(momentum), unflatten(Q))

    def update_leaves(grads, momentum, Q, keys, use_cqr):
        groups: dict[tuple, list[int]] = {}
        for i, g in enumerate(grads):
            groups.setdefault((g.shape, g.dtype, Q[i].shape, _sharding_key(g)), []).append(i)
        directions, new_momentum, new_Q = [None] * len(grads), [None] * len(grads), [None] * len(grads)
        for group_index, members in enumerate(groups.values()):
            batch_keys = jax.random.split(keys[group_index], len(members))
            stack = lambda xs: jnp.stack([_fp32(xs[i]) for i in members])
            direction, M, Q_batch = dion_batch_update(stack(grads), stack(momentum), stack(Q), batch_keys, use_cqr,
                                                      options, replicate_axis)
            for j, i in enumerate(members):
                directions[i] = direction[j].astype(grads[i].dtype)
                new_momentum[i] = M[j].astype(momentum[i].dtype)
                new_Q[i] = Q_batch[j].astype(Q[i].dtype)
        return directions, new_momentum, new_Q

    def update(updates, state, params=None):
        del params
        step = state.count + 1
        key, step_key = jax.random.split(state.key)
        grads, treedef = jax.tree_util.tree_flatten(updates)
        momentum = treedef.flatten_up_to(state.momentum)
        Q = treedef.flatten_up_to(state.Q)
        group_keys = jax.random.split(step_key, max(len(grads), 1))
        use_cqr = step > options.cqr_warmup_steps
        directions, momentum, Q = _as_auto_axes(update_leaves, (grads, momentum, Q, group_keys, use_cqr),
                                                (grads, momentum, Q))
        unflatten = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
        return unflatten(directions), ScaleByDionState(step, key, unflatten(momentum), unflatten(Q))

    return optax.GradientTransformation(init, update)


class ScaleByAdamWState(NamedTuple):
    count: jax.Array  # int32 scalar: steps taken
    exp_avg: Any
    exp_avg_sq: Any


class ScaleByLionState(NamedTuple):
    exp_avg: Any


def adamw_direction(g: jax.Array, m: jax.Array, v: jax.Array, step: jax.Array, beta1: float, beta2: float,
                    epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Adam's direction (Kingma & Ba 2015; weight decay is added by the chain), float32:
        m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
        direction = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
    """
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    t = step.astype(jnp.float32)
    direction = (m / (1.0 - beta1 ** t)) / (jnp.sqrt(v / (1.0 - beta2 ** t)) + epsilon)
    return direction, m, v


def lion_direction(g: jax.Array, m: jax.Array, beta1: float, beta2: float) -> tuple[jax.Array, jax.Array]:
    """Lion's direction (Chen et al. 2023, Algorithm 2; weight decay is added by the chain), float32:
        direction = sign(beta1 m + (1 - beta1) g);  m <- beta2 m + (1 - beta2) g
    """
    direction = jnp.sign(beta1 * m + (1.0 - beta1) * g)
    return direction, beta2 * m + (1.0 - beta2) * g


def _map_leaves(function, trees: list, n_outputs: int) -> list:
    """Apply `function` to the leaves of `trees` (same structure, leaves taken in order) and return `n_outputs`
    trees (one per element of the tuple `function` returns), all with the first tree's structure."""
    leaves, treedef = jax.tree_util.tree_flatten(trees[0])
    others = [treedef.flatten_up_to(t) for t in trees[1:]]
    results = [function(*args) for args in zip(leaves, *others)]
    return [jax.tree_util.tree_unflatten(treedef, [r[j] for r in results]) for j in range(n_outputs)]


def scale_by_adamw(beta1: float, beta2: float, epsilon: float, momentum_dtype=None, variance_dtype=None,
                   replicate_axis: str | None = None) -> optax.GradientTransformation:
    """Adam moments stored in momentum_dtype and variance_dtype (default: the leaf's dtype), updated in float32."""

    def init(params):
        zeros = lambda dtype: jax.tree_util.tree_map(lambda x: jnp.zeros_like(x, dtype=dtype or x.dtype), params)
        return ScaleByAdamWState(jnp.zeros([], jnp.int32), zeros(momentum_dtype), zeros(variance_dtype))

    def update(updates, state, params=None):
        del params
        step = state.count + 1

        def leaf(g, m, v):
            direction, m_new, v_new = adamw_direction(_fp32(_mean_over(g, replicate_axis)), _fp32(m), _fp32(v), step,
                                                      beta1, beta2, epsilon)
            return direction.astype(g.dtype), m_new.astype(m.dtype), v_new.astype(v.dtype)

        directions, exp_avg, exp_avg_sq = _map_leaves(leaf, [updates, state.exp_avg, state.exp_avg_sq], 3)
        return directions, ScaleByAdamWState(step, exp_avg, exp_avg_sq)

    return optax.GradientTransformation(init, update)


def scale_by_lion(beta1: float, beta2: float, momentum_dtype=None,
                  replicate_axis: str | None = None) -> optax.GradientTransformation:
    """Lion momentum stored in momentum_dtype (default: the leaf's dtype), updated in float32."""

    def init(params):
        zeros = lambda x: jnp.zeros_like(x, dtype=momentum_dtype or x.dtype)
        return ScaleByLionState(jax.tree_util.tree_map(zeros, params))

    def update(updates, state, params=None):
        del params

        def leaf(g, m):
            direction, m_new = lion_direction(_fp32(_mean_over(g, replicate_axis)), _fp32(m), beta1, beta2)
            return direction.astype(g.dtype), m_new.astype(m.dtype)

        directions, exp_avg = _map_leaves(leaf, [updates, state.exp_avg], 2)
        return directions, ScaleByLionState(exp_avg)

    return optax.GradientTransformation(init, update)


def dion(learning_rate: float | optax.Schedule, *, rank_fraction: float = 1.0, rank_multiple_of: int = 1,
         qr_method: str = "rcqr", mu: float = 0.95, betas: tuple[float, float] = (0.9, 0.95),
         weight_decay: float = 0.01, epsilon: float = 1e-8, power_iters: int = 1, cqr_warmup_steps: int = 150,
         rcqr_oversample: float = 1.25, scalar_algorithm: str = "adamw",
         scalar_learning_rate: float | optax.Schedule | None = None, scalar_weight_decay: float | None = None,
         labels=None, weight_layout: str = "out_in", seed: int = 0, momentum_dtype=None, q_dtype=None,
         variance_dtype=None, replicate_axis: str | None = None) -> optax.GradientTransformation:
    """Dion on the 2D leaves, AdamW or Lion on the rest: the options of `dion_reference_optax.dion`, plus

    momentum_dtype / q_dtype / variance_dtype: storage dtypes of the momenta (Dion, AdamW and Lion), of Dion's Q
    and of AdamW's second moment (None: the parameter's dtype).
    replicate_axis: name of a mesh axis over which this update runs inside `jax.shard_map`, each replica with its
    own gradients (see the module docstring); None when the gradients are already averaged (plain jit).
    """
    options = DionOptions(rank_fraction=rank_fraction, rank_multiple_of=rank_multiple_of, mu=mu, betas=betas,
                          weight_decay=weight_decay, epsilon=epsilon, power_iters=power_iters, qr_method=qr_method,
                          cqr_warmup_steps=cqr_warmup_steps, rcqr_oversample=rcqr_oversample,
                          scalar_algorithm=scalar_algorithm, weight_layout=weight_layout)
    scalar_lr = learning_rate if scalar_learning_rate is None else scalar_learning_rate
    scalar_wd = weight_decay if scalar_weight_decay is None else scalar_weight_decay
    beta1, beta2 = options.betas
    transforms = {
        "dion": optax.chain(scale_by_dion(options, seed, momentum_dtype, q_dtype, replicate_axis),
                            optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(learning_rate)),
        "adamw": optax.chain(scale_by_adamw(beta1, beta2, epsilon, momentum_dtype, variance_dtype, replicate_axis),
                             optax.add_decayed_weights(scalar_wd), optax.scale_by_learning_rate(scalar_lr)),
        "lion": optax.chain(scale_by_lion(beta1, beta2, momentum_dtype, replicate_axis),
                            optax.add_decayed_weights(scalar_wd), optax.scale_by_learning_rate(scalar_lr)),
    }
    return optax.partition(transforms, resolve_labels(labels, scalar_algorithm))


def replica_state_specs(state, replicate_axis: str):
    """shard_map PartitionSpecs for a state of `dion(..., replicate_axis=...)`: Dion's momentum differs between the
    replicas, so it is laid out along dimension 0 over the axis (global shape [replicas * m, n], one m x n block per
    replica); every other leaf is replicated. `state` may be abstract (jax.eval_shape(tx.init, params))."""

    def spec(path, _):
        per_replica = any(isinstance(entry, jax.tree_util.GetAttrKey) and entry.name == "momentum" for entry in path)
        return PartitionSpec(replicate_axis) if per_replica else PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, state)
