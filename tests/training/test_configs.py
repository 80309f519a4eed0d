"""Every shipped config validates (the FineWeb ones with data_dir overridden, since shards are downloaded on
demand) and the 160M presets describe the paper's model."""
from pathlib import Path

import pytest

from tests.training.helpers import ROOT
from trainer.config import build_config

# *_runs.yaml files are run tables for scripts/compare_optimizers.py, not train.py configs.
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not p.name.endswith("_runs.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_validates(path: Path):
    config = build_config(["--config", str(path), "--data_dir", "null"])
    if "160m" in path.name:
        assert (config.model_dim, config.n_layer, config.n_head, config.sequence_length, config.vocab_size) == \
            (768, 12, 6, 1024, 50304)


def test_dion_configs_select_the_documented_settings():
    dion = build_config(["--config", "configs/dion_160m.yaml", "--data_dir", "null"])
    assert (dion.optimizer, dion.rank_fraction, dion.qr_method, dion.replicate_mesh_grad_sync,
            dion.mixed_precision) == ("dion", 0.5, "rcqr", True, True)
    efficient = build_config(["--config", "configs/dion_efficient_160m.yaml", "--data_dir", "null"])
    assert (efficient.qr_method, efficient.cqr_warmup_steps) == ("cqr", 150)
    assert build_config([]).optimizer == "dion"
