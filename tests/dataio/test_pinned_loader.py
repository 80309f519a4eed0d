"""Pinned (page-locked) batches for asynchronous host-to-GPU copies, checked on a machine without a GPU: pinning
needs CUDA, so `Tensor.pin_memory` is replaced by a recording copy; what matters here is where the loader pins and
that the batches are the same. tests/gpu/test_cuda.py checks real pinned batches on a GPU."""
from __future__ import annotations

import numpy as np
import torch

import train
import trainer.loop
from data import DistributedTokenLoader, write_shard


def shards(directory, sizes=(5000, 3000)):
    rng = np.random.default_rng(0)
    paths = []
    for index, size in enumerate(sizes):
        paths.append(directory / f"fineweb_train_{index:06d}.bin")
        write_shard(paths[-1], rng.integers(0, 50257, size))
    return paths


def recording_pin(monkeypatch) -> list[torch.Tensor]:
    """Replace Tensor.pin_memory by a copy that records each tensor it was called on."""
    pinned = []

    def pin_memory(tensor, *args, **kwargs):
        pinned.append(tensor)
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    return pinned


def test_pinned_loader_pins_each_batch_once_and_yields_the_same_batches(tmp_path, monkeypatch):
    files = shards(tmp_path)
    pinned = recording_pin(monkeypatch)
    plain = DistributedTokenLoader(files, 4, 64, rank=1, world_size=2)
    assert not pinned
    pinning = DistributedTokenLoader(files, 4, 64, rank=1, world_size=2, pin_memory=True)
    steps = 12  # crosses into the second shard and wraps around to the first
    for step in range(steps):
        expected, got = plain.next_batch(), pinning.next_batch()
        for a, b in zip(expected, got):
            assert torch.equal(a, b) and b.dtype == torch.int64
        # one buffer of batch x sequence + 1 tokens per batch; inputs and targets are views of it
        assert len(pinned) == step + 1 and pinned[-1].numel() == 4 * 64 + 1
    assert pinning.state_dict() == plain.state_dict()


def test_train_pins_batches_only_on_cuda(tmp_path, monkeypatch):
    """On the CPU train.py builds an unpinned loader (pinning would fail without CUDA and gains nothing)."""
    built = []

    class RecordingLoader(DistributedTokenLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self.pin_memory)

    monkeypatch.setattr(trainer.loop, "DistributedTokenLoader", RecordingLoader)
    assert train.main(["--model_dim", "32", "--n_layer", "1", "--n_head", "2", "--sequence_length", "32",
                       "--batch_size", "2", "--num_iterations", "1", "--val_loss_every", "0", "--checkpoint_freq",
                       "0", "--run_dir", str(tmp_path)]) == 0
    assert built == [False]
