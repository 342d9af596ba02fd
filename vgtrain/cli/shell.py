"""Command lines printed for the user to copy: Hydra overrides quoted as a person types them."""

from __future__ import annotations

import shlex


def quote_override(arg: str) -> str:
    """``key=value`` with only the value quoted when the shell needs it (``key='a-{0..3}.tar'``),
    instead of shlex's quoting of the whole argument; anything else as shlex quotes it."""
    key, sep, value = arg.partition("=")
    if not sep or shlex.quote(key) != key or shlex.quote(value) == value:
        return shlex.quote(arg)
    if "'" not in value:
        return f"{key}='{value}'"
    return shlex.quote(arg)


def command_line(*args: str) -> str:
    return " ".join(quote_override(arg) for arg in args)
