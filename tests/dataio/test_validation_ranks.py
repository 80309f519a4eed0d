"""Validation with several data-parallel ranks: for every validation step, the ranks' batches laid side by side are
exactly the single-rank batch of the same global size, so the mean of the ranks' mean losses is the single-process
validation loss (every rank runs the same number of batches)."""
import pytest
import torch

from data import validation_batches
from tests.dataio.test_shards_and_loader import make_shards

BATCH, SEQUENCE = 2, 10


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_validation_batches_tile_the_single_rank_batches(tmp_path, world_size):
    # Two shards, and enough steps that the global batches cross into the second one.
    step_tokens = world_size * BATCH * SEQUENCE
    files = make_shards(tmp_path, [2 * step_tokens + 5, 3 * step_tokens], split="val")
    val_tokens = 4 * step_tokens + 7  # rounded down to 4 global batches
    single = list(validation_batches(files, world_size * BATCH, SEQUENCE, val_tokens))
    per_rank = [list(validation_batches(files, BATCH, SEQUENCE, val_tokens, rank, world_size))
                for rank in range(world_size)]
    assert len(single) == 4 and all(len(batches) == 4 for batches in per_rank)
    for step, (inputs, targets) in enumerate(single):
        torch.testing.assert_close(torch.cat([batches[step][0] for batches in per_rank]), inputs, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([batches[step][1] for batches in per_rank]), targets, rtol=0, atol=0)
    # Not the same tokens on every rank (a loader ignoring the rank would pass the shape checks).
    assert not torch.equal(per_rank[0][0][0], per_rank[1][0][0])
