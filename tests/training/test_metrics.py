"""The per-group hyperparameter table printed at start (trainer.metrics.describe_param_groups): every parameter in
exactly one row, each row's values the ones the optimizer runs with."""
from __future__ import annotations

import math
import re

import pytest

from tests.training.helpers import run_train
from trainer.build import build_model, build_training_optimizer
from trainer.config import build_config
from trainer.distributed import init_distributed
from trainer.metrics import describe_param_groups
from trainer.schedule import build_scheduler

SMALL = ["--data.dir", "null", "--model.model_dim", "64", "--model.n_layer", "2", "--model.n_head", "2",
         "--model.vocab_size", "512"]


def table(text: str) -> tuple[list[dict], str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("param groups"))
    header = lines[start + 1].split()
    rows, index = [], start + 2
    while lines[index].startswith("  "):
        rows.append(dict(zip(header, re.split(r"\s{2,}", lines[index].strip()))))
        index += 1
    return rows, lines[index]


def built(args: list[str]):
    config = build_config(args)
    model = build_model(config)
    optimizer = build_training_optimizer(model, config, init_distributed(config))
    return config, model, optimizer, build_scheduler(optimizer, config)


def test_run_prints_every_parameter_once_with_its_lr_and_momentum(tmp_path, capsys):
    assert run_train(tmp_path, "--optimizer", "dion", "--num_iterations", "10", "--schedule.warmup_ratio", "0.25",
                     "--schedule.warmdown_ratio", "0.35", "--lr", "0.03") == 0
    rows, schedule = table(capsys.readouterr().out)
    by_role = {row["role"]: row for row in rows}
    assert set(by_role) == {"matrix", "vector", "embedding", "lm_head"}
    assert by_role["matrix"]["algorithm"] == "dion" and by_role["matrix"]["momentum"] == "mu 0.95"
    assert float(by_role["matrix"]["weight_decay"]) == 0.01
    assert by_role["embedding"]["algorithm"] == "lion" and by_role["embedding"]["momentum"] == "betas 0.9, 0.95"
    assert float(by_role["embedding"]["lr"]) == 0.03
    assert float(by_role["lm_head"]["lr"]) == pytest.approx(0.03 / math.sqrt(32), rel=1e-5)  # Lion's head scaling
    assert float(by_role["lm_head"]["weight_decay"]) == 0
    config, model, _, _ = built(["--model_dim", "32", "--n_layer", "1", "--n_head", "2", "--sequence_length", "32"])
    assert sum(int(row["tensors"]) for row in rows) == len(list(model.parameters()))
    assert sum(int(row["params"].replace(",", "")) for row in rows) == sum(p.numel() for p in model.parameters())
    # round(0.25 x 10) = 2 (from lr/2), round(0.35 x 10) = 4 (the reference rounds; int() would give 3)
    assert schedule == "schedule: 10 steps = warmup 2 (linear, from lr/warmup) + stable 4 + decay 4 (linear, to 0 x lr)"


def test_reference_muon_config_shows_adamw_scalars_at_the_betas_the_reference_runs():
    config, model, optimizer, scheduler = built(["--config", "configs/reference/muon_160m.yaml", *SMALL])
    rows, schedule = table(describe_param_groups(optimizer, model.param_groups(), scheduler, config.optimizer.name))
    assert [(r["role"], r["algorithm"], r["momentum"], r["lr"], r["weight_decay"]) for r in rows] == [
        ("matrix", "muon", "mu 0.95", "0.02", "0.01"),
        ("embedding", "adamw", "betas 0.9, 0.95", "0.02", "0"),
        ("lm_head", "adamw", "betas 0.9, 0.95", "0.02", "0")]
    assert schedule == "schedule: 3000 steps = stable 2400 + decay 600 (linear, to 0 x lr)"


def test_composite_optimizer_names_the_part_that_runs_each_group():
    config, model, optimizer, scheduler = built(["--optimizer", "soap", "--optimizer.scalar.name", "adamw", *SMALL])
    rows, _ = table(describe_param_groups(optimizer, model.param_groups(), scheduler, config.optimizer.name))
    assert [(r["role"], r["algorithm"]) for r in rows] == [("matrix", "soap"), ("vector", "adamw"),
                                                           ("embedding", "adamw"), ("lm_head", "adamw")]
    assert rows[0]["momentum"].startswith("betas ")
