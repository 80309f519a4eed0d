"""Typed option parsing shared by the optimizers: string options become enum members, with one clear error."""
from __future__ import annotations

from enum import Enum
from typing import Any


def parse_choice(enum_cls: type[Enum], owner: str, key: str, value: Any) -> Enum:
    """`enum_cls(value)`, or ValueError "owner: key='value' is invalid; allowed: a, b, c"."""
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_cls)
        raise ValueError(f"{owner}: {key}={value!r} is invalid; allowed: {allowed}") from None
