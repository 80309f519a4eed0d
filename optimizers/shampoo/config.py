"""Typed options of DistributedShampoo: enums for the choices and one frozen dataclass validated on construction.

Every enum accepts its member, or its value as a string (case-insensitive) so a YAML config can name it;
anything else raises a ValueError naming the key and the allowed values.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import torch


class GraftingType(str, Enum):
    """The simpler method whose per-block update norm the Shampoo direction takes (Agarwal et al. 2020, "Disentangling
    Adaptive Gradient Methods from Learning Rates"). Before preconditioning starts this method runs alone.

    SGD: no second moment. ADAGRAD: a <- a + g^2. RMSPROP: v <- b2 v + (1 - b2) g^2.
    ADAM: RMSPROP with the bias correction 1 / (1 - b2^t) of v."""
    SGD = "sgd"
    ADAGRAD = "adagrad"
    RMSPROP = "rmsprop"
    ADAM = "adam"


class LargeDimMethod(str, Enum):
    """What to do with a (merged) dimension larger than `max_preconditioner_dim`.

    BLOCKING: cut the tensor into blocks of at most max_preconditioner_dim per dimension, each block preconditioned
    on its own. DIAGONAL: keep full Kronecker factors for the small dimensions and a diagonal factor for the large
    ones. ADAGRAD: the whole tensor gets one diagonal (element-wise AdaGrad) preconditioner."""
    BLOCKING = "blocking"
    DIAGONAL = "diagonal"
    ADAGRAD = "adagrad"


class RootInverseMethod(str, Enum):
    """EIGEN: symmetric eigendecomposition (retried in float64 when it fails). NEWTON: coupled inverse Newton
    iteration (matrix multiplications only)."""
    EIGEN = "eigen"
    NEWTON = "newton"


class Precision(str, Enum):
    """A floating-point precision for preconditioner state or root-inverse arithmetic (also accepts a torch.dtype)."""
    FLOAT32 = "float32"
    FLOAT64 = "float64"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self is Precision.FLOAT32 else torch.float64


EnumType = TypeVar("EnumType", bound=Enum)


def parse_choice(enum_class: type[EnumType], value: Any, key: str) -> EnumType:
    """`value` as a member of `enum_class`: the member itself, its string value (any case), or for Precision a
    torch.dtype."""
    if isinstance(value, enum_class):
        return value
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if isinstance(value, str):
        try:
            return enum_class(value.lower())
        except ValueError:
            pass
    allowed = ", ".join(member.value for member in enum_class)
    raise ValueError(f"DistributedShampoo: {key} must be one of {allowed}; got {value!r}")


@dataclass(frozen=True)
class ShampooConfig:
    """Options shared by all parameter groups (they fix the shape of the optimizer state or the schedule).

    grafting_epsilon / grafting_beta2: epsilon and second-moment decay of the grafted method (beta2 unused by SGD
    and ADAGRAD). adam_w_mode: decoupled weight decay p <- p (1 - lr wd) instead of L2 (g <- g + wd p).
    bias_correction: divide the first moment by 1 - b1^t and the Kronecker factors (when b2 < 1) by 1 - b2^t.
    Root inverses are recomputed at steps start_preconditioning_step + k * precondition_frequency; preconditioning
    is applied from start_preconditioning_step on. factor_matrix_dtype: precision of the accumulated factors and their
    root inverses; root_inverse_dtype: precision of the eigendecomposition / Newton iteration."""
    grafting_type: GraftingType = GraftingType.ADAM
    grafting_epsilon: float = 1e-8
    grafting_beta2: float = 0.999
    adam_w_mode: bool = True
    bias_correction: bool = True
    max_preconditioner_dim: int = 1024
    large_dim_method: LargeDimMethod = LargeDimMethod.BLOCKING
    merge_small_dims: bool = True
    precondition_frequency: int = 1
    start_preconditioning_step: int = 1
    root_inverse_method: RootInverseMethod = RootInverseMethod.EIGEN
    newton_max_iterations: int = 100
    newton_tolerance: float = 1e-6
    factor_matrix_dtype: Precision = Precision.FLOAT32
    root_inverse_dtype: Precision = Precision.FLOAT32

    def __post_init__(self) -> None:
        for key, enum_class in (("grafting_type", GraftingType), ("large_dim_method", LargeDimMethod),
                                ("root_inverse_method", RootInverseMethod), ("factor_matrix_dtype", Precision),
                                ("root_inverse_dtype", Precision)):
            object.__setattr__(self, key, parse_choice(enum_class, getattr(self, key), key))
        for key in ("adam_w_mode", "bias_correction", "merge_small_dims"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"DistributedShampoo: {key} must be true or false; got {getattr(self, key)!r}")
        if not self.grafting_epsilon >= 0.0:
            raise ValueError(f"DistributedShampoo: grafting_epsilon must be >= 0; got {self.grafting_epsilon}")
        uses_beta2 = self.grafting_type in (GraftingType.RMSPROP, GraftingType.ADAM)
        if uses_beta2 and not 0.0 <= self.grafting_beta2 < 1.0:
            raise ValueError(f"DistributedShampoo: grafting_beta2 must lie in [0, 1) for {self.grafting_type.value} "
                             f"grafting; got {self.grafting_beta2}")
        for key in ("max_preconditioner_dim", "precondition_frequency", "start_preconditioning_step",
                    "newton_max_iterations"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DistributedShampoo: {key} must be an integer >= 1; got {value!r}")
        if not self.newton_tolerance >= 0.0:
            raise ValueError(f"DistributedShampoo: newton_tolerance must be >= 0; got {self.newton_tolerance}")

    def preconditioning_active(self, step: int) -> bool:
        return step >= self.start_preconditioning_step

    def recompute_root_inverses(self, step: int) -> bool:
        return (self.preconditioning_active(step)
                and (step - self.start_preconditioning_step) % self.precondition_frequency == 0)
