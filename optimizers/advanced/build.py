"""Registry builders of the advanced family (names adam_adv, adopt_adv, prodigy_adv, simplified_ademamix, lion_adv,
prodigy_lion_adv). The config's `optimizer_args` reach the constructor (features included), checked by
`OptimizerContext.constructor_kwargs`. Without an explicit scalar_opt the optimizer takes every parameter (the
scalar groups keep their learning rates and get no weight decay); with one, it takes the matrices and the scalar
optimizer the rest."""
from __future__ import annotations

from torch.optim import Optimizer

from optimizers.advanced.adam import Adam_Adv, Adopt_Adv, Simplified_AdEMAMix
from optimizers.advanced.lion import Lion_Adv
from optimizers.advanced.prodigy import Prodigy_Adv, Prodigy_Lion_Adv


def _build(cls, ctx, **defaults) -> Optimizer:
    kwargs = ctx.constructor_kwargs(cls, **defaults)
    if ctx.scalar_opt_explicit:
        return ctx.with_scalar_optimizer(cls(ctx.matrix_params, **kwargs))
    groups = [dict(params=ctx.matrix_params)] + ctx.scalar_param_groups(algorithm_key=False)
    return cls(groups, **kwargs)


def build_adam_adv(ctx) -> Optimizer:
    return _build(Adam_Adv, ctx, lr=ctx.lr, betas=ctx.betas, eps=ctx.epsilon, weight_decay=ctx.weight_decay)


def build_adopt_adv(ctx) -> Optimizer:
    return _build(Adopt_Adv, ctx, lr=ctx.lr, betas=ctx.betas, weight_decay=ctx.weight_decay)


def build_prodigy_adv(ctx) -> Optimizer:
    return _build(Prodigy_Adv, ctx, lr=ctx.lr, betas=ctx.betas, eps=ctx.epsilon, weight_decay=ctx.weight_decay)


def build_simplified_ademamix(ctx) -> Optimizer:
    return _build(Simplified_AdEMAMix, ctx, lr=ctx.lr, betas=ctx.betas, eps=ctx.epsilon,
                  weight_decay=ctx.weight_decay)


def build_lion_adv(ctx) -> Optimizer:
    return _build(Lion_Adv, ctx, lr=ctx.lr, betas=ctx.betas, weight_decay=ctx.weight_decay)


def build_prodigy_lion_adv(ctx) -> Optimizer:
    return _build(Prodigy_Lion_Adv, ctx, lr=ctx.lr, betas=ctx.betas, weight_decay=ctx.weight_decay)
