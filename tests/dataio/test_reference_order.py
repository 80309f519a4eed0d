"""`data.order: reference` reads the tokens microsoft/dion's DistributedDataLoader (models/gpt_utils.py at 0a059a4)
reads, in its order, on every rank, across shard boundaries. The twin below is written here from the reference's
definition: read at the rank's position, advance by one global batch, and move to the next shard (cyclically, back at
rank x local) when the new position plus one global batch plus one token would pass the shard's end."""
import numpy as np
import pytest

from data import DistributedTokenLoader, ShardError, write_shard
from data.loader import shards_read_by, validation_batches


class ReferenceLoaderTwin:
    def __init__(self, shards, batch, seq, rank, world):
        self.shards, self.batch, self.seq, self.rank, self.world = shards, batch, seq, rank, world
        self.shard, self.position = 0, rank * batch * seq

    def next_batch(self):
        local = self.batch * self.seq
        buf = self.shards[self.shard][self.position:self.position + local + 1]
        self.position += local * self.world
        if self.position + (local * self.world + 1) > len(self.shards[self.shard]):
            self.shard = (self.shard + 1) % len(self.shards)
            self.position = self.rank * local
        return buf[:-1].reshape(self.batch, self.seq), buf[1:].reshape(self.batch, self.seq)


def write(tmp_path, sizes, seed=0):
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(0, 50257, size) for size in sizes]
    paths = []
    for index, shard in enumerate(tokens):
        paths.append(tmp_path / f"fineweb_train_{index:06d}.bin")
        write_shard(paths[-1], shard)
    return paths, tokens


# Shard sizes that leave a different remainder at every boundary, so the ranks part at some boundaries, including
# the edges: 1024 and 928 = 3 x 256 + 5 x 32 end exactly one global batch after rank 0's / rank 5's last read (8 ranks
# x 2 x 16 = 256 tokens per global batch), and 1025 holds one global batch plus the target token exactly.
SIZES = [1000, 1024, 777, 928, 1290, 1025, 600, 2049]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_rank_reads_the_references_tokens_across_shard_boundaries(tmp_path, world):
    paths, tokens = write(tmp_path, SIZES)
    batches = 2 * sum(SIZES) // (world * 32) + 3  # two passes over all shards
    for rank in range(world):
        ours = DistributedTokenLoader(paths, 2, 16, rank, world, order="reference")
        twin = ReferenceLoaderTwin(tokens, 2, 16, rank, world)
        for i in range(batches):
            inputs, targets = ours.next_batch()
            expected_inputs, expected_targets = twin.next_batch()
            np.testing.assert_array_equal(inputs.numpy(), expected_inputs, err_msg=f"rank {rank} batch {i}")
            np.testing.assert_array_equal(targets.numpy(), expected_targets, err_msg=f"rank {rank} batch {i}")


def test_the_sequential_order_is_not_the_references_on_several_ranks(tmp_path):
    """The reason for the option: with 8 ranks the default order reads other batches after the first boundary."""
    paths, tokens = write(tmp_path, SIZES)
    ours = DistributedTokenLoader(paths, 2, 16, 7, 8)
    twin = ReferenceLoaderTwin(tokens, 2, 16, 7, 8)
    differ = [i for i in range(20) if not np.array_equal(ours.next_batch()[0].numpy(), twin.next_batch()[0])]
    assert differ and differ[0] > 0


@pytest.mark.parametrize("world, read", [(1, 7), (4, 23), (8, 41)])
def test_resume_continues_the_references_stream_on_every_rank(tmp_path, world, read):
    paths, tokens = write(tmp_path, SIZES)
    for rank in range(world):
        first = DistributedTokenLoader(paths, 2, 16, rank, world, order="reference")
        for _ in range(read):
            first.next_batch()
        state = first.state_dict()
        assert state == DistributedTokenLoader(paths, 2, 16, 0, world, order="reference").state_dict() | \
            dict(batches=read), "the state must be the same on every rank"
        resumed = DistributedTokenLoader(paths, 2, 16, rank, world, order="reference")
        resumed.load_state_dict(state)
        for i in range(12):
            np.testing.assert_array_equal(resumed.next_batch()[0].numpy(), first.next_batch()[0].numpy(),
                                          err_msg=f"rank {rank} batch {read + i}")


def test_resume_refuses_another_order(tmp_path):
    paths, _ = write(tmp_path, SIZES)
    state = DistributedTokenLoader(paths, 2, 16, 0, 2).state_dict()
    with pytest.raises(ShardError, match="data.order=sequential, this run uses reference"):
        DistributedTokenLoader(paths, 2, 16, 0, 2, order="reference").load_state_dict(state)


def test_validation_in_reference_order_reads_the_references_batches(tmp_path):
    paths, tokens = write(tmp_path, [700, 900])
    for rank in range(4):
        twin = ReferenceLoaderTwin(tokens, 2, 16, rank, 4)
        got = list(validation_batches(paths, 2, 16, val_tokens=128 * 6, rank=rank, world_size=4, order="reference"))
        assert len(got) == 6
        for inputs, _ in got:
            np.testing.assert_array_equal(inputs.numpy(), twin.next_batch()[0])


def test_shards_read_counts_the_last_rank_which_leaves_each_shard_first(tmp_path):
    paths, _ = write(tmp_path, [150, 600, 600])  # global batch 64 tokens: 2 fit rank 0 in shard 0, 1 fits rank 3
    assert shards_read_by(paths, 2, 8, 4, 2) == paths[:1]
    assert shards_read_by(paths, 2, 8, 4, 2, order="reference") == paths[:2]
