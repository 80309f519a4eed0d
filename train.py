"""Train a GPT with Dion or any registered optimizer.

    python train.py                                   # configs/default.yaml: the embedded Shakespeare corpus
    python train.py --config configs/dion_160m.yaml --optimizer dion_async --lr 0.02
    torchrun --standalone --nproc_per_node=8 train.py --config configs/dion_160m.yaml --fs_size 8

Every config key can be overridden as `--key value`; `python train.py --help` lists them. Restarting the same
command resumes from the newest checkpoint in checkpoint_dir (default: run_dir/checkpoints).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F

from data import DistributedTokenLoader, ShardError, check_data, find_shards, validation_batches
from data.corpus import ensure_embedded_corpus
from models import GPT, GPTConfig
from optimizers import OptimizerContext, build_optimizer
from optimizers.registry import get_spec
from trainer.checkpoint import choose_resume_checkpoint, load_checkpoint, save_checkpoint, saved_config
from trainer.config import TrainConfig, build_config
from trainer.errors import ConfigError, TrainingError, UserError
from trainer.distributed import (Distributed, all_reduce_mean, broadcast_from_main, init_distributed,
                                 no_gradient_sync, parallelize, unwrap)
from trainer.metrics import RunLogger
from trainer.runlock import lock_run_directories
from trainer.runtime import StopRequest, exit_with_launcher, keep_large_allocations_in_heap
from trainer.schedule import build_scheduler, rescale_lr


class Stopped(Exception):
    """SIGTERM was honoured: the run stopped at a step boundary (after saving when there was time); exit 143."""


def build_model(config: TrainConfig, env: Distributed) -> GPT:
    torch.manual_seed(config.seed)
    model_config = GPTConfig(vocab_size=config.vocab_size, n_layer=config.n_layer, n_head=config.n_head,
                             model_dim=config.model_dim, sequence_length=config.sequence_length)
    return GPT(model_config).to(env.device)


def split_parameters(model: GPT) -> dict[str, list[torch.Tensor]]:
    """Matrices of the blocks / token embedding / LM head / vectors (norm gains)."""
    groups = {"matrix": [], "embedding": [model.embed.weight], "lm_head": [model.lm_head.weight], "vector": []}
    special = {id(model.embed.weight), id(model.lm_head.weight)}
    for param in model.parameters():
        if id(param) in special:
            continue
        in_blocks = any(param is p for p in model.blocks.parameters())
        groups["matrix" if param.ndim == 2 and in_blocks else "vector"].append(param)
    return groups


def build_training_optimizer(model: GPT, config: TrainConfig, env: Distributed, optimizer_syncs: bool):
    groups = split_parameters(model)
    context = OptimizerContext(
        matrix_params=groups["matrix"], embedding_params=groups["embedding"], lm_head_params=groups["lm_head"],
        vector_params=groups["vector"], model_dim=config.model_dim, lr=config.lr, scalar_lr=config.scalar_lr,
        mu=config.mu, betas=tuple(config.betas), weight_decay=config.weight_decay, epsilon=config.epsilon,
        scalar_opt=config.scalar_opt or "lion", scalar_opt_explicit=config.scalar_opt is not None,
        rank_fraction=config.rank_fraction, rank_multiple_of=config.rank_multiple_of,
        power_iters=config.power_iters, qr_method=config.qr_method, cqr_warmup_steps=config.cqr_warmup_steps,
        rcqr_oversample=config.rcqr_oversample, mixed_precision=config.mixed_precision,
        tokens_per_step=config.batch_size * config.sequence_length, options=dict(config.optimizer_args),
        replicate_mesh=env.submesh("dp"), outer_shard_mesh=env.submesh("fs"), inner_shard_mesh=env.submesh("tp"),
        replicate_mesh_grad_sync=optimizer_syncs)
    return build_optimizer(config.optimizer, context)


def data_files(config: TrainConfig, env: Distributed):
    if config.data_dir is None:
        if env.is_main:
            ensure_embedded_corpus()
        env.barrier()
        data_dir = ensure_embedded_corpus()
    else:
        data_dir = config.data_dir
    return find_shards(data_dir, "train"), find_shards(data_dir, "val")


def optimizer_hook(optimizer, name: str):
    """Optional optimizer methods the loop honours: eval()/train() (schedule-free), hessian_update_due() and
    update_hessian() (Sophia), register_fused_backward_hooks() (the advanced family), synchronize_for_checkpoint()
    (Dion)."""
    return getattr(optimizer, name, None)


@torch.no_grad()
def evaluate(model, config: TrainConfig, env: Distributed, val_files, autocast) -> float:
    total, count = torch.zeros((), device=env.device), 0
    for inputs, targets in validation_batches(val_files, config.device_batch_size, config.sequence_length,
                                              config.val_tokens, env.data_rank, env.data_world_size):
        with autocast():
            total += model(inputs.to(env.device), targets.to(env.device)).detach()
        count += 1
    return all_reduce_mean(total / count, env).item()


def gradient_norm(parameters) -> torch.Tensor:
    """Global L2 norm of the gradients; DTensor norms are reduced over their meshes."""
    from torch.distributed.tensor import DTensor
    squares = []
    for p in parameters:
        if p.grad is None:
            continue
        norm = torch.linalg.vector_norm(p.grad.float())
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())


def estimate_hessian(model, optimizer, inputs, targets, autocast) -> None:
    """Gauss-Newton-Bartlett pass for Sophia: backpropagate the loss on labels sampled from the model's own
    predictions; the optimizer reads the resulting gradients in update_hessian()."""
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        logits = model(inputs)
    sampled = torch.multinomial(F.softmax(logits.detach().view(-1, logits.size(-1)), dim=-1), 1).view(-1)
    F.cross_entropy(logits.view(-1, logits.size(-1)), sampled).backward()
    optimizer.update_hessian()
    optimizer.zero_grad(set_to_none=True)


def run(config: TrainConfig, env: Distributed, stop: StopRequest | None = None) -> None:
    spec = get_spec(config.optimizer)
    optimizer_syncs = spec.syncs_replicate_grads and config.replicate_mesh_grad_sync and env.dp > 1
    if env.tp > 1 and not spec.supports_tensor_parallel:
        raise ConfigError(f"tp_size: optimizer {config.optimizer!r} does not support tensor parallelism; "
                          f"use tp_size 1 or one of the optimizers marked TP in the README")
    if config.grad_clip > 0 and optimizer_syncs:
        raise ConfigError("grad_clip: not available while the optimizer syncs replicas itself "
                          "(replicate_mesh_grad_sync true with dp_size > 1); set replicate_mesh_grad_sync false")
    per_step = config.device_batch_size * env.data_world_size
    if config.batch_size % per_step != 0:
        raise ConfigError(f"batch_size: {config.batch_size} is not divisible by device_batch_size x data-parallel "
                          f"ranks = {config.device_batch_size} x {env.data_world_size}")
    accumulation = config.batch_size // per_step
    if config.fused_backward and accumulation > 1:
        raise ConfigError(f"fused_backward: needs one micro-batch per step, but batch_size / (device_batch_size x "
                          f"ranks) = {accumulation}; raise device_batch_size or turn fused_backward off")
    train_files, val_files = data_files(config, env)
    check_data(train_files, val_files if config.val_loss_every > 0 else None, batch_size=config.device_batch_size,
               sequence_length=config.sequence_length, world_size=env.data_world_size,
               num_steps=config.num_iterations, vocab_size=config.vocab_size, val_tokens=config.val_tokens)

    model = build_model(config, env)
    model = parallelize(model, config, env, optimizer_syncs)
    base_model = unwrap(model)
    optimizer = build_training_optimizer(base_model, config, env, optimizer_syncs)
    scheduler = build_scheduler(optimizer, config)
    if config.fused_backward:
        register = optimizer_hook(optimizer, "register_fused_backward_hooks")
        if register is None:
            raise ConfigError(f"fused_backward: optimizer {config.optimizer!r} has no fused backward pass "
                              f"(the advanced family has: adam_adv, adopt_adv, prodigy_adv, ...)")
        register()
    loader = DistributedTokenLoader(train_files, config.device_batch_size, config.sequence_length, env.data_rank,
                                    env.data_world_size)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if env.device.type == "cuda" \
        else contextlib.nullcontext

    def switch(mode: str) -> None:
        hook = optimizer_hook(optimizer, mode)
        if hook is not None:
            hook()

    step, wandb_id, elapsed, tokens = 0, None, 0.0, 0
    checkpoint_dir = config.resolved_checkpoint_dir
    resume_from = choose_resume_checkpoint(checkpoint_dir, config.to_dict(), env)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, env)
        switch("train")  # checkpoints hold the eval-mode parameters (schedule-free: the average x, not y)
        loader.load_state_dict(state["loader"])
        scheduler.load_state_dict(state["scheduler"])
        saved_lr = saved_config(resume_from)["lr"]
        if saved_lr != config.lr:  # a restart with another lr (e.g. lower, after a divergence) takes effect
            rescale_lr(scheduler, config.lr / saved_lr)
        step, wandb_id, elapsed, tokens = state["step"], state["wandb_id"], state["elapsed"], state["tokens"]
    if wandb_id is None and not config.no_wandb:
        wandb_id = broadcast_from_main(uuid.uuid4().hex[:8], env)
    logger = RunLogger(config, env.is_main, step, wandb_id)
    if env.is_main and resume_from is not None:
        print(f"resumed from {resume_from} at step {step}")
    if step >= config.num_iterations:
        if env.is_main:
            print(f"run already complete: {resume_from} is at step {step} of {config.num_iterations}; "
                  f"set a new run_dir (or checkpoint_dir) to train again")
        return

    save_seconds = None  # how long the last save took: decides whether a SIGTERM leaves time for one

    def checkpoint(at_step: int) -> None:
        nonlocal save_seconds
        started = time.monotonic()
        switch("eval")
        synchronize = optimizer_hook(optimizer, "synchronize_for_checkpoint")
        if synchronize is not None:  # Dion with its own replica sync: make the replicas' states identical
            synchronize()
        save_checkpoint(checkpoint_dir, at_step, model, optimizer,
                        dict(step=at_step, wandb_id=logger.wandb_id, elapsed=elapsed, tokens=tokens,
                             loader=loader.state_dict(), scheduler=scheduler.state_dict()),
                        env, config.keep_checkpoints, config.to_dict())
        switch("train")
        save_seconds = time.monotonic() - started

    def validate() -> float:
        switch("eval")
        loss = evaluate(model, config, env, val_files, autocast)
        switch("train")
        return loss

    if step == 0 and config.val_loss_every > 0:
        logger.log(dict(step=0, val_loss=validate(), tokens=0, time=0.0))
    progress = None
    if env.is_main:
        from tqdm import tqdm
        progress = tqdm(total=config.num_iterations, initial=step, desc=config.optimizer, dynamic_ncols=True)
    tokens_per_step = config.batch_size * config.sequence_length
    hessian_due = optimizer_hook(optimizer, "hessian_update_due")
    while step < config.num_iterations:
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss = torch.zeros((), device=env.device)
        for micro in range(accumulation):
            inputs, targets = (t.to(env.device, non_blocking=True) for t in loader.next_batch())
            with no_gradient_sync(model, sync=micro == accumulation - 1), autocast():
                loss = model(inputs, targets) / accumulation
            loss.backward()
            train_loss += loss.detach()
        train_loss = all_reduce_mean(train_loss, env).item()
        if not math.isfinite(train_loss):
            raise TrainingError(f"non-finite training loss {train_loss} at step {step + 1}; stopping without saving "
                                f"(the last good checkpoint is kept). Lower lr or check the data")
        log_now = (step + 1) % config.log_every == 0 or step + 1 == config.num_iterations
        grad_norm = None
        if config.grad_clip > 0:
            grad_norm = gradient_norm(model.parameters())
            clip = torch.clamp(config.grad_clip / (grad_norm + 1e-6), max=1.0)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(clip.to(p.grad.device))
        elif log_now and not config.fused_backward:
            grad_norm = gradient_norm(model.parameters())
        refresh_hessian = hessian_due is not None and hessian_due()
        optimizer.step()
        if refresh_hessian:
            estimate_hessian(model, optimizer, inputs, targets, autocast)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        step_time = time.perf_counter() - started
        elapsed += step_time
        record = dict(step=step, train_loss=train_loss, lr=lr, tokens=tokens, time=round(elapsed, 4),
                      tokens_per_second=round(tokens_per_step / step_time, 1))
        if grad_norm is not None:
            record["grad_norm"] = grad_norm.item()
        if config.val_loss_every > 0 and (step % config.val_loss_every == 0 or step == config.num_iterations):
            record["val_loss"] = validate()
        if log_now or "val_loss" in record:
            logger.log(record)
        if progress is not None:
            postfix = dict(loss=f"{train_loss:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
            if "val_loss" in record:
                postfix["val"] = f"{record['val_loss']:.4f}"
            progress.set_postfix(postfix, refresh=False)
            progress.update(1)
        saved = config.checkpoint_freq > 0 and step % config.checkpoint_freq == 0 or step == config.num_iterations
        if saved:
            checkpoint(step)
        if stop is not None and stop.due(env.device, env.world_size):
            if not saved and (save_seconds or 0.0) <= stop.seconds_left():
                checkpoint(step)
                saved = True
            raise Stopped(f"stopped by SIGTERM after step {step}: " + (
                f"checkpoint saved in {checkpoint_dir}; rerun the same command to resume" if saved else
                f"no time to save within sigterm_grace_seconds={config.sigterm_grace_seconds} (the last save "
                f"took {save_seconds:.0f} s); a rerun resumes from the previous checkpoint"))
    if progress is not None:
        progress.close()
    logger.finish()


def print_help() -> None:
    print(__doc__)
    print("Keys (default):")
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        print(f"  --{f.name} {default!r}")


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print_help()
        return 0
    env, locks, stop = None, [], None
    is_main = os.environ.get("RANK", "0") == "0"
    exit_with_launcher()
    try:
        config = build_config(argv)
        env = init_distributed(config)
        locks = lock_run_directories({"run_dir": Path(config.run_dir),
                                      "checkpoint_dir": config.resolved_checkpoint_dir}, env)
        if env.device.type == "cpu":
            keep_large_allocations_in_heap()
        if config.debug:
            torch.autograd.set_detect_anomaly(True)
        stop = StopRequest(config.sigterm_grace_seconds)
        run(config, env, stop)
    except (UserError, ShardError, FileNotFoundError) as error:
        if is_main:
            print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        if is_main:
            print(f"error: {error}", file=sys.stderr)
        return 3
    except Stopped as stopped:
        if is_main:
            print(str(stopped), file=sys.stderr)
        return 143
    finally:
        for lock in locks:
            lock.release()
        if stop is not None:
            stop.restore()
        if env is not None and env.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
