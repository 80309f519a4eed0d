"""Dion2 (Ahn et al. 2025, arXiv 2512.16928) and NorDion2 (Dion2's selection with NorMuon's normalization;
microsoft/dion exports it as Dion3, so `Dion3 is NorDion2`).

Dion2 accumulates gradients in M and, each step, orthogonalizes only the k = ceil(fraction x count) slices (rows if
m <= n, else columns) of M with the largest L1 norm; the chosen slices are then decayed (error feedback) while the
others keep accumulating. The orthogonalized submatrix is k x n (or m x k), so the work and the traffic scale with
`fraction`.

`selection_scope`:
- "global" (default): the slice norms are reduced over all shards, the exact top-k is chosen, and whole matrices
  are assembled on their owner rank: the single-process result under every layout, for either orientation.
- "local": for a matrix sharded over one mesh dimension (FSDP2, HSDP's shard axis), every shard chooses its own
  top `fraction` of its slices along the sharded dimension (rows under FSDP2), and only those slices travel to the
  owner (traffic proportional to `fraction`). The selection then depends on the layout; replicas of HSDP repeat the
  shard group's work; plain (DDP) matrices and matrices sharded over two mesh dimensions use "global". NorDion2
  selects rows, so only row-sharded matrices take the local path.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from optimizers.muon.base import MatrixOptions, OrthonormalOptimizer, apply_update
from optimizers.muon.distributed import MatrixLayout, exchange_selected
from optimizers.muon.normuon import normalize_rows
from optimizers.common.choices import parse_choice


class SelectionScope(str, Enum):
    GLOBAL = "global"
    LOCAL = "local"


@dataclass(frozen=True)
class SelectionOptions(MatrixOptions):
    """The keys of row/column selection shared by Dion2 and NorDion2."""
    fraction: float = 0.25
    selection_scope: str = "global"

    def validate(self, owner: str) -> None:
        super().validate(owner)
        parse_choice(SelectionScope, owner, "selection_scope", self.selection_scope)


@dataclass(frozen=True)
class Dion2Options(SelectionOptions):
    ef_decay: float = 0.95


@dataclass(frozen=True)
class NorDion2Options(SelectionOptions):
    mu: float = 0.95
    muon_beta2: float = 0.95


def selected_count(fraction: float, count: int) -> int:
    """k = ceil(fraction x count), at least one slice of a non-empty dimension."""
    return 0 if count == 0 else max(1, math.ceil(fraction * count))


def top_slices(norms: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries of `norms`, in increasing order."""
    return torch.topk(norms, k, sorted=False).indices.sort().values


def _local_indices(indices: Tensor, start: int, length: int) -> Tensor:
    inside = (indices >= start) & (indices < start + length)
    return indices[inside] - start


@torch.no_grad()
def decay_slices(momentum: Tensor, dim: int, indices: Tensor, ef_decay: float) -> None:
    """Error feedback: M_S <- ef_decay M_S on the chosen slices (local indices along `dim`); the rest keeps
    accumulating."""
    momentum.index_copy_(dim, indices, momentum.index_select(dim, indices) * ef_decay)


class Dion2(OrthonormalOptimizer):
    """Dion2 for 2D matrices (3D+ with flatten) with built-in Lion/AdamW for the other groups.

    Keywords (and per-group overrides): lr 0.01, fraction 0.25, ef_decay 0.95, selection_scope "global",
    weight_decay 0.01, adjust_lr "spectral_norm", cautious_wd False, flatten False, betas and epsilon (scalar
    algorithms); constructor only: orthogonalizer "polar_express", ns_steps 5, ns_coefficients, ns_dtype,
    distributed_mesh. State: "momentum" (the parameter's shape and placement); "exp_avg" ("exp_avg_sq") for
    scalar groups.

    Per matrix X (m x n), with s(m, n) the LR scale:
        X <- X (1 - lr wd);  M <- M + G;  S = the k slices of M with the largest L1 norm
        O = orth(M_S);  M_S <- ef_decay M_S;  X_S <- X_S - lr s(m, n) O
    """
    options_class = Dion2Options
    algorithm = "dion2"
    fixed_selection_dim: int | None = None  # None: rows if m <= n, else columns
    normalizes_rows = False  # finish() needs the (m, 1) mask of the chosen rows

    def selection_dim(self, layout: MatrixLayout) -> int:
        if self.fixed_selection_dim is not None:
            return self.fixed_selection_dim
        return 0 if layout.shape[0] <= layout.shape[1] else 1

    def ef_decay(self, group: dict) -> float:
        return group["ef_decay"]

    def finish(self, group: dict, p: Tensor, layout: MatrixLayout, update: Tensor, rows: Tensor | None) -> None:
        """Applies the step; update: this rank's part of O scattered into zeros (m x n); rows: the (m, 1) bool
        mask of the chosen rows when `normalizes_rows` (rows are then always the selection)."""
        apply_update(layout.local_matrix(p), update, lr=group["lr"], scale=self.scale(group, layout),
                     weight_decay=group["weight_decay"], cautious_wd=group["cautious_wd"])

    def _local_dim(self, group: dict, layout: MatrixLayout) -> int | None:
        """The mesh dimension to select within under selection_scope "local" (the matrix must be sharded over
        exactly one, along a dimension this member may select); None: the global path."""
        if group["selection_scope"] != SelectionScope.LOCAL.value or not layout.is_dtensor:
            return None
        sharded = layout.sharded_dims()
        if len(sharded) != 1 or (self.fixed_selection_dim is not None and sharded[0][1] != self.fixed_selection_dim):
            return None
        return sharded[0][0]

    def _matrix_step(self, groups: list[tuple[dict, list[Tensor]]]) -> None:
        items, inputs, selections = [], [], []
        local_buckets: dict[tuple, list[tuple]] = defaultdict(list)
        for group, params in groups:
            for p in params:
                layout = self.layout(p, group)
                momentum = layout.local_matrix(self.state_tensor(p, "momentum"))
                momentum.add_(layout.local_matrix(p.grad).to(momentum.dtype))
                mesh_dim = self._local_dim(group, layout)
                if mesh_dim is not None:
                    key = (layout.mesh, mesh_dim, layout.shape, momentum.dtype, group["fraction"])
                    local_buckets[key].append((group, p, layout, momentum))
                    continue
                dim = self.selection_dim(layout)
                norms = layout.full_sums(momentum.abs(), dim=1 - dim)
                chosen = top_slices(norms, selected_count(group["fraction"], layout.shape[dim]))
                items.append((group, p, layout, momentum))
                # Plain (replicated) matrices are whole on every rank: only the chosen slices travel. DTensor
                # shards go whole to the owner, which selects.
                source = momentum if layout.is_dtensor else momentum.index_select(dim, chosen)
                inputs.append(source.to(self.orthogonalize.working_dtype(momentum)))
                selections.append((dim, chosen))

        def compute(indices: list[int], stack: Tensor) -> Tensor:
            if not items[indices[0]][2].is_dtensor:
                return self.orthogonalize(stack)
            out = None
            by_count: dict[int, list[int]] = defaultdict(list)
            for position, i in enumerate(indices):
                by_count[len(selections[i][1])].append(position)
            for positions in by_count.values():
                chosen = torch.stack([stack[b].index_select(selections[indices[b]][0], selections[indices[b]][1])
                                      for b in positions])
                orthogonalized = self.orthogonalize(chosen)
                if out is None:
                    out = stack.new_zeros(stack.shape, dtype=orthogonalized.dtype)
                for b, o in zip(positions, orthogonalized):
                    out[b].index_copy_(selections[indices[b]][0], selections[indices[b]][1], o)
            return out

        updates = self.whole_matrices([layout for _, _, layout, _ in items], inputs, compute) if items else []
        for (group, p, layout, momentum), update, (dim, chosen) in zip(items, updates, selections):
            if not layout.is_dtensor:
                update = torch.zeros_like(momentum, dtype=update.dtype).index_copy_(dim, chosen, update)
            start, length = layout.local_range(dim)
            decay_slices(momentum, dim, _local_indices(chosen, start, length), self.ef_decay(group))
            rows = None
            if self.normalizes_rows:
                rows = torch.zeros(layout.shape[0], 1, dtype=torch.bool, device=momentum.device)
                rows[chosen] = True
            self.finish(group, p, layout, update, rows)
        for (mesh, mesh_dim, _, _, _), bucket in local_buckets.items():
            self._local_scope(mesh, mesh_dim, bucket)

    def _local_scope(self, mesh, mesh_dim: int, bucket: list[tuple]) -> None:
        """Every rank of the shard group chooses its own top slices along the sharded dimension; only those travel
        (see `exchange_selected`)."""
        group0, _, layout, _ = bucket[0]
        dim = layout.placements[mesh_dim].dim
        world, rank = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
        length = layout.shape[dim]
        chunk = -(-length // world)
        lengths = [max(0, min(chunk, length - r * chunk)) for r in range(world)]
        counts = [selected_count(group0["fraction"], n) for n in lengths]
        padded = selected_count(group0["fraction"], chunk)
        pieces, chosen_local = [], []
        for group, p, layout, momentum in bucket:
            chosen = top_slices(momentum.abs().sum(1 - dim), counts[rank])
            piece_shape = list(momentum.shape)
            piece_shape[dim] = padded
            piece = momentum.new_zeros(piece_shape, dtype=self.orthogonalize.working_dtype(momentum))
            piece.narrow(dim, 0, counts[rank]).copy_(momentum.index_select(dim, chosen))
            pieces.append(piece)
            chosen_local.append(chosen)

        def compute(indices: list[int], matrices: list[Tensor]) -> list[Tensor]:
            return list(self.orthogonalize(torch.stack(matrices)).unbind(0))

        results = exchange_selected(pieces, counts, mesh.get_group(mesh_dim), dim, compute)
        for (group, p, layout, momentum), chosen, result in zip(bucket, chosen_local, results):
            decay_slices(momentum, dim, chosen, self.ef_decay(group))
            update = torch.zeros_like(momentum, dtype=result.dtype)
            update.index_copy_(dim, chosen, result.narrow(dim, 0, counts[rank]))
            rows = None
            if self.normalizes_rows:
                indicator = torch.zeros_like(momentum, dtype=torch.float32)
                indicator[chosen] = 1.0
                rows = (layout.full_sums(indicator, dim=1) > 0).unsqueeze(1)
            self.finish(group, p, layout, update, rows)


class NorDion2(Dion2):
    """NorDion2: Dion2's selection on rows with ef_decay = mu, then NorMuon's normalization of the chosen rows (their
    second moment v is updated on those rows only).

    Keywords (and per-group overrides): lr 0.01, fraction 0.25, mu 0.95, muon_beta2 0.95, selection_scope
    "global", weight_decay 0.01, adjust_lr "spectral_norm", cautious_wd False, flatten False, betas and epsilon;
    constructor only: as Dion2. State: "momentum" and "variance" (m x 1, float32, the full vector on every rank).
    """
    options_class = NorDion2Options
    algorithm = "nordion2"
    fixed_selection_dim = 0
    normalizes_rows = True

    def ef_decay(self, group: dict) -> float:
        return group["mu"]

    def finish(self, group: dict, p: Tensor, layout: MatrixLayout, update: Tensor, rows: Tensor | None) -> None:
        variance = self.row_state(p, layout, "variance")
        normalized = normalize_rows(update, layout, variance, beta2=group["muon_beta2"], rows=rows)
        super().finish(group, p, layout, normalized, rows)


Dion3 = NorDion2
