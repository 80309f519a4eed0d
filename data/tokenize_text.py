"""Tokenize text files into training shards with GPT-2 BPE, offline.

    python data/tokenize_text.py book1.txt book2.txt --out_dir data/mytext --name mytext

Each file is one document, preceded by the end-of-text token. The last `--val_fraction` of the token stream goes to
`{name}_val_000000.bin`, the rest to `{name}_train_%06d.bin` shards; train with `--data_dir data/mytext`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.shards import write_shard  # noqa: E402
from data.tokenizer import EOT_TOKEN, gpt2_encoding  # noqa: E402


def tokenize_files(paths: list[Path]) -> np.ndarray:
    encoding = gpt2_encoding()
    tokens: list[int] = []
    for path in paths:
        tokens.append(EOT_TOKEN)
        tokens.extend(encoding.encode_ordinary(path.read_text(encoding="utf-8", errors="replace")))
    return np.array(tokens, dtype=np.uint16)


def write_splits(tokens: np.ndarray, out_dir: Path, name: str, val_fraction: float, shard_tokens: int) -> list[Path]:
    num_val = max(1, int(len(tokens) * val_fraction))
    train, val = tokens[:-num_val], tokens[-num_val:]
    written = [out_dir / f"{name}_val_{0:06d}.bin"]
    write_shard(written[0], val)
    for index, start in enumerate(range(0, len(train), shard_tokens), start=1):
        written.append(out_dir / f"{name}_train_{index:06d}.bin")
        write_shard(written[-1], train[start:start + shard_tokens])
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out_dir", type=Path, required=True)
    parser.add_argument("--name", default="text", help="shard name prefix (letters, digits, dashes)")
    parser.add_argument("--val_fraction", type=float, default=0.05)
    parser.add_argument("--shard_tokens", type=int, default=100_000_000)
    args = parser.parse_args()
    problems = [f"{p}: file not found" for p in args.files if not p.is_file()]
    if not 0.0 < args.val_fraction < 1.0:
        problems.append(f"--val_fraction: must lie in (0, 1), got {args.val_fraction}")
    if args.shard_tokens <= 0:
        problems.append(f"--shard_tokens: must be positive, got {args.shard_tokens}")
    if "_" in args.name or not args.name:
        problems.append(f"--name: {args.name!r} must be non-empty without '_' (the loader splits names on it)")
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        raise SystemExit(2)
    tokens = tokenize_files(args.files)
    for path in write_splits(tokens, args.out_dir, args.name, args.val_fraction, args.shard_tokens):
        print(path)
    print(f"{len(tokens)} tokens from {len(args.files)} files")


if __name__ == "__main__":
    main()
