"""The pieces of trainer/loop.py's Trainer on their own: RunState round trip, when each component is due, the
clipping arithmetic of clip_grad_norm_, the SIGTERM decision (the end-to-end behaviour is in test_train_loop.py and
test_faults.py)."""
import json

import pytest
import torch

from tests.training.helpers import TINY
from trainer.checkpoint import Checkpointer
from trainer.config import build_config
from trainer.distributed import Distributed, clip_grad_norm_
from trainer.loop import RunState, Validator
from trainer.metrics import RunLogger
from trainer.runtime import StopRequest

CPU = Distributed(0, 1, 0, torch.device("cpu"), 1, 1, 1)


def test_run_state_round_trips_through_json_in_the_checkpoint_key_order():
    state = RunState(step=7, tokens=1792, elapsed=1.25, wandb_id="ab12cd34")
    saved = json.loads(json.dumps(state.state_dict()))
    assert list(saved) == ["step", "wandb_id", "elapsed", "tokens"]  # the trainer state train.py always wrote
    restored = RunState()
    restored.load_state_dict({**saved, "loader": {}, "world_size": 1})
    assert restored == state


def test_components_are_due_every_n_steps_and_after_the_last(tmp_path):
    config = build_config([*TINY, "--run_dir", str(tmp_path), "--logging.log_every", "3", "--val_loss_every", "4",
                           "--checkpoint_freq", "5"])
    logger = RunLogger(config, False, 0, None)
    validator = Validator(config, CPU, [], 4, None)
    checkpointer = Checkpointer(config, CPU)
    steps = range(1, 12)
    assert [s for s in steps if logger.due(s, s == 11)] == [3, 6, 9, 11]
    assert [s for s in steps if validator.due(s, s == 11)] == [4, 8, 11]
    assert [s for s in steps if checkpointer.due(s, s == 11)] == [5, 10, 11]
    assert validator.due(0, last=False)  # the initial weights


def test_components_switched_off_are_never_due(tmp_path):
    config = build_config([*TINY, "--run_dir", str(tmp_path), "--val_loss_every", "0", "--checkpoint_freq", "0"])
    assert not any(Validator(config, CPU, [], 4, None).due(s, True) for s in range(3))
    assert not any(Checkpointer(config, CPU).due(s, True) for s in range(3))


def test_clip_grad_norm_returns_the_norm_and_scales_only_gradients_above_max_norm():
    params = [torch.nn.Parameter(torch.zeros(size)) for size in (2, 1, 1)]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # norm 5; the third has none
    assert clip_grad_norm_(params, 10.0).item() == pytest.approx(5.0)
    assert params[0].grad.tolist() == [3.0, 0.0]  # below max_norm: untouched (the factor is clamped to 1)
    assert clip_grad_norm_(params, 0.0).item() == pytest.approx(5.0)  # 0 measures only
    assert clip_grad_norm_(params, 1.0).item() == pytest.approx(5.0)  # the norm before clipping
    factor = 1.0 / (5.0 + 1e-6)
    assert params[0].grad.tolist() == pytest.approx([3.0 * factor, 0.0], rel=1e-6)
    assert params[1].grad.item() == pytest.approx(4.0 * factor, rel=1e-6)
    assert params[2].grad is None
    assert clip_grad_norm_(params, 0.0).item() == pytest.approx(1.0, rel=1e-5)


def test_stop_request_checks_on_sync_steps_and_every_check_every_steps():
    every = StopRequest.CHECK_EVERY
    assert [s for s in range(1, 2 * every + 1) if StopRequest.checked_at(s, syncs=False)] == [every, 2 * every]
    assert StopRequest.checked_at(3, syncs=True)


def test_stop_request_saves_only_when_the_last_save_fits_and_says_why_not():
    stop = StopRequest(grace_seconds=30.0)
    try:
        stop._on_signal(None, None)
        assert stop.due(torch.device("cpu"), 1)
        assert stop.leaves_time_for(None) and stop.leaves_time_for(1.0) and not stop.leaves_time_for(60.0)
        saved = str(stop.stopped(12, True, "runs/x/checkpoints", 5, 1.0))
        assert saved.startswith("stopped by SIGTERM after step 12: checkpoint saved in runs/x/checkpoints")
        late = str(stop.stopped(12, False, "runs/x/checkpoints", 5, 60.0))
        assert "no time within checkpoint.sigterm_grace_seconds=30.0 (the last save took 60 s)" in late
        assert "checkpoint.freq is 0" in str(stop.stopped(12, False, "runs/x/checkpoints", 0, None))
    finally:
        stop.restore()
