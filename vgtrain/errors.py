"""Errors a user can act on, and how the CLI turns any error into one line.

A :class:`UserError` says what to change (a config key, a file, a knob); the CLI prints its message
as a single line. Config errors from Hydra/OmegaConf, missing files, unknown backbones and
out-of-memory are recognised too. Anything else is a bug and keeps its traceback. Pure Python on
purpose: ``vgtrain.models`` may raise these without importing Lightning or Hydra.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from typing import Any


def oom_knobs(cache_features: bool = False) -> str:
    """What lowers memory, in the order worth trying."""
    knobs = (
        "lower data.batch_size (raise trainer.accumulate_grad_batches by the same factor to keep the "
        "effective batch), use trainer.precision=bf16-mixed"
    )
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


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        # Explicit causes only: an error raised while handling another is not explained by it.
        current = current.__cause__


def closest(word: str, options: Iterable[Any]) -> str | None:
    matches = difflib.get_close_matches(str(word), [str(option) for option in options], n=1, cutoff=0.5)
    return matches[0] if matches else None


def _suggest(word: str, options: Iterable[Any]) -> str:
    match = closest(word, options)
    return f"; did you mean {match!r}?" if match else ""


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    # The CPU allocator raises a plain RuntimeError.
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def _config_message(error: BaseException) -> str | None:
    """Hydra composition and OmegaConf errors, with the closest valid key or option."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

    if isinstance(error, OverrideParseException):
        return (
            f"config: cannot parse the override {error.override!r} ({_one_line(error.message)}); "
            "quote values with braces or spaces, e.g. data.train_urls='/data/train-{000000..000009}.tar'"
        )
    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, option = str(error.missing_cfg_file).rpartition("/")
        options = error.options or []
        listed = f" (options: {', '.join(options)})" if options else ""
        return f"config: no option {option!r} in group {group!r}{_suggest(option, options)}{listed}"
    if isinstance(error, (ConfigAttributeError, ConfigKeyError)) and error.key is not None:
        parent = error.parent_node
        keys = list(parent.keys()) if parent is not None and hasattr(parent, "keys") else []
        where = error.full_key or error.key
        return (
            f"config: unknown key {where!r}{_suggest(error.key, keys)} "
            f"(a new key needs a leading '+', e.g. +{where}=...)"
        )
    if isinstance(error, MissingMandatoryValue):
        return f"config: {error.full_key} has no value; set it on the command line ({error.full_key}=...)"
    return None


def explain(error: BaseException) -> str | None:
    """One line for an error the user can act on; None for an unexpected one (a bug)."""
    from vgtrain.models.backbones.registry import BackboneError

    chain = list(_chain(error))
    for item in chain:
        if isinstance(item, Preempted):
            return item.message
        if isinstance(item, (UserError, BackboneError)):
            return _one_line(str(item))
    for item in chain:
        message = _config_message(item)
        if message:
            return message
    for item in chain:
        if is_out_of_memory(item):
            return f"out of memory ({_one_line(str(item))[:160]}): {oom_knobs()}"
        if isinstance(item, FileNotFoundError):
            return _one_line(str(item))
    from hydra.errors import HydraException

    for item in chain:
        if isinstance(item, HydraException):  # composition and override parse errors
            return "config: " + _one_line(str(item))
    return None
