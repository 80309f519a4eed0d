"""The feature switches of the advanced optimizer family and the check of which optimizer accepts which.

Every switch is a constructor keyword of every class in the family, so a configuration that names a feature an
optimizer does not implement fails with a ValueError that lists what that optimizer accepts (rather than a
TypeError about an unexpected keyword, or a silently ignored flag).
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Features:
    """factored: SMMF state compression (sign bits + rank-1 magnitudes). use_AdEMAMix: slow gradient EMA mixed into
    the fast momentum. orthogonal_gradient: OrthoGrad projection. cautious_mask: zero update entries that disagree in
    sign with the gradient. grams: update sign from the gradient, magnitude from the momentum. use_atan2: bounded
    atan2 in place of m / (sqrt(v) + eps). stochastic_rounding: unbiased rounding of bf16 parameters."""
    factored: bool = False
    use_AdEMAMix: bool = False
    orthogonal_gradient: bool = False
    cautious_mask: bool = False
    grams: bool = False
    use_atan2: bool = False
    stochastic_rounding: bool = False

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def pick(cls, arguments: dict) -> Features:
        """The feature switches among a constructor's arguments (pass `locals()`): the family's constructors take
        the seven switches as keyword-only arguments, so each is also a typed config option of the optimizer."""
        return cls(**{name: arguments[name] for name in cls.names()})

    def enabled(self) -> tuple[str, ...]:
        return tuple(name for name in self.names() if getattr(self, name))

    def check(self, optimizer_name: str, supported: frozenset[str]) -> None:
        """Raise ValueError if a feature outside `supported` is on, or if two features contradict each other."""
        for name in self.names():
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{optimizer_name}: {name} must be true or false, got {value!r}")
        unsupported = [name for name in self.enabled() if name not in supported]
        if unsupported:
            raise ValueError(f"{optimizer_name}: unsupported feature(s) {', '.join(unsupported)}; "
                             f"this optimizer accepts: {', '.join(sorted(supported))}")
        if self.grams and self.cautious_mask:
            raise ValueError(f"{optimizer_name}: cautious_mask has no effect together with grams (a Grams update "
                             f"always agrees in sign with the gradient); enable one of them")
