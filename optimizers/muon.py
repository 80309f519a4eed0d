"""Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; Liu et al. 2025, "Muon is
Scalable for LLM Training"): SGD-momentum whose update matrix is replaced by its nearest semi-orthogonal matrix,
computed with a few Newton-Schulz iterations.

Like Dion, the optimizer carries built-in scalar algorithms: a param group with `algorithm` = "lion" or "adamw"
(embeddings, norm gains, LM head) runs the shared element-wise updates of `optimizers.common.scalar_updates`; the default
"muon" groups must hold 2D matrices.

Distributed execution never orthogonalizes a shard on its own (the orthogonal factor of a block of rows is not the
block of the orthogonal factor):
- DTensor parameters sharded over one mesh dimension (FSDP2 `Shard(0)`, HSDP's shard axis): one all-to-all per
  matrix shape hands each rank whole matrices (round-robin), the rank runs Newton-Schulz on them, and a second
  all-to-all returns every rank its shard of every result. Replicated mesh axes repeat the same work.
- plain tensors replicated over a process group (DDP): matrices are split round-robin across ranks, each rank
  orthogonalizes its own, and one all-gather per shape hands everyone all results.
Matrices of the same shape are stacked and orthogonalized with one batched matmul chain.

Typical settings (GPT, 160M): lr 0.02 with `adjust_lr` = "spectral_norm", mu 0.95, weight decay 0.01; with
"rms_norm" the update's RMS matches AdamW's, so AdamW's LR (about 3e-3) and weight decay (0.1) carry over.
"""
from __future__ import annotations

import math
from collections import defaultdict
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard
from torch.optim import Optimizer

from optimizers.common.closure import closure_loss
from optimizers.common.param_groups import CheckedParamGroups
from optimizers.common.choices import parse_choice
from optimizers.common.scalar_updates import adamw_update, lion_update
from optimizers.common.tensors import local_tensor

# Quintic coefficients from Keller Jordan's Muon: they maximise the slope at zero so 5 steps suffice, leaving singular
# values in roughly [0.7, 1.2] rather than exactly 1, which does not hurt training.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPSILON = 1e-7
NS_DTYPES = {None: None, "bfloat16": torch.bfloat16, "float32": torch.float32}


class Algorithm(str, Enum):
    MUON = "muon"
    LION = "lion"
    ADAMW = "adamw"


class AdjustLR(str, Enum):
    """How the LR of a (fan_out, fan_in) matrix is scaled. SPECTRAL_NORM: sqrt(fan_out / fan_in), so the update has a
    fixed spectral norm relative to the layer's input/output RMS (Dion's default). RMS_NORM: 0.2 sqrt(max(fan_out,
    fan_in)), which gives the update the RMS of a typical AdamW update (Moonshot). NONE: no scaling."""
    SPECTRAL_NORM = "spectral_norm"
    RMS_NORM = "rms_norm"
    NONE = "none"


def lr_scale(adjust_lr: AdjustLR, shape: torch.Size) -> float:
    """LR multiplier of a (fan_out, fan_in) weight; see AdjustLR."""
    fan_out, fan_in = shape[0], shape[1]
    if adjust_lr is AdjustLR.SPECTRAL_NORM:
        return math.sqrt(fan_out / fan_in)
    if adjust_lr is AdjustLR.RMS_NORM:
        return 0.2 * math.sqrt(max(fan_out, fan_in))
    return 1.0


@torch.no_grad()
def newton_schulz(matrices: Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Approximate orthogonalization U V^T of G = U S V^T, batched over the leading dimension.

        X <- G / max(||G||_F, eps)                       (singular values now <= 1)
        repeat `steps` times:  A = X X^T;  B = b A + c A A;  X <- a X + B X

    matrices: (batch, m, n) of any float dtype; the iteration runs in `dtype` (bfloat16 on GPUs) on the wide
    orientation (rows <= cols, so the Gram matrix A is the small one). Returns (batch, m, n) in `dtype`.
    """
    a, b, c = coefficients
    x = matrices.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=NS_EPSILON)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if transposed else x


@torch.no_grad()
def muon_momentum_update(grads: list[Tensor], momenta: list[Tensor], *, mu: float, nesterov: bool) -> list[Tensor]:
    """Updates the momenta in place and returns the matrices to orthogonalize.

        M <- mu M + (1 - mu) G
        U = (1 - mu) G + mu M   (nesterov)   or   U = M
    """
    torch._foreach_lerp_(momenta, grads, 1.0 - mu)
    if nesterov:
        return list(torch._foreach_lerp(grads, momenta, mu))
    return list(momenta)


@torch.no_grad()
def muon_apply_update(params: list[Tensor], orthogonalized: list[Tensor], scales: list[float], *, lr: float,
                      weight_decay: float) -> None:
    """Decoupled weight decay, then the scaled orthogonal step (both with the group LR, as torch.optim.Muon):

        W <- W (1 - lr wd) - lr scale(W) O
    """
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    steps = [o.to(p.dtype) for o, p in zip(orthogonalized, params)]
    torch._foreach_mul_(steps, [-lr * s for s in scales])
    torch._foreach_add_(params, steps)


def _pad_to(t: Tensor, dim: int, size: int) -> Tensor:
    """Zero-pads dimension `dim` of t up to `size` (uneven shards, uneven splits)."""
    missing = size - t.size(dim)
    if missing == 0:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = missing
    return torch.cat([t, t.new_zeros(pad_shape)], dim=dim)


def _shard_placement(p: Tensor) -> tuple[int, int] | None:
    """(mesh dim, tensor dim) of the one Shard placement of a DTensor, None if it is replicated or plain."""
    if not isinstance(p, DTensor):
        return None
    shards = [(mesh_dim, placement.dim) for mesh_dim, placement in enumerate(p.placements)
              if isinstance(placement, Shard)]
    if len(shards) > 1:
        raise ValueError(f"Muon: a parameter of shape {tuple(p.shape)} is sharded over {len(shards)} mesh dimensions "
                         f"({p.placements}); Muon supports one sharded mesh dimension (FSDP/HSDP), not tensor "
                         f"parallelism")
    return shards[0] if shards else None


class _Orthogonalizer:
    """Runs Newton-Schulz on a list of update matrices on this rank, with the communication their placement needs.

    Each matrix is orthogonalized on exactly one rank of its group (round-robin over all matrices, so the work is
    balanced across shapes), all matrices a rank owns are stacked per shape for one batched Newton-Schulz, and the
    results travel back. Communication runs in the Newton-Schulz dtype.
    """

    def __init__(self, steps: int, coefficients: tuple[float, float, float], dtype: torch.dtype | None,
                 replicate_group: Any):
        self.steps = steps
        self.coefficients = coefficients
        self.dtype = dtype
        self.replicate_group = replicate_group

    def _ns_dtype(self, t: Tensor) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return torch.bfloat16 if t.is_cuda else torch.float32

    def _batched(self, matrices: list[Tensor]) -> list[Tensor]:
        """Newton-Schulz of every matrix, one batched call per (shape, device)."""
        results: list[Tensor | None] = [None] * len(matrices)
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, m in enumerate(matrices):
            buckets[(tuple(m.shape), m.device)].append(i)
        for indices in buckets.values():
            stacked = torch.stack([matrices[i] for i in indices])
            out = newton_schulz(stacked, self.steps, self.coefficients, self._ns_dtype(stacked))
            for i, o in zip(indices, out.unbind(0)):
                results[i] = o
        return results

    def __call__(self, params: list[Tensor], updates: list[Tensor]) -> list[Tensor]:
        """params: the (possibly DTensor) parameters; updates: their local update tensors. Returns the local parts
        of the orthogonalized updates."""
        local_jobs: list[int] = []
        sharded: dict[tuple, list[int]] = defaultdict(list)
        replicated: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            placement = _shard_placement(p)
            if placement is not None:
                mesh_dim, tensor_dim = placement
                sharded[(p.device_mesh, mesh_dim, tensor_dim, tuple(p.shape), updates[i].dtype)].append(i)
            elif self.replicate_group is not None and not isinstance(p, DTensor):
                replicated[(tuple(p.shape), updates[i].dtype)].append(i)
            else:
                local_jobs.append(i)

        results: list[Tensor | None] = [None] * len(params)
        # Phase 1: gather whole matrices on their owners.
        to_compute: list[Tensor] = [updates[i].to(self._ns_dtype(updates[i])) for i in local_jobs]
        finishers = []
        offset = 0
        for key, indices in sharded.items():
            full, finish = self._scatter_whole_matrices(key, [updates[i] for i in indices], offset)
            finishers.append((indices, len(to_compute), len(full), finish))
            to_compute.extend(full)
            offset += len(indices)
        for key, indices in replicated.items():
            own, finish = self._split_replicated([updates[i] for i in indices], offset)
            finishers.append((indices, len(to_compute), len(own), finish))
            to_compute.extend(own)
            offset += len(indices)
        # Phase 2: one batched Newton-Schulz per shape.
        computed = self._batched(to_compute)
        for position, i in enumerate(local_jobs):
            results[i] = computed[position]
        # Phase 3: results back to the shards / to every replica.
        for indices, start, count, finish in finishers:
            for i, r in zip(indices, finish(computed[start:start + count])):
                results[i] = r
        return results

    def _owners(self, count: int, world: int, offset: int) -> list[int]:
        return [(offset + j) % world for j in range(count)]

    def _scatter_whole_matrices(self, key: tuple, shards: list[Tensor], offset: int):
        """All-to-all so that each rank of the shard group holds the whole matrices it owns. Returns them and a
        function that sends the orthogonalized matrices back and returns this rank's shards, in input order."""
        mesh, mesh_dim, dim, shape, _ = key
        group = mesh.get_group(mesh_dim)
        world, rank = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
        length = shape[dim]
        chunk = -(-length // world)
        padded_shape = list(shape)
        padded_shape[dim] = chunk
        shard_numel = math.prod(padded_shape)
        owners = self._owners(len(shards), world, offset)
        counts = [owners.count(o) for o in range(world)]
        ns_dtype = self._ns_dtype(shards[0])

        order = sorted(range(len(shards)), key=lambda j: owners[j])
        send = torch.cat([_pad_to(shards[j].to(ns_dtype), dim, chunk).reshape(-1) for j in order])
        received = send.new_empty(world * counts[rank] * shard_numel)
        dist.all_to_all_single(received, send, output_split_sizes=[counts[rank] * shard_numel] * world,
                               input_split_sizes=[c * shard_numel for c in counts], group=group)
        pieces = received.view(world, counts[rank], *padded_shape)
        full = [torch.cat(pieces[:, k].unbind(0), dim=dim).narrow(dim, 0, length) for k in range(counts[rank])]

        def finish(orthogonalized: list[Tensor]) -> list[Tensor]:
            if orthogonalized:
                # (mine, ..., world * chunk, ...) -> (world, mine, ..., chunk, ...): one block per destination rank.
                stacked = torch.stack([_pad_to(o, dim, world * chunk) for o in orthogonalized])
                split = stacked.unflatten(dim + 1, (world, chunk)).movedim(dim + 1, 0)
                send_back = split.reshape(-1)
            else:
                send_back = received.new_empty(0)
            back = send_back.new_empty(len(shards) * shard_numel)
            dist.all_to_all_single(back, send_back, output_split_sizes=[c * shard_numel for c in counts],
                                   input_split_sizes=[counts[rank] * shard_numel] * world, group=group)
            back_pieces = back.view(len(shards), *padded_shape)
            local_length = max(0, min(chunk, length - rank * chunk))
            out: list[Tensor | None] = [None] * len(shards)
            for position, j in enumerate(order):
                out[j] = back_pieces[position].narrow(dim, 0, local_length)
            return out

        return full, finish

    def _split_replicated(self, matrices: list[Tensor], offset: int):
        """Each rank keeps the matrices it owns; `finish` all-gathers the results (padded to equal counts)."""
        group = self.replicate_group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        owners = self._owners(len(matrices), world, offset)
        mine = [m.to(self._ns_dtype(m)) for m, o in zip(matrices, owners) if o == rank]
        per_rank = -(-len(matrices) // world)

        def finish(orthogonalized: list[Tensor]) -> list[Tensor]:
            template = matrices[0]
            local = template.new_zeros((per_rank, *template.shape), dtype=self._ns_dtype(template))
            if orthogonalized:
                local[:len(orthogonalized)] = torch.stack(orthogonalized)
            gathered = local.new_empty((world * per_rank, *template.shape))
            dist.all_gather_into_tensor(gathered, local, group=group)
            # Owner o holds matrix j at position j // world (j runs over o's residue class).
            return [gathered[o * per_rank + j // world] for j, o in enumerate(owners)]

        return mine, finish


class Muon(CheckedParamGroups, Optimizer):
    """Muon for 2D matrices with built-in Lion/AdamW for the other groups.

    Param-group keys: lr, mu (momentum), betas and epsilon (scalar algorithms), weight_decay, nesterov, adjust_lr,
    algorithm ("muon" | "lion" | "adamw"), step (steps taken by the group, the AdamW bias correction).
    State: "momentum" for muon groups; "exp_avg" (and "exp_avg_sq" for AdamW) for scalar groups, all with the
    parameter's shape, dtype and placement.

    ns_dtype: "bfloat16" or "float32", the dtype of the Newton-Schulz iteration and of its communication (None:
    bfloat16 on CUDA, float32 elsewhere).
    distributed_mesh: DeviceMesh or ProcessGroup over which plain (replicated, DDP) matrices are split; None keeps
    every matrix on every rank. DTensor parameters always use their own mesh.
    """

    def __init__(self, params, lr: float = 0.02, mu: float = 0.95, betas: tuple[float, float] = (0.9, 0.95),
                 weight_decay: float = 0.01, epsilon: float = 1e-8, nesterov: bool = True,
                 adjust_lr: str = "spectral_norm", ns_steps: int = 5,
                 ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS, ns_dtype: str | None = None,
                 distributed_mesh: Any = None):
        if lr < 0.0:
            raise ValueError(f"Muon: lr must be >= 0, got {lr}")
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"Muon: mu must lie in [0, 1), got {mu}")
        if ns_steps < 1:
            raise ValueError(f"Muon: ns_steps must be >= 1, got {ns_steps}")
        if len(ns_coefficients) != 3:
            raise ValueError(f"Muon: ns_coefficients must be three numbers (a, b, c), got {ns_coefficients}")
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"Muon: ns_dtype must be one of {', '.join(map(str, NS_DTYPES))}, got {ns_dtype!r}")
        defaults = dict(lr=lr, mu=mu, betas=tuple(betas), weight_decay=weight_decay, epsilon=epsilon,
                        nesterov=nesterov,
                        adjust_lr=parse_choice(AdjustLR, "Muon", "adjust_lr", adjust_lr).value,
                        algorithm=Algorithm.MUON.value, step=0)
        super().__init__(params, defaults)
        for group in self.param_groups:
            algorithm = parse_choice(Algorithm, "Muon", "algorithm", group["algorithm"])
            parse_choice(AdjustLR, "Muon", "adjust_lr", group["adjust_lr"])
            if algorithm is Algorithm.MUON:
                for p in group["params"]:
                    if p.ndim != 2:
                        raise ValueError(f"Muon: algorithm 'muon' needs 2D matrices, got a parameter of shape "
                                         f"{tuple(p.shape)}; put it in a group with algorithm 'lion' or 'adamw'")
                    _shard_placement(p)
        if hasattr(distributed_mesh, "get_group"):
            if distributed_mesh.ndim != 1:
                raise ValueError(f"Muon: distributed_mesh must be 1-D, got {distributed_mesh.ndim} dimensions")
            distributed_mesh = distributed_mesh.get_group()
        if distributed_mesh is not None and dist.get_world_size(distributed_mesh) == 1:
            distributed_mesh = None
        self._orthogonalize = _Orthogonalizer(ns_steps, tuple(ns_coefficients), NS_DTYPES[ns_dtype], distributed_mesh)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        muon_groups: list[tuple[dict, list[Tensor]]] = []
        muon_params: list[Tensor] = []
        muon_updates: list[Tensor] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            group["step"] += 1
            algorithm = Algorithm(group["algorithm"])
            if algorithm is Algorithm.MUON:
                momenta = [local_tensor(self._state(p, "momentum")) for p in params]
                muon_updates += muon_momentum_update([local_tensor(p.grad) for p in params], momenta, mu=group["mu"],
                                                     nesterov=group["nesterov"])
                muon_params += params
                muon_groups.append((group, params))
                continue
            beta1, beta2 = group["betas"]
            grads = [p.grad for p in params]
            exp_avgs = [self._state(p, "exp_avg") for p in params]
            if algorithm is Algorithm.LION:
                lion_update(params, grads, exp_avgs, lr=group["lr"], beta1=beta1, beta2=beta2,
                            weight_decay=group["weight_decay"])
            else:
                adamw_update(params, grads, exp_avgs, [self._state(p, "exp_avg_sq") for p in params], lr=group["lr"],
                             beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], epsilon=group["epsilon"],
                             step=group["step"])
        if muon_params:
            orthogonalized = self._orthogonalize(muon_params, muon_updates)
            start = 0
            for group, params in muon_groups:
                adjust_lr = AdjustLR(group["adjust_lr"])
                muon_apply_update([local_tensor(p) for p in params], orthogonalized[start:start + len(params)],
                                  [lr_scale(adjust_lr, p.shape) for p in params], lr=group["lr"],
                                  weight_decay=group["weight_decay"])
                start += len(params)
        return loss

    def _state(self, p: Tensor, key: str) -> Tensor:
        state = self.state[p]
        if key not in state:
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state[key]


def runtime_kwargs(ctx) -> dict:
    """The trainer-supplied keyword: plain (DDP) matrices are split over the replicate mesh, or over the default group
    when the trainer runs distributed without meshes."""
    distributed_mesh = ctx.replicate_mesh
    if distributed_mesh is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        distributed_mesh = dist.group.WORLD
    return dict(distributed_mesh=distributed_mesh)
