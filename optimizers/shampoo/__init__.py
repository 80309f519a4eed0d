"""Distributed Shampoo with learning-rate grafting: `DistributedShampoo`, its option enums and the registry builder."""
from optimizers.shampoo.config import GraftingType, LargeDimMethod, Precision, RootInverseMethod, ShampooConfig
from optimizers.shampoo.optimizer import DistributedShampoo, build

__all__ = ["DistributedShampoo", "GraftingType", "LargeDimMethod", "Precision", "RootInverseMethod", "ShampooConfig",
           "build"]
