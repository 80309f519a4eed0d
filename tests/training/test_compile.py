"""torch.compile per block with fullgraph=True (trainer/distributed.py `parallelize`).

A graph break splits a block into several graphs with eager Python between them: on a GPU that costs a host round
trip and a kernel launch gap at every break, in every block, at every step, and nothing reports it. fullgraph=True
turns such a break into an error at the first forward; these tests show the block traces as one graph and that
parallelize asks for fullgraph (which also caught that compile with activation checkpointing compiled nothing).
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from models.gpt.model import GPT, Block
from trainer.config import build_config
from trainer.distributed import Distributed, compile_blocks, parallelize

SHAPE = ["--model_dim", "32", "--n_layer", "2", "--n_head", "2", "--sequence_length", "16"]
SINGLE = Distributed(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), dp=1, fs=1, tp=1)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model(*args: str) -> tuple[GPT, object]:
    config = build_config(SHAPE + ["--model.vocab_size", "256", *args])
    torch.manual_seed(0)
    model = GPT(config.model)
    with torch.no_grad():  # move the zero-initialized output projections and head, so every gradient is non-zero
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model, config


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (2, 17), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


@pytest.mark.parametrize("activation_checkpointing", ["none", "full", "selective"])
def test_every_gpt_block_compiles_as_one_graph_forward_and_backward(activation_checkpointing):
    """compile_blocks as parallelize calls it (fullgraph), with a backend that skips inductor's code generation
    (dynamo's tracing, where graph breaks happen, is the same): any break raises."""
    model, config = tiny_model("--parallel.activation_checkpointing", activation_checkpointing)
    parallelize(model, config, SINGLE, optimizer_syncs_replicas=False)  # compile off: only checkpointing applied
    compile_blocks(model, backend="aot_eager")
    inputs, targets = batch()
    model(inputs, targets).backward()
    assert counters["stats"]["unique_graphs"] >= 1  # compiled, not run eagerly (blocks of one shape share a graph)


def test_parallelize_compiles_with_fullgraph_so_a_graph_break_fails(monkeypatch):
    """A block forward with a graph break in it (what a print, an .item() or an unsupported call causes):
    parallelize's compile must refuse it rather than run it as two graphs."""
    original = Block.forward

    def forward_with_break(self, x):
        x = x * 1.0
        torch._dynamo.graph_break()
        return original(self, x)

    monkeypatch.setattr(Block, "forward", forward_with_break)
    model, config = tiny_model("--compile", "true")
    model = parallelize(model, config, SINGLE, optimizer_syncs_replicas=False)
    inputs, targets = batch()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        model(inputs, targets)


@pytest.mark.slow  # inductor's C++ compilation of forward and backward: 10-40 s per case on 2 cores
@pytest.mark.parametrize("activation_checkpointing", ["none", "full"])
def test_compiled_blocks_give_the_eager_loss_and_gradients(activation_checkpointing):
    eager, _ = tiny_model()
    compiled, config = tiny_model("--compile", "true", "--parallel.activation_checkpointing", activation_checkpointing)
    compiled = parallelize(compiled, config, SINGLE, optimizer_syncs_replicas=False)
    inputs, targets = batch()
    losses = []
    for model in (eager, compiled):
        loss = model(inputs, targets)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
