"""Download pre-tokenized FineWeb shards (GPT-2 tokens, the shard format of data/shards.py) from the Hugging Face
Hub. Used by the data/cached_*.py scripts; files already present are skipped."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def download(repo_id: str, prefix: str, num_train: int, max_train: int, local_dir: Path) -> None:
    """Fetch `{prefix}_val_000000.bin` and `{prefix}_train_000001.bin` .. `{prefix}_train_{num_train:06d}.bin`."""
    if not 1 <= num_train <= max_train:
        raise ValueError(f"number of training shards must be in [1, {max_train}], got {num_train}")
    from huggingface_hub import hf_hub_download
    from tqdm import tqdm

    names = [f"{prefix}_val_{0:06d}.bin"] + [f"{prefix}_train_{i:06d}.bin" for i in range(1, num_train + 1)]
    existed = local_dir.exists()
    todo = [n for n in names if not (local_dir / n).exists()]
    print(f"{repo_id}: {len(names) - len(todo)} of {len(names)} shards already in {local_dir}; fetching "
          f"{len(todo)} (~{0.2 * len(todo):.1f} GB; pass a number of training shards to fetch fewer)", flush=True)
    for name in tqdm(todo, desc=f"downloading {repo_id}", unit="shard"):
        try:
            hf_hub_download(repo_id=repo_id, filename=name, repo_type="dataset", local_dir=local_dir)
        except Exception as error:  # the hub client raises many types for a missing network
            if not existed and local_dir.is_dir() and not any(local_dir.glob(f"{prefix}_*.bin")):
                import shutil
                shutil.rmtree(local_dir)  # nothing was fetched: leave no empty directory behind
            offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
            reason = "HF_HUB_OFFLINE is set" if offline else f"{type(error).__name__}: {error}"
            raise SystemExit(f"error: could not download {name} from {repo_id} ({reason}). This needs network access "
                             f"to huggingface.co; without it, train on the embedded corpus (data_dir: null) or "
                             f"tokenize your own text with data/tokenize_text.py") from None


def main(repo_id: str, prefix: str, default_train: int, max_train: int, default_dir: str) -> None:
    parser = argparse.ArgumentParser(description=f"Download GPT-2-tokenized shards of {repo_id}")
    parser.add_argument("num_train", nargs="?", type=int, default=default_train,
                        help=f"training shards to fetch, each ~100M tokens (default {default_train}, max {max_train})")
    parser.add_argument("--local_dir", default=str(Path(__file__).parent / default_dir))
    args = parser.parse_args()
    try:
        download(repo_id, prefix, args.num_train, max_train, Path(args.local_dir))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
