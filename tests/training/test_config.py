"""Bad input: one line naming the key and what is allowed, exit status 2, no traceback, before any work."""
import subprocess
import sys

import pytest

from tests.training.helpers import ROOT
from trainer.config import ConfigError, TrainConfig, build_config, parse_cli_overrides


def test_default_config_loads_and_matches_documented_keys():
    config = build_config([])
    assert isinstance(config, TrainConfig)
    assert config.data_dir is None  # the embedded corpus


def test_cli_overrides_take_yaml_scalars_and_booleans_both_ways():
    config = build_config(["--optimizer", "lion", "--num_iterations", "7", "--lr", "3e-4", "--compile", "true",
                           "--betas", "0.8,0.9", "--optimizer_args.foo", "1"])
    assert (config.optimizer, config.num_iterations, config.lr, config.compile) == ("lion", 7, 3e-4, True)
    assert config.betas == (0.8, 0.9) and config.optimizer_args == {"foo": 1}
    assert build_config(["--compile", "false"]).compile is False
    assert build_config(["--compile=True"]).compile is True


@pytest.mark.parametrize("argv, words", [
    (["--lrr", "0.1"], ["lrr", "did you mean 'lr'"]),
    (["--num_iterations", "ten"], ["num_iterations", "integer"]),
    (["--lr", "true"], ["lr", "number"]),
    (["--compile", "maybe"], ["compile", "true/false"]),
    (["--batch_size", "10", "--device_batch_size", "4"], ["batch_size", "divisible", "device_batch_size"]),
    (["--optimizer", "sgdx"], ["optimizer", "sgdx", "registered", "adamw"]),
    (["--scalar_opt", "sgd"], ["scalar_opt", "adamw", "lion"]),
    (["--schedule", "step"], ["schedule", "wsd", "cosine"]),
    (["--warmup_ratio", "0.9", "--warmdown_ratio", "0.5"], ["warmup_ratio + warmdown_ratio"]),
    (["--model_dim", "100", "--n_head", "3"], ["model_dim", "n_head"]),
    (["--tp_size", "3", "--n_head", "4"], ["tp_size", "n_head"]),
    (["--data_dir", "/nonexistent/dir"], ["data_dir", "/nonexistent/dir"]),
    (["--betas", "0.9"], ["betas", "two numbers"]),
    (["--config", "configs/missing.yaml"], ["configs/missing.yaml", "not found"]),
    (["--lr"], ["--lr", "missing value"]),
])
def test_bad_config_raises_one_line_naming_the_key(argv, words):
    with pytest.raises(ConfigError) as error:
        build_config(argv)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: 0.1\nmodel_dimm: 64\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'model_dimm'.*model_dim"):
        build_config(["--config", str(path)])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("lr: 0.1\nbetas: [0.9,\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        build_config(["--config", str(path)])


def test_dotted_override_only_for_mappings():
    with pytest.raises(ConfigError, match="only mapping keys"):
        parse_cli_overrides(["--lr.x", "1"])


@pytest.mark.parametrize("argv, key", [
    (["--batch_size", "10", "--device_batch_size", "4"], "batch_size"),
    (["--bogus", "1"], "bogus"),
    (["--dp_size", "2"], "dp_size"),  # product 2 != 1 process, found before any work
])
def test_cli_exits_2_with_one_line_and_no_traceback(argv, key, tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--run_dir", str(tmp_path / "run"), *argv], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def test_help_lists_every_key():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    for key in ("--model_dim", "--replicate_mesh_grad_sync", "--optimizer_args", "--val_loss_every"):
        assert key in result.stdout
