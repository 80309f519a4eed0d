"""Typed option parsing shared by the optimizers: string options become enum members (and a param group's
`algorithm` one of the allowed names), with one clear error."""
from __future__ import annotations

from enum import Enum
from typing import Any

from optimizers.common.scalar_updates import SCALAR_ALGORITHMS


def group_algorithm(owner: str, matrix_algorithm: str, value: Any) -> str:
    """A param group's `algorithm`: the optimizer's own matrix algorithm or one of the shared scalar algorithms;
    ValueError "owner: algorithm='x' is invalid; allowed: ..." otherwise."""
    allowed = (matrix_algorithm, *SCALAR_ALGORITHMS)
    if value not in allowed:
        raise ValueError(f"{owner}: algorithm={value!r} is invalid; allowed: {', '.join(allowed)}")
    return value


def parse_choice(enum_cls: type[Enum], owner: str, key: str, value: Any) -> Enum:
    """`enum_cls(value)`, or ValueError "owner: key='value' is invalid; allowed: a, b, c"."""
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_cls)
        raise ValueError(f"{owner}: {key}={value!r} is invalid; allowed: {allowed}") from None
