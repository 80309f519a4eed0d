"""Optimizer-state memory for the 160M GPT: every registered optimizer, and every advanced optimizer x feature.

For each optimizer: build it through the registry as train.py does by default (scalar_opt lion, not explicit, so
element-wise optimizers take every parameter and the others leave embeddings, LM head and norm gains to Lion), give
every parameter a random gradient, take one step, and add up the bytes of the tensors in `optimizer.state` (packed
and factored states at their real size; the local shard of a DTensor). Prints a Markdown table of bytes per model
parameter and the ratio to AdamW; optimizers that fail to build or step are listed with the reason.

    python scripts/optimizer_memory.py [--preset 160m] [--output docs/optimizer_memory.md]
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import GPT, PRESETS  # noqa: E402
from optimizers import build_optimizer  # noqa: E402
from optimizers.advanced import (Adam_Adv, Adopt_Adv, Features, Lion_Adv, Prodigy_Adv,  # noqa: E402
                                 Prodigy_Lion_Adv, Simplified_AdEMAMix)
from optimizers.registry import OPTIMIZERS, OptimizerContext  # noqa: E402

ADVANCED = {"adam_adv": Adam_Adv, "adopt_adv": Adopt_Adv, "prodigy_adv": Prodigy_Adv,
            "simplified_ademamix": Simplified_AdEMAMix, "lion_adv": Lion_Adv, "prodigy_lion_adv": Prodigy_Lion_Adv}


def split_parameters(model: GPT) -> dict[str, list[torch.Tensor]]:
    """matrix: 2D weights inside the blocks; embedding; lm_head; vector: the 1D norm gains."""
    return dict(matrix_params=[p for p in model.blocks.parameters() if p.ndim == 2],
                embedding_params=[model.embed.weight], lm_head_params=[model.lm_head.weight],
                vector_params=[p for p in model.parameters() if p.ndim == 1])


def tensor_bytes(value) -> int:
    """Bytes of every tensor in a (possibly nested) state value; a DTensor counts its local shard."""
    if isinstance(value, torch.Tensor):
        local = value.to_local() if hasattr(value, "to_local") else value
        return local.numel() * local.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(state) for state in optimizer.state.values())


def measure(model: GPT, name: str, options: dict) -> int:
    """Optimizer-state bytes after one step of optimizer `name` with `optimizer_args` options."""
    context = OptimizerContext(**split_parameters(model), model_dim=model.config.model_dim, scalar_opt="lion",
                               scalar_opt_explicit=False, tokens_per_step=8 * model.config.sequence_length,
                               options=dict(options))
    optimizer = build_optimizer(name, context)
    generator = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator) * 1e-3
    optimizer.step()
    total = state_bytes(optimizer)
    del optimizer
    model.zero_grad(set_to_none=True)
    gc.collect()
    return total


def feature_combinations(cls) -> list[dict[str, bool]]:
    """None, each supported feature alone, factored with AdEMAMix, and every compatible supported feature at once."""
    supported = [name for name in Features.names() if name in cls.SUPPORTED_FEATURES]
    combinations = [{}] + [{name: True} for name in supported]
    if "use_AdEMAMix" in supported:
        combinations.append(dict(factored=True, use_AdEMAMix=True))
    everything = {name: True for name in supported if not (name == "cautious_mask" and "grams" in supported)}
    if len(everything) > 1:
        combinations.append(everything)
    return combinations


def build_report(preset: str) -> str:
    torch.manual_seed(0)
    model = GPT(PRESETS[preset])
    parameters = sum(p.numel() for p in model.parameters())
    rows: list[tuple[str, str, int]] = []
    skipped: list[tuple[str, str]] = []

    def run(name: str, options: dict, label: str) -> None:
        try:
            rows.append((name, label, measure(model, name, options)))
        except Exception as error:  # a builder or step that cannot run here is reported, not fatal
            skipped.append((f"{name} ({label})", f"{type(error).__name__}: {error}".splitlines()[0]))
            model.zero_grad(set_to_none=True)
            print(f"skipped {name} ({label}): {skipped[-1][1]}", file=sys.stderr)

    for name in sorted(OPTIMIZERS):
        run(name, {}, "defaults")
        print(f"measured {name}", file=sys.stderr)
    for name, cls in ADVANCED.items():
        for options in feature_combinations(cls)[1:]:
            run(name, options, " + ".join(options))
            print(f"measured {name} {options}", file=sys.stderr)

    adamw = next((size for name, label, size in rows if name == "adamw" and label == "defaults"), None)
    lines = [
        f"# Optimizer-state memory, {preset} GPT",
        "",
        "Generated by `python scripts/optimizer_memory.py --output docs/optimizer_memory.md`.",
        "",
        f"Model: `GPT(PRESETS[\"{preset}\"])`, {parameters:,} parameters (float32). Each optimizer is built through "
        "the registry as train.py does by default (`scalar_opt` lion, not explicit: element-wise optimizers take "
        "every parameter, the others leave embeddings, LM head and norm gains to Lion), takes one step with random "
        "gradients, and the tensors in `optimizer.state` are added up at their real size (packed 1-bit signs as "
        "uint8, factored moments as their vectors). State that an optimizer keeps outside `optimizer.state` is not "
        "counted.",
        "",
        "| optimizer | features | state (MiB) | bytes / parameter | vs AdamW |",
        "|---|---|---:|---:|---:|",
    ]
    for name, label, size in rows:
        ratio = f"{size / adamw:.3f}" if adamw else "n/a"
        lines.append(f"| {name} | {label} | {size / 2 ** 20:,.1f} | {size / parameters:.3f} | {ratio} |")
    if skipped:
        lines += ["", "Not measured:", ""] + [f"- {what}: {why}" for what, why in skipped]
    lines += [
        "",
        "Notes: OrthoGrad, the cautious mask, Grams, atan2 and stochastic rounding keep no state. `factored` keeps a "
        "moment as two vectors of the near-square matrix it is viewed as, plus 1 bit per entry for a signed "
        "(first) moment; Prodigy's `s` and `p0` (every 11th entry by default, `slice_p`) stay dense. The optimizer's "
        "working tensors during a step (a factored moment is reconstructed at full size one parameter at a time) "
        "are transient and not counted.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="160m", choices=sorted(PRESETS))
    parser.add_argument("--output", type=Path, help="write the Markdown report to this file")
    args = parser.parse_args(argv)
    report = build_report(args.preset)
    print(report)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
