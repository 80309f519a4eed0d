"""Pure element-wise update functions shared by every optimizer in the project.

AdamW and Lion are used on their own (`optimizers.adamw.AdamW`, `optimizers.lion.Lion`) and as the "scalar"
algorithm for embeddings, norm gains and the LM head inside matrix optimizers (Dion, Muon, ...). Each function
updates its tensors in place and takes python scalars for hyper-parameters, so one call can serve a whole list of
parameters (the foreach path); on CPU the lists run tile by tile (`optimizers.common.foreach_tiles`). State tensors may be stored in a lower precision than the parameters (mixed
precision states); the arithmetic then runs in float32 and is written back.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from optimizers.common.foreach_tiles import tiled

# The element-wise algorithms that matrix optimizers (Dion, Muon, ...) run on their scalar param groups.
SCALAR_ALGORITHMS = ("lion", "adamw")


def _same_dtype(*lists: list[Tensor]) -> bool:
    dtype = lists[0][0].dtype
    return all(t.dtype == dtype for tensors in lists for t in tensors)


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _foreach_buckets(*lists: list[Tensor]):
    """Split parallel lists into buckets that one foreach call can take: foreach kernels refuse to mix plain
    tensors with DTensors (e.g. tensor-parallel matrices next to replicated embeddings) or DTensors of different
    meshes."""
    from torch.distributed.tensor import DTensor
    buckets: dict[tuple, list[int]] = {}
    for i, t in enumerate(lists[0]):
        key = (id(t.device_mesh), t.placements) if isinstance(t, DTensor) else None
        buckets.setdefault(key, []).append(i)
    if len(buckets) == 1:
        yield lists
        return
    for indices in buckets.values():
        yield tuple([tensors[i] for i in indices] for tensors in lists)


@torch.no_grad()
@tiled(4)
def adamw_update(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 *, lr: float, beta1: float, beta2: float, weight_decay: float, epsilon: float, step: int) -> None:
    """AdamW (Loshchilov & Hutter 2019), identical to torch.optim.AdamW (non-amsgrad).

        p <- p (1 - lr wd)
        m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """
    if not params:
        return
    buckets = list(_foreach_buckets(params, grads, exp_avgs, exp_avg_sqs))
    if len(buckets) > 1:
        for bucket in buckets:
            adamw_update(*bucket, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, epsilon=epsilon,
                         step=step)
        return
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
    step_size = lr / bias_correction1
    if _same_dtype(params, grads, exp_avgs, exp_avg_sqs):
        if weight_decay != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, epsilon)
        torch._foreach_addcdiv_(params, exp_avgs, denom, -step_size)
        return
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        g32, m32, v32 = g.float(), m.float(), v.float()
        m32.lerp_(g32, 1.0 - beta1)
        v32.mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
        update = m32 / (v32.sqrt() / bias_correction2_sqrt + epsilon)
        p32 = p.float()
        if weight_decay != 0.0:
            p32.mul_(1.0 - lr * weight_decay)
        p32.add_(update, alpha=-step_size)
        p.copy_(p32)
        m.copy_(m32)
        v.copy_(v32)


@torch.no_grad()
@tiled(3)
def lion_update(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                *, lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2).

        u <- sign(beta1 m + (1 - beta1) g)
        p <- p (1 - lr wd) - lr u
        m <- beta2 m + (1 - beta2) g
    """
    if not params:
        return
    buckets = list(_foreach_buckets(params, grads, exp_avgs))
    if len(buckets) > 1:
        for bucket in buckets:
            lion_update(*bucket, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
        return
    if _same_dtype(params, grads, exp_avgs):
        if _is_dtensor(params[0]):
            # torch 2.11's DTensor (FSDP2, TP) has no sharding strategy for the out-of-place _foreach_lerp nor for
            # _foreach_sign_ (2.13 has both); per tensor, the same kernels run on every version.
            updates = [m.lerp(g, 1.0 - beta1).sign_() for m, g in zip(exp_avgs, grads)]
        else:
            updates = torch._foreach_lerp(exp_avgs, grads, 1.0 - beta1)
            torch._foreach_sign_(updates)
        if weight_decay != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        torch._foreach_add_(params, updates, alpha=-lr)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta2)
        return
    for p, g, m in zip(params, grads, exp_avgs):
        g32, m32 = g.float(), m.float()
        update = m32.lerp(g32, 1.0 - beta1).sign_()
        p32 = p.float()
        if weight_decay != 0.0:
            p32.mul_(1.0 - lr * weight_decay)
        p32.add_(update, alpha=-lr)
        p.copy_(p32)
        m.copy_(m32.lerp_(g32, 1.0 - beta2))
