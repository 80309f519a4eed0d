"""configs/reference/*.yaml are microsoft/dion's 160M settings key for key: every value of configs/reference/SOURCE.yaml
(the reference's file keys and what its train.py fixes, at the commit named there) is mapped onto our resolved config
and onto the param groups our optimizer builds from it. A reference key without a mapping fails too."""
import math
from pathlib import Path

import pytest
import torch
import yaml

from tests.training.helpers import ROOT
from trainer.build import build_training_optimizer
from trainer.config import build_config
from trainer.distributed import Distributed

SOURCE = yaml.safe_load((ROOT / "configs" / "reference" / "SOURCE.yaml").read_text())


def option(name):
    return lambda c: c.optimizer.options.get(name)


# reference key -> (our value from the resolved TrainConfig, how the reference's value becomes ours)
SAME = lambda value, file: value  # noqa: E731
MAPPING = {
    "model_dim": (lambda c: c.model.model_dim, SAME), "n_layer": (lambda c: c.model.n_layer, SAME),
    "n_head": (lambda c: c.model.n_head, SAME), "sequence_length": (lambda c: c.model.sequence_length, SAME),
    "vocab_size": (lambda c: c.model.vocab_size, SAME), "init": (lambda c: c.model.init, SAME),
    "norm_gains": (lambda c: c.model.norm_gains, SAME), "rope_dtype": (lambda c: c.model.rope_dtype, SAME),
    "batch_size": (lambda c: c.data.batch_size, SAME), "device_batch_size": (lambda c: c.data.device_batch_size, SAME),
    "val_tokens": (lambda c: c.data.val_tokens, SAME), "data_dir": (lambda c: c.data.dir, SAME),
    "data_order": (lambda c: c.data.order, SAME),
    "num_iterations": (lambda c: c.schedule.num_iterations, SAME),
    "warmup_ratio": (lambda c: c.schedule.warmup_ratio, SAME),
    "warmdown_ratio": (lambda c: c.schedule.warmdown_ratio, SAME),
    "val_loss_every": (lambda c: c.logging.val_loss_every, SAME),
    "optimizer": (lambda c: c.optimizer.name, SAME), "scalar_opt": (lambda c: c.optimizer.scalar.name, SAME),
    "lr": (lambda c: c.optimizer.lr, SAME), "weight_decay": (option("weight_decay"), SAME),
    "mu": (lambda c: c.optimizer.options.get("ef_decay" if c.optimizer.name == "dion2" else "mu"), SAME),
    "ortho_fraction": (lambda c: c.optimizer.options.get("fraction" if c.optimizer.name == "dion2" else
                                                         "rank_fraction"), SAME),
    "qr_method": (option("qr_method"), SAME), "rcqr_oversample": (option("rcqr_oversample"), SAME),
    "epsilon": (option("epsilon"), SAME),
    "cqr_warmup": (option("cqr_warmup_steps"), lambda value, file: round(value * file["num_iterations"])),
    "adjust_lr": (option("adjust_lr"), SAME), "nesterov": (option("nesterov"), SAME),
    "muon_beta2": (option("muon_beta2"), SAME), "orthogonalizer": (option("orthogonalizer"), SAME),
    "ns_dtype": (option("ns_dtype"), SAME),
    "ns_coefficients": (option("ns_coefficients"), lambda value, file: tuple(tuple(t) for t in value)),
    "scalar_betas": (lambda c: list(c.optimizer.options["betas"]), SAME),
    "mixed_precision": (lambda c: (c.precision.optimizer_states, c.precision.optimizer_variances),
                        lambda value, file: ("bfloat16", "bfloat16") if value else ("float32", "float32")),
    "replicate_mesh_grad_sync": (lambda c: c.parallel.replicate_mesh_grad_sync, SAME),
}
# Checked on the optimizer's param groups instead (test_param_groups_are_the_references).
GROUP_KEYS = {"scalar_weight_decay", "lm_head_lr_scale"}


def reference_values(name):
    entry = SOURCE["configs"][name]
    return entry["file"], {**entry["file"], **entry["train_py"]}


def load(name, *overrides):
    return build_config(["--config", str(ROOT / "configs" / "reference" / f"{name}.yaml"), "--data_dir", "null",
                         *overrides])


@pytest.mark.parametrize("name", SOURCE["configs"])
def test_reference_config_equals_the_references_values(name):
    file, values = reference_values(name)
    config = load(name)
    unmapped = sorted(set(values) - set(MAPPING) - GROUP_KEYS)
    assert not unmapped, f"reference keys without a mapping: {unmapped}"
    for key, value in values.items():
        if key in GROUP_KEYS:
            continue
        ours, convert = MAPPING[key]
        expected = convert(value, file)
        if key == "data_dir":  # overridden above, as every FineWeb config is in the tests
            expected = None
        assert ours(config) == expected, f"{name}: reference {key}={value!r} -> ours {ours(config)!r}"


@pytest.mark.parametrize("name", SOURCE["configs"])
def test_param_groups_are_the_references(name):
    """init_optimizer's groups: the blocks' matrices at lr and the optimizer's weight decay; embedding and LM head on
    the scalar optimizer at lr (x lm_head_lr_scale), the betas the reference runs (0.9, 0.95), no weight decay; nothing
    else."""
    file, values = reference_values(name)
    config = load(name, "--model_dim", "64", "--n_head", "2", "--n_layer", "2", "--model.vocab_size", "256",
                  "--sequence_length", "32")
    torch.manual_seed(0)
    from models.gpt.model import GPT
    model = GPT(config.model)
    optimizer = build_training_optimizer(model, config, Distributed(0, 1, 0, torch.device("cpu"), 1, 1, 1))
    groups = optimizer.param_groups
    role = {id(model.embed.weight): "embedding", id(model.lm_head.weight): "lm_head"}
    by_role = {}
    for group in groups:
        roles = {role.get(id(p), "matrix") for p in group["params"]}
        assert len(roles) == 1, f"a group mixes {roles}"
        by_role[roles.pop()] = group
    assert set(by_role) == {"matrix", "embedding", "lm_head"}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    matrix = by_role["matrix"]
    assert (matrix["lr"], matrix["weight_decay"]) == (file["lr"], file["weight_decay"])
    for key, scale in (("embedding", 1.0), ("lm_head", values["lm_head_lr_scale"])):
        group = by_role[key]
        assert group.get("algorithm") == file["scalar_opt"], key
        assert group["lr"] == pytest.approx(file["lr"] * scale), key
        assert tuple(group["betas"]) == tuple(values["scalar_betas"]), key
        assert group["weight_decay"] == values["scalar_weight_decay"], key
