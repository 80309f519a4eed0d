"""torchrun worker for tests/models/test_vocab_parallel.py: the vocab-parallel embedding, LM head and loss on 2 ranks.

Usage: torchrun --standalone --nproc_per_node=2 vocab_parallel_worker.py OUTPUT.json
Rank 0 writes a JSON object of measurements (the test states the bounds):
- `ce_loss`, `ce_grad`: `vocab_parallel_cross_entropy` in float64 against F.cross_entropy on the gathered logits
  (relative error of the summed loss, largest absolute error of the gradient), with targets on both ranks' shards;
- per mode (`replicated`, `vocab`, `vocab_chunked`): the GPT under the TP plan against an unsharded copy on the same
  batch: relative loss error, largest relative gradient error over every parameter, the logits without targets, and
  the largest last dimension of any tensor the forward saved for backward, of the LM head's output and of the
  embedding's and LM head's weight shards on this rank.
"""
from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from models.gpt import GPT, GPTConfig, apply_tensor_parallel
from models.gpt.parallelize import vocab_parallel_cross_entropy

VOCAB = 96


def full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def cross_entropy_check(mesh) -> dict:
    """Closed form: the same summed loss and gradient as F.cross_entropy on the whole (tokens, vocab) logits."""
    rank, size = mesh.get_local_rank(), mesh.size()
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(40, VOCAB, dtype=torch.float64, generator=generator) * 4
    targets = torch.randint(0, VOCAB, (40,), generator=generator)
    assert {int(t) // (VOCAB // size) for t in targets} == set(range(size))  # targets on every rank's shard
    expected_logits = logits.clone().requires_grad_()
    expected = F.cross_entropy(expected_logits, targets, reduction="sum")
    expected.backward()
    width = VOCAB // size
    shard = logits[:, rank * width:(rank + 1) * width].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, targets, rank * width, mesh.get_group())
    (loss * 0.5).backward()  # a non-unit upstream gradient
    expected_grad = expected_logits.grad[:, rank * width:(rank + 1) * width] * 0.5
    return {"ce_loss": abs(loss.item() / expected.item() - 1),
            "ce_grad": (shard.grad - expected_grad).abs().max().item()}


def model_check(mesh, vocab_parallel: bool, chunk_tokens: int) -> dict:
    config = GPTConfig(vocab_size=VOCAB, n_layer=1, n_head=2, model_dim=16, sequence_length=12,
                       loss_chunk_tokens=chunk_tokens)
    torch.manual_seed(0)
    reference = GPT(config)
    with torch.no_grad():  # move the zero-initialized weights so that every gradient is non-zero
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model = copy.deepcopy(reference)
    apply_tensor_parallel(model, mesh, vocab_parallel=vocab_parallel)
    inputs, targets = torch.randint(0, VOCAB, (2, 12)), torch.randint(0, VOCAB, (2, 12))
    head_output = []
    model.lm_head.register_forward_hook(lambda module, args, output: head_output.append(local(output).shape[-1]))
    saved_widths = []

    def pack(tensor):
        saved_widths.append(local(tensor).shape[-1] if tensor.dim() else 0)
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(inputs, targets)
    loss.backward()
    expected = reference(inputs, targets)
    expected.backward()
    gradient_error = max(((full(p.grad) - q.grad).abs().max() / q.grad.abs().max()).item()
                         for p, q in zip(model.parameters(), reference.parameters()))
    logits = model(inputs)
    return {"loss": abs(loss.item() / expected.item() - 1), "gradients": gradient_error,
            "logits": (logits - reference(inputs)).abs().max().item(), "logits_shape": list(logits.shape),
            "largest_saved_width": max(saved_widths), "head_output_width": head_output[0],
            "embedding_rows": local(model.embed.weight).shape[0], "head_rows": local(model.lm_head.weight).shape[0]}


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    result = cross_entropy_check(mesh)
    for name, vocab_parallel, chunk in (("replicated", False, 0), ("vocab", True, 0), ("vocab_chunked", True, 7)):
        result[name] = model_check(mesh, vocab_parallel, chunk)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as file:
            json.dump(result, file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
