"""Files written atomically: a temporary sibling, fsync, then ``os.replace``.

Readers never observe half a file, and an interrupted write leaves nothing that looks complete.
Written files get the permissions the user's umask gives any new file (tools that stage in
private temporary files, like ``mkdtemp`` or some writers, would otherwise leave them 0600/0700,
unreadable to a teammate in a shared folder). Pure Python: every layer may use it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["apply_umask", "atomic_path", "atomic_write_text", "umask_mode"]


def umask_mode(directory: bool = False) -> int:
    """The mode a new file (0o666) or directory (0o777) gets under the current umask."""
    mask = os.umask(0)  # reading the umask means setting it; restore at once
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def apply_umask(root: Path) -> None:
    """Gives ``root`` and everything under it the modes the umask gives new files and folders."""
    root = Path(root)
    file_mode, dir_mode = umask_mode(), umask_mode(directory=True)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if not path.is_symlink():
            path.chmod(dir_mode if path.is_dir() else file_mode)


def _temp_sibling(path: Path) -> Path:
    # Same folder as the target so os.replace is a same-filesystem rename;
    # the pid keeps concurrent writers of the same target apart.
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary sibling of ``path`` to write; it replaces ``path`` when the block ends
    without error, and is removed otherwise (a Ctrl-C included)."""
    path = Path(path)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
