"""Memory and traffic per rank of a training layout at any world size, simulated on this CPU (trainer/estimate.py):
the trainer's own mesh, meta-device model, parallelize, optimizer and one step, under torch's fake process group
and fake tensors.

    python scripts/estimate.py --world 64 --dp 8 --fs 8 -- --model.preset 7b --optimizer dion
    python scripts/estimate.py --config configs/dion_160m.yaml --world 256 --dp 8 --fs 16 --tp 2 --ranks 0 255 \
        -- --data.device_batch_size 8
    python scripts/estimate.py --table --write docs/scaling.md     # regenerate the measured table of docs/scaling.md

Options after `--` are train.py's (`--section.key value`); sizes in GiB per rank. Needs the packages importable:
run it from a checkout after `pip install -e .` (or with PYTHONPATH=.).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from trainer.estimate import TABLE_HEADER, describe, estimate_config, simulate, table_config, table_row, table_rows
from trainer.errors import UserError


BEGIN, END = "<!-- scripts/estimate.py --table: begin -->", "<!-- scripts/estimate.py --table: end -->"


def write_table(path: Path, text: str) -> None:
    """Replace what lies between the BEGIN and END markers of `path` with `text`."""
    document = path.read_text()
    if BEGIN not in document or END not in document:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} markers to put the table between")
    head, rest = document.split(BEGIN, 1)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}")


def table(rows: list[int] | None) -> str:
    """The header and the rows of trainer.estimate.table_rows() (those numbered `rows`, default all); each row is
    also printed to stderr as it is measured."""
    lines = [TABLE_HEADER]
    for number, (preset, world, layout, optimizer, extra) in enumerate(table_rows()):
        if rows is None or number in rows:
            config = table_config(preset, world, layout, optimizer, extra)
            lines.append(table_row(preset, layout, extra, simulate(config, world)))
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="training config (default: configs/default.yaml)")
    parser.add_argument("--world", type=int, help="number of ranks to simulate")
    parser.add_argument("--dp", type=int, help="parallel.dp_size")
    parser.add_argument("--fs", type=int, help="parallel.fs_size")
    parser.add_argument("--tp", type=int, help="parallel.tp_size")
    parser.add_argument("--ranks", type=int, nargs="+", default=[0], help="which ranks to simulate (default 0)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory tracker (peak, activations): "
                                                                  "several times faster")
    parser.add_argument("--table", action="store_true", help="print docs/scaling.md's table (about an hour)")
    parser.add_argument("--rows", type=int, nargs="+", help="with --table: only these rows (0-based)")
    parser.add_argument("--write", type=Path, help="with --table: put it between the markers of this file instead")
    parser.add_argument("train_args", nargs="*", help="train.py options after `--`")
    args = parser.parse_args(argv)
    if args.table:
        text = table(args.rows)
        if args.write is not None:
            write_table(args.write, text)
        else:
            print(text)
        return 0
    if args.world is None:
        parser.error("--world is required (or --table)")
    train_args = ([] if args.config is None else ["--config", args.config]) + args.train_args
    try:
        config = estimate_config(train_args, args.world, args.dp, args.fs, args.tp)
        for rank in args.ranks:
            started = time.perf_counter()
            estimate = simulate(config, args.world, rank, memory=not args.no_memory)
            print(describe(estimate))
            print(f"  (simulated in {time.perf_counter() - started:.1f} s)")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
