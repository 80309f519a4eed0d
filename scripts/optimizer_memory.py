"""Optimizer-state memory for the 160M GPT: every registered optimizer, and every advanced optimizer x feature.

For each optimizer: build it through the registry as train.py does by default (the registry's scalar policy, so
element-wise optimizers take every parameter and the others leave embeddings, LM head and norm gains to Lion or
AdamW), give
every parameter a random gradient, take one step, and add up the bytes of the tensors in `optimizer.state` (packed
and factored states at their real size; the local shard of a DTensor). Prints a Markdown table of bytes per model
parameter and the ratio to AdamW; optimizers that fail to build or step are listed with the reason. Each row is
printed as soon as it is measured.

    python scripts/optimizer_memory.py [--preset 160m] [--output docs/optimizer_memory.md]
    python scripts/optimizer_memory.py --optimizers adamw dion adam_adv       # a subset (with adam_adv's features)
    python scripts/optimizer_memory.py --results runs/memory.jsonl            # resumable: rerun to finish

With --results FILE.jsonl each row is appended to FILE as it is measured; a rerun with the same file and preset
reuses those rows and measures only the missing ones.
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import GPT, PRESETS  # noqa: E402
from optimizers import build_optimizer  # noqa: E402
from optimizers.advanced import (Adam_Adv, Adopt_Adv, Features, Lion_Adv, Prodigy_Adv, Prodigy_Lion_Adv,  # noqa: E402
                                 Simplified_AdEMAMix)
from optimizers.registry import OPTIMIZERS, OptimizerContext  # noqa: E402
from results_file import ResultsFile, ResultsFileError  # noqa: E402

ADVANCED = {"adam_adv": Adam_Adv, "adopt_adv": Adopt_Adv, "prodigy_adv": Prodigy_Adv,
            "simplified_ademamix": Simplified_AdEMAMix, "lion_adv": Lion_Adv, "prodigy_lion_adv": Prodigy_Lion_Adv}


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
    """Optimizer-state bytes after one step of optimizer `name` with `options` over the registry's defaults."""
    context = OptimizerContext.from_groups(model.param_groups(), model_dim=model.config.model_dim,
                                           tokens_per_step=8 * model.config.sequence_length, options=dict(options))
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


def build_report(preset: str, names: list[str], store: ResultsFile) -> str:
    """The Markdown report for the registry `names` (and the feature combinations of the advanced ones among them),
    printed line by line as rows are measured (or taken from `store`); returns the whole report."""
    torch.manual_seed(0)
    model = GPT(PRESETS[preset])
    parameters = sum(p.numel() for p in model.parameters())
    lines: list[str] = []
    skipped: list[tuple[str, str]] = []
    adamw = None

    def emit(*new: str) -> None:
        lines.extend(new)
        print("\n".join(new), flush=True)

    def run(name: str, options: dict, label: str) -> None:
        nonlocal adamw
        key = f"{name} ({label})"
        stored = store.get(key)
        if stored is None:
            try:
                stored = {"bytes": measure(model, name, options)}
            except Exception as error:  # a builder or step that cannot run here is reported, not fatal
                skipped.append((key, f"{type(error).__name__}: {error}".splitlines()[0]))
                model.zero_grad(set_to_none=True)
                print(f"skipped {key}: {skipped[-1][1]}", file=sys.stderr, flush=True)
                return
            store.add(key, stored)
        size = stored["bytes"]
        if name == "adamw" and label == "defaults":
            adamw = size
        ratio = f"{size / adamw:.3f}" if adamw else "n/a"
        emit(f"| {name} | {label} | {size / 2 ** 20:,.1f} | {size / parameters:.3f} | {ratio} |")

    emit(
        f"# Optimizer-state memory, {preset} GPT",
        "",
        "Generated by `python scripts/optimizer_memory.py --output docs/optimizer_memory.md`.",
        "",
        f"Model: `GPT(PRESETS[\"{preset}\"])`, {parameters:,} parameters (float32). Each optimizer is built through "
        "the registry as train.py does by default (each optimizer's own scalar policy: element-wise optimizers take "
        "every parameter, the others leave embeddings, LM head and norm gains to Lion), takes one step with random "
        "gradients, and the tensors in `optimizer.state` are added up at their real size (packed 1-bit signs as "
        "uint8, factored moments as their vectors). State that an optimizer keeps outside `optimizer.state` is not "
        "counted.",
        "",
        "| optimizer | features | state (MiB) | bytes / parameter | vs AdamW |",
        "|---|---|---:|---:|---:|",
    )
    # AdamW first: every later row is given relative to it.
    for name in sorted(names, key=lambda n: (n != "adamw", n)):
        run(name, {}, "defaults")
    for name, cls in ADVANCED.items():
        if name in names:
            for options in feature_combinations(cls)[1:]:
                run(name, options, " + ".join(options))
    if skipped:
        emit("", "Not measured:", "", *(f"- {what}: {why}" for what, why in skipped))
    emit(
        "",
        "Notes: OrthoGrad, the cautious mask, Grams, atan2 and stochastic rounding keep no state. `factored` keeps a "
        "moment as two vectors of the near-square matrix it is viewed as, plus 1 bit per entry for a signed "
        "(first) moment; Prodigy's `s` and `p0` (every 11th entry by default, `slice_p`) stay dense. The optimizer's "
        "working tensors during a step (a factored moment is reconstructed at full size one parameter at a time) "
        "are transient and not counted.",
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="160m", choices=sorted(PRESETS))
    parser.add_argument("--output", type=Path, help="write the Markdown report to this file")
    parser.add_argument("--optimizers", nargs="+", metavar="NAME", help="registry names (default: all)")
    parser.add_argument("--results", type=Path, metavar="FILE.jsonl",
                        help="append each measured row here; rows already there (same preset) are reused")
    args = parser.parse_args(argv)
    names = args.optimizers or sorted(OPTIMIZERS)
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown:
        print(f"error: --optimizers: unknown name(s) {', '.join(unknown)}; registered: {', '.join(sorted(OPTIMIZERS))}",
              file=sys.stderr)
        return 2
    try:
        store = ResultsFile(args.results, dict(script="optimizer_memory", preset=args.preset))
    except ResultsFileError as error:
        print(f"error: --results: {error}", file=sys.stderr)
        return 2
    report = build_report(args.preset, names, store)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
