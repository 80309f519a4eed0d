"""Dion (Ahn et al. 2025, arXiv 2504.05295) in three forms sharing one core:

    reference.py    DionReference: one matrix at a time, the algorithm as written (the slow, obviously-correct twin)
    batched.py      Dion: same-shape matrices stacked, one collective per batch
    overlapped.py   DionAsync: the batched form with its collectives overlapped with compute
    core.py         the optimizer base class (state, param groups, scalar algorithms, replica sync, checkpoints)
    linalg.py       power iteration, QR / Cholesky QR / randomized Cholesky QR, low-rank sizes
    distributed.py  how a matrix is laid out over the meshes (FSDP rows, TP columns, replicas) and its collectives
    replica_sync.py the replicas' full-gradient average, started during backward from post-accumulate-grad hooks
"""
from optimizers.dion.batched import Dion
from optimizers.dion.core import DionMixedPrecisionConfig
from optimizers.dion.overlapped import DionAsync
from optimizers.dion.reference import DionReference

__all__ = ["Dion", "DionAsync", "DionMixedPrecisionConfig", "DionReference"]
