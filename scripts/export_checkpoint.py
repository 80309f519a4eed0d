"""Export a run's newest checkpoint as one plain state_dict file, for use outside this repository.

    python scripts/export_checkpoint.py --run_dir runs/default                       # runs/default/export/model.pt
    python scripts/export_checkpoint.py --run_dir runs/default --format safetensors --out model.safetensors

Writes the model weights (full tensors, float32, keys = parameter names, whatever layout the run was trained in) as
`torch.save` of a dict or as safetensors (needs the `safetensors` package), and the run's resolved config next to
it (`<out>.config.yaml`; `build_config(["--config", that file])` and `trainer.build.build_model` rebuild the model):

    model = build_model(build_config(["--config", "model.pt.config.yaml"]))
    model.load_state_dict(torch.load("model.pt"))

A missing run directory or checkpoint, or safetensors requested without the package, is one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

import torch

from trainer.build import describe_model, load_run
from trainer.errors import ConfigError, UserError

SUFFIXES = {"torch": ".pt", "safetensors": ".safetensors"}


def export(run_dir: Path, out: Path | None = None, format: str = "torch", checkpoint: Path | None = None) -> Path:
    """Write the weights of the run's newest (or the given) checkpoint to `out` and its config to
    `<out>.config.yaml`; returns `out`."""
    if format == "safetensors" and importlib.util.find_spec("safetensors") is None:
        raise ConfigError("--format safetensors: the safetensors package is not installed (pip install safetensors), "
                          "or use --format torch")
    config, model, path = load_run(run_dir, checkpoint)
    out = out or run_dir / "export" / f"model{SUFFIXES[format]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if format == "safetensors":
        from safetensors.torch import save_file
        save_file(weights, str(out), metadata={"checkpoint": str(path)})
    else:
        torch.save(weights, out)
    shutil.copyfile(run_dir / "config.yaml", config_path(out))
    print(describe_model(model, config))
    print(f"exported {path} -> {out} ({format}) and {config_path(out)}")
    return out


def config_path(out: Path) -> Path:
    return out.with_name(out.name + ".config.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", type=Path, required=True, help="a train.py run directory")
    parser.add_argument("--out", type=Path, help="output file (default: RUN/export/model.pt or .safetensors)")
    parser.add_argument("--format", choices=sorted(SUFFIXES), default="torch")
    parser.add_argument("--checkpoint", type=Path, help="a step_NNNNNNNN directory (default: the newest)")
    args = parser.parse_args(argv)
    try:
        export(args.run_dir, args.out, args.format, args.checkpoint)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
