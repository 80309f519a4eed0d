"""Dion with divided orthonormalization and overlapped communication (`--optimizer dion_async`).

Drop-in for `optimizers.dion.Dion` (same constructor, same results up to floating-point summation order), for
arXiv 2504.05295, Algorithm 1 at scale:
- Batches: same-shape matrices are stacked as in `Dion`, in batches whose size is a multiple of the number of ranks
  that share each P.
- Divided orthonormalization: where every rank of a group would hold the same P after its all-reduce (the column
  shards of an FSDP/TP matrix, or the replicas of a compressed data-parallel sync), P is reduce-scattered instead,
  each rank orthonormalizes its share of the stack, and an all-gather returns the results: the same traffic as the
  all-reduce, and 1/world of the QR work per rank.
- Overlap: several batches are in flight at once (`max_batches_in_flight`); every collective is asynchronous, and while
  one batch waits for its P or R another one computes (`optimizers.dion.distributed.run_overlapped`).
- No blocking host round trip: the one host decision of a batch (whether the Cholesky-based orthonormalization must
  fall back) is yielded as a `HostFlag`, read from pinned memory after a recorded CUDA event, so the host waits for it
  only once the other batches in flight have been issued. On CUDA, `async_op=True` collectives run on the process
  group's own stream, and `Work.wait()` only makes the compute stream wait for them: the host never blocks on them.
"""
from __future__ import annotations

from optimizers.dion.batched import Dion
from optimizers.dion.core import MatrixTask
from optimizers.dion.distributed import run_overlapped


class DionAsync(Dion):
    """`Dion` with the orthonormalization divided among the ranks that share a P, and batches overlapped."""

    batch_size = 8
    divide_orthonormalization = True
    max_batches_in_flight = 3

    def _update_matrices(self, tasks: list[MatrixTask]) -> None:
        run_overlapped((self._batch_update(batch) for batch in self._batches(tasks)), self.max_batches_in_flight)
