"""Trains a small MLP with the optimized optax Dion on one CPU device and on 4 (forced host devices), and prints the
largest parameter difference of each multi-device layout as JSON. Run by test_dion_optax.py in a subprocess, since the
device count is fixed when JAX starts: python multi_device_run.py QR_METHOD"""
import os
import sys

# Four CPU devices; no LLVM optimization (as in conftest.py): these small programs compile several times faster.
_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from optimizers.experimental import dion_optax  # noqa: E402

STEPS = 4
BATCH = 32


def init_params():
    """Numpy draws (no compilation): an MLP 8 -> 32 -> 32 -> 32 whose Dion matrices are a wide one (w_in, updated
    transposed) and two of one shape (updated as one batch), plus a gain vector for AdamW."""
    rng = np.random.default_rng(0)
    shapes = {"w_in": (8, 32), "w_hidden": (32, 32), "w_out": (32, 32)}
    params = {name: jnp.asarray(rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0]))
              for name, shape in shapes.items()}
    params["gain"] = jnp.ones(32)
    return params


def data():
    x = np.random.default_rng(1).standard_normal((STEPS, BATCH, 8), dtype=np.float32)
    return jnp.asarray(x), jnp.asarray(np.sin(2.0 * np.tile(x, (1, 1, 4))))


def loss_fn(params, x, y):
    h = jax.nn.relu(x @ params["w_in"]) * params["gain"]
    h = jnp.tanh(h @ params["w_hidden"])
    return jnp.mean((h @ params["w_out"] - y) ** 2)


def make_tx(qr_method, replicate_axis=None):
    return dion_optax.dion(0.05, qr_method=qr_method, cqr_warmup_steps=1, rank_fraction=0.5,
                           replicate_axis=replicate_axis)


def train_jit(tx, params, xs, ys, batch_sharding=None):
    """Plain jit: gradients are averaged over the batch by XLA, wherever the data lives. On a mesh with explicit
    axes the model (written without sharding annotations) runs in automatic mode, the optimizer does not."""
    grad_fn = jax.grad(loss_fn)
    if batch_sharding is not None and AxisType.Explicit in batch_sharding.mesh.axis_types:
        grad_fn = jax.sharding.auto_axes(grad_fn, out_sharding=jax.tree_util.tree_map(lambda p: p.sharding, params))

    @jax.jit
    def step(params, state, x, y):
        grads = grad_fn(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for t in range(STEPS):
        x, y = xs[t], ys[t]
        if batch_sharding is not None:
            x, y = jax.device_put(x, batch_sharding), jax.device_put(y, batch_sharding)
        params, state = step(params, state, x, y)
    return params


def sharded_run(qr_method, axis_type):
    """Matrices sharded FSDP x TP over a 2 x 2 mesh, the batch over the data axis."""
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type, axis_type))
    specs = {"w_in": P(None, "model"), "w_hidden": P("data", "model"), "w_out": P("model", "data"),
             "gain": P("model")}
    params = jax.device_put(init_params(), {k: NamedSharding(mesh, s) for k, s in specs.items()})
    xs, ys = data()
    return train_jit(make_tx(qr_method), params, xs, ys, NamedSharding(mesh, P("data")))


def replicated_run(qr_method):
    """shard_map over 4 data-parallel replicas, each with its own gradient; Dion syncs P and R itself."""
    mesh = jax.make_mesh((4,), ("replica",), axis_types=(AxisType.Explicit,))
    tx = make_tx(qr_method, replicate_axis="replica")
    params = init_params()
    state_specs = dion_optax.replica_state_specs(jax.eval_shape(tx.init, params), "replica")
    init = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=state_specs))

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P(), state_specs, P("replica"), P("replica")),
                   out_specs=(P(), state_specs))
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = init(params)
    xs, ys = jax.device_put(data(), NamedSharding(mesh, P(None, "replica")))
    for t in range(STEPS):
        params, state = step(params, state, xs[t], ys[t])
    return params


def max_difference(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def main(qr_method):
    xs, ys = data()
    params0 = init_params()
    single = train_jit(make_tx(qr_method), params0, xs, ys)
    result = {"devices": jax.device_count(),
              "moved": max_difference(single, params0),
              "sharded_auto": max_difference(single, sharded_run(qr_method, AxisType.Auto)),
              "sharded_explicit": max_difference(single, sharded_run(qr_method, AxisType.Explicit)),
              "replicated": max_difference(single, replicated_run(qr_method))}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
