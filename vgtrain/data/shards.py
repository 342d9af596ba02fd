"""Atomic WebDataset shard writing (see :mod:`vgtrain.files`) and shard naming helpers."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import webdataset as wds

from vgtrain.files import atomic_path

__all__ = ["brace_pattern", "shard_path", "write_shard"]

# TarWriter stamps every member with time.time() unless told otherwise; a fixed
# mtime/owner makes shards byte-identical for identical samples. It must be an
# int: tarfile (PAX format) stores a float mtime in an extra 1 KiB PAX header.
_TAR_MTIME = 0
_TAR_USER = "vgtrain"


def write_shard(path: Path, samples: Iterable[dict[str, Any]]) -> int:
    """Write ``samples`` as one WebDataset tar at ``path``, atomically.

    Each sample needs a ``__key__``; other keys are extensions (``png`` bytes,
    ``txt`` str, ...), encoded by TarWriter's default encoder.
    Returns the number of samples written. On any exception the temporary file
    is removed and ``path`` is left as it was (absent, or its previous content).
    """
    count = 0
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream, user=_TAR_USER, group=_TAR_USER, mtime=_TAR_MTIME)
        try:
            for sample in samples:
                writer.write(sample)
                count += 1
        finally:
            writer.close()  # does not close `stream`; the with-block does
        stream.flush()
        os.fsync(stream.fileno())
    return count


def shard_path(directory: Path, prefix: str, index: int, suffix: str = ".tar", width: int = 6) -> Path:
    """Path of shard ``index``: ``directory/{prefix}-{index:0{width}d}{suffix}``."""
    return Path(directory) / f"{prefix}-{index:0{width}d}{suffix}"


def brace_pattern(directory: Path, prefix: str, count: int, suffix: str = ".tar", width: int = 6) -> str:
    """Brace pattern naming ``count`` shards written with :func:`shard_path`.

    ``brace_pattern(Path("/x"), "train", 4)`` -> ``"/x/train-{000000..000003}.tar"``;
    with ``count == 1`` the single file name is returned (no braces to expand).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if count == 1:
        return str(shard_path(directory, prefix, 0, suffix, width))
    first, last = f"{0:0{width}d}", f"{count - 1:0{width}d}"
    return str(Path(directory) / f"{prefix}-{{{first}..{last}}}{suffix}")
