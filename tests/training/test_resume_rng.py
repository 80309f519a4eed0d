"""Bit-exact resume with optimizers that draw random numbers: Sophia's Hessian refresh samples labels from the
model's predictions with the global torch RNG (restored from the checkpoint's per-rank RNG state), and Dion's rcqr
draws a Gaussian sketch seeded from the step (kept in the optimizer's param groups). A checkpoint that drops either
changes the result after the resume point.

The final checkpoints are compared tensor by tensor, bit for bit: the training losses cannot see such a bug (the
loss of step t is computed before update t, and rcqr's result depends on its sketch only through round-off).
"""
import shutil

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.training.helpers import run_train, train_losses

ARGS = {
    "sophia": ["--optimizer", "sophia", "--lr", "0.003", "--optimizer_args.hessian_interval", "1"],
    "dion_rcqr": ["--optimizer", "dion", "--lr", "0.02", "--optimizer.qr_method", "rcqr", "--rank_fraction", "0.5"],
}
COMMON = ["--num_iterations", "6", "--batch_size", "8", "--device_batch_size", "4", "--checkpoint_freq", "3"]


def checkpoint_tensors(run_dir) -> dict[str, torch.Tensor]:
    """Every tensor of the model and optimizer state in the step-6 checkpoint, by flattened name."""
    dcp_to_torch_save(run_dir / "checkpoints" / "step_00000006", run_dir / "final.pt")
    state = torch.load(run_dir / "final.pt", weights_only=False)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(f"{prefix}.{i}", item)
    walk("model", state["model"])
    walk("optimizer", state["optimizer"])
    return flat


@pytest.mark.parametrize("name", list(ARGS))
def test_resume_is_bit_exact_with_random_draws(name, tmp_path):
    args = [*ARGS[name], *COMMON]
    assert run_train(tmp_path / "straight", *args) == 0
    shutil.copytree(tmp_path / "straight", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step_00000006")
    assert run_train(tmp_path / "split", *args) == 0
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "straight")
    straight, split = checkpoint_tensors(tmp_path / "straight"), checkpoint_tensors(tmp_path / "split")
    assert straight.keys() == split.keys() and len(straight) > 20
    differing = [key for key in straight if not torch.equal(straight[key], split[key])]
    assert not differing
