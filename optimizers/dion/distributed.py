"""How a Dion matrix is laid out over the process groups, and the collectives the Dion optimizers issue.

Dion runs on the tall orientation of each matrix X (m x n, fan_out x fan_in): on X itself when m >= n, on X^T when
m < n. Call that orientation the algorithm matrix, with "rows" (the side of P, orthonormalized) and "columns" (the
side of Q). Either side may be sharded over one process group:
- P = B Q sums over the columns: all-reduce P over the column group.
- orth(P) needs P^T P (or the sketch S P) summed over the rows: all-reduce it over the row group.
- R = B^T P sums over the rows: all-reduce R over the row group.
- the column norms of R sum over R's rows (= the algorithm's columns): all-reduce them over the column group.
- X <- X - lr P Q^T is local: each rank holds the rows of P and of Q that match its shard of X.
FSDP2 (`outer_shard_mesh`) and TP (`inner_shard_mesh`) only decide which group shards which side, so every
combination (FSDP only, TP only, FSDP + TP on the two dims, any orientation) follows the same pattern and no rank ever
gathers a full matrix. Data-parallel replicas (`replicate_mesh`) average either the gradient (all of it) or the
low-rank P and R (compressed, PowerSGD-style), see `MatrixLayout.compressed`. A P or R that is summed over a shard
group first is divided among that group's ranks before the replicas average it (`sum_then_average`), so the
replicas exchange (m + n) r / |shards| elements per matrix and rank, not (m / |shards| + n) r.

Collectives are issued asynchronously and handed to the caller as `Work` objects: the update code is written as
generators that `yield` each pending collective, and a driver decides when to wait (`run_blocking` waits at once;
`run_overlapped` keeps several batches in flight so one batch's communication overlaps another's compute).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Generator, Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DeviceMesh, DTensor, Replicate, Shard

try:
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # older torch: no strided sharding to reject
    _StridedShard = None

# torch >= 2.12 names the single-tensor collectives *_single; older versions only have the *_tensor spellings.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# A generator that yields pending collectives (a Work, or None when nothing was issued) and returns a value.
Collectives = Generator[Any, None, Any]


def process_group(mesh: DeviceMesh | ProcessGroup | None, key: str) -> ProcessGroup | None:
    """The process group of a 1-D DeviceMesh (flattened meshes included) or a ProcessGroup; None when there is
    nothing to communicate with (no mesh, or a single rank)."""
    if mesh is None:
        return None
    if isinstance(mesh, DeviceMesh):
        if mesh.ndim != 1:
            raise ValueError(f"dion: {key}: expected a 1-D DeviceMesh (take a sub-mesh or flatten it), got "
                             f"{mesh.ndim}-D with dims {mesh.mesh_dim_names}")
        group = mesh.get_group()
    elif isinstance(mesh, ProcessGroup):
        group = mesh
    else:
        raise ValueError(f"dion: {key}: expected a DeviceMesh, a ProcessGroup or None, got {type(mesh).__name__}")
    return group if dist.get_world_size(group) > 1 else None


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _chunk(size: int, parts: int, index: int) -> tuple[int, int]:
    """(offset, length) of chunk `index` of `size` elements split like torch.chunk (DTensor's Shard)."""
    chunk = -(-size // parts)
    start = min(index * chunk, size)
    return start, min(start + chunk, size) - start


@dataclass(frozen=True)
class MatrixLayout:
    """Where one Dion matrix lives. `shape` is X's global shape; `transposed` says the algorithm matrix is X^T.

    row_group / column_group shard the algorithm's rows / columns (None: not sharded); rows = (offset, length,
    chunk) of this rank's rows of the algorithm matrix (chunk: rows per rank, for padded gathers), columns =
    (offset, length). x_slices selects this rank's shard of X (X's orientation). column_mesh_dim: the mesh dimension
    of the DTensor parameter that shards the columns (Q is sharded the same way), or None."""
    shape: tuple[int, int]
    transposed: bool
    row_group: ProcessGroup | None
    column_group: ProcessGroup | None
    rows: tuple[int, int, int]
    columns: tuple[int, int]
    x_slices: tuple[slice, slice]
    column_mesh_dim: int | None

    @property
    def algorithm_shape(self) -> tuple[int, int]:
        m, n = self.shape
        return (n, m) if self.transposed else (m, n)

    def compressed(self, replicate_group: ProcessGroup | None, low_rank: int) -> bool:
        """All-reduce the low-rank P (m x r) and R (n x r) over the replicas instead of the gradient (m x n) when that
        moves fewer numbers: (m + n) r < m n."""
        m, n = self.shape
        return replicate_group is not None and (m + n) * low_rank < m * n


def _group_ranks(group: ProcessGroup | None) -> tuple[int, ...] | None:
    return None if group is None else tuple(dist.get_process_group_ranks(group))


def matrix_layout(param: Tensor, outer_group: ProcessGroup | None, inner_group: ProcessGroup | None) -> MatrixLayout:
    """The layout of a 2-D parameter: a plain tensor is whole on every rank; a DTensor may be sharded over the outer
    (FSDP) and inner (TP) groups, at most one group per tensor dimension."""
    m, n = param.shape
    transposed = m < n
    dim_groups: list[ProcessGroup | None] = [None, None]
    dim_mesh_dims: list[int | None] = [None, None]
    spans = [(0, m, m), (0, n, n)]
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        known = {_group_ranks(group) for group in (outer_group, inner_group) if group is not None}
        for mesh_dim, placement in enumerate(param.placements):
            if _StridedShard is not None and isinstance(placement, _StridedShard):
                raise ValueError("dion: strided sharding (FSDP and TP on the same tensor dimension) is not supported; "
                                 "shard the two dimensions of a matrix over different meshes")
            if not placement.is_shard() or mesh.size(mesh_dim) == 1:
                continue
            group = mesh.get_group(mesh_dim)
            if _group_ranks(group) not in known:
                raise ValueError(f"dion: a parameter of shape {tuple(param.shape)} is sharded over mesh dimension "
                                 f"{mesh_dim} ({mesh.mesh_dim_names}), which is neither outer_shard_mesh nor "
                                 f"inner_shard_mesh")
            dim = placement.dim
            if dim_groups[dim] is not None:
                raise ValueError(f"dion: tensor dimension {dim} of a parameter of shape {tuple(param.shape)} is "
                                 f"sharded over two mesh dimensions; shard each dimension over at most one mesh")
            size = param.shape[dim]
            parts = mesh.size(mesh_dim)
            start, length = _chunk(size, parts, mesh.get_local_rank(mesh_dim))
            dim_groups[dim], dim_mesh_dims[dim] = group, mesh_dim
            spans[dim] = (start, length, -(-size // parts))
    row_dim, column_dim = (1, 0) if transposed else (0, 1)
    return MatrixLayout(
        shape=(m, n), transposed=transposed,
        row_group=dim_groups[row_dim], column_group=dim_groups[column_dim],
        rows=spans[row_dim], columns=spans[column_dim][:2],
        x_slices=tuple(slice(start, start + length) for start, length, _ in spans),
        column_mesh_dim=dim_mesh_dims[column_dim])


def q_placements(param: Tensor, layout: MatrixLayout) -> tuple:
    """DTensor placements of Q (rows = the algorithm's columns) on the parameter's mesh."""
    placements = [Replicate()] * param.device_mesh.ndim
    if layout.column_mesh_dim is not None:
        placements[layout.column_mesh_dim] = Shard(0)
    return tuple(placements)


def as_like(local: Tensor, param: Tensor, shape: tuple[int, ...], placements: tuple | None = None) -> Tensor:
    """Wrap a local shard as a DTensor on `param`'s mesh (global `shape`) when `param` is a DTensor."""
    if not isinstance(param, DTensor):
        return local
    placements = param.placements if placements is None else placements
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, param.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


def all_reduce(tensor: Tensor, group: ProcessGroup | None):
    """Start a sum over `group` in place; returns the Work (None when there is no group)."""
    if group is None:
        return None
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)


def all_reduce_mean(tensor: Tensor, group: ProcessGroup | None) -> Collectives:
    """Average `tensor` over `group` in place."""
    if group is not None:
        yield all_reduce(tensor, group)
        tensor.div_(group_size(group))


def sum_then_average(tensor: Tensor, group: ProcessGroup | None, replicas: ProcessGroup | None) -> Collectives:
    """Sum `tensor` over `group`, then average it over `replicas`, in place.

    After the sum every rank of `group` holds the same tensor, so the replicas need not all exchange all of it: the
    sum is reduce-scattered over `group` (the flat tensor, zero-padded to a multiple of |group|), each rank averages
    its 1/|group| share over the replicas, and an all-gather over `group` puts the shares back together. That moves
    as much over `group` as the all-reduce would, and |group| times less over the replicas: (m + n) r / fs elements
    per rank per HSDP matrix for Dion's P and R instead of (m / fs + n) r. The replica group of rank i of `group`
    must hold the ranks at position i of the other copies of `group` (a (dp, fs) mesh does), so that the ranks
    averaging a share hold the same elements."""
    if group is None or replicas is None:
        yield all_reduce(tensor, group)
        yield from all_reduce_mean(tensor, replicas)
        return
    numel, world = tensor.numel(), group_size(group)
    share = -(-numel // world)
    flat = tensor.new_zeros(world * share)
    flat[:numel] = tensor.reshape(-1)
    mine = flat.new_empty(share)
    yield _reduce_scatter(mine, flat, group=group, async_op=True)
    yield from all_reduce_mean(mine, replicas)
    yield _all_gather(flat, mine, group=group, async_op=True)
    tensor.copy_(flat[:numel].view_as(tensor))


def reduce_scatter_batch(stack: Tensor, group: ProcessGroup) -> Collectives:
    """Sum a stack (b x ...) over `group`; rank i receives matrices [i b/w, (i+1) b/w). b must divide by w."""
    out = stack.new_empty((stack.shape[0] // group_size(group), *stack.shape[1:]))
    yield _reduce_scatter(out, stack.contiguous(), group=group, async_op=True)
    return out


class _AllWorks:
    """Several pending collectives waited for as one."""

    def __init__(self, works: list):
        self.works = works

    def wait(self) -> None:
        for work in self.works:
            work.wait()


def all_gather_batch(*stacks: Tensor, group: ProcessGroup) -> Collectives:
    """Concatenate every rank's stacks (c x ...) along the batch dimension, in rank order; all stacks travel at once.
    Returns one gathered tensor per stack (a single tensor for a single stack)."""
    outs = [stack.new_empty((stack.shape[0] * group_size(group), *stack.shape[1:])) for stack in stacks]
    yield _AllWorks([_all_gather(out, stack.contiguous(), group=group, async_op=True)
                     for out, stack in zip(outs, stacks)])
    return outs[0] if len(outs) == 1 else outs


def all_gather_rows(local: Tensor, group: ProcessGroup | None, rows: tuple[int, int, int], total: int) -> Collectives:
    """The full rows (b x total x r) of a row-sharded stack (b x length x r; shards of `chunk` rows, the last ones
    possibly shorter or empty, as torch.chunk splits)."""
    if group is None:
        return local
    _, length, chunk = rows
    padded = local.new_zeros((local.shape[0], chunk, local.shape[2]))
    padded[:, :length] = local
    world = group_size(group)
    gathered = yield from all_gather_batch(padded, group=group)
    # (w b, chunk, r) -> (b, w chunk, r), then drop the padding rows of the short last shards.
    gathered = gathered.view(world, *padded.shape).permute(1, 0, 2, 3)
    return gathered.reshape(local.shape[0], world * chunk, local.shape[2])[:, :total]


class HostFlag:
    """A boolean device tensor read on the host without stalling the pipeline: on CUDA it is copied into pinned
    memory on the current stream and an event is recorded, so the generator can `yield` it like a pending collective;
    `run_overlapped` then resumes other batches (enqueuing their kernels and collectives) and waits for the event only
    when this batch is the oldest one in flight. On the CPU the value is there at once. Every rank of the group the
    value was reduced over reads the same value, so the collectives that follow stay in the same order on every rank.
    """

    def __init__(self, flag: Tensor):
        self._event = None
        if flag.device.type == "cuda":
            self._host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = flag

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def __bool__(self) -> bool:
        self.wait()
        return bool(self._host.all())


def run_blocking(collectives: Collectives):
    """Drive a generator, waiting for each collective as soon as it is issued; returns the generator's value."""
    try:
        work = next(collectives)
        while True:
            if work is not None:
                work.wait()
            work = collectives.send(None)
    except StopIteration as stop:
        return stop.value


def run_overlapped(tasks: Iterable[Collectives], max_in_flight: int) -> None:
    """Run generators concurrently: up to `max_in_flight` are started, and the one whose collective was issued first
    is resumed first (after waiting for it), so the communication of each overlaps the compute of the others. The
    order of collectives depends only on the tasks, never on timing, so every rank issues them in the same order."""
    pending = iter(tasks)
    in_flight: deque = deque()

    def advance(task: Collectives) -> None:
        try:
            in_flight.append((task, task.send(None)))
        except StopIteration:
            pass

    while True:
        while len(in_flight) < max_in_flight:
            task = next(pending, None)
            if task is None:
                break
            advance(task)
        if not in_flight:
            return
        task, work = in_flight.popleft()
        if work is not None:
            work.wait()
        advance(task)
