"""Extending the framework as docs/architecture.md says: a model = one package + one MODELS line, an optimizer = one
module + one registry line, an option = one constructor keyword. Each is then reachable from train.py's config and
command line with validation, --help and config.yaml for free."""
import pytest
import torch
import yaml

import models
from optimizers import registry
import train
from tests.training.helpers import read_metrics, train_losses
from trainer.config import build_config
from trainer.errors import ConfigError

TOY = ["--logging.wandb", "false", "--model.name", "toy", "--model.model_dim", "16", "--model.sequence_length", "16", "--batch_size", "4",
       "--num_iterations", "8", "--val_loss_every", "4", "--data.val_tokens", "256", "--checkpoint_freq", "4"]


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(models.MODELS, "toy", "tests.training.toy_components")
    monkeypatch.setitem(registry.OPTIMIZERS, "scaled_sgd", registry.OptimizerSpec(
        "tests.training.toy_components:ScaledSGD", "SGD with a step multiplier", defaults=dict(lr=2.0)))
    registry.option_fields.cache_clear()
    yield
    registry.option_fields.cache_clear()


def test_toy_model_and_optimizer_train_through_train_py(toy_registered, tmp_path):
    assert train.main(["--run_dir", str(tmp_path), *TOY, "--optimizer", "scaled_sgd", "--optimizer.scale", "2.0"]) == 0
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"] == {"name": "toy", "vocab_size": 50304, "model_dim": 16, "sequence_length": 16,
                              "n_layer": 1}
    assert saved["optimizer"]["name"] == "scaled_sgd" and saved["optimizer"]["scale"] == 2.0
    assert saved["optimizer"]["lr"] == 2.0  # the registry line's training default
    losses = train_losses(tmp_path)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses
    assert [r["step"] for r in read_metrics(tmp_path) if "val_loss" in r] == [0, 4, 8]


def test_toy_option_is_typed_and_checked_by_its_optimizer(toy_registered):
    with pytest.raises(ConfigError, match="optimizer.scale: expected a number"):
        build_config(["--optimizer", "scaled_sgd", "--optimizer.scale", "big"])
    with pytest.raises(ConfigError, match="unknown key 'momentum'.*scale"):
        build_config(["--optimizer", "scaled_sgd", "--optimizer.momentum", "0.9"])
    with pytest.raises(ConfigError, match="model: unknown key 'n_head'"):
        build_config(["--model.name", "toy", "--model.n_head", "2"])


def test_toy_option_value_refused_by_the_optimizer_is_one_line(toy_registered, tmp_path, capsys):
    assert train.main(["--run_dir", str(tmp_path), *TOY, "--optimizer", "scaled_sgd", "--optimizer.scale", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: optimizer scaled_sgd: ScaledSGD: scale must be a positive number, got -1.0"]


def test_model_without_a_tensor_parallel_plan_is_a_layout_error(toy_registered):
    from trainer.build import build_model
    from trainer.distributed import Distributed, parallelize
    from trainer.errors import LayoutError
    config = build_config(["--model.name", "toy", "--optimizer", "adamw"])
    tp_env = Distributed(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), dp=1, fs=1, tp=2)
    with pytest.raises(LayoutError, match="model 'toy' has no tensor-parallel plan"):
        parallelize(build_model(config), config, tp_env, optimizer_syncs_replicas=False)
