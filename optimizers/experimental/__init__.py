"""Experimental ports of the project's optimizers to other frameworks.

`dion_reference_optax` (readable, leaf by leaf) and `dion_optax` (batched, mixed precision, sharded): Dion as an
optax GradientTransformation for JAX users. They need the optional `jax` extra (`pip install .[jax]`); see README.md
here. Nothing is imported eagerly, so the PyTorch side never needs JAX.
"""
