"""Resumable measurements: each row of a long script is appended to a JSON-lines file as soon as it is measured, so
an interrupted run keeps what it finished and a rerun with the same file measures only what is missing.

Each line is {"label": ..., "setup": {...}, "row": {...}}; `setup` (preset, device, ...) must match the current run,
so rows measured under other conditions are never mixed into one table. A line cut short by a killed process is
dropped on the next run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


class ResultsFileError(ValueError):
    """The file holds rows of another setup or is not a results file."""


class ResultsFile:
    """`get(label)`: the stored row or None; `add(label, row)`: append and flush. Without a path it stores nothing."""

    def __init__(self, path: Path | None, setup: dict[str, Any]):
        self.path, self.setup, self.rows = path, setup, {}
        if path is None or not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # the last write was cut short
                    print(f"{path}:{number}: dropped an incomplete line", file=sys.stderr)
                    continue
                raise ResultsFileError(f"{path}:{number}: not a JSON line of a results file") from None
            if not isinstance(record, dict) or not {"label", "setup", "row"} <= set(record):
                raise ResultsFileError(f"{path}:{number}: not a results line (needs label, setup, row)")
            if record["setup"] != setup:
                raise ResultsFileError(f"{path}: rows measured with {record['setup']}, this run is {setup}; use "
                                       f"another file or the same settings")
            self.rows[record["label"]] = record["row"]
            kept.append(line)
        if len(kept) < len(lines):
            path.write_text("".join(line + "\n" for line in kept))

    def get(self, label: str) -> dict[str, Any] | None:
        return self.rows.get(label)

    def add(self, label: str, row: dict[str, Any]) -> None:
        self.rows[label] = row
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"label": label, "setup": self.setup, "row": row}) + "\n")
            f.flush()
