"""Precision and memory keys on CPU (precision.autocast / param_dtype / reduce_dtype / optimizer_states,
parallel.activation_checkpointing, model.loss_chunk_tokens), so CI runs the bf16 and memory-saving
paths: bf16 compute tracks float32 within a stated band, the FSDP2 bf16 policy works over gloo and tracks the
single-process bf16 run, and bf16 optimizer states are refused by optimizers that do not have them.

Band: the tiny model's loss starts at ln(50304) = 10.83 with a zero LM head, so 6 steps move it by ~0.14; bf16
rounding of the matmuls (8 mantissa bits) changes it by ~1e-4 here. 2e-3 relative is 20x that and below the loss
movement; a run that ignored the training signal entirely would differ by 1e-2."""
import pytest

from tests.training.helpers import TINY, run_train, torchrun, train_losses
from trainer.config import build_config

STEPS = ["--optimizer", "adamw", "--num_iterations", "6", "--checkpoint_freq", "0"]
BAND = 2e-3


def relative_gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == 6
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def float32_losses(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fp32")
    assert run_train(run_dir, *STEPS, "--precision.autocast", "float32") == 0
    return train_losses(run_dir)


def test_bf16_autocast_on_cpu_tracks_float32(float32_losses, tmp_path):
    assert run_train(tmp_path, *STEPS, "--precision.autocast", "bfloat16") == 0
    gap = relative_gap(train_losses(tmp_path), float32_losses)
    assert 0 < gap < BAND  # bf16 really ran (not identical), and stays in the band


def test_auto_autocast_is_bf16_on_cuda_and_float32_on_cpu():
    import torch
    precision = build_config([]).precision
    assert precision.autocast == "auto"
    assert precision.autocast_dtype("cuda") is torch.bfloat16 and precision.autocast_dtype("cpu") is None


@pytest.mark.slow
def test_fsdp2_bf16_policy_over_gloo_tracks_single_process_bf16(float32_losses, tmp_path):
    assert run_train(tmp_path / "single", *STEPS, "--precision.autocast", "bfloat16") == 0
    result = torchrun(2, *TINY, "--run_dir", str(tmp_path / "fsdp"), *STEPS, "--fs_size", "2",
                      "--device_batch_size", "2", "--precision.param_dtype", "bfloat16",
                      "--precision.reduce_dtype", "float32")
    assert result.returncode == 0, result.stderr[-3000:]
    fsdp = train_losses(tmp_path / "fsdp")
    assert relative_gap(fsdp, train_losses(tmp_path / "single")) < BAND
    assert 0 < relative_gap(fsdp, float32_losses) < BAND


def test_bf16_optimizer_states_need_an_optimizer_that_has_them(tmp_path, capsys):
    assert run_train(tmp_path, *STEPS, "--precision.optimizer_states", "bfloat16") == 2
    assert "precision.optimizer_states: optimizer 'adamw' keeps float32 states" in capsys.readouterr().err
    assert run_train(tmp_path / "dion", "--optimizer", "dion", "--num_iterations", "2", "--checkpoint_freq", "0",
                     "--precision.optimizer_states", "bfloat16") == 0


def test_bad_dtype_names_the_key():
    from trainer.errors import ConfigError
    with pytest.raises(ConfigError, match="precision.param_dtype: 'fp8' is not one of float32, bfloat16"):
        build_config(["--precision.param_dtype", "fp8"])
    with pytest.raises(ConfigError, match="mixed_precision.*precision.param_dtype"):
        build_config(["--mixed_precision", "true"])


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_and_chunked_loss_leave_the_losses_unchanged(mode, float32_losses, tmp_path):
    """Recomputation runs the same float32 ops again: the curve is identical, and so are the checkpoint's names."""
    assert run_train(tmp_path, *STEPS, "--precision.autocast", "float32", "--n_layer", "2",
                     "--parallel.activation_checkpointing", mode, "--model.loss_chunk_tokens", "48") == 0
    assert run_train(tmp_path / "plain", *STEPS, "--precision.autocast", "float32", "--n_layer", "2") == 0
    assert train_losses(tmp_path) == pytest.approx(train_losses(tmp_path / "plain"), rel=1e-6)


@pytest.mark.slow
def test_activation_checkpointing_under_fsdp2_matches_one_process(tmp_path):
    args = [*STEPS, "--n_layer", "2", "--parallel.activation_checkpointing", "full"]
    assert run_train(tmp_path / "single", *args) == 0
    result = torchrun(2, *TINY, "--run_dir", str(tmp_path / "fsdp"), *args, "--fs_size", "2",
                      "--device_batch_size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert train_losses(tmp_path / "fsdp") == pytest.approx(train_losses(tmp_path / "single"), rel=1e-5)
