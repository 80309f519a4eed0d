"""Every shipped config validates (the FineWeb ones with data.dir overridden, since shards are downloaded on
demand), every run table of the comparison script validates against its base, and the 160M presets describe the
paper's model."""
from pathlib import Path

import pytest

from tests.training.helpers import ROOT
from trainer.config import build_config

# *_runs.yaml files are run tables for scripts/compare_optimizers.py, and reference/SOURCE.yaml the reference's
# values (tests/training/test_reference_configs.py), not train.py configs.
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                 if not p.name.endswith("_runs.yaml") and p.name != "SOURCE.yaml")
RUN_TABLES = {"small_runs.yaml": "compare/small.yaml", "sweep_runs.yaml": "compare/small.yaml",
              "160m_runs.yaml": "dion_160m.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_validates(path: Path):
    config = build_config(["--config", str(path), "--data_dir", "null"])
    if "160m" in path.name:
        m = config.model
        assert (m.model_dim, m.n_layer, m.n_head, m.sequence_length, m.vocab_size) == (768, 12, 6, 1024, 50304)


@pytest.mark.parametrize("table", RUN_TABLES)
def test_every_comparison_run_validates(table):
    from scripts.compare_optimizers import load_runs, override_arguments
    runs = load_runs(ROOT / "configs" / "compare" / table)
    base = ROOT / "configs" / RUN_TABLES[table]
    for name, overrides in runs.items():
        overrides = {k: v for k, v in overrides.items() if k != "_group"}
        config = build_config(["--config", str(base), "--data_dir", "null", *override_arguments(overrides)])
        assert config.optimizer.name == overrides["optimizer"]["name"], name
        assert config.seed == overrides.get("seed", 0) and config.optimizer.lr == overrides["optimizer"].get(
            "lr", config.optimizer.lr), name


def test_dion_configs_select_the_documented_settings():
    dion = build_config(["--config", "configs/dion_160m.yaml", "--data_dir", "null"])
    options = dion.optimizer.options
    assert (dion.optimizer.name, options["rank_fraction"], options["qr_method"], dion.parallel.replicate_mesh_grad_sync,
            dion.precision.param_dtype, dion.precision.optimizer_states) == ("dion", 0.5, "rcqr", True, "bfloat16",
                                                                             "bfloat16")
    efficient = build_config(["--config", "configs/dion_efficient_160m.yaml", "--data_dir", "null"])
    assert (efficient.optimizer.options["qr_method"], efficient.optimizer.options["cqr_warmup_steps"]) == ("cqr", 150)
    assert build_config([]).optimizer.name == "dion"
