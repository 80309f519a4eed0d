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


@pytest.mark.parametrize("num_iterations, warmup_ratio, warmdown_ratio", [(300, 0.0, 0.3), (3000, 0.0, 0.2),
                                                                           (101, 0.05, 0.25), (10, 0.2, 0.3)])
def test_wsd_is_the_references_lambda_schedule(num_iterations, warmup_ratio, warmdown_ratio):
    """microsoft/dion's train.py get_lr (round() of the ratios; linear warmup, constant, linear warmdown)."""
    import torch
    from trainer.config import build_config
    from trainer.schedule import build_scheduler

    def reference(it):
        warmup, warmdown = round(warmup_ratio * num_iterations), round(warmdown_ratio * num_iterations)
        if it < warmup:
            return (it + 1) / warmup
        if it <= num_iterations - warmdown:
            return 1.0
        return (num_iterations - it) / warmdown

    config = build_config(["--num_iterations", str(num_iterations), "--schedule.warmup_ratio", str(warmup_ratio),
                           "--schedule.warmdown_ratio", str(warmdown_ratio)])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    scheduler = build_scheduler(optimizer, config)
    for step in range(num_iterations):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * reference(step)), step
        optimizer.step()
        scheduler.step()
