"""How the GPT is split for tensor parallelism (the model file itself has no distributed code).

Megatron-style: q/k/v and the MLP input are column-parallel, the attention and MLP outputs row-parallel, so each TP
rank holds n_head / tp heads. The per-head QK-norm runs on the local heads, treated as a tensor sharded on its head
dimension so that its (replicated) gains get their gradient summed over all heads. The final norm stays replicated.

Vocab-parallel (`vocab_parallel=True`, the trainer's `parallel.vocab_parallel`, on by default): the token embedding
and the LM head are split on the vocabulary, so each TP rank holds and computes vocab / tp of them instead of the
whole 50k-row tables and the full (tokens, vocab) logits.
- embedding: row-parallel on the (vocab, d) table; each rank looks up the ids it owns (the others give zero rows)
  and one all-reduce sums the partial outputs into the replicated residual stream;
- LM head: column-parallel, its logits stay sharded on the vocabulary dimension;
- loss: `vocab_parallel_cross_entropy` takes the logsumexp over the shards with three all-reduces of one number
  per token (max, sum of exponentials, target log-probability), and its backward is local (softmax minus the
  one-hot of the owned targets), so the full-vocab logits and their gradient never exist on a rank. The gradient
  reaching the replicated hidden states is summed over the shards by the column-parallel head's input.
This replaces `GPT.output` on the instance. torch's `loss_parallel` context is not used: it routes the
cross-entropy ops to their sharded versions only while it is entered, and the training loop calls `loss.backward()`
after `model(inputs, targets)` has returned, outside any context the model could hold; there the backward fails
(torch 2.13: "aten.nll_loss_backward.default got mixed torch.Tensor and DTensor"). Every caller of the model would
have to wrap forward and backward. `model.loss_chunk_tokens` combines with vocab-parallel: each chunk's local
logits and loss are recomputed in backward.

Optimizers see the embedding and LM head as DTensors sharded on dim 0 over the TP mesh (with FSDP2 also on dim 1),
as FSDP2 alone already shards them: every registered optimizer that supports TP runs element-wise algorithms on
the local shards (AdamW / Lion, alone or as the scalar algorithm of Dion and the Muon family) or reduces its sums
over the shard groups (the advanced family, Prodigy). Tested: every parameter against one process for AdamW, Dion,
Muon and adam_adv, a 3-step loss curve for every optimizer with `supports_tensor_parallel`.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor


def apply_tensor_parallel(model, tp_mesh, vocab_parallel: bool = True) -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module
    tp = tp_mesh.size()
    if model.config.n_head % tp != 0:
        raise ValueError(f"parallel.tp_size: {tp} does not divide model.n_head={model.config.n_head}")
    if vocab_parallel and model.config.vocab_size % tp != 0:
        raise ValueError(f"parallel.tp_size: {tp} does not divide model.vocab_size={model.config.vocab_size} "
                         f"(vocab-parallel embedding and LM head); pad the vocabulary or set "
                         f"parallel.vocab_parallel: false")
    for block in model.blocks:
        parallelize_module(block, tp_mesh, {
            "attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.o": RowwiseParallel(),
            "attn.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
            "attn.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
            "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel(),
        })
    if vocab_parallel:
        parallelize_module(model, tp_mesh, {
            "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        })
        model.output = functools.partial(vocab_parallel_output, model)


def vocab_parallel_output(model, hidden: Tensor, targets: Tensor | None = None) -> Tensor:
    """`GPT.output` with the LM head sharded on the vocabulary: the mean cross-entropy from the local logits, or,
    without targets, the full float32 logits gathered on every rank."""
    from models.gpt.model import chunked_loss
    if targets is None:
        return model.lm_head(hidden).full_tensor().float()
    if model.config.loss_chunk_tokens:
        return chunked_loss(functools.partial(_head_loss_sum, model.lm_head), hidden, targets,
                            model.config.loss_chunk_tokens)
    return _head_loss_sum(model.lm_head, hidden, targets) / targets.numel()


def _head_loss_sum(lm_head, hidden: Tensor, targets: Tensor) -> Tensor:
    logits = lm_head(hidden)  # DTensor sharded on the vocabulary
    mesh = logits.device_mesh
    local = logits.to_local().float()
    return vocab_parallel_cross_entropy(local.reshape(-1, local.size(-1)), targets.reshape(-1),
                                        mesh.get_local_rank() * local.size(-1), mesh.get_group())


def vocab_parallel_cross_entropy(logits: Tensor, targets: Tensor, vocab_start: int, group) -> Tensor:
    """sum_i CE(logits_i, target_i) where this rank holds the columns [vocab_start, vocab_start + V_local) of the
    (tokens, vocab) logits and `group` the rest. Every rank returns the same sum; the gradient is with respect to the
    local columns only."""
    return _VocabParallelCrossEntropySum.apply(logits, targets, vocab_start, group)


class _VocabParallelCrossEntropySum(torch.autograd.Function):
    """The arithmetic of torch's CPU/CUDA log-softmax + NLL (log-probabilities x - max - log(sum exp), gradient
    exp(log-probabilities) - one-hot), so that the rounding matches the replicated head's closely: AdamW's first
    steps amplify gradient round-off in weights whose gradients are still tiny (docs/testing.md)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, vocab_start: int, group) -> Tensor:
        row_max = logits.max(dim=-1, keepdim=True).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        log_probs = logits - row_max
        sum_exp = log_probs.exp().sum(dim=-1, keepdim=True)
        dist.all_reduce(sum_exp, group=group)
        log_probs.sub_(sum_exp.log_())
        local_targets = targets - vocab_start
        owned = (local_targets >= 0) & (local_targets < logits.size(-1))
        local_targets = torch.where(owned, local_targets, 0)
        target_log_prob = torch.where(owned, log_probs.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1), 0.0)
        dist.all_reduce(target_log_prob, group=group)
        ctx.save_for_backward(log_probs, local_targets, owned)
        return -target_log_prob.sum()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        log_probs, local_targets, owned = ctx.saved_tensors
        grad = log_probs.exp().mul_(grad_output)
        grad.scatter_add_(-1, local_targets.unsqueeze(-1), (-grad_output * owned.to(grad.dtype)).unsqueeze(-1))
        return grad, None, None, None
