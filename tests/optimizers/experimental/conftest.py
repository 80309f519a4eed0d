"""XLA setting for the JAX tests: no LLVM optimization of the compiled CPU code. Compilation dominates these tests
(small matrices, a few steps each) and runs several times faster without it; the arithmetic is the same."""
import os
import sys

if "jax" not in sys.modules and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
