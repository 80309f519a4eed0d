"""A second model and an extra optimizer, each added the way docs/architecture.md says: one module plus one registry
line (the tests add the registry lines with monkeypatch)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from optimizers.common.closure import closure_loss


@dataclass(frozen=True)
class Config:
    vocab_size: int = field(default=50304, metadata={"help": "token ids"})
    model_dim: int = field(default=16, metadata={"help": "embedding width"})
    sequence_length: int = field(default=16, metadata={"help": "tokens per sequence"})
    n_layer: int = field(default=1, metadata={"help": "residual MLP blocks"})

    def __post_init__(self):
        if self.n_layer < 1:
            raise ValueError(f"n_layer: must be >= 1, got {self.n_layer}")


PRESETS = {"micro": Config(model_dim=8)}


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.tanh(self.fc(x))


class Model(nn.Module):
    """Bigram-style LM: embedding, residual tanh blocks, untied head."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.model_dim)
        self.blocks = nn.ModuleList(Block(config.model_dim) for _ in range(config.n_layer))
        self.lm_head = nn.Linear(config.model_dim, config.vocab_size, bias=False)
        nn.init.zeros_(self.lm_head.weight)

    def forward(self, inputs: Tensor, targets: Tensor | None = None) -> Tensor:
        x = self.embed(inputs)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(x).float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def initial_values(self):
        """What construction after the same seed draws, parameter by parameter (for meta-device builds)."""
        d, vocab = self.config.model_dim, self.config.vocab_size
        yield "embed.weight", nn.Embedding(vocab, d, device="cpu").weight.detach()
        for index in range(len(self.blocks)):
            yield f"blocks.{index}.fc.weight", nn.Linear(d, d, bias=False, device="cpu").weight.detach()
        nn.Linear(d, vocab, bias=False, device="cpu")  # drawn, then zeroed
        yield "lm_head.weight", torch.zeros(vocab, d)

    def reset_buffers(self) -> None:
        """No buffers."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"matrix": [b.fc.weight for b in self.blocks], "embedding": [self.embed.weight],
                "lm_head": [self.lm_head.weight], "vector": []}

    def num_parameters(self, exclude_embedding: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if exclude_embedding else total

    def flops_per_token(self) -> int:
        return 6 * self.num_parameters()


apply_tensor_parallel = None


class ScaledSGD(Optimizer):
    """p <- p - lr * scale * g: the smallest optimizer with one option of its own (`scale`)."""

    def __init__(self, params, lr: float = 0.1, weight_decay: float = 0.0, scale: float = 1.0):
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"ScaledSGD: scale must be a positive number, got {scale}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, scale=scale))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * group["weight_decay"]).add_(p.grad, alpha=-group["lr"] * group["scale"])
        return loss
