import pytest
import torch

from trainer.config import build_config
from trainer.schedule import build_scheduler


def lrs_for(schedule: str, base_lrs=(1.0, 0.25)) -> list[list[float]]:
    config = build_config(["--schedule.name", schedule, "--num_iterations", "10", "--schedule.warmup_ratio", "0.2",
                           "--schedule.warmdown_ratio", "0.3"])
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in base_lrs]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, base_lrs)])
    scheduler = build_scheduler(optimizer, config)
    out = []
    for _ in range(10):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("schedule, expected", [
    ("wsd", [0.5, 1, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3]),
    ("constant", [0.5, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
    ("cosine", [0.5, 1, 1, 0.9619, 0.8536, 0.6913, 0.5, 0.3087, 0.1464, 0.0381]),
])
def test_schedule_multipliers_scale_every_group_by_its_own_lr(schedule, expected):
    lrs = lrs_for(schedule)
    assert [g[0] for g in lrs] == pytest.approx(expected, abs=1e-4)
    assert [g[1] for g in lrs] == pytest.approx([0.25 * e for e in expected], abs=1e-4)
