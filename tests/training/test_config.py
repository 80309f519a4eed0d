"""The config by component: sections, dotted overrides, short aliases, per-optimizer options and defaults, and bad
input as one line naming the key and what is allowed (exit status 2, no traceback, before any work)."""
import re
import subprocess
import sys

import pytest

from tests.training.helpers import ROOT
from trainer.config import TrainConfig, build_config, load_yaml, parse_cli_overrides
from trainer.errors import ConfigError


def test_default_config_loads_into_component_sections():
    config = build_config([])
    assert isinstance(config, TrainConfig)
    assert config.data.dir is None  # the embedded corpus
    assert (config.model_name, config.model.n_layer, config.optimizer.name) == ("gpt", 4, "dion")
    assert config.optimizer.options["rank_fraction"] == 0.5  # from configs/default.yaml
    assert config.optimizer.options["power_iters"] == 1  # Dion's own default, spelled out


def test_dotted_overrides_and_short_aliases_reach_the_same_keys():
    dotted = build_config(["--optimizer.name", "lion", "--schedule.num_iterations", "7", "--optimizer.lr", "3e-4",
                           "--compile", "true", "--optimizer.betas", "0.8,0.9", "--model.n_layer", "3"])
    aliases = build_config(["--optimizer", "lion", "--num_iterations", "7", "--lr", "3e-4", "--compile", "true",
                            "--optimizer.betas", "0.8,0.9", "--n_layer", "3"])
    assert dotted == aliases
    assert (aliases.optimizer.name, aliases.schedule.num_iterations, aliases.optimizer.lr, aliases.compile) == \
        ("lion", 7, 3e-4, True)
    assert aliases.optimizer.options["betas"] == (0.8, 0.9) and aliases.model.n_layer == 3
    assert build_config(["--compile", "false"]).compile is False
    assert build_config(["--compile=True"]).compile is True


def test_optimizer_args_alias_and_mapping_values_set_options():
    config = build_config(["--optimizer_args.power_iters", "2", "--optimizer_args", "{qr_method: qr}",
                           "--rank_fraction", "0.25"])
    assert (config.optimizer.options["power_iters"], config.optimizer.options["qr_method"],
            config.optimizer.options["rank_fraction"]) == (2, "qr", 0.25)


def test_switching_optimizer_on_the_command_line_starts_from_its_own_defaults():
    """configs/default.yaml sets Dion's lr 0.02 and rank_fraction; prodigy must get lr 1.0 and no Dion keys."""
    prodigy = build_config(["--optimizer", "prodigy"])
    assert prodigy.optimizer.lr == 1.0 and "rank_fraction" not in prodigy.optimizer.options
    adamw = build_config(["--optimizer", "adamw", "--lr", "0.001"])
    assert adamw.optimizer.lr == 0.001 and adamw.optimizer.options["weight_decay"] == 0.1
    same = build_config(["--optimizer", "dion"])  # naming the file's own optimizer keeps the file's settings
    assert same.optimizer.options["rank_fraction"] == 0.5


def test_resolved_config_round_trips_through_yaml(tmp_path):
    import yaml
    config = build_config(["--optimizer", "muon", "--optimizer.adjust_lr", "rms_norm", "--fs_size", "2"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    again = build_config(["--config", str(path)])
    assert again == config and again.optimizer.options == config.optimizer.options


@pytest.mark.parametrize("argv, words", [
    (["--lrr", "0.1"], ["lrr", "did you mean 'lr'"]),
    (["--num_iterations", "ten"], ["schedule.num_iterations", "integer"]),
    (["--lr", "true"], ["optimizer.lr", "number"]),
    (["--compile", "maybe"], ["compile", "true/false"]),
    (["--optimizer", "sgdx"], ["optimizer.name", "sgdx", "adamw"]),
    (["--scalar_opt", "sgd"], ["optimizer.scalar.name", "adamw", "lion"]),
    (["--schedule.name", "step"], ["schedule.name", "wsd", "cosine"]),
    (["--schedule.warmup_ratio", "0.9", "--schedule.warmdown_ratio", "0.5"], ["warmup_ratio + "]),
    (["--model_dim", "100", "--n_head", "3"], ["model", "model_dim", "n_head"]),
    (["--data_dir", "/nonexistent/dir"], ["data.dir", "/nonexistent/dir"]),
    (["--optimizer.betas", "0.9"], ["optimizer.betas", "2 numbers"]),
    (["--config", "configs/missing.yaml"], ["configs/missing.yaml", "not found"]),
    (["--lr"], ["--lr", "missing value"]),
    (["--optimizer", "adamw", "--rank_fraction", "0.25"], ["rank_fraction", "'adamw'", "eps"]),
    (["--optimizer_args.bogus", "1"], ["bogus", "'dion'", "rank_fraction"]),
    (["--qr_method", "qr"], ["qr_method", "optimizer.qr_method"]),
    (["--no_wandb", "true"], ["no_wandb", "logging.wandb"]),
    (["--schedule", "cosine"], ["schedule", "schedule.name"]),
    (["--optimizer.qr_method", "svd"], ["qr_method", "qr", "rcqr"]),
    (["--model.preset", "13b"], ["model.preset", "160m", "7b"]),
    (["--checkpoint.keep", "0"], ["checkpoint.keep", "positive"]),
    (["--optimizer.rcqr_oversample", "inf"], ["rcqr_oversample=inf", "finite float >= 1"]),
    (["--optimizer.epsilon", "inf"], ["epsilon=inf", "finite float >= 0"]),
    (["--optimizer.mu", "1.0"], ["mu=1.0", "[0, 1)"]),
    (["--optimizer_args.factored", "true"], ["factored", "'dion'"]),
    (["--parallel.fsdp_gradient_accumulation", "lazy"], ["fsdp_gradient_accumulation", "'lazy'", "sharded"]),
    (["--parallel.meta_init", "sometimes"], ["meta_init", "true/false"]),
])
def test_bad_config_raises_one_line_naming_the_key(argv, words):
    with pytest.raises(ConfigError) as error:
        config = build_config(argv)
        from trainer.build import build_training_optimizer  # option values are checked by the optimizer itself
        from trainer.build import build_model
        from trainer.distributed import Distributed
        model = build_model(config)
        build_training_optimizer(model, config, Distributed(0, 1, 0, model.embed.weight.device, 1, 1, 1))
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  model_dimm: 64\n")
    with pytest.raises(ConfigError, match=r"model: unknown key 'model_dimm'.*model_dim"):
        build_config(["--config", str(path)])


def test_old_flat_yaml_names_the_new_spelling(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("model_dim: 64\n")
    with pytest.raises(ConfigError, match=r"old.yaml: key 'model_dim' moved to model.model_dim"):
        load_yaml(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optimizer:\n  betas: [0.9,\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        build_config(["--config", str(path)])


def test_model_preset_fills_the_section_and_fields_override_it():
    config = build_config(["--model.preset", "160m", "--model.n_layer", "2"])
    assert (config.model.model_dim, config.model.n_layer) == (768, 2)


def test_parse_cli_builds_a_nested_tree():
    path, tree = parse_cli_overrides(["--config", "x.yaml", "--lr", "0.1", "--optimizer.scalar.lr", "0.01",
                                      "--fs_size", "2"])
    assert str(path) == "x.yaml"
    assert tree == {"optimizer": {"lr": 0.1, "scalar": {"lr": 0.01}}, "parallel": {"fs_size": 2}}


@pytest.mark.parametrize("argv, key", [
    (["--batch_size", "10", "--device_batch_size", "4"], "batch_size"),
    (["--bogus", "1"], "bogus"),
    (["--dp_size", "2"], "dp_size"),  # product 2 != 1 process, found before any work
    (["--optimizer_args.bogus", "1"], "bogus"),
    (["--optimizer", "soap", "--tp_size", "1", "--optimizer.precondition_frequency", "0"], "precondition_frequency"),
])
def test_cli_exits_2_with_one_line_and_no_traceback(argv, key, tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--run_dir", str(tmp_path / "run"), *argv], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def test_help_shows_effective_defaults_meanings_and_optimizers():
    result = subprocess.run([sys.executable, "train.py", "--config", "configs/shampoo_small.yaml", "--help"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "  n_layer: 2 " in out  # the chosen config's value, not a dataclass default
    assert "  precondition_frequency: 10 " in out and "  name: shampoo " in out
    assert "# transformer blocks" in out and "replicate_mesh_grad_sync" in out
    for name in ("dion", "adamw", "sophia", "prodigy"):
        assert f"\n  {name} " in out


@pytest.mark.parametrize("args, key", [
    (["--optimizer", "soap", "--fs_size", "2"], "parallel.fs_size"),  # a layout the optimizer refuses
    (["--optimizer", "adamw", "--optimizer.bogus", "1"], "bogus"),
])
def test_torchrun_user_error_prints_one_line_once_and_every_rank_exits_2(args, key, tmp_path):
    from tests.training.helpers import TINY, torchrun
    result = torchrun(2, *TINY, "--run_dir", str(tmp_path / "run"), *args)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and key in errors[0], result.stderr[-3000:]
    # No traceback of ours (torchrun adds its own failure report below the line). Every rank exits with 2, unless
    # torchrun stopped it first (SIGTERM) after the other one's exit: none fails any other way.
    assert "train.py\", line" not in result.stderr and "trainer/" not in result.stderr
    codes = re.findall(r"exitcode\s*: (-?\d+)", result.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, result.stderr[-3000:]
