"""The base class of the advanced optimizer family: state, dispatch, features shared by every member, and the
fused backward pass.

A member implements `_moments` (which moments it keeps) and `_direction` (its update rule for one parameter);
the base class owns everything else, once for the whole family:

    g  <- local shard of the gradient, float32
    g  <- OrthoGrad(w, g)                                     (orthogonal_gradient)
    u, step_size, decay <- member's _direction(g)             (calls _add_slow_momentum / _shape_update)
    p  <- p (1 - decay) - step_size u                         (stochastic rounding for bf16 parameters)

Fused backward pass: `register_fused_backward_hooks()` runs that per-parameter update in a
`register_post_accumulate_grad_hook` hook as soon as the parameter's gradient is ready and then frees the gradient,
so full gradients never coexist in memory. `step()` then only finishes per-step bookkeeping (`_finish_step`, e.g.
Prodigy's D estimate): it steps only parameters that still hold a gradient, so none is updated a second time.
Incompatible with gradient accumulation (the hook would step on every micro-batch); train.py refuses that
combination.

Cache tiling: a member whose `_direction` is element-wise (ELEMENTWISE_DIRECTION; Adam_Adv, Adopt_Adv,
Simplified_AdEMAMix, Lion_Adv) runs it, with the update, on one ~1 MiB slice of the parameter, its gradient and its
states at a time when the parameter is a plain contiguous float32 CPU tensor with dense float32 states and no
feature reduces over the tensor (factored, orthogonal_gradient, cautious_mask): the several passes and temporaries
of a step then stay in cache (see optimizers/common/foreach_tiles.py) and the arithmetic per element is unchanged.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from optimizers.advanced.factored import Moment
from optimizers.advanced.features import Features
from optimizers.advanced.sharding import ShardReducer, local_tensor, shard_groups
from optimizers.advanced.transforms import (ademamix_alpha, ademamix_beta3, cautious_mask_, copy_stochastic_, grams_,
                                            orthogonalize_gradient)
from optimizers.common import foreach_tiles
from optimizers.common.closure import closure_loss
from optimizers.common.hooks import TrainingHooks
from optimizers.common.param_groups import CheckedParamGroups
from optimizers.common.tensors import local_gradient

UpdateResult = tuple[Tensor, float, float] | None


def check_option(optimizer: str, key: str, value, valid: bool, allowed: str) -> None:
    if not valid:
        raise ValueError(f"{optimizer}: {key} must be {allowed}, got {value!r}")


def check_common_options(optimizer: str, lr: float, betas, weight_decay: float) -> None:
    check_option(optimizer, "lr", lr, lr >= 0.0, ">= 0")
    check_option(optimizer, "betas", betas, len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas),
                 "two numbers in [0, 1)")
    check_option(optimizer, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0")


def check_ademamix_options(optimizer: str, beta1: float, alpha: float, beta3_ema: float,
                           ademamix_warmup_steps: int) -> None:
    check_option(optimizer, "alpha", alpha, alpha >= 0.0, ">= 0")
    check_option(optimizer, "beta3_ema", beta3_ema, 0.0 <= beta3_ema < 1.0, "in [0, 1)")
    check_option(optimizer, "ademamix_warmup_steps", ademamix_warmup_steps,
                 isinstance(ademamix_warmup_steps, int) and ademamix_warmup_steps >= 0, "an integer >= 0")
    check_option(optimizer, "betas[0]", beta1, ademamix_warmup_steps == 0 or beta1 > 0.0,
                 "> 0 when ademamix_warmup_steps > 0 (beta3's warmup starts from beta1)")


# Decoupled weight decay and the step:  p <- p (1 - decay) - step_size u,  computed in float32; a bfloat16
# parameter is rounded stochastically when requested, to the nearest value otherwise.
@torch.no_grad()
def apply_update_(param: Tensor, update: Tensor, step_size: float, decay: float, stochastic_rounding: bool) -> None:
    if param.dtype == torch.float32:
        if decay != 0.0:
            param.mul_(1.0 - decay)
        param.add_(update, alpha=-step_size)
        return
    result = param.float()
    if decay != 0.0:
        result.mul_(1.0 - decay)
    result.add_(update, alpha=-step_size)
    if stochastic_rounding and param.dtype == torch.bfloat16:
        copy_stochastic_(param, result)
    else:
        param.copy_(result)


class AdvancedOptimizer(CheckedParamGroups, Optimizer, TrainingHooks):
    """State per parameter: `step` (int, updates of this parameter) plus the member's moments (see
    `optimizers.advanced.factored.Moment` for the dense and factored layouts)."""

    supports_fused_backward = True

    SUPPORTED_FEATURES: ClassVar[frozenset[str]]
    # True when `_direction` is element-wise for dense states (no reduction over the tensor, nothing but the
    # parameter-shaped states read or written): the base class may then run it slice by slice.
    ELEMENTWISE_DIRECTION: ClassVar[bool] = False

    def __init__(self, params, defaults: dict, features: Features):
        features.check(type(self).__name__, self.SUPPORTED_FEATURES)
        self.features = features
        super().__init__(params, defaults)
        self._fused_hook_handles: list = []
        self._slow_moment = Moment("exp_avg_slow", signed=True, factored=features.factored)

    # --- the member's part -------------------------------------------------------------------------------------
    def _moments(self, group: dict) -> list[Moment]:
        raise NotImplementedError

    def _direction(self, param: Tensor, local: Tensor, grad: Tensor, state: dict, group: dict,
                   reducer: ShardReducer) -> UpdateResult:
        """Returns (u, step_size, decay) for `apply_update_`, or None to leave the parameter unchanged this step.
        `grad` may alias the parameter's gradient: never modify it in place."""
        raise NotImplementedError

    def _init_state(self, param: Tensor, local: Tensor, state: dict, group: dict) -> None:
        state["step"] = 0
        for moment in self._moments(group):
            moment.init(state, param, local)

    def _finish_step(self) -> None:
        """Per-step bookkeeping after every parameter was updated (nothing by default)."""

    # --- shared features ---------------------------------------------------------------------------------------
    def _add_slow_momentum(self, state: dict, group: dict, fast: Tensor, source: Tensor, step: int,
                           source_scale: float = 1.0) -> Tensor:
        """AdEMAMix: m_slow <- beta3_t m_slow + (1 - beta3_t) s source;  returns fast + alpha_t m_slow, computed in
        place in `fast` (which must be a fresh tensor). Without use_AdEMAMix, returns `fast` unchanged."""
        if not self.features.use_AdEMAMix:
            return fast
        warmup = group["ademamix_warmup_steps"]
        beta3 = ademamix_beta3(group["betas"][0], group["beta3_ema"], step, warmup)
        slow = self._slow_moment.load(state, fast.shape)
        slow.mul_(beta3).add_(source, alpha=(1.0 - beta3) * source_scale)
        fast.add_(slow, alpha=ademamix_alpha(group["alpha"], step, warmup))
        self._slow_moment.store(state, slow)
        return fast

    def _shape_update(self, update: Tensor, grad: Tensor, reducer: ShardReducer) -> Tensor:
        """Grams and the cautious mask, in place on `update` (a fresh tensor)."""
        if self.features.grams:
            grams_(update, grad)
        if self.features.cautious_mask:
            cautious_mask_(update, grad, reducer)
        return update

    def _slow_moments(self) -> list[Moment]:
        return [self._slow_moment] if self.features.use_AdEMAMix else []

    # --- dispatch ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_parameter(self, param: Tensor, group: dict) -> None:
        state = self.state[param]
        local = local_tensor(param)
        if not state:
            self._init_state(param, local, state, group)
        state["step"] += 1
        reducer = ShardReducer(shard_groups(param))
        grad = local_gradient(param).float()
        tiles = self._cache_tiles(param, local, grad, state)
        if tiles is not None:
            for local_tile, grad_tile, state_tile in tiles:
                self._step_tensor(param, local_tile, grad_tile, state_tile, group, reducer)
            return
        if self.features.orthogonal_gradient:
            grad = orthogonalize_gradient(local.float(), grad, reducer)
        self._step_tensor(param, local, grad, state, group, reducer)

    def _step_tensor(self, param: Tensor, local: Tensor, grad: Tensor, state: dict, group: dict,
                     reducer: ShardReducer) -> None:
        result = self._direction(param, local, grad, state, group, reducer)
        if result is not None:
            update, step_size, decay = result
            apply_update_(local, update, step_size, decay, self.features.stochastic_rounding)

    def _cache_tiles(self, param: Tensor, local: Tensor, grad: Tensor, state: dict):
        """(local, grad, state) slices covering the parameter, or None where slicing is not valid or not useful
        (see the module docstring)."""
        features = self.features
        if (not self.ELEMENTWISE_DIRECTION or features.factored or features.orthogonal_gradient
                or features.cautious_mask or local is not param or local.dtype != torch.float32):
            return None
        tensors = {key: value for key, value in state.items() if isinstance(value, Tensor)}
        if not all(value.dtype == torch.float32 and value.shape == local.shape for value in tensors.values()):
            return None
        keys = list(tensors)
        lists = [[local], [grad]] + [[tensors[key]] for key in keys]
        if not foreach_tiles.tileable(lists, foreach_tiles.TILE_ELEMENTS):
            return None
        tiles = []
        for tile in foreach_tiles.cache_tiles(lists, foreach_tiles.TILE_ELEMENTS):
            (local_tile,), (grad_tile,) = tile[0], tile[1]
            state_tile = {**state, **{key: pieces[0] for key, pieces in zip(keys, tile[2:])}}
            tiles.append((local_tile, grad_tile, state_tile))
        return tiles

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        # With fused backward hooks the hooks have already stepped and freed every gradient of the backward pass;
        # a gradient still present was set by hand (e.g. torch.distributed.checkpoint initializing the state with
        # zero gradients and lr 0) and is stepped here.
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update_parameter(param, group)
        self._finish_step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that state tensors keep their saved dtype: torch casts every floating-point state
        tensor to its parameter's dtype, which would round the float32 factors and D-adaptation sums of a bfloat16
        parameter (and turn packed uint8 signs into floats)."""
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [param_id for group in state_dict["param_groups"] for param_id in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for param_id, param in zip(saved_ids, params):
            if param_id in saved_state:
                device = local_tensor(param).device
                self.state[param] = {key: value.to(device=device) if isinstance(value, Tensor) else value
                                     for key, value in saved_state[param_id].items()}

    # --- fused backward pass -----------------------------------------------------------------------------------
    def register_fused_backward_hooks(self) -> None:
        """Update each parameter inside its post-accumulate-grad hook and free its gradient (see module doc)."""
        if self._fused_hook_handles:
            raise RuntimeError(f"{type(self).__name__}: fused backward hooks are already registered")
        for group_index, group in enumerate(self.param_groups):
            for param in group["params"]:
                if param.requires_grad:
                    handle = param.register_post_accumulate_grad_hook(self._fused_hook(group_index))
                    self._fused_hook_handles.append(handle)

    def remove_fused_backward_hooks(self) -> None:
        for handle in self._fused_hook_handles:
            handle.remove()
        self._fused_hook_handles = []

    def _fused_hook(self, group_index: int):
        # The group is looked up at call time: load_state_dict replaces the group dicts.
        def hook(param: Tensor) -> None:
            self._update_parameter(param, self.param_groups[group_index])
            param.grad = None
        return hook
