"""The training loop: `Trainer(config, env, stop).train()`.

Construction builds the run in the order of the story: the layout refusals and the batch split, the data check, the
model (on the meta device in sharded layouts), its parallel layout, the optimizer and its schedule, the loader.
`train()` resumes from the newest checkpoint and steps to schedule.num_iterations. Each component says when it is
due after a step: the logger (`RunLogger.due`), the validator (`Validator.due`), the checkpointer
(`Checkpointer.due`) and the SIGTERM request (`StopRequest.checked_at`). The loss stays on the device except on the
steps that log, validate or checkpoint: those are the only host syncs, where the non-finite check, the timing and
the SIGTERM decision happen. The optimizer's hooks are called only through `training_hooks(optimizer)`.
"""
from __future__ import annotations

import functools
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

from data import DistributedTokenLoader, check_data, validation_batches
from optimizers.common.hooks import training_hooks
from trainer.build import (autocast_context, build_model, build_training_optimizer, builds_on_meta, check_layout,
                           data_files, describe_model, distribute_model, micro_batch_size, optimizer_syncs_replicas)
from trainer.checkpoint import Checkpointer
from trainer.config import TrainConfig
from trainer.distributed import (Distributed, all_reduce_mean, broadcast_from_main, clip_grad_norm_,
                                 no_gradient_sync, unwrap)
from trainer.errors import TrainingError
from trainer.metrics import DivergenceWarning, RunLogger, Throughput, describe_param_groups, peak_tflops
from trainer.runtime import StopRequest, synchronize
from trainer.schedule import build_scheduler, configured_hyperparameters, resume_schedule


@dataclass
class RunState:
    """Where the run is: saved in every checkpoint (beside the loader's position) and restored on resume."""
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # tokens trained on, all ranks together
    elapsed: float = 0.0  # seconds of training (validation and saves excluded)
    wandb_id: str | None = None  # the same on every rank, so a resumed run continues its wandb run

    def state_dict(self) -> dict[str, Any]:
        return dict(step=self.step, wandb_id=self.wandb_id, elapsed=self.elapsed, tokens=self.tokens)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.wandb_id = state["wandb_id"]


@torch.no_grad()
def evaluate(model, config: TrainConfig, env: Distributed, val_files, device_batch_size: int, autocast) -> float:
    """Mean loss over data.val_tokens of the validation split (each data-parallel rank reads its own part in the
    data.order), averaged over the ranks; `autocast`: the forward's context factory. A host sync."""
    total, count = torch.zeros((), device=env.device), 0
    for inputs, targets in validation_batches(val_files, device_batch_size, config.model.sequence_length,
                                              config.data.val_tokens, env.data_rank, env.data_world_size,
                                              config.data.order):
        with autocast():
            total += model(inputs.to(env.device), targets.to(env.device)).detach()
        count += 1
    return all_reduce_mean(total / count, env).item()


class Validator:
    """The validation loss: before the first step, every logging.val_loss_every steps and after the last one
    (val_loss_every 0: never)."""

    def __init__(self, config: TrainConfig, env: Distributed, files, device_batch_size: int, autocast):
        self.every = config.logging.val_loss_every
        self.evaluate = functools.partial(evaluate, config=config, env=env, val_files=files,
                                          device_batch_size=device_batch_size, autocast=autocast)

    def due(self, step: int, last: bool) -> bool:
        """Whether step `step` (0: the initial weights) is validated; `last`: the run's final step."""
        return self.every > 0 and (step % self.every == 0 or last)

    def __call__(self, model) -> float:
        return self.evaluate(model)


class StepResult(NamedTuple):
    loss: torch.Tensor  # the step's mean training loss on this rank, on the device
    lr: float  # the first param group's learning rate during the step
    grad_norm: torch.Tensor | None  # the global gradient norm (clipping, or a logged step), on the device


def bar_postfix(record: dict[str, Any]) -> dict[str, str]:
    """What the progress bar shows of a logged record."""
    postfix = dict(loss=f"{record['train_loss']:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
    if "val_loss" in record:
        postfix["val"] = f"{record['val_loss']:.4f}"
    return postfix


class Trainer:
    """One training run of `config` on the processes of `env`; `stop`: the SIGTERM request to honour (None: none).
    Rank 0 prints the model, the MFU reference and the param-group table while building, and writes the records."""

    def __init__(self, config: TrainConfig, env: Distributed, stop: StopRequest | None = None):
        self.config, self.env, self.stop = config, env, stop
        check_layout(config, env)
        self.device_batch_size, self.accumulation = micro_batch_size(config, env)
        train_files, val_files = data_files(config, env)
        check_data(train_files, val_files if config.logging.val_loss_every > 0 else None,
                   batch_size=self.device_batch_size, sequence_length=config.model.sequence_length,
                   world_size=env.data_world_size, num_batches=config.schedule.num_iterations * self.accumulation,
                   vocab_size=config.model.vocab_size, val_tokens=config.data.val_tokens, order=config.data.order)
        model = build_model(config, env.device, meta=builds_on_meta(config, env))  # sharded: never whole on a rank
        peak = None
        if env.is_main:  # only rank 0 logs records
            print(describe_model(model, config), flush=True)
            peak, peak_source = peak_tflops(env.device)
            print(f"mfu: against {peak:.3g} TFLOP/s per device ({peak_source})" if peak is not None else
                  f"mfu: not logged ({peak_source})", flush=True)
        self.throughput = Throughput(config.tokens_per_step, model.flops_per_token(), peak, env.world_size)
        self.model = distribute_model(model, config, env)
        # the replicas whose gradients the optimizer averages itself: the true gradient norm averages them first
        self.unsynced_replicas = env.mesh["dp"].get_group() if optimizer_syncs_replicas(config, env) else None
        self.optimizer = build_training_optimizer(unwrap(self.model), config, env)
        self.hooks = training_hooks(self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, config)
        if env.is_main:
            print(describe_param_groups(self.optimizer, unwrap(self.model).param_groups(), self.scheduler,
                                        config.optimizer.name), flush=True)
        self.loader = DistributedTokenLoader(train_files, self.device_batch_size, config.model.sequence_length,
                                             env.data_rank, env.data_world_size, pin_memory=env.device.type == "cuda",
                                             order=config.data.order)
        self.autocast = autocast_context(config, env.device)
        self.validator = Validator(config, env, val_files, self.device_batch_size, self.autocast)
        self.checkpointer = Checkpointer(config, env)
        self.divergence = DivergenceWarning(config, enabled=env.is_main)
        self.state = RunState()
        self.logger: RunLogger | None = None  # opened by resume(), which knows the step and the wandb id
        self.save_seconds: float | None = None  # how long the last save took: whether a SIGTERM leaves time for one

    def train(self) -> None:
        """Resume, validate the initial weights (a fresh run), then step to schedule.num_iterations."""
        if not self.resume():
            return
        total = self.config.schedule.num_iterations
        if self.state.step == 0 and self.validator.due(0, last=False):
            self.logger.log(dict(step=0, val_loss=self.validate(), tokens=0, time=0.0))
        # the bar closes before an error line is printed, so that line starts on its own line
        with tqdm(total=total, initial=self.state.step, desc=self.config.optimizer.name, dynamic_ncols=True,
                  disable=not self.env.is_main) as bar:
            self.throughput.restart()
            while self.state.step < total:
                step = self.state.step + 1
                last = step == total
                log, validate, save = (self.logger.due(step, last), self.validator.due(step, last),
                                       self.checkpointer.due(step, last))
                syncs = log or validate or save  # the only steps with host syncs
                result = self.train_step(measure_norm=log)
                bar.update(1)
                if syncs:
                    bar.set_postfix(bar_postfix(self.log_step(result, validate)))
                if save:
                    self.save()
                if self.stop is not None and self.stop.checked_at(step, syncs):
                    self.honour_stop(saved_now=save)
                if syncs:
                    self.throughput.restart()  # validation and saves are not training time
        self.logger.finish()
        if self.env.is_main:
            saved = f"; checkpoints in {self.config.checkpoint_dir}" if self.checkpointer.freq > 0 else ""
            print(f"outputs: {self.logger.metrics_path}, {self.logger.run_dir / 'config.yaml'}{saved}")

    def resume(self) -> bool:
        """Load the newest usable checkpoint (weights, optimizer, schedule, loader position, RNG, RunState) if there
        is one, and open the logger; False when that checkpoint already ends the run."""
        config, env = self.config, self.env
        path = self.checkpointer.resume_point()
        if path is not None:
            configured = configured_hyperparameters(self.optimizer)
            state = self.checkpointer.load(path, self.model, self.optimizer)
            self.hooks.train()  # the checkpoint holds the evaluation point (schedule-free's x): train from the gradient
            self.loader.load_state_dict(state["loader"])
            self.state.load_state_dict(state)
            resume_schedule(self.optimizer, self.scheduler, configured, self.state.step)
        if self.state.wandb_id is None and config.logging.wandb:
            self.state.wandb_id = broadcast_from_main(uuid.uuid4().hex[:8], env)
        self.logger = RunLogger(config, env.is_main, self.state.step, self.state.wandb_id)
        if env.is_main and path is not None:
            print(f"resumed from {path} at step {self.state.step}")
        if self.state.step >= config.schedule.num_iterations:
            if env.is_main:
                print(f"run already complete: {path} is at step {self.state.step} of "
                      f"{config.schedule.num_iterations}; set a new run_dir (or checkpoint.dir) to train again")
            return False
        return True

    def forward_backward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of the step's micro-batches, their gradients summed; the gradient sync runs on the
        last one, and each backward is announced to the optimizer first (`prepare_backward`). Returns the mean loss
        (on the device) and the last micro-batch's inputs."""
        total = torch.zeros((), device=self.env.device)  # stays on the device until a sync step
        sharded_accumulation = self.config.parallel.fsdp_gradient_accumulation == "sharded"
        for micro in range(self.accumulation):
            last = micro == self.accumulation - 1
            inputs, targets = (t.to(self.env.device, non_blocking=True) for t in self.loader.next_batch())
            with no_gradient_sync(self.model, last, sharded_accumulation), self.autocast():
                loss = self.model(inputs, targets) / self.accumulation
            self.hooks.prepare_backward(last_micro_batch=last, rescaled_after=self.config.grad_clip > 0)
            loss.backward()
            total += loss.detach()
        return total, inputs

    def train_step(self, measure_norm: bool) -> StepResult:
        """One optimizer step: forward and backward, clipping (grad_clip), the step, Sophia's Hessian pass when it
        is due, the schedule. `measure_norm`: the step's record needs the gradient norm. No host sync."""
        lr = self.optimizer.param_groups[0]["lr"]
        loss, inputs = self.forward_backward()
        grad_norm = None
        if self.config.grad_clip > 0 or (measure_norm and not self.config.fused_backward):
            grad_norm = clip_grad_norm_(self.model.parameters(), self.config.grad_clip, self.unsynced_replicas)
        refresh_hessian = self.hooks.hessian_update_due()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if refresh_hessian:  # Sophia: an extra backward pass on labels sampled from the model
            self.hooks.hessian_pass(functools.partial(self.logits, inputs))
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        self.state.tokens += self.config.tokens_per_step
        self.throughput.step()
        return StepResult(loss, lr, grad_norm)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(inputs)

    def log_step(self, result: StepResult, validate: bool) -> dict[str, Any]:
        """The record of a step that syncs the host: the loss averaged over the ranks (a non-finite one stops the run
        before any checkpoint is written), the time and speed since the last record, the gradient norm, the
        validation loss when `validate`. Logged (rank 0) and returned."""
        train_loss = all_reduce_mean(result.loss, self.env).item()
        if not math.isfinite(train_loss):
            raise TrainingError(f"non-finite training loss {train_loss} at step {self.state.step}; stopping without "
                                f"saving (the last good checkpoint is kept). Lower lr or check the data")
        self.divergence.check(train_loss, self.state.step)
        synchronize(self.env.device)
        seconds = self.throughput.seconds()
        self.state.elapsed += seconds
        record = dict(step=self.state.step, train_loss=train_loss, lr=result.lr, tokens=self.state.tokens,
                      time=round(self.state.elapsed, 4), **self.throughput.rates(seconds))
        if result.grad_norm is not None:
            record["grad_norm"] = result.grad_norm.item()
        if validate:
            record["val_loss"] = self.validate()
        self.logger.log(record)
        return record

    def validate(self) -> float:
        self.hooks.eval()
        loss = self.validator(self.model)
        self.hooks.train()
        return loss

    def save(self) -> None:
        """Collective: a checkpoint of the current step, the optimizer's replicas synchronized and its evaluation
        point in place (hooks) while saving."""
        started = time.monotonic()
        self.hooks.eval()
        self.hooks.synchronize_for_checkpoint()
        self.checkpointer.save(self.state.step, self.model, self.optimizer,
                               {**self.state.state_dict(), "loader": self.loader.state_dict()})
        self.save_seconds = time.monotonic() - started
        self.hooks.train()

    def honour_stop(self, saved_now: bool) -> None:
        """After a SIGTERM (all ranks agree on it): save unless `saved_now`, when the last save fits in the grace
        left, then raise Stopped."""
        if not self.stop.due(self.env.device, self.env.world_size):
            return
        saved = saved_now
        if not saved and self.checkpointer.freq > 0 and self.stop.leaves_time_for(self.save_seconds):
            self.save()
            saved = True
        raise self.stop.stopped(self.state.step, saved, self.checkpointer.directory, self.checkpointer.freq,
                                self.save_seconds)
