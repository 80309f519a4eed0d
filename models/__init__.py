"""Models, each a package implementing a small protocol, registered by name (`model.name` in the config).

A model package exports:
- `Config`: a frozen dataclass, the YAML `model:` section (fields with `metadata={"help": ...}`), validated on
  construction; `PRESETS`: name -> Config (`model.preset`);
- `Model(config)`: an nn.Module with `forward(inputs, targets=None)` (mean cross-entropy with targets, else logits),
  `blocks` (the repeated units FSDP2 shards and torch.compile compiles one by one), `param_groups()` (matrix /
  embedding / lm_head / vector: how optimizers treat each parameter), `num_parameters()`, `flops_per_token()`, and,
  for meta-device builds in sharded layouts (`parallel.meta_init`), `initial_values()` (name and full CPU tensor of
  each parameter in turn, the values the CPU build gives after the same seed, drawing the same random numbers) and
  `reset_buffers()` (recompute the non-persistent buffers);
- `apply_tensor_parallel(model, tp_mesh, vocab_parallel)`: its TP plan (vocab_parallel: also shard the embedding,
  LM head and loss on the vocabulary), or None if it has none.
Adding a model: one package plus one line in MODELS.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from models.gpt import GPT, PRESETS, GPTConfig, padded_vocab_size

MODELS: dict[str, str] = {"gpt": "models.gpt"}


def model_package(name: str) -> ModuleType:
    if name not in MODELS:
        raise ValueError(f"model.name: unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")
    return importlib.import_module(MODELS[name])


__all__ = ["GPT", "GPTConfig", "MODELS", "PRESETS", "model_package", "padded_vocab_size"]
