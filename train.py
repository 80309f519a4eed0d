"""Train a GPT with Dion or any registered optimizer.

    python train.py                                   # configs/default.yaml: the embedded Shakespeare corpus
    python train.py --config configs/dion_160m.yaml --optimizer dion_async --lr 0.02
    torchrun --standalone --nproc_per_node=8 train.py --config configs/dion_160m.yaml --fs_size 8

Every config key can be overridden as `--section.key value` (short aliases: --lr, --optimizer NAME, --num_iterations,
...); `python train.py --help` prints the effective config with meanings. Restarting the same command resumes from
the newest checkpoint in checkpoint.dir (default: run_dir/checkpoints).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from data import DistributedTokenLoader, ShardError, check_data, validation_batches
from optimizers.common.hooks import training_hooks
from trainer.build import (build_model, build_training_optimizer, builds_on_meta, check_layout, data_files,
                           describe_model, initialize_sharded, micro_batch_size, optimizer_syncs_replicas)
from trainer.checkpoint import choose_resume_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig, build_config, help_text
from trainer.distributed import (Distributed, all_reduce_mean, broadcast_from_main, init_distributed, no_gradient_sync,
                                 parallelize, unwrap)
from trainer.errors import ConfigError, TrainingError, UserError
from trainer.metrics import RunLogger, describe_param_groups, peak_tflops
from trainer.runlock import lock_run_directories
from trainer.runtime import (StopRequest, allow_tf32_matmuls, exit_with_launcher, interrupts_deferred,
                             keep_large_allocations_in_heap)
from trainer.schedule import build_scheduler, configured_hyperparameters, resume_schedule

DIVERGENCE_MARGIN = 1.0  # nats above the first step's loss that a run must not reach
STOP_CHECK_EVERY = 10  # steps between SIGTERM checks (a collective) outside the steps that sync anyway


class Stopped(Exception):
    """SIGTERM was honoured: the run stopped at a step boundary (after saving when there was time); exit 143."""


@torch.no_grad()
def evaluate(model, config: TrainConfig, env: Distributed, val_files, device_batch_size: int, autocast) -> float:
    total, count = torch.zeros((), device=env.device), 0
    for inputs, targets in validation_batches(val_files, device_batch_size, config.model.sequence_length,
                                              config.data.val_tokens, env.data_rank, env.data_world_size,
                                              config.data.order):
        with autocast():
            total += model(inputs.to(env.device), targets.to(env.device)).detach()
        count += 1
    return all_reduce_mean(total / count, env).item()


def gradient_norm(parameters, replicate_group=None) -> torch.Tensor:
    """Global L2 norm of the gradients; DTensor norms are reduced over their meshes. replicate_group: the
    data-parallel replicas whose gradients are still un-averaged because the optimizer syncs them itself (Dion's
    compressed P/R sync): the norm is then the one of their mean, as in synchronized training, at the price of one
    all-reduce of the gradients (in one flat buffer per dtype) on the steps that need the norm."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in parameters if p.grad is not None]
    if replicate_group is not None and grads:
        grads = replica_mean(grads, replicate_group)
    squares = []
    for grad in grads:
        norm = torch.linalg.vector_norm(grad.float())
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())


def replica_mean(grads: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Copies of `grads` averaged over `group` (the gradients themselves are left for the optimizer)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    locals_ = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    averaged = list(locals_)
    for dtype in dict.fromkeys(g.dtype for g in locals_):
        indices = [i for i, g in enumerate(locals_) if g.dtype == dtype]
        flat = torch.cat([locals_[i].reshape(-1) for i in indices])
        dist.all_reduce(flat, group=group)
        flat /= dist.get_world_size(group)
        for i, piece in zip(indices, flat.split([locals_[i].numel() for i in indices])):
            averaged[i] = piece.view_as(locals_[i])
    return [DTensor.from_local(local, g.device_mesh, g.placements, run_check=False, shape=g.shape, stride=g.stride())
            if isinstance(g, DTensor) else local for g, local in zip(grads, averaged)]


@dataclass
class Progress:
    """Where the run is, for the line printed when it is interrupted."""
    step: int = 0
    last_checkpoint: str | None = None


def run(config: TrainConfig, env: Distributed, progress: Progress | None = None,
        stop: StopRequest | None = None) -> None:
    progress = progress if progress is not None else Progress()
    check_layout(config, env)
    device_batch_size, accumulation = micro_batch_size(config, env)
    if config.fused_backward and accumulation > 1:
        raise ConfigError(f"fused_backward: needs one micro-batch per step, but batch_size / (device_batch_size x "
                          f"ranks) = {accumulation}; raise data.device_batch_size or turn fused_backward off")
    train_files, val_files = data_files(config, env)
    check_data(train_files, val_files if config.logging.val_loss_every > 0 else None, batch_size=device_batch_size,
               sequence_length=config.model.sequence_length, world_size=env.data_world_size,
               num_batches=config.schedule.num_iterations * accumulation, vocab_size=config.model.vocab_size,
               val_tokens=config.data.val_tokens, order=config.data.order)

    meta = builds_on_meta(config, env)  # sharded layouts: no rank ever holds the whole model
    model = build_model(config, env.device, meta=meta)
    flops_per_token, peak = model.flops_per_token(), None
    if env.is_main:  # only rank 0 logs records
        print(describe_model(model, config), flush=True)
        peak, peak_source = peak_tflops(env.device)
        print(f"mfu: against {peak:.3g} TFLOP/s per device ({peak_source})" if peak is not None else
              f"mfu: not logged ({peak_source})", flush=True)
    syncs_replicas = optimizer_syncs_replicas(config, env)
    model = parallelize(model, config, env, syncs_replicas)
    if meta:
        initialize_sharded(model, config, env.device)
    unsynced_replicas = env.mesh["dp"].get_group() if syncs_replicas else None  # for the true gradient norm
    optimizer = build_training_optimizer(unwrap(model), config, env)
    hooks = training_hooks(optimizer)
    scheduler = build_scheduler(optimizer, config)
    if env.is_main:
        print(describe_param_groups(optimizer, unwrap(model).param_groups(), scheduler, config.optimizer.name),
              flush=True)
    if config.fused_backward:
        if not hooks.supports_fused_backward:
            raise ConfigError(f"fused_backward: optimizer {config.optimizer.name!r} has no fused backward pass "
                              f"(the advanced family has: adam_adv, adopt_adv, prodigy_adv, ...)")
        hooks.register_fused_backward_hooks()
    loader = DistributedTokenLoader(train_files, device_batch_size, config.model.sequence_length, env.data_rank,
                                    env.data_world_size, pin_memory=env.device.type == "cuda", order=config.data.order)
    autocast_dtype = config.precision.autocast_dtype(env.device.type)
    autocast = (lambda: torch.autocast(env.device.type, dtype=autocast_dtype)) if autocast_dtype is not None \
        else contextlib.nullcontext

    step, wandb_id, elapsed, tokens = 0, None, 0.0, 0
    num_iterations = config.schedule.num_iterations
    resume_from = choose_resume_checkpoint(config.checkpoint_dir, config.to_dict(), env)
    progress.last_checkpoint = resume_from.name if resume_from is not None else None
    if resume_from is not None:
        configured = configured_hyperparameters(optimizer)
        state = load_checkpoint(resume_from, model, optimizer, env)
        hooks.train()  # the checkpoint holds the evaluation point (schedule-free's x): train from the gradient point
        loader.load_state_dict(state["loader"])
        step, wandb_id, elapsed, tokens = state["step"], state["wandb_id"], state["elapsed"], state["tokens"]
        resume_schedule(optimizer, scheduler, configured, step)
        progress.step = step
    if wandb_id is None and config.logging.wandb:
        wandb_id = broadcast_from_main(uuid.uuid4().hex[:8], env)
    logger = RunLogger(config, env.is_main, step, wandb_id)
    if env.is_main and resume_from is not None:
        print(f"resumed from {resume_from} at step {step}")
    if step >= num_iterations:
        if env.is_main:
            print(f"run already complete: {resume_from} is at step {step} of {num_iterations}; "
                  f"set a new run_dir (or checkpoint.dir) to train again")
        return

    save_seconds = None  # how long the last save took: decides whether a SIGTERM leaves time for one

    def checkpoint(at_step: int) -> None:
        nonlocal save_seconds
        started = time.monotonic()
        hooks.eval()
        hooks.synchronize_for_checkpoint()
        with interrupts_deferred():  # Ctrl-C during the save takes effect once it is complete
            saved = save_checkpoint(config.checkpoint_dir, at_step, model, optimizer,
                                    dict(step=at_step, wandb_id=logger.wandb_id, elapsed=elapsed, tokens=tokens,
                                         loader=loader.state_dict()),
                                    env, config.checkpoint.keep, config.to_dict())
            progress.last_checkpoint = saved.name
        save_seconds = time.monotonic() - started
        hooks.train()

    def validate() -> float:
        hooks.eval()
        loss = evaluate(model, config, env, val_files, device_batch_size, autocast)
        hooks.train()
        return loss

    def honour_stop(saved_now: bool) -> None:
        """After a SIGTERM (all ranks agree on it): save if the last save fits in the grace left, then stop."""
        if not stop.due(env.device, env.world_size):
            return
        saved = saved_now
        if not saved and config.checkpoint.freq > 0 and (save_seconds or 0.0) <= stop.seconds_left():
            checkpoint(step)
            saved = True
        took = f" (the last save took {save_seconds:.0f} s)" if save_seconds is not None else ""
        if saved:
            raise Stopped(f"stopped by SIGTERM after step {step}: checkpoint saved in {config.checkpoint_dir}; rerun "
                          f"the same command to resume")
        reason = (f"no time within checkpoint.sigterm_grace_seconds={config.checkpoint.sigterm_grace_seconds}{took}"
                  if config.checkpoint.freq > 0 else "checkpoint.freq is 0")
        raise Stopped(f"stopped by SIGTERM after step {step} without saving: {reason}; a rerun resumes from the "
                      f"previous checkpoint, if any")

    val_loss_every, log_every = config.logging.val_loss_every, config.logging.log_every
    if step == 0 and val_loss_every > 0:
        logger.log(dict(step=0, val_loss=validate(), tokens=0, time=0.0))
    def train_steps() -> None:
        nonlocal step, elapsed, tokens
        tokens_per_step = config.tokens_per_step
        sharded_accumulation = config.parallel.fsdp_gradient_accumulation == "sharded"
        first_loss, warned_divergence = None, False
        window_started, window_steps = time.perf_counter(), 0  # steps since the last host sync
        while step < num_iterations:
            lr = optimizer.param_groups[0]["lr"]
            train_loss = torch.zeros((), device=env.device)  # stays on the device until a sync step
            for micro in range(accumulation):
                inputs, targets = (t.to(env.device, non_blocking=True) for t in loader.next_batch())
                with no_gradient_sync(model, micro == accumulation - 1, sharded_accumulation), autocast():
                    loss = model(inputs, targets) / accumulation
                hooks.prepare_backward(last_micro_batch=micro == accumulation - 1, rescaled_after=config.grad_clip > 0)
                loss.backward()
                train_loss += loss.detach()
            # Host syncs (.item(), collectives of the loss, cuda.synchronize) happen only on steps that log, validate or
            # checkpoint; the loss is checked for non-finite values there, always before a checkpoint is written.
            log_now = (step + 1) % log_every == 0 or step + 1 == num_iterations
            validate_now = val_loss_every > 0 and ((step + 1) % val_loss_every == 0 or step + 1 == num_iterations)
            freq = config.checkpoint.freq
            checkpoint_now = freq > 0 and ((step + 1) % freq == 0 or step + 1 == num_iterations)
            sync_now = log_now or validate_now or checkpoint_now
            grad_norm = None
            if config.grad_clip > 0:
                grad_norm = gradient_norm(model.parameters(), unsynced_replicas)
                clip = torch.clamp(config.grad_clip / (grad_norm + 1e-6), max=1.0)
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(clip.to(p.grad.device))
            elif log_now and not config.fused_backward:
                grad_norm = gradient_norm(model.parameters(), unsynced_replicas)
            refresh_hessian = hooks.hessian_update_due()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if refresh_hessian:  # Sophia: an extra backward pass on labels sampled from the model
                def logits():
                    with autocast():
                        return model(inputs)
                hooks.hessian_pass(logits)
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            progress.step = step
            tokens += tokens_per_step
            window_steps += 1
            if bar is not None:
                bar.update(1)
            if not sync_now:
                if stop is not None and step % STOP_CHECK_EVERY == 0:
                    honour_stop(saved_now=False)
                continue
            train_loss = all_reduce_mean(train_loss, env).item()
            if not math.isfinite(train_loss):
                raise TrainingError(f"non-finite training loss {train_loss} at step {step}; stopping without saving "
                                    f"(the last good checkpoint is kept). Lower lr or check the data")
            first_loss = train_loss if first_loss is None else first_loss
            if train_loss > first_loss + DIVERGENCE_MARGIN and not warned_divergence and env.is_main:
                warned_divergence = True
                print(f"warning: training loss {train_loss:.3f} at step {step} is far above the first logged "
                      f"{first_loss:.3f}: the run is diverging; lower optimizer.lr (now {config.optimizer.lr:g})",
                      file=sys.stderr)
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            window = time.perf_counter() - window_started
            elapsed += window
            record = dict(step=step, train_loss=train_loss, lr=lr, tokens=tokens, time=round(elapsed, 4),
                          tokens_per_second=round(window_steps * tokens_per_step / window, 1))
            record["tflops"] = round(record["tokens_per_second"] * flops_per_token / 1e12, 4)  # all ranks together
            if peak is not None:
                record["mfu"] = round(record["tflops"] / (peak * env.world_size), 4)
            if grad_norm is not None:
                record["grad_norm"] = grad_norm.item()
            if validate_now:
                record["val_loss"] = validate()
            logger.log(record)
            if bar is not None:
                postfix = dict(loss=f"{train_loss:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
                if "val_loss" in record:
                    postfix["val"] = f"{record['val_loss']:.4f}"
                bar.set_postfix(postfix)
            if checkpoint_now:
                checkpoint(step)
            if stop is not None:
                honour_stop(saved_now=checkpoint_now)
            window_started, window_steps = time.perf_counter(), 0  # validation and saves are not training time

    bar = None
    if env.is_main:
        from tqdm import tqdm
        bar = tqdm(total=num_iterations, initial=step, desc=config.optimizer.name, dynamic_ncols=True)
    try:
        train_steps()
    finally:  # an error line must start on its own line, not after the bar
        if bar is not None:
            bar.close()
    logger.finish()
    if env.is_main:
        saved = f"; checkpoints in {config.checkpoint_dir}" if config.checkpoint.freq > 0 else ""
        print(f"outputs: {logger.metrics_path}, {logger.run_dir / 'config.yaml'}{saved}")


def main(argv: list[str]) -> int:
    is_main = os.environ.get("RANK", "0") == "0"
    env, progress, locks, stop = None, Progress(), [], None
    exit_with_launcher()
    try:
        if "-h" in argv or "--help" in argv:
            print(__doc__)
            print(help_text(argv))
            return 0
        config = build_config(argv)
        env = init_distributed(config)
        locks = lock_run_directories({"logging.run_dir": Path(config.logging.run_dir),
                                      "checkpoint.dir": config.checkpoint_dir}, env)
        if env.device.type == "cpu":
            keep_large_allocations_in_heap()
        allow_tf32_matmuls(env.device)
        if config.debug:
            torch.autograd.set_detect_anomaly(True)
        stop = StopRequest(config.checkpoint.sigterm_grace_seconds)
        run(config, env, progress, stop)
    except (UserError, ShardError, FileNotFoundError) as error:
        if is_main:
            print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if is_main:
            print(f"\ninterrupted at step {progress.step}; last checkpoint: {progress.last_checkpoint or 'none'}; "
                  f"rerun the same command to resume", file=sys.stderr)
        return 130
    except TrainingError as error:
        if is_main:
            print(f"error: {error}", file=sys.stderr)
        return 3
    except Stopped as stopped:
        if is_main:
            print(str(stopped), file=sys.stderr)
        return 143
    finally:
        for lock in reversed(locks):  # inner directories first
            lock.release()
        if stop is not None:
            stop.restore()
        if env is not None and env.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
