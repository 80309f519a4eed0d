"""Distributed Shampoo with learning-rate grafting: `DistributedShampoo` and its option enums."""
from optimizers.shampoo.config import GraftingType, LargeDimMethod, Precision, RootInverseMethod, ShampooConfig
from optimizers.shampoo.optimizer import DistributedShampoo

__all__ = ["DistributedShampoo", "GraftingType", "LargeDimMethod", "Precision", "RootInverseMethod", "ShampooConfig"]
