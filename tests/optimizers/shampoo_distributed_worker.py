"""torchrun worker for test_shampoo.py: DistributedShampoo on gloo ranks against the single-process result.

    torchrun --standalone --nproc_per_node=2 tests/optimizers/shampoo_distributed_worker.py OUT_DIR

Runs the same seeded parameters and gradients three ways: on this process alone (a one-rank process group), with
plain parameters and the root-inverse work split over the default group (DDP), and with Shard(0) DTensor parameters
and gradients (what FSDP2 hands the optimizer). Writes OUT_DIR/rank{r}.json with the largest differences.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import optimizers.shampoo.optimizer as shampoo_module
from optimizers.shampoo import DistributedShampoo

SHAPES = [(8, 6), (5, 6), (7,), (3, 4, 5), (10, 9)]
OPTIONS = dict(lr=0.05, betas=(0.9, 0.99), epsilon=1e-6, weight_decay=0.01, max_preconditioner_dim=4,
               precondition_frequency=2, start_preconditioning_step=2)
STEPS = 5


def initial_tensors() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def gradients(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def run(process_group, to_parameter, **overrides) -> list[torch.Tensor]:
    """Full parameter values after STEPS steps."""
    params = [torch.nn.Parameter(to_parameter(t)) for t in initial_tensors()]
    optimizer = DistributedShampoo(params, process_group=process_group, **{**OPTIONS, **overrides})
    for step in range(STEPS):
        for p, g in zip(params, gradients(step)):
            p.grad = to_parameter(g)
        optimizer.step()
    return [p.detach().full_tensor() if isinstance(p, DTensor) else p.detach() for p in params]


def count_root_inverses():
    """Wrap the optimizer's root-inverse function to count the calls made on this rank."""
    original = shampoo_module.matrix_inverse_root
    calls = [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)
    shampoo_module.matrix_inverse_root = counted
    return calls


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    singleton_groups = [dist.new_group([r]) for r in range(world_size)]
    mesh = init_device_mesh("cpu", (world_size,))
    calls = count_root_inverses()

    reference = run(singleton_groups[rank], lambda t: t.clone())
    reference_calls = calls[0]
    calls[0] = 0
    data_parallel = run(None, lambda t: t.clone())
    data_parallel_calls = calls[0]

    def shard(t: torch.Tensor) -> DTensor:
        return distribute_tensor(t, mesh, [Shard(0)])
    reference_l2 = run(singleton_groups[rank], lambda t: t.clone(), adam_w_mode=False)
    sharded_l2 = run(None, shard, adam_w_mode=False)

    flat = torch.cat([p.reshape(-1) for p in data_parallel])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    result = dict(
        data_parallel_vs_single=max_difference(data_parallel, reference),
        fsdp_vs_single=max_difference(sharded_l2, reference_l2),
        across_ranks=max(float((g - gathered[0]).abs().max()) for g in gathered),
        reference_root_inverses=reference_calls,
        data_parallel_root_inverses=data_parallel_calls,
        moved_from_start=max_difference(reference, initial_tensors()),
    )
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
