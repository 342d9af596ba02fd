"""Atomic WebDataset shard writing and shard naming helpers.

Every file is written to a temporary sibling and moved into place with
``os.replace``, so readers never observe a half-written shard or manifest and an
interrupted run leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import webdataset as wds

__all__ = ["atomic_write_text", "brace_pattern", "shard_path", "write_shard"]

# TarWriter stamps every member with time.time() unless told otherwise; a fixed
# mtime/owner makes shards byte-identical for identical samples. It must be an
# int: tarfile (PAX format) stores a float mtime in an extra 1 KiB PAX header.
_TAR_MTIME = 0
_TAR_USER = "vgtrain"


def _temp_path(path: Path) -> Path:
    # Same folder as the target so os.replace is a same-filesystem rename;
    # the pid keeps concurrent writers of the same target apart.
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def write_shard(path: Path, samples: Iterable[dict[str, Any]]) -> int:
    """Write ``samples`` as one WebDataset tar at ``path``, atomically.

    Each sample needs a ``__key__``; other keys are extensions (``png`` bytes,
    ``txt`` str, ...), encoded by TarWriter's default encoder.
    Returns the number of samples written. On any exception the temporary file
    is removed and ``path`` is left as it was (absent, or its previous content).
    """
    path = Path(path)
    tmp = _temp_path(path)
    count = 0
    try:
        with open(tmp, "wb") as stream:
            writer = wds.TarWriter(stream, user=_TAR_USER, group=_TAR_USER, mtime=_TAR_MTIME)
            try:
                for sample in samples:
                    writer.write(sample)
                    count += 1
            finally:
                writer.close()  # does not close `stream`; the with-block does
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        # BaseException too: a Ctrl-C mid-shard must not leave a stray temp file.
        _remove_quietly(tmp)
        raise
    return count


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


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
