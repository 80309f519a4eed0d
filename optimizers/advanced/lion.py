"""Lion_Adv: Lion with the family's features (factored 1-bit momentum, OrthoGrad, cautious mask, stochastic
rounding, fused backward)."""
from __future__ import annotations

from torch import Tensor

from optimizers.advanced.base import AdvancedOptimizer, UpdateResult, check_common_options
from optimizers.advanced.factored import Moment
from optimizers.advanced.features import Features
from optimizers.advanced.sharding import ShardReducer
from optimizers.advanced.transforms import lion_direction_


class Lion_Adv(AdvancedOptimizer):
    """Lion (Chen et al. 2023), equal to optimizers.lion.Lion with every feature off.

        u = sign(beta1 m + (1 - beta1) g);   m <- beta2 m + (1 - beta2) g;   p <- p (1 - lr wd) - lr u
    Typical settings: lr 3-10x smaller than AdamW's, weight decay 3-10x larger. State: step, exp_avg.
    """
    SUPPORTED_FEATURES = frozenset({"factored", "orthogonal_gradient", "cautious_mask", "stochastic_rounding"})
    ELEMENTWISE_DIRECTION = True

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 *, factored: bool = False, use_AdEMAMix: bool = False, orthogonal_gradient: bool = False,
                 cautious_mask: bool = False, grams: bool = False, use_atan2: bool = False,
                 stochastic_rounding: bool = False):
        check_common_options(type(self).__name__, lr, betas, weight_decay)
        features = Features.pick(locals())
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay), features)
        self._momentum = Moment("exp_avg", signed=True, factored=factored)

    def _moments(self, group: dict) -> list[Moment]:
        return [self._momentum]

    def _direction(self, param: Tensor, local: Tensor, grad: Tensor, state: dict, group: dict,
                   reducer: ShardReducer) -> UpdateResult:
        beta1, beta2 = group["betas"]
        momentum = self._momentum.load(state, grad.shape)
        update = lion_direction_(momentum, grad, beta1, beta2)
        self._momentum.store(state, momentum)
        return self._shape_update(update, grad, reducer), group["lr"], group["lr"] * group["weight_decay"]
