"""The 'advanced' optimizer family: memory-lean element-wise optimizers with composable features.

Members (each a torch.optim.Optimizer; see their docstrings for the update rules):
    Adam_Adv, Adopt_Adv, Prodigy_Adv, Simplified_AdEMAMix, Lion_Adv, Prodigy_Lion_Adv.
Features (constructor switches, written once in `transforms`, `factored` and `base`): factored (SMMF states with
1-bit packed signs), use_AdEMAMix, orthogonal_gradient, cautious_mask, grams, use_atan2, stochastic_rounding, and
the fused backward pass (`register_fused_backward_hooks()`). Each member declares the features it accepts in
`SUPPORTED_FEATURES`; any other switch turned on raises a ValueError.
"""
from optimizers.advanced.adam import Adam_Adv, Adopt_Adv, Simplified_AdEMAMix
from optimizers.advanced.features import Features
from optimizers.advanced.lion import Lion_Adv
from optimizers.advanced.prodigy import Prodigy_Adv, Prodigy_Lion_Adv

__all__ = ["Adam_Adv", "Adopt_Adv", "Prodigy_Adv", "Simplified_AdEMAMix", "Lion_Adv", "Prodigy_Lion_Adv", "Features"]
