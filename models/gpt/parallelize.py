"""How the GPT is split for tensor parallelism (the model file itself has no distributed code).

Megatron-style: q/k/v and the MLP input are column-parallel, the attention and MLP outputs row-parallel, so each TP
rank holds n_head / tp heads. The per-head QK-norm runs on the local heads, treated as a tensor sharded on its head
dimension so that its (replicated) gains get their gradient summed over all heads. Embedding, final norm and LM head
stay replicated.
"""
from __future__ import annotations


def apply_tensor_parallel(model, tp_mesh) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module
    tp = tp_mesh.size()
    if model.config.n_head % tp != 0:
        raise ValueError(f"parallel.tp_size: {tp} does not divide model.n_head={model.config.n_head}")
    for block in model.blocks:
        parallelize_module(block, tp_mesh, {
            "attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.o": RowwiseParallel(),
            "attn.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
            "attn.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
            "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel(),
        })
