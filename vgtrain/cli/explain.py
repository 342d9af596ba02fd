"""How the CLI turns any error into one line a user can act on.

A :class:`~vgtrain.errors.UserError` (a backbone error too) says what to change; its message is
printed as a single line. Config errors from Hydra/OmegaConf, missing files and out-of-memory are
recognised too. Anything else is a bug and keeps its traceback. The CLI layer owns this because it
knows Hydra; the errors themselves (vgtrain.errors) stay pure Python for every layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from vgtrain.errors import Preempted, UserError, closest, is_out_of_memory, oom_knobs


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        # Explicit causes only: an error raised while handling another is not explained by it.
        current = current.__cause__


def _suggest(word: str, options: Iterable[Any]) -> str:
    match = closest(word, options)
    return f"; did you mean {match!r}?" if match else ""


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


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
    chain = list(_chain(error))
    for item in chain:
        if isinstance(item, Preempted):
            return item.message
        if isinstance(item, UserError):
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
