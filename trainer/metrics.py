"""Run directory outputs: `config.yaml` (the resolved config), `metrics.jsonl` (one JSON record per logged step:
step, train_loss, val_loss when computed, lr, tokens, time, grad_norm, tokens_per_second, tflops, mfu), and wandb
when enabled. Only rank 0 writes. Also what goes into a record or beside it: the training speed and MFU
(`Throughput`, against `peak_tflops`), the divergence warning, and the start-of-run param-group table."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from trainer.config import TrainConfig


class RunLogger:
    def __init__(self, config: TrainConfig, enabled: bool, resume_step: int, wandb_id: str | None):
        """wandb_id: the run id, the same on every rank (it is stored in checkpoints so a resumed run continues
        the same wandb run)."""
        self.enabled = enabled
        self.log_every = config.logging.log_every
        self.run_dir = Path(config.logging.run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        self._truncate_after(resume_step)
        if config.logging.wandb:
            import wandb
            self.wandb_run = wandb.init(project=config.logging.wandb_project, name=config.logging.wandb_job_name,
                                        id=self.wandb_id, resume="allow", config=config.to_dict(),
                                        dir=str(self.run_dir))

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites history after its checkpoint: drop records a crashed run logged past it (a run
        that starts over at step 0 drops them all, so its step-0 validation is not recorded twice)."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and 0 < json.loads(line)["step"] <= step]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)

    def due(self, step: int, last: bool) -> bool:
        """Whether step `step` (counted from 1) is logged, on every rank: every logging.log_every steps and the
        last one. Logged steps are the loop's host syncs."""
        return step % self.log_every == 0 or last

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


# Dense bf16 peak TFLOP/s per GPU (vendor datasheets, without sparsity), matched in order against torch's device name
# (the PCIe H100 before the SXM one, whose name carries no form factor).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0,
                    "L4": 121.0}


def peak_tflops(device) -> tuple[float | None, str]:
    """(peak TFLOP/s of one device, where it comes from): a known GPU's dense bf16 datasheet peak; on a CPU the
    float32 matmul rate measured now (`measured_matmul_tflops`); None for unlisted GPUs (MFU is then not logged)."""
    import torch
    if device.type == "cpu":
        return measured_matmul_tflops(device), "float32 matmul measured at start"
    if device.type != "cuda":
        return None, "unknown device"
    name = torch.cuda.get_device_name(device)
    peak = next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)
    return peak, (f"{name} dense bf16 datasheet peak" if peak is not None else f"{name}: no known peak")


def measured_matmul_tflops(device, size: int = 512, seconds: float = 0.1) -> float:
    """The best rate of square float32 matmuls over about `seconds` (a few warm-up calls first): the ceiling a CPU
    run is measured against. On a shared machine it varies with the load, as the run's own speed does."""
    import torch
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    for _ in range(2):
        torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size ** 3 / (time.perf_counter() - started) / 1e12)
    return best


class Throughput:
    """Training speed over a window of steps (those since the last logged step; validation and saves fall outside
    it): tokens/s, TFLOP/s of all ranks together, and MFU against `peak` TFLOP/s per device (None: not logged)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float | None, world_size: int):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak, self.world_size = peak, world_size
        self.restart()

    def restart(self) -> None:
        self.started, self.steps = time.perf_counter(), 0

    def step(self) -> None:
        self.steps += 1

    def seconds(self) -> float:
        """Wall time of the window so far (the caller has synchronized the device)."""
        return time.perf_counter() - self.started

    def rates(self, seconds: float) -> dict[str, float]:
        """tokens_per_second, tflops and (with a known peak) mfu of the window's steps, rounded as logged."""
        rates = dict(tokens_per_second=round(self.steps * self.tokens_per_step / seconds, 1))
        rates["tflops"] = round(rates["tokens_per_second"] * self.flops_per_token / 1e12, 4)
        if self.peak is not None:
            rates["mfu"] = round(rates["tflops"] / (self.peak * self.world_size), 4)
        return rates


DIVERGENCE_MARGIN = 1.0  # nats above the first logged training loss that a run must not reach


class DivergenceWarning:
    """One warning on stderr (when `enabled`: rank 0) the first time a logged training loss is DIVERGENCE_MARGIN
    nats above the first logged one, naming the configured optimizer.lr to lower."""

    def __init__(self, config: TrainConfig, enabled: bool):
        self.config, self.enabled = config, enabled
        self.first_loss: float | None = None
        self.warned = False

    def check(self, loss: float, step: int) -> None:
        self.first_loss = loss if self.first_loss is None else self.first_loss
        if loss > self.first_loss + DIVERGENCE_MARGIN and not self.warned and self.enabled:
            self.warned = True
            print(f"warning: training loss {loss:.3f} at step {step} is far above the first logged "
                  f"{self.first_loss:.3f}: the run is diverging; lower optimizer.lr (now {self.config.optimizer.lr:g})",
                  file=sys.stderr)


BETAS_ALGORITHMS = ("adamw", "lion")  # scalar algorithms whose momentum is `betas` (a Dion group also carries `mu`)


def describe_param_groups(optimizer, roles: dict[str, list], scheduler, optimizer_name: str) -> str:
    """The hyperparameters of every param group, as the run uses them, and the LR schedule: a table to check a run
    against a paper in one look. roles: the model's `param_groups()` (matrix / embedding / lm_head / vector);
    scheduler: a WSDScheduler. Groups without an `algorithm` key run the optimizer's own rule (`optimizer_name`, or
    the class of the part of a CompositeOptimizer that holds them)."""
    role_of = {id(p): role for role, params in roles.items() for p in params}
    parts = getattr(optimizer, "optimizers", [optimizer])
    owner = {id(group): (optimizer_name if index == 0 else type(part).__name__.lower())
             for index, part in enumerate(parts) for group in part.param_groups}
    header = ("group", "role", "algorithm", "tensors", "params", "lr", "momentum", "weight_decay")
    rows = []
    for index, group in enumerate(optimizer.param_groups):
        params = group["params"]
        role = "+".join(dict.fromkeys(role_of.get(id(p), "other") for p in params)) or "empty"
        algorithm = group.get("algorithm") or owner.get(id(group), optimizer_name)
        if "mu" in group and algorithm not in BETAS_ALGORITHMS:
            momentum = f"mu {group['mu']:g}"
        elif "betas" in group:
            momentum = "betas " + ", ".join(f"{b:g}" for b in group["betas"])
        elif "momentum" in group:
            momentum = f"momentum {group['momentum']:g}"
        else:
            momentum = "-"
        lr = group.get("initial_lr", group["lr"])
        rows.append((str(index), role, str(algorithm), str(len(params)), f"{sum(p.numel() for p in params):,}",
                     f"{lr:.6g}", momentum, f"{group.get('weight_decay', 0.0):g}"))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["param groups (lr: the peak, before the schedule's multiplier):"]
    lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
              for row in (header, *rows)]
    total = scheduler.warmup_steps + scheduler.stable_steps + scheduler.decay_steps
    shape = getattr(scheduler.decay_shape, "value", scheduler.decay_shape)
    warmup = f"warmup {scheduler.warmup_steps} (linear, from lr/warmup) + " if scheduler.warmup_steps else ""
    lines.append(f"schedule: {total} steps = {warmup}stable {scheduler.stable_steps} + decay {scheduler.decay_steps} "
                 f"({shape}, to {scheduler.min_lr_ratio:g} x lr)")
    return "\n".join(lines)
