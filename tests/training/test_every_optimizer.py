"""Every registered optimizer trains through train.py on the embedded corpus and lowers the loss (tiny model,
12 steps; the loss starts at ln(50304) = 10.83 because the LM head is zero-initialized).

The drop asked of each optimizer is 60% of the drop it made on main (REFERENCE_DROPS: first loss minus the mean of
the last three, measured 2026-11-27; the runs are seeded and deterministic). A model whose embedding and blocks get no
gradient, which only fits the LM head, reaches 8-43% of those drops (AdamW 0.42, Dion 0.22, Lion 0.03, Prodigy
0.035), so a broken backward pass or an optimizer that skips parameter groups fails here."""
import pytest

from optimizers.registry import OPTIMIZERS
from tests.training.helpers import run_train, train_losses

LEARNING_RATES = {"lion": 3e-3, "lion_adv": 3e-3, "prodigy": 1.0, "prodigy_adv": 1.0, "prodigy_lion_adv": 1.0,
                  "simplified_ademamix": 1e-3, "sophia": 1e-3, "dion": 0.02, "dion_async": 0.02,
                  "dion_reference": 0.02, "muon": 0.02, "normuon": 0.02, "dion2": 0.02, "nordion2": 0.02,
                  "dion3": 0.02}
# Prodigy's step size grows from d0; start it where 12 steps can show progress.
OPTIONS = {name: ["--optimizer_args.d0", "1e-3"] for name in ("prodigy", "prodigy_adv", "prodigy_lion_adv")}
FUSED_BACKWARD = ["adam_adv", "adopt_adv", "prodigy_adv", "simplified_ademamix", "lion_adv", "prodigy_lion_adv"]


REFERENCE_DROPS = {"adam_adv": 2.665, "adamw": 2.665, "adopt_adv": 1.127, "dion": 0.509, "dion_async": 0.509,
                   "dion_reference": 0.509, "lion": 0.159, "lion_adv": 0.891, "muon": 0.460, "prodigy": 0.113,
                   "prodigy_adv": 0.111, "prodigy_lion_adv": 0.315, "schedule_free_adamw": 2.166, "shampoo": 0.572,
                   "simplified_ademamix": 1.090, "soap": 0.636, "sophia": 0.181,
                   # the orthonormal family, measured after the merge into the component config
                   "normuon": 0.509, "dion2": 0.394, "nordion2": 0.401, "dion3": 0.401}


def drop(losses: list[float]) -> float:
    assert len(losses) == 12
    return losses[0] - sum(losses[-3:]) / 3


def lowers_loss(losses: list[float]) -> bool:
    return drop(losses) > 0.05


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_lowers_the_loss_in_train_py(name, tmp_path):
    lr = LEARNING_RATES.get(name, 0.01)
    assert run_train(tmp_path, "--optimizer", name, "--lr", str(lr), "--num_iterations", "12",
                     "--batch_size", "8", *OPTIONS.get(name, [])) == 0
    losses = train_losses(tmp_path)
    assert drop(losses) > 0.6 * REFERENCE_DROPS[name], losses


@pytest.mark.parametrize("name", FUSED_BACKWARD)
def test_fused_backward_trains_in_train_py(name, tmp_path):
    lr = LEARNING_RATES.get(name, 0.01)
    assert run_train(tmp_path, "--optimizer", name, "--lr", str(lr), "--num_iterations", "12",
                     "--fused_backward", "true", *OPTIONS.get(name, [])) == 0
    assert lowers_loss(train_losses(tmp_path))


def test_fused_backward_with_accumulation_is_a_config_error(tmp_path, capsys):
    code = run_train(tmp_path, "--optimizer", "adam_adv", "--fused_backward", "true", "--batch_size", "8")
    assert code == 2
    assert "fused_backward: needs one micro-batch per step" in capsys.readouterr().err


def test_fused_backward_on_optimizer_without_it_is_a_config_error(tmp_path, capsys):
    assert run_train(tmp_path, "--optimizer", "adamw", "--fused_backward", "true") == 2
    assert "fused_backward: optimizer 'adamw' has no fused backward pass" in capsys.readouterr().err
