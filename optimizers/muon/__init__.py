"""The orthonormal-update family: Muon, NorMuon, Dion2 and NorDion2 (Dion3), with one orthogonalizer module
(Newton-Schulz, Polar Express, or a callable) and one distributed execution shared by all four."""
from optimizers.muon.base import AdjustLR, lr_scale
from optimizers.muon.dion2 import Dion2, Dion3, NorDion2
from optimizers.muon.muon import Muon, runtime_kwargs
from optimizers.muon.normuon import NorMuon
from optimizers.muon.orthogonalize import newton_schulz, polar_express

__all__ = ["AdjustLR", "Dion2", "Dion3", "Muon", "NorDion2", "NorMuon", "lr_scale", "newton_schulz", "polar_express",
           "runtime_kwargs"]
