"""Errors a user can act on.

A :class:`UserError` says what to change (a config key, a file, a knob); the CLI prints its message
as a single line (:mod:`vgtrain.cli.explain`). Pure Python on purpose: every layer, ``vgtrain.models``
included, may raise these without importing Lightning or Hydra.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


def oom_knobs(cache_features: bool = False, bf16: bool = False) -> str:
    """What lowers memory, in the order worth trying (leaving out what is already on)."""
    knobs = (
        "lower data.batch_size (raise trainer.accumulate_grad_batches by the same factor to keep the "
        "effective batch)"
    )
    if not bf16:
        knobs += ", use trainer.precision=bf16-mixed"
    if not cache_features:
        knobs += ", or set data.cache_features=true (trains from precomputed vision features)"
    return knobs


class UserError(Exception):
    """An error fixed by changing a command, a config value or a file; its message says how."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (an unknown key, an unset value, a bad combination)."""


class ShardNotFoundError(UserError, FileNotFoundError):
    """A shard URL names no file, or a pattern expands to no shard."""


class TokenizerError(UserError, ValueError):
    """A tokenizer that lacks a special token captioning needs (EOS)."""


class CheckpointMismatchError(UserError, ValueError, RuntimeError):
    """A checkpoint from other backbones or another adapter shape than the config builds.

    A ValueError for the backbone case and a RuntimeError for the shape case, as strict
    ``load_state_dict`` raises, so callers catching either keep working."""


class NonFiniteError(UserError, FloatingPointError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class OutOfMemory(UserError, MemoryError):
    """Out of memory, with the knobs that reduce memory."""


class UserExit(SystemExit):
    """Carries a user error out of a Hydra job. Hydra reports a failed job by printing an extra
    "Error executing job with overrides" line before re-raising; a SystemExit skips that, and
    the CLI unwraps :attr:`error`. Uncaught, it prints the one-line message and exits with 1."""

    def __init__(self, error: Exception, message: str) -> None:
        super().__init__(f"error: {message}")
        self.error = error


class Preempted(SystemExit):
    """Raised after a checkpoint was written on SIGTERM/SIGUSR1; exits with 128 + the signal number
    (what a shell reports for a process killed by that signal), so job schedulers see a preemption."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.message = message


def closest(word: str, options: Iterable[Any]) -> str | None:
    matches = difflib.get_close_matches(str(word), [str(option) for option in options], n=1, cutoff=0.5)
    return matches[0] if matches else None


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    # The CPU allocator raises a plain RuntimeError.
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
