"""Building the pieces of a run from the config: model, its parallel layout, optimizer, data files, batch split and
autocast; and the trained model of a finished run (`load_run`). Used by the Trainer (trainer/loop.py) and the
scripts."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torch import nn

from data import find_shards
from data.corpus import ensure_embedded_corpus
from models import model_package
from optimizers.common.hooks import training_hooks
from optimizers.registry import OPTIMIZERS, OptimizerContext, build_optimizer, get_spec
from trainer.checkpoint import find_checkpoint, load_model_weights
from trainer.config import TrainConfig, build_config
from trainer.distributed import Distributed, parallelize, unwrap
from trainer.errors import ConfigError, LayoutError


def builds_on_meta(config: TrainConfig, env: Distributed) -> bool:
    """True when the run builds its model on the meta device (`parallel.meta_init`): in the layouts whose parameters
    `parallelize` shards (FSDP2 / HSDP with fs > 1, TP), so that no rank ever holds the full model."""
    return config.parallel.meta_init and (env.fs > 1 or env.tp > 1)


def build_model(config: TrainConfig, device: torch.device | str = "cpu", meta: bool = False) -> nn.Module:
    """The configured model, initialized from `config.seed`, on `device`. With `meta`, its parameters and buffers
    are meta tensors (shapes, no storage): parallelize it, then `initialize_sharded` gives it storage and values."""
    if meta:
        with torch.device("meta"):
            return model_package(config.model_name).Model(config.model)
    torch.manual_seed(config.seed)
    return model_package(config.model_name).Model(config.model).to(device)


def distribute_model(model: nn.Module, config: TrainConfig, env: Distributed) -> nn.Module:
    """`model` (from `build_model(..., meta=builds_on_meta(config, env))`) parallelized for the layout of `env`
    (TP, activation checkpointing, compile, FSDP2 / DDP), with its storage and initial values when it was built on
    the meta device."""
    model = parallelize(model, config, env, optimizer_syncs_replicas(config, env))
    if builds_on_meta(config, env):
        initialize_sharded(model, config, env.device)
    return model


@torch.no_grad()
def initialize_sharded(model: nn.Module, config: TrainConfig, device: torch.device) -> None:
    """Storage on `device` for a meta-built, parallelized model, and the initial values `build_model` gives with the
    same seed, in every layout. The model's `initial_values()` yields each parameter's full tensor in turn (drawn
    from the seeded CPU generator, as a CPU build draws them); every rank keeps its own slice of it (DTensor
    placements over FSDP2's and TP's meshes, no communication). Peak: the shards plus one full parameter and a copy
    of its slice (the largest: the token embedding or LM head, vocab x model_dim float32). The global generator ends
    in the state `build_model` leaves it in, so later random draws (e.g. an optimizer's initial Q) match too."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    model.to_empty(device=device)
    inner = unwrap(model)
    torch.manual_seed(config.seed)
    for name, value in inner.initial_values():
        param = inner.get_parameter(name)
        if isinstance(param, DTensor):
            mine = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(mine)
        else:
            param.copy_(value)
    inner.reset_buffers()


def describe_model(model: nn.Module, config: TrainConfig) -> str:
    """One line: the parameter count split into embedding / blocks / the rest, training FLOPs per token and tokens
    per optimizer step."""
    total = model.num_parameters(exclude_embedding=False)
    embedding = total - model.num_parameters()
    blocks = sum(p.numel() for p in model.blocks.parameters())
    return (f"model {config.model_name}: {total:,} parameters = {embedding:,} embedding + {blocks:,} in the blocks "
            f"(x{len(model.blocks)}) + {total - embedding - blocks:,} outside them (LM head, final norm); "
            f"{model.flops_per_token() / 1e6:,.2f} MFLOPs/token (training); {config.tokens_per_step:,} tokens/step")


def optimizer_syncs_replicas(config: TrainConfig, env: Distributed) -> bool:
    """True when the optimizer all-reduces the data-parallel replicas itself (Dion's compressed P/R sync), so
    DDP/FSDP leave the dp axis alone."""
    spec = get_spec(config.optimizer.name)
    return spec.syncs_replicate_grads and config.parallel.replicate_mesh_grad_sync and env.dp > 1


def check_layout(config: TrainConfig, env: Distributed) -> None:
    """Refusals that depend on the optimizer and the mesh, before any work."""
    name = config.optimizer.name
    if env.tp > 1 and not get_spec(name).supports_tensor_parallel:
        raise LayoutError(f"parallel.tp_size: optimizer {name!r} does not support tensor parallelism; use tp_size 1 "
                          f"or one of the optimizers marked TP in the README")
    if env.fs > 1 and not get_spec(name).supports_sharding:
        raise LayoutError(f"parallel.fs_size: optimizer {name!r} does not support FSDP-sharded parameters; use "
                          f"fs_size 1 (DDP replicas) or another optimizer")
    if config.precision.optimizer_states != "float32" and not get_spec(name).low_precision_states:
        raise LayoutError(f"precision.optimizer_states: optimizer {name!r} keeps float32 states; bfloat16 states are "
                          f"available for: {', '.join(n for n, s in OPTIMIZERS.items() if s.low_precision_states)}")


def build_training_optimizer(model: nn.Module, config: TrainConfig, env: Distributed) -> torch.optim.Optimizer:
    """The configured optimizer over the model's parameter groups, with the meshes of `env`. A value the optimizer
    refuses becomes a ConfigError naming the optimizer. With `fused_backward` the optimizer steps each parameter
    inside backward (its hooks are registered here), or, without that capability, is refused."""
    name = config.optimizer.name
    context = OptimizerContext.from_groups(
        model.param_groups(), model_dim=config.model.model_dim, options=dict(config.optimizer.options),
        scalar=config.optimizer.scalar.name, scalar_lr=config.optimizer.scalar.lr,
        state_dtype=getattr(torch, config.precision.optimizer_states),
        variance_dtype=getattr(torch, config.precision.optimizer_variances), tokens_per_step=config.tokens_per_step,
        replicate_mesh=env.submesh("dp"), outer_shard_mesh=env.submesh("fs"), inner_shard_mesh=env.submesh("tp"),
        replicate_mesh_grad_sync=optimizer_syncs_replicas(config, env))
    try:
        optimizer = build_optimizer(name, context)
    except ValueError as error:
        raise ConfigError(f"optimizer {name}: {error}") from None
    if config.fused_backward:
        hooks = training_hooks(optimizer)
        if not hooks.supports_fused_backward:
            raise ConfigError(f"fused_backward: optimizer {name!r} has no fused backward pass (the advanced family "
                              f"has: adam_adv, adopt_adv, prodigy_adv, ...)")
        hooks.register_fused_backward_hooks()
    return optimizer


def data_files(config: TrainConfig, env: Distributed):
    if config.data.dir is None:
        if env.is_main:
            ensure_embedded_corpus()
        env.barrier()
        data_dir = ensure_embedded_corpus()
    else:
        data_dir = config.data.dir
    return find_shards(data_dir, "train"), find_shards(data_dir, "val")


def micro_batch_size(config: TrainConfig, env: Distributed) -> tuple[int, int]:
    """(sequences per micro-batch per rank, micro-batches per step): data.device_batch_size, or batch_size / ranks.
    fused_backward needs one micro-batch per step (each parameter steps inside its backward)."""
    batch_size, ranks = config.data.batch_size, env.data_world_size
    device_batch_size = config.data.device_batch_size or max(batch_size // ranks, 1)
    per_step = device_batch_size * ranks
    if batch_size % per_step != 0:
        raise ConfigError(f"data.batch_size: {batch_size} is not divisible by data.device_batch_size x data-parallel "
                          f"ranks = {device_batch_size} x {ranks}; pick a batch_size that is a multiple of "
                          f"{per_step}, or leave device_batch_size null")
    accumulation = batch_size // per_step
    if config.fused_backward and accumulation > 1:
        raise ConfigError(f"fused_backward: needs one micro-batch per step, but batch_size / (device_batch_size x "
                          f"ranks) = {accumulation}; raise data.device_batch_size or turn fused_backward off")
    return device_batch_size, accumulation


def autocast_context(config: TrainConfig, device: torch.device) -> Callable[[], ContextManager]:
    """A factory of the forward's autocast context (precision.autocast on this device type; float32: none)."""
    dtype = config.precision.autocast_dtype(device.type)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def load_run(run_dir: Path, checkpoint: Path | None = None) -> tuple[TrainConfig, nn.Module, Path]:
    """(config, model in eval mode on the CPU with the checkpoint's weights, checkpoint path). `checkpoint` is a
    step_NNNNNNNN directory or a directory of them; default: the run's checkpoint.dir, else RUN/checkpoints."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"--run_dir: {run_dir} has no config.yaml (is it a train.py run directory?)")
    config = build_config(["--config", str(config_path)])
    if checkpoint is None:
        checkpoint = Path(config.checkpoint.dir) if config.checkpoint.dir else run_dir / "checkpoints"
    path = find_checkpoint(checkpoint)
    model = build_model(config, "cpu")
    load_model_weights(path, model)
    return config, model.eval(), path
