"""DistributedShampoo: Kronecker-factored preconditioning with learning-rate grafting (Gupta et al. 2018, "Shampoo";
Anil et al. 2020, "Scalable Second Order Optimization for Deep Learning"; Shi et al. 2023, "A Distributed
Data-Parallel PyTorch Implementation of the Distributed Shampoo Optimizer").

The math lives in `updates.py` (moments, factors, grafting), `matrix_functions.py` (inverse roots) and `blocking.py`
(how a parameter is cut into blocks); this class owns the state, the parameter groups, the schedule and the
distribution of the root-inverse work (`distributed.py`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim import Optimizer

from optimizers.common.closure import closure_loss
from optimizers.common.param_groups import CheckedParamGroups
from optimizers.shampoo.blocking import BlockPlan, plan_blocks
from optimizers.shampoo.config import GraftingType, LargeDimMethod, Precision, RootInverseMethod, ShampooConfig
from optimizers.shampoo.distributed import compute_shared
from optimizers.shampoo.matrix_functions import matrix_inverse_root
from optimizers.shampoo.updates import (apply_kronecker_preconditioner, diagonal_inverse_root, graft,
                                        grafting_direction, update_first_moment, update_grafting_state,
                                        update_kronecker_factors)


class DistributedShampoo(CheckedParamGroups, Optimizer):
    """Shampoo with a grafted step size, for dense parameters of any order.

    One step, per parameter with gradient g (t = the parameter's step count):
      1. L2 weight decay (adam_w_mode=False): g <- g + wd p.
      2. First moment (betas[0] = b1 > 0): m <- b1 m + (1 - b1) g, m^ = m / (1 - b1^t) (bias_correction) or m;
         b1 = 0: m^ = g.
      3. Grafting state from g (see GraftingType) and the grafted direction D_graft(m^).
      4. Per block G of order k: Kronecker factors L_i <- b2 L_i + (1 - b2) G_(i) G_(i)^T (b2 = betas[1]; b2 = 1
         sums), and at steps start_preconditioning_step + n * precondition_frequency the root inverses
         P_i = (L_i / (1 - b2^t) + epsilon I)^(-1/(2k)) (bias correction only when b2 < 1).
      5. From start_preconditioning_step on, per block: D = (m^ x_1 P_1 ... x_k P_k) * ||D_graft|| / ||that||
         (for a matrix P_1 m^ P_2 with -1/4 roots); before it, D = D_graft (the grafted method alone).
      6. p <- p (1 - lr wd) if adam_w_mode; p <- p - lr D.
    With preconditioning never started this is exactly SGD with momentum, AdaGrad, RMSprop or Adam(W).

    State per parameter: `step`, `exp_avg` (b1 > 0) and `grafting_state` (not SGD) in the parameter's dtype,
    `factors` and `root_inverses` (identity until first computed): flat lists (block by block, one per dimension) in
    factor_matrix_dtype. torch's load_state_dict casts state to the parameter dtype; the configured precision is
    restored on the next step (so float64 factors of float32 parameters resume from float32-rounded values).

    Distributed: when torch.distributed is initialized, gradients must already be synced (DDP, or FSDP2's
    reduce-scatter). Every rank updates every factor (cheap products), the root inverses are split across the ranks
    of `process_group` (default: the default group) and all-gathered, so all ranks hold identical state. DTensor
    parameters (FSDP2 Shard(0), HSDP, any placement) are supported by all-gathering each gradient to its full
    shape, running the step above on the full tensor, and adding the local part of the update to the local shard:
    the result equals single-process Shampoo (blocks do not depend on the sharding) at the price of one gradient
    all-gather per step and full-size optimizer state on every rank (replicated, so any checkpointing that saves
    replicated tensors once, torch.distributed.checkpoint included, restores it). No CPU offload.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 1.0), epsilon: float = 1e-12,
                 weight_decay: float = 0.0, grafting_type: GraftingType | str = GraftingType.ADAM,
                 grafting_epsilon: float = 1e-8, grafting_beta2: float = 0.999, adam_w_mode: bool = True,
                 bias_correction: bool = True, max_preconditioner_dim: int = 1024,
                 large_dim_method: LargeDimMethod | str = LargeDimMethod.BLOCKING, merge_small_dims: bool = True,
                 precondition_frequency: int = 1, start_preconditioning_step: int = 1,
                 root_inverse_method: RootInverseMethod | str = RootInverseMethod.EIGEN,
                 newton_max_iterations: int = 100, newton_tolerance: float = 1e-6,
                 factor_matrix_dtype: Precision | str | torch.dtype = Precision.FLOAT32,
                 root_inverse_dtype: Precision | str | torch.dtype = Precision.FLOAT32, process_group=None):
        self.config = ShampooConfig(
            grafting_type=grafting_type, grafting_epsilon=grafting_epsilon, grafting_beta2=grafting_beta2,
            adam_w_mode=adam_w_mode, bias_correction=bias_correction, max_preconditioner_dim=max_preconditioner_dim,
            large_dim_method=large_dim_method, merge_small_dims=merge_small_dims,
            precondition_frequency=precondition_frequency, start_preconditioning_step=start_preconditioning_step,
            root_inverse_method=root_inverse_method, newton_max_iterations=newton_max_iterations,
            newton_tolerance=newton_tolerance, factor_matrix_dtype=factor_matrix_dtype,
            root_inverse_dtype=root_inverse_dtype)
        self.process_group = process_group
        super().__init__(params, dict(lr=lr, betas=tuple(betas), epsilon=epsilon, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        beta1, beta2 = group["betas"]
        if not group["lr"] >= 0.0:
            raise ValueError(f"DistributedShampoo: lr must be >= 0; got {group['lr']}")
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 <= 1.0):
            raise ValueError(f"DistributedShampoo: betas must satisfy 0 <= betas[0] < 1 and 0 <= betas[1] <= 1; "
                             f"got {group['betas']}")
        if not group["epsilon"] > 0.0:
            raise ValueError(f"DistributedShampoo: epsilon must be > 0; got {group['epsilon']}")
        if not group["weight_decay"] >= 0.0:
            raise ValueError(f"DistributedShampoo: weight_decay must be >= 0; got {group['weight_decay']}")

    def _plan(self, shape: torch.Size) -> BlockPlan:
        config = self.config
        return plan_blocks(tuple(shape), config.max_preconditioner_dim, config.large_dim_method,
                           config.merge_small_dims)

    def _work_group(self):
        if self.process_group is not None:
            return self.process_group
        if dist.is_available() and dist.is_initialized():
            return dist.group.WORLD
        return None

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        updates = []
        root_inverse_requests = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = self._full_gradient(p, group)
                state = self.state[p]
                step = self._update_statistics(state, grad, group)
                if self.config.recompute_root_inverses(step):
                    root_inverse_requests.append((state, grad.shape, group, step))
                updates.append((p, grad, state, group, step))
        self._compute_root_inverses(root_inverse_requests)
        for p, grad, state, group, step in updates:
            self._apply_update(p, grad, state, group, step)
        return loss

    def _full_gradient(self, p: Tensor, group: dict) -> Tensor:
        grad = p.grad
        if group["weight_decay"] != 0.0 and not self.config.adam_w_mode:
            grad = grad + group["weight_decay"] * p
        return grad.full_tensor() if isinstance(grad, DTensor) else grad

    def _update_statistics(self, state: dict, grad: Tensor, group: dict) -> int:
        """Steps 2-4 of the class docstring, except the root inverses; returns the parameter's step count."""
        config = self.config
        beta1, beta2 = group["betas"]
        plan = self._plan(grad.shape)
        factor_dtype = config.factor_matrix_dtype.dtype
        if not state:
            state["step"] = torch.tensor(0.0)
            if beta1 > 0.0:
                state["exp_avg"] = torch.zeros_like(grad)
            if config.grafting_type is not GraftingType.SGD:
                state["grafting_state"] = torch.zeros_like(grad)
            state["factors"] = [torch.zeros((d,) if is_diagonal else (d, d), dtype=factor_dtype, device=grad.device)
                                for block in plan.blocks for d, is_diagonal in zip(block.shape, block.diagonal)]
            # Allocated with the factors so that the state has its final structure from the first step on
            # (torch.distributed.checkpoint loads into a template made by one step with zero gradients).
            state["root_inverses"] = [_identity_like(factor) for factor in state["factors"]]
        for key in ("factors", "root_inverses"):
            if state[key][0].dtype != factor_dtype:
                state[key] = [t.to(factor_dtype) for t in state[key]]
        state["step"] += 1
        step = int(state["step"])
        if config.grafting_type is not GraftingType.SGD:
            update_grafting_state(state["grafting_state"], grad, grafting_type=config.grafting_type,
                                  beta2=config.grafting_beta2, dtype=_compute_dtype(grad))
        view = grad.reshape(plan.view_shape)
        offset = 0
        for block in plan.blocks:
            order = len(block.shape)
            update_kronecker_factors(view[block.slices], state["factors"][offset:offset + order], block.diagonal,
                                     beta2=beta2)
            offset += order
        return step

    def _compute_root_inverses(self, requests: list) -> None:
        """P = (L^ + eps I)^(-1/(2k)) for every factor of the requested parameters: diagonal factors here, matrices
        split across the ranks of the work group."""
        config = self.config
        matrices, roots, epsilons, targets = [], [], [], []
        for state, shape, group, step in requests:
            beta2 = group["betas"][1]
            scale = 1.0 / (1.0 - beta2 ** step) if config.bias_correction and beta2 < 1.0 else 1.0
            index = 0
            for block in self._plan(shape).blocks:
                root = 2 * len(block.shape)
                for is_diagonal in block.diagonal:
                    factor, target = state["factors"][index] * scale, state["root_inverses"][index]
                    index += 1
                    if is_diagonal:
                        target.copy_(diagonal_inverse_root(factor, root, group["epsilon"]))
                    else:
                        matrices.append(factor)
                        roots.append(root)
                        epsilons.append(group["epsilon"])
                        targets.append(target)

        def compute(i: int) -> Tensor:
            return matrix_inverse_root(matrices[i], roots[i], epsilons[i], config.root_inverse_method,
                                       config.root_inverse_dtype.dtype, config.newton_max_iterations,
                                       config.newton_tolerance)

        for target, result in zip(targets, compute_shared(matrices, compute, self._work_group())):
            target.copy_(result)

    def _apply_update(self, p: Tensor, grad: Tensor, state: dict, group: dict, step: int) -> None:
        """Steps 2, 3, 5 and 6 of the class docstring."""
        config = self.config
        beta1 = group["betas"][0]
        dtype = _compute_dtype(grad)
        if beta1 > 0.0:
            first_moment = update_first_moment(state["exp_avg"], grad, beta1=beta1, step=step,
                                               bias_correction=config.bias_correction, dtype=dtype)
        else:
            first_moment = grad.to(dtype)
        direction = grafting_direction(first_moment, state.get("grafting_state"), grafting_type=config.grafting_type,
                                       epsilon=config.grafting_epsilon, beta2=config.grafting_beta2, step=step)
        if config.preconditioning_active(step):
            direction = self._precondition(first_moment, direction, state["root_inverses"])
        lr, weight_decay = group["lr"], group["weight_decay"]
        if weight_decay != 0.0 and config.adam_w_mode:
            p.mul_(1.0 - lr * weight_decay)
        direction = direction.to(p.dtype)
        if isinstance(p, DTensor):
            # Every rank holds the full update; distributing it without a source rank keeps the local part only.
            direction = distribute_tensor(direction, p.device_mesh, p.placements, src_data_rank=None)
        p.add_(direction, alpha=-lr)

    def _precondition(self, first_moment: Tensor, grafted: Tensor, root_inverses: list[Tensor]) -> Tensor:
        """Block by block: the Shampoo direction of m^ with the norm of the grafted direction."""
        plan = self._plan(first_moment.shape)
        moment_view = first_moment.reshape(plan.view_shape)
        grafted_view = grafted.reshape(plan.view_shape)
        result = torch.empty_like(grafted_view)
        offset = 0
        for block in plan.blocks:
            order = len(block.shape)
            shampoo = apply_kronecker_preconditioner(moment_view[block.slices],
                                                     root_inverses[offset:offset + order], block.diagonal)
            result[block.slices] = graft(shampoo, grafted_view[block.slices])
            offset += order
        return result.reshape(first_moment.shape)


def _identity_like(factor: Tensor) -> Tensor:
    """The identity preconditioner for a (d, d) factor matrix or a (d,) diagonal factor."""
    if factor.ndim == 1:
        return torch.ones_like(factor)
    return torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """Element-wise arithmetic runs in at least float32."""
    return torch.promote_types(t.dtype, torch.float32)
