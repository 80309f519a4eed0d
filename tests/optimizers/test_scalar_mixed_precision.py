"""The mixed-precision path of the scalar updates (optimizers/common/scalar_updates.py): float32 parameters with bfloat16
states, as Dion uses for embeddings, norm gains and the LM head when mixed_precision is on (the 160M configs).

Two checks over several steps with changing gradients:
- exact twin: the mixed path equals the float32 update with its states rounded to bfloat16 after every step (the
  arithmetic is float32 in both; only the storage differs), to float32 round-off;
- band: the bfloat16-state run stays within 0.8% of the parameters' movement (L1) from the float32-state run
  (observed: AdamW 0.17%, Lion 0: bf16 keeps 8 bits, ~0.4% per stored value, which mostly averages out). A wrong
  beta moves AdamW by 2.7-6.6% (beta2 0.999 or 0.9 for 0.95, beta1 0.95 for 0.9) and Lion by 18%, a dropped weight
  decay by 12%, a dropped bias correction by more.
"""
from __future__ import annotations

import pytest
import torch

from optimizers.common.scalar_updates import adamw_update, lion_update

SHAPES = [(33, 17), (64,), (5, 7, 3)]
STEPS = 8
ADAMW = dict(lr=0.01, beta1=0.9, beta2=0.95, weight_decay=0.1, epsilon=1e-8)
LION = dict(lr=0.003, beta1=0.9, beta2=0.99, weight_decay=0.1)


def gradients(step: int) -> list[torch.Tensor]:
    """A persistent direction plus noise, halving each step: the moments then lag the gradient by an amount that
    depends on the betas, so a wrong beta shows (with gradients of constant size AdamW's update barely sees beta2)."""
    generator = torch.Generator().manual_seed(100 + step)
    base = torch.Generator().manual_seed(7)
    return [0.5 ** step * (0.5 * torch.randn(s, generator=base) + torch.randn(s, generator=generator))
            for s in SHAPES]


def initial() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=generator) for s in SHAPES]


def run(algorithm: str, state_dtype: torch.dtype, round_states: bool = False) -> list[torch.Tensor]:
    """Parameters (float32) after STEPS updates with states stored in state_dtype; round_states: float32 states
    rounded to bfloat16 after each step (the reference for the mixed path)."""
    params = initial()
    states = [[torch.zeros(s, dtype=state_dtype) for s in SHAPES] for _ in range(2 if algorithm == "adamw" else 1)]
    for step in range(1, STEPS + 1):
        grads = gradients(step)
        if algorithm == "adamw":
            adamw_update(params, grads, *states, step=step, **ADAMW)
        else:
            lion_update(params, grads, *states, **LION)
        if round_states:
            for state in states:
                for t in state:
                    t.copy_(t.bfloat16().float())
    return params


def relative_to_movement(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """max over tensors of sum |got - expected| / sum |expected - initial| (L1: Lion moves every entry by +-lr, so
    a single rounding-flipped sign would dominate a max norm)."""
    return max(((g - e).abs().sum() / (e - p0).abs().sum()).item() for g, e, p0 in zip(got, expected, initial()))


@pytest.mark.parametrize("algorithm", ["adamw", "lion"])
def test_bf16_state_path_equals_float32_arithmetic_with_states_rounded_each_step(algorithm):
    mixed = run(algorithm, torch.bfloat16)
    twin = run(algorithm, torch.float32, round_states=True)
    assert relative_to_movement(mixed, twin) < 1e-5


@pytest.mark.parametrize("algorithm", ["adamw", "lion"])
def test_bf16_states_track_float32_states_within_bf16_precision(algorithm):
    mixed, full = run(algorithm, torch.bfloat16), run(algorithm, torch.float32)
    assert relative_to_movement(mixed, full) < 0.008


def test_bf16_adamw_moves_like_bias_corrected_adam_at_step_one():
    # Step 1 of bias-corrected Adam moves every entry by lr * sign(g) (|m_hat| = sqrt(v_hat) = |g|), plus decay.
    params, grads = initial(), gradients(1)
    states = [[torch.zeros(s, dtype=torch.bfloat16) for s in SHAPES] for _ in range(2)]
    before = [p.clone() for p in params]
    adamw_update(params, grads, *states, step=1, **ADAMW)
    for p, p0, g in zip(params, before, grads):
        expected = p0 * (1 - ADAMW["lr"] * ADAMW["weight_decay"]) - ADAMW["lr"] * g.sign()
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-5)  # eps and round-off; lr = 0.01
