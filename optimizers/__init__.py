"""Optimizers for GPT training: Dion and the collection around it.

Classes are imported on first access (`from optimizers import Dion`), so that importing the package stays cheap,
an optional dependency of one optimizer never breaks the others, and the JAX port (`optimizers.experimental`)
imports without torch installed.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "OPTIMIZERS": "optimizers.registry",
    "OptimizerContext": "optimizers.registry",
    "build_optimizer": "optimizers.registry",
    "registered_names": "optimizers.registry",
    "AdamW": "optimizers.adamw",
    "Lion": "optimizers.lion",
    "CompositeOptimizer": "optimizers.common.composite",
    "DistributedShampoo": "optimizers.shampoo",
    "GraftingType": "optimizers.shampoo",
    "Muon": "optimizers.muon",
    "NorMuon": "optimizers.muon",
    "Dion2": "optimizers.muon",
    "NorDion2": "optimizers.muon",
    "Dion3": "optimizers.muon",
    "DionReference": "optimizers.dion.reference",
    "Dion": "optimizers.dion.batched",
    "DionAsync": "optimizers.dion.overlapped",
    "Sophia": "optimizers.sophia",
    "ScheduleFreeAdamW": "optimizers.schedule_free",
    "Prodigy": "optimizers.prodigy",
    "SOAP": "optimizers.soap",
    "WSDScheduler": "optimizers.schedulers",
    "Adam_Adv": "optimizers.advanced",
    "Adopt_Adv": "optimizers.advanced",
    "Prodigy_Adv": "optimizers.advanced",
    "Simplified_AdEMAMix": "optimizers.advanced",
    "Lion_Adv": "optimizers.advanced",
    "Prodigy_Lion_Adv": "optimizers.advanced",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'optimizers' has no attribute {name!r}")
