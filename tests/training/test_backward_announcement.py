"""train.py announces every backward to the optimizer (`TrainingHooks.prepare_backward`), saying whether it is the
step's last micro-batch: Dion starts its replica averages during that backward only (optimizers/dion/replica_sync.py),
so a missing or wrong announcement silently moves them back into step() or starts them on partial gradients."""
import pytest
import torch

import models
import train
from optimizers import registry
from optimizers.common.hooks import TrainingHooks
from tests.training.toy_components import ScaledSGD


class AnnouncedSGD(ScaledSGD, TrainingHooks):
    """ScaledSGD that records each announcement: (last_micro_batch, whether gradients already exist then)."""
    announcements: list[tuple[bool, bool]] = []
    rescaled: list[bool] = []

    def prepare_backward(self, last_micro_batch: bool, rescaled_after: bool = False) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        AnnouncedSGD.announcements.append((last_micro_batch, any(p.grad is not None for p in params)))
        AnnouncedSGD.rescaled.append(rescaled_after)


@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_loop_announces_each_backward_and_only_the_last_micro_batch_as_last(monkeypatch, tmp_path, grad_clip):
    monkeypatch.setitem(models.MODELS, "toy", "tests.training.toy_components")
    monkeypatch.setitem(registry.OPTIMIZERS, "announced_sgd", registry.OptimizerSpec(
        f"{__name__}:AnnouncedSGD", "ScaledSGD recording prepare_backward", defaults=dict(lr=0.1)))
    registry.option_fields.cache_clear()
    AnnouncedSGD.announcements.clear()
    AnnouncedSGD.rescaled.clear()
    try:
        torch.manual_seed(0)
        assert train.main(["--run_dir", str(tmp_path), "--logging.wandb", "false", "--model.name", "toy",
                           "--model.model_dim", "16", "--model.sequence_length", "16", "--batch_size", "6",
                           "--device_batch_size", "2", "--num_iterations", "2", "--val_loss_every", "0",
                           "--checkpoint_freq", "0", "--optimizer", "announced_sgd",
                           "--grad_clip", str(grad_clip)]) == 0
    finally:
        registry.option_fields.cache_clear()
    # Three micro-batches per step; announced before each backward (no gradients yet before the first one).
    step = [(False, False), (False, True), (True, True)]
    assert AnnouncedSGD.announcements == step + step
    # Clipping rescales the gradients after backward: the optimizer is told so before each backward.
    assert AnnouncedSGD.rescaled == [grad_clip > 0] * 6
