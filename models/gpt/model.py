"""GPT as in the Dion paper's experiments (the modded-nanoGPT architecture).

Pre-norm blocks with RMSNorm, rotary position embeddings, QK-norm, causal scaled-dot-product attention, ReLU^2 MLP
with 4x expansion, no biases, untied token embedding and LM head. No distributed code lives here: tensor
parallelism only relies on the attention reshapes using the *local* number of heads (`-1` in the view), so a
column-sharded q/k/v projection just sees fewer heads, and on `GPT.output` (LM head + loss) being one method that
the TP plan can replace on the instance with its vocab-parallel version (`parallelize.py`).

Initialization, `init: zero_out` (the default; chosen for orthonormalized optimizers such as Dion and Muon, whose
updates have a fixed spectral size regardless of the weight's scale):
- hidden matrices (q, k, v, MLP input): normal with std 1/sqrt(fan_in), so every layer starts with unit-RMS outputs;
- the two residual-branch output projections (attention out, MLP out) and the LM head: zero, so every block starts
  as the identity and the initial loss is exactly ln(vocab_size) (uniform prediction);
- token embedding: standard normal (the RMSNorm that follows makes the scale irrelevant);
- norm gains: one.
`init: reference` is microsoft/dion's GPT (models/gpt_model.py at 0a059a4): every linear layer normal with std
1/sqrt(fan_in) min(1, sqrt(fan_out / fan_in)) (Yang et al. 2023, arXiv 2310.17813), nothing zeroed, token embedding
standard normal. With `norm_gains: false` the RMSNorms have no learnable gain (the reference's F.rms_norm) and the
QK-norm runs after the rotary embedding, in the reference's order (the same function without a gain: a rotation keeps
the RMS). `rope_dtype: bfloat16` rounds the cos/sin tables to bfloat16 as the reference does.
configs/reference/*.yaml set all three to the reference's values.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GPT2_VOCAB_SIZE = 50257
INIT_SCHEMES = ("zero_out", "reference")
ROPE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class GPTConfig:
    """The `model` section of a training config (YAML `model:`), validated on construction."""
    vocab_size: int = field(default=50304, metadata={"help": "token ids the model embeds (50304 = GPT-2's 50257 "
                                                             "padded to a multiple of 128)"})
    n_layer: int = field(default=12, metadata={"help": "transformer blocks"})
    n_head: int = field(default=6, metadata={"help": "attention heads (model_dim / n_head must be even)"})
    model_dim: int = field(default=768, metadata={"help": "width of the residual stream"})
    sequence_length: int = field(default=1024, metadata={"help": "tokens per training sequence (RoPE table size)"})
    loss_chunk_tokens: int = field(default=0, metadata={"help": "compute the LM head and cross-entropy this many "
                                                                "tokens at a time, recomputed in backward, so the full "
                                                                "fp32 logits never exist; 0 = all at once"})
    init: str = field(default="zero_out", metadata={"help": "initial weights: zero_out (residual outputs and LM head "
                                                           "zero) or reference (microsoft/dion's scheme)"})
    norm_gains: bool = field(default=True, metadata={"help": "learnable RMSNorm gains; false = the reference's "
                                                            "parameter-free norms"})
    rope_dtype: str = field(default="float32", metadata={"help": "precision of the rotary cos/sin tables: float32 or "
                                                                "bfloat16 (the reference's)"})

    def __post_init__(self):
        for key in ("vocab_size", "n_layer", "n_head", "model_dim", "sequence_length"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be a positive integer, got {getattr(self, key)}")
        if self.loss_chunk_tokens < 0:
            raise ValueError(f"loss_chunk_tokens: must be >= 0 (0 = off), got {self.loss_chunk_tokens}")
        if self.model_dim % self.n_head != 0:
            raise ValueError(f"model_dim: {self.model_dim} is not divisible by n_head={self.n_head}")
        if (self.model_dim // self.n_head) % 2 != 0:
            raise ValueError(f"model_dim / n_head = {self.model_dim // self.n_head} must be even (rotary embedding)")
        for key, allowed in (("init", INIT_SCHEMES), ("rope_dtype", ROPE_DTYPES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.n_head


PRESETS: dict[str, GPTConfig] = {
    "160m": GPTConfig(vocab_size=50304, n_layer=12, n_head=6, model_dim=768, sequence_length=1024),
    "tiny": GPTConfig(vocab_size=50304, n_layer=4, n_head=6, model_dim=384, sequence_length=256),
    # Planning shapes for scripts/estimate.py (docs/scaling.md): GPT-3 XL's width, and the 7B / 70B widths and
    # depths of LLaMA, with this GPT's blocks (4x ReLU^2 MLP, no grouped-query attention), head_dim 128.
    "1b": GPTConfig(vocab_size=50304, n_layer=24, n_head=16, model_dim=2048, sequence_length=2048),
    "7b": GPTConfig(vocab_size=50304, n_layer=32, n_head=32, model_dim=4096, sequence_length=4096),
    "70b": GPTConfig(vocab_size=50304, n_layer=80, n_head=64, model_dim=8192, sequence_length=4096),
}


def padded_vocab_size(vocab_size: int = GPT2_VOCAB_SIZE, multiple: int = 128) -> int:
    """Vocabulary rounded up to a multiple of 128 (50257 -> 50304) for efficient matmuls."""
    return -(-vocab_size // multiple) * multiple


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021) on the last dimension of (batch, seq, heads, head_dim)."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0, table_dtype: str = "float32"):
        super().__init__()
        self.head_dim, self.max_seq_len, self.base = head_dim, max_seq_len, base
        self.table_dtype = getattr(torch, table_dtype)
        cos, sin = self._tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self) -> tuple[Tensor, Tensor]:
        """cos and sin of the rotation angles, (1, max_seq_len, 1, head_dim / 2) float32 (values rounded to
        table_dtype), computed on the CPU."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device="cpu") / self.head_dim
        inv_freq = 1.0 / (self.base ** exponents)
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32, device="cpu"), inv_freq)
        cos, sin = (t.to(self.table_dtype).float() for t in (angles.cos(), angles.sin()))
        return cos[None, :, None, :], sin[None, :, None, :]

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the tables in place (after `to_empty` gave the buffers storage but no values)."""
        cos, sin = self._tables()
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, x: Tensor) -> Tensor:
        seq_len = x.size(1)
        cos, sin = self.cos[:, :seq_len].to(x.dtype), self.sin[:, :seq_len].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        d = config.model_dim
        self.head_dim = config.head_dim
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.q_norm = nn.RMSNorm(config.head_dim, elementwise_affine=config.norm_gains)
        self.k_norm = nn.RMSNorm(config.head_dim, elementwise_affine=config.norm_gains)
        self.rotary = Rotary(config.head_dim, config.sequence_length, table_dtype=config.rope_dtype)
        self.norm_after_rotary = not config.norm_gains  # the reference's order; the same function without gains

    def forward(self, x: Tensor) -> Tensor:
        batch, seq_len, _ = x.shape
        # -1: the local number of heads (all heads, or heads / tp under tensor parallelism).
        q = self.q(x).view(batch, seq_len, -1, self.head_dim)
        k = self.k(x).view(batch, seq_len, -1, self.head_dim)
        v = self.v(x).view(batch, seq_len, -1, self.head_dim)
        if self.norm_after_rotary:
            q, k = self.q_norm(self.rotary(q)), self.k_norm(self.rotary(k))
        else:
            q, k = self.rotary(self.q_norm(q)), self.rotary(self.k_norm(k))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(batch, seq_len, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.model_dim, 4 * config.model_dim, bias=False)
        self.proj = nn.Linear(4 * config.model_dim, config.model_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.model_dim, elementwise_affine=config.norm_gains)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.model_dim, elementwise_affine=config.norm_gains)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


def _chunk_loss_sum(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


def chunked_loss(loss_sum: Callable[[Tensor, Tensor], Tensor], hidden: Tensor, targets: Tensor,
                 chunk_tokens: int) -> Tensor:
    """mean over all tokens of `loss_sum(hidden rows, their targets)` (a summed loss), taken `chunk_tokens` rows at
    a time, each chunk recomputed in backward (activation checkpointing): only one chunk's logits exist at a time.
    hidden: (..., d); targets: (...) int64."""
    from torch.utils.checkpoint import checkpoint
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        total = total + checkpoint(loss_sum, h, t, use_reentrant=False)
    return total / targets.numel()


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int) -> Tensor:
    """mean_i CE(hidden_i W^T, target_i) over all tokens, `chunk_tokens` rows at a time, so at most one chunk of
    (chunk_tokens, vocab) float32 logits exists at any time instead of (batch x seq, vocab). weight: (vocab, d)."""
    return chunked_loss(lambda h, t: _chunk_loss_sum(h, weight, t), hidden, targets, chunk_tokens)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.model_dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = nn.RMSNorm(config.model_dim, elementwise_affine=config.norm_gains)
        self.lm_head = nn.Linear(config.model_dim, config.vocab_size, bias=False)
        self.reset_parameters()

    def _initializers(self) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
        """(parameter name, in-place initialization of its full tensor) in the order they draw from the generator
        (the module docstring's schemes). zero_out: the zero-initialized matrices still draw their normal sample
        first: that draw was part of this model's initialization from the start, and dropping it would change every
        value drawn after it (and every recorded result). reference: the reference's order (embedding, the blocks'
        matrices, LM head)."""
        if self.config.init == "reference":
            out = [("embed.weight", functools.partial(nn.init.normal_, std=1.0))]
            for name, module in self.named_modules():
                if isinstance(module, nn.Linear):
                    fan_out, fan_in = module.weight.shape
                    std = min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in)
                    out.append((f"{name}.weight", functools.partial(nn.init.normal_, std=std)))
            return out
        zeroed = {self.lm_head} | {block.attn.o for block in self.blocks} | {block.mlp.proj for block in self.blocks}
        out = []
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = 1.0 / math.sqrt(module.in_features)
                if module in zeroed:
                    out.append((f"{name}.weight", lambda t, std=std: nn.init.normal_(t, std=std).zero_()))
                else:
                    out.append((f"{name}.weight", functools.partial(nn.init.normal_, std=std)))
            elif isinstance(module, nn.RMSNorm) and module.weight is not None:
                out.append((f"{name}.weight", nn.init.ones_))
        out.append(("embed.weight", functools.partial(nn.init.normal_, std=1.0)))
        return out

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, initialize in self._initializers():
            initialize(self.get_parameter(name))

    def initial_values(self) -> Iterator[tuple[str, Tensor]]:
        """(name, full float32 CPU tensor) for every parameter, one at a time: the values `torch.manual_seed(s);
        GPT(config)` on the CPU gives, when called after `torch.manual_seed(s)`. For a model built on the meta device
        and sharded: each rank draws every full tensor in turn and keeps its slice, so the initial weights are the
        same in every layout and at most one full parameter exists at a time. Only names and global shapes are read
        from `self`, so its parameters may be meta tensors or DTensors. The draws that nn.Linear and nn.Embedding
        make when constructed come first (their values are overwritten by `reset_parameters`, but they advance the
        generator)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="cpu")
            elif isinstance(module, nn.Embedding):
                nn.Embedding(module.num_embeddings, module.embedding_dim, device="cpu")
        for name, initialize in self._initializers():
            value = torch.empty(self.get_parameter(name).shape, device="cpu")
            with torch.no_grad():
                initialize(value)
            yield name, value

    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (the RoPE tables), e.g. after `to_empty`."""
        for module in self.modules():
            if isinstance(module, Rotary):
                module.reset_buffers()

    def forward(self, inputs: Tensor, targets: Tensor | None = None) -> Tensor:
        """inputs: (batch, seq) int64 token ids. Returns the mean cross-entropy over all target positions when
        targets is given, else the logits (batch, seq, vocab) in float32."""
        x = self.embed(inputs)
        for block in self.blocks:
            x = block(x)
        return self.output(self.final_norm(x), targets)

    def output(self, hidden: Tensor, targets: Tensor | None = None) -> Tensor:
        """The LM head on the final hidden states: float32 logits without targets, else the mean cross-entropy
        (chunked when loss_chunk_tokens > 0). The TP plan replaces it on the instance with a vocab-parallel head."""
        if targets is not None and self.config.loss_chunk_tokens:
            return chunked_cross_entropy(hidden, self.lm_head.weight, targets, self.config.loss_chunk_tokens)
        logits = self.lm_head(hidden).float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """How optimizers should treat each parameter: `matrix` (the blocks' 2D weights: orthonormalized by Dion and
        Muon), `embedding`, `lm_head`, `vector` (norm gains). Every parameter appears exactly once."""
        matrices = [p for p in self.blocks.parameters() if p.ndim == 2]
        taken = {id(p) for p in matrices} | {id(self.embed.weight), id(self.lm_head.weight)}
        vectors = [p for p in self.parameters() if id(p) not in taken]
        return {"matrix": matrices, "embedding": [self.embed.weight], "lm_head": [self.lm_head.weight],
                "vector": vectors}

    def num_parameters(self, exclude_embedding: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if exclude_embedding else total

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 x (non-embedding parameters) for the matmuls plus the attention scores
        (6 x n_layer x seq x d for QK^T and AV, forward and backward, causal mask not discounted)."""
        c = self.config
        return 6 * self.num_parameters() + 6 * c.n_layer * c.sequence_length * c.model_dim
