"""The fenced code blocks of a Markdown file, for tests that run a README's examples as a reader pastes them.

    for block in code_blocks(ROOT / "README.md", "bash"): ...
    run_python_blocks(ROOT / "optimizers/experimental/README.md")   # every ```python block, in order, one namespace
"""
from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")


@dataclass(frozen=True)
class CodeBlock:
    """One fenced block: its language tag ("" when none), the file line of its first code line, its text."""
    language: str
    line: int
    source: str


def code_blocks(path: Path, language: str | None = None) -> list[CodeBlock]:
    """The top-level fenced blocks of `path` (fences at the start of a line), optionally only those tagged
    `language`. An unclosed fence is an error, so a broken README cannot silently lose its last block."""
    blocks, opened, body = [], None, []
    for number, text in enumerate(Path(path).read_text().splitlines(), start=1):
        match = _FENCE.match(text)
        if opened is None:
            if match:
                opened, body = (match.group(1), number + 1), []
        elif text.strip() == "```":
            blocks.append(CodeBlock(opened[0], opened[1], "\n".join(body) + "\n"))
            opened = None
        else:
            body.append(text)
    if opened is not None:
        raise ValueError(f"{path}:{opened[1] - 1}: code fence never closed")
    return [b for b in blocks if language is None or b.language == language]


def run_python_blocks(path: Path, namespace: dict[str, Any] | None = None) -> dict[str, Any]:
    """Execute every ```python block of `path` in order in one namespace (a reader pasting them into one session);
    returns the namespace. A failing block raises AssertionError naming the file, the block's line and the error."""
    namespace = {"__name__": "__readme__"} if namespace is None else namespace
    for block in code_blocks(path, "python"):
        try:
            exec(compile(block.source, f"{path}:{block.line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{path}, the python block at line {block.line} fails as pasted: "
                                 f"{type(error).__name__}: {error}\n{traceback.format_exc()}") from None
    return namespace
