"""The one family of errors a user can cause: config, data, checkpoint, optimizer options, layout refusals.

Every such error carries one line naming the key, file or value and what is allowed. `train.py`'s main catches the
family, prints the line on rank 0 only and exits with status 2; anything else is a bug and keeps its traceback.
The optimizers' ValueErrors at construction are converted at the trainer's boundary (trainer/build.py). The data
package's own errors, `data.ShardError` and `FileNotFoundError` (no shards, a missing shard file), are not: `main`
catches them beside this family, in the same clause, with the same one line and status 2.
"""
from __future__ import annotations


class UserError(ValueError):
    """Base of every user-caused failure; the message is one line."""


class ConfigError(UserError):
    """Invalid configuration key or value (YAML file or command line)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: corrupt, incompatible with the config, or not writable."""


class LayoutError(UserError):
    """A parallel layout the chosen optimizer or model cannot run (e.g. TP for an optimizer without TP support)."""



class TrainingError(RuntimeError):
    """The run cannot continue (a non-finite loss, weights or optimizer state); not a user error: printed as one
    line on rank 0, exit status 3."""
