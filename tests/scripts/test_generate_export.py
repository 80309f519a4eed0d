"""scripts/generate.py and scripts/export_checkpoint.py on a tiny trained run: deterministic sampling, an export that
round-trips to identical logits, checkpoints of a 2-rank FSDP run loading into one process, one-line errors."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import export_checkpoint  # noqa: E402
import generate  # noqa: E402

from tests.training.helpers import TINY, run_train, torchrun  # noqa: E402
from trainer.build import build_model  # noqa: E402
from trainer.config import build_config  # noqa: E402

STEPS = 3


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    assert run_train(run_dir, "--num_iterations", str(STEPS), "--checkpoint_freq", str(STEPS)) == 0
    return run_dir


def probe_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(16).view(1, 16))


def test_generate_with_a_seed_is_deterministic_and_returns_max_new_tokens(trained_run):
    config, model, checkpoint = generate.load_run(trained_run)
    assert checkpoint.name == f"step_{STEPS:08d}"
    prompt = generate.gpt2_encoding().encode_ordinary("To be")
    draw = lambda seed: generate.sample(model, prompt, 12, config.model.sequence_length, config.model.vocab_size,
                                        temperature=1.0, top_k=50, seed=seed)
    first = draw(1)
    assert len(first) == 12 and first == draw(1)
    assert all(0 <= token < 50257 for token in first)
    assert draw(2) != first  # the seed is what makes it repeatable, not a degenerate distribution


def test_sampling_never_draws_the_padding_ids_of_the_embedding():
    def padding_favoured(tokens):  # a model that puts nearly all mass on ids >= 50257 (vocab padded to 50304)
        logits = torch.zeros(1, tokens.size(1), 50304)
        logits[..., 50257:] = 100.0
        return logits

    for temperature in (0.0, 1.0):
        assert max(generate.sample(padding_favoured, [1], 5, 32, 50304, temperature=temperature)) < 50257


def test_top_k_1_is_greedy(trained_run):
    config, model, _ = generate.load_run(trained_run)
    draw = lambda **options: generate.sample(model, [10, 20], 6, config.model.sequence_length,
                                             config.model.vocab_size, **options)
    assert draw(temperature=1.0, top_k=1, seed=5) == draw(temperature=0.0)


def test_generate_loads_the_trained_weights_not_the_initialization(trained_run):
    config, model, _ = generate.load_run(trained_run)
    fresh = build_model(config)
    assert not torch.allclose(probe_logits(model), probe_logits(fresh))


def test_generate_cli_prints_the_model_summary_and_where_the_sample_is(trained_run, capsys):
    assert generate.main(["--run_dir", str(trained_run), "--prompt", "Hello", "--max_new_tokens", "5",
                          "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "parameters = " in out and "embedding" in out and "MFLOPs/token" in out
    written = trained_run / "samples" / f"step_{STEPS:08d}_seed3.txt"
    assert f"sample written to {written}" in out
    assert written.read_text().startswith("Hello")


def test_generate_context_is_cropped_to_the_sequence_length(trained_run):
    config, model, _ = generate.load_run(trained_run)
    long_prompt = list(range(3 * config.model.sequence_length))
    assert len(generate.sample(model, long_prompt, 2, config.model.sequence_length, config.model.vocab_size,
                               temperature=0)) == 2


def copy_config(run_dir: Path, to: Path, *replace: tuple[str, str]) -> None:
    text = (run_dir / "config.yaml").read_text()
    for old, new in replace:
        assert old in text
        text = text.replace(old, new)
    to.mkdir(exist_ok=True)
    (to / "config.yaml").write_text(text)


@pytest.mark.parametrize("case, words", [
    ("no run directory", "has no config.yaml"),
    ("no checkpoint", "no complete checkpoint"),
    ("another model shape", "cannot load into this model"),
])
def test_bad_input_is_one_line_and_exit_2(trained_run, tmp_path, capsys, case, words):
    run_dir = tmp_path / "run"
    arguments = ["--run_dir", str(run_dir)]
    if case == "no checkpoint":
        copy_config(trained_run, run_dir)
    elif case == "another model shape":
        copy_config(trained_run, run_dir, ("n_layer: 1", "n_layer: 2"))
        arguments += ["--checkpoint", str(trained_run / "checkpoints")]
    for main in (generate.main, export_checkpoint.main):
        assert main(arguments) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err


def test_export_round_trips_to_identical_logits(trained_run, tmp_path):
    out = export_checkpoint.export(trained_run, tmp_path / "model.pt")
    config = build_config(["--config", str(export_checkpoint.config_path(out))])
    fresh = build_model(config)
    fresh.load_state_dict(torch.load(out))
    _, trained, _ = generate.load_run(trained_run)
    assert torch.equal(probe_logits(fresh), probe_logits(trained))


def test_export_safetensors(trained_run, tmp_path, capsys, monkeypatch):
    import importlib.util
    if importlib.util.find_spec("safetensors") is None:
        assert export_checkpoint.main(["--run_dir", str(trained_run), "--format", "safetensors"]) == 2
        assert "safetensors package is not installed" in capsys.readouterr().err
        return
    from safetensors.torch import load_file
    out = export_checkpoint.export(trained_run, tmp_path / "model.safetensors", "safetensors")
    fresh = build_model(build_config(["--config", str(export_checkpoint.config_path(out))]))
    fresh.load_state_dict(load_file(str(out)))
    _, trained, _ = generate.load_run(trained_run)
    assert torch.equal(probe_logits(fresh), probe_logits(trained))


@pytest.mark.slow
def test_a_two_rank_fsdp_checkpoint_loads_into_one_process(tmp_path):
    result = torchrun(2, *TINY, "--device_batch_size", "2", "--fs_size", "2", "--run_dir", str(tmp_path),
                      "--num_iterations", "2", "--checkpoint_freq", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    config, model, checkpoint = generate.load_run(tmp_path)
    assert checkpoint.name == "step_00000002"
    assert not torch.allclose(probe_logits(model), probe_logits(build_model(config)))
    out = export_checkpoint.export(tmp_path, tmp_path / "model.pt")
    fresh = build_model(config)
    fresh.load_state_dict(torch.load(out))
    assert torch.equal(probe_logits(fresh), probe_logits(model))


@pytest.mark.slow
def test_a_tensor_parallel_checkpoint_loads_into_one_process_and_generates(tmp_path):
    """TP shards the embedding and LM head on the vocabulary (parallel.vocab_parallel, the default): DCP saves them
    by name as whole tensors, so generate.py's one-process model gets both halves of every vocab-sized table."""
    result = torchrun(2, *TINY, "--device_batch_size", "2", "--tp_size", "2", "--run_dir", str(tmp_path),
                      "--num_iterations", "2", "--checkpoint_freq", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    config, model, checkpoint = generate.load_run(tmp_path)
    assert config.parallel.vocab_parallel and checkpoint.name == "step_00000002"
    initial = build_model(config)
    half = config.model.vocab_size // 2
    for name in ("embed.weight", "lm_head.weight"):  # both TP ranks' rows were trained and saved
        trained, start = model.get_parameter(name), initial.get_parameter(name)
        assert not torch.equal(trained[:half], start[:half]) and not torch.equal(trained[half:], start[half:]), name
    tokens = generate.sample(model, [1, 2, 3], 5, config.model.sequence_length, config.model.vocab_size, seed=0)
    assert len(tokens) == 5
