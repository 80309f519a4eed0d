"""WSDScheduler: closed-form phase values for each decay shape, per-group ratios, peak_lr, CompositeOptimizer,
state-dict resume and option validation."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from optimizers.adamw import AdamW
from optimizers.common.composite import CompositeOptimizer
from optimizers.lion import Lion
from optimizers.schedulers import DecayShape, WSDScheduler, wsd_multiplier


def _optimizer(lrs=(0.02, 0.02 / math.sqrt(768))):
    groups = [dict(params=[torch.zeros(2, requires_grad=True)], lr=lr) for lr in lrs]
    return AdamW(groups, lr=lrs[0])


def _lrs(scheduler, optimizer, steps):
    history = []
    for _ in range(steps):
        history.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return history


def test_linear_phases_closed_form():
    optimizer = _optimizer(lrs=(1.0,))
    scheduler = WSDScheduler(optimizer, warmup_steps=2, stable_steps=3, decay_steps=4)
    got = [lrs[0] for lrs in _lrs(scheduler, optimizer, 11)]
    expected = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("shape, middle", [("linear", 0.5), ("cosine", 0.5), ("sqrt", 1.0 - math.sqrt(0.5))])
def test_decay_shapes_with_min_lr_ratio(shape, middle):
    # Halfway through the decay: r + (1 - r) f(1/2); at and after the end: r.
    r = 0.1
    values = [wsd_multiplier(step, 0, 0, 8, DecayShape(shape), r) for step in (0, 2, 4, 8, 20)]
    quarter = {"linear": 0.75, "cosine": 0.5 * (1 + math.cos(math.pi / 4)), "sqrt": 0.5}[shape]
    assert values == pytest.approx([1.0, r + (1 - r) * quarter, r + (1 - r) * middle, r, r], abs=1e-12)


def test_groups_keep_their_lr_ratio_and_peak_lr_rescales_all():
    optimizer = _optimizer()
    scheduler = WSDScheduler(optimizer, warmup_steps=0, stable_steps=2, decay_steps=2, peak_lr=0.04)
    for matrix_lr, head_lr in _lrs(scheduler, optimizer, 4):
        assert head_lr == pytest.approx(matrix_lr / math.sqrt(768), rel=1e-12)
    assert optimizer.param_groups[0]["initial_lr"] == 0.02
    rescaled = _optimizer()
    WSDScheduler(rescaled, warmup_steps=0, stable_steps=1, decay_steps=1, peak_lr=0.04)
    assert rescaled.param_groups[0]["lr"] == pytest.approx(0.04)
    assert rescaled.param_groups[1]["lr"] == pytest.approx(0.04 / math.sqrt(768))


def test_drives_every_part_of_a_composite_optimizer():
    matrix = AdamW([torch.zeros(2, 2, requires_grad=True)], lr=0.01)
    scalars = Lion([torch.zeros(2, requires_grad=True)], lr=0.001)
    optimizer = CompositeOptimizer([matrix, scalars])
    scheduler = WSDScheduler(optimizer, warmup_steps=4, stable_steps=0, decay_steps=0)
    assert matrix.param_groups[0]["lr"] == pytest.approx(0.0025)
    assert scalars.param_groups[0]["lr"] == pytest.approx(0.00025)
    optimizer.step()
    scheduler.step()
    assert scalars.param_groups[0]["lr"] == pytest.approx(0.0005)


def test_state_dict_round_trip_resumes_the_schedule():
    optimizer = _optimizer()
    scheduler = WSDScheduler(optimizer, warmup_steps=3, stable_steps=2, decay_steps=5, decay_shape="cosine")
    _lrs(scheduler, optimizer, 4)
    saved_optimizer, saved_scheduler = copy.deepcopy(optimizer.state_dict()), scheduler.state_dict()
    expected = _lrs(scheduler, optimizer, 5)

    fresh = _optimizer()
    resumed = WSDScheduler(fresh, warmup_steps=3, stable_steps=2, decay_steps=5, decay_shape="cosine")
    fresh.load_state_dict(saved_optimizer)
    resumed.load_state_dict(saved_scheduler)
    assert _lrs(resumed, fresh, 5) == expected


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="decay_shape must be one of linear, cosine, sqrt"):
        WSDScheduler(_optimizer(), 1, 1, 1, decay_shape="exp")
    with pytest.raises(ValueError, match="min_lr_ratio must lie in"):
        WSDScheduler(_optimizer(), 1, 1, 1, min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="stable_steps must be an integer >= 0"):
        WSDScheduler(_optimizer(), 1, -1, 1)


def test_scheduler_state_survives_a_json_round_trip():
    import json

    import torch

    from optimizers.schedulers import WSDScheduler
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = WSDScheduler(optimizer, 0, 2, 4, decay_shape="linear")
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    restored_optimizer = torch.optim.SGD([param], lr=1.0)
    restored = WSDScheduler(restored_optimizer, 0, 2, 4, decay_shape="linear")
    restored.load_state_dict(json.loads(json.dumps(scheduler.state_dict())))
    for _ in range(3):
        optimizer.step(); scheduler.step()
        restored_optimizer.step(); restored.step()
        assert restored_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
