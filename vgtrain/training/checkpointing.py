"""Checkpoints that survive crashes: atomic writes, safe loading, and picking one to resume from.

- :class:`AtomicCheckpointIO` (a Lightning CheckpointIO plugin) writes every checkpoint to a
  temporary sibling and renames it into place, so a crash leaves either the previous file or the
  complete new one; it loads with ``torch.load(weights_only=True)`` whatever the caller asks.
- :func:`find_resume_checkpoint` implements ``resume=auto``: the newest checkpoint of a run that
  loads as weights-only, skipping (with a warning naming it) truncated or corrupt files.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from vgtrain.errors import ConfigError

log = logging.getLogger(__name__)

TEMP_MARKER = ".tmp-"
# Lightning's SLURM requeue handler saves hpc_ckpt_<n>.ckpt into the run directory itself.
HPC_PATTERN = "hpc_ckpt_*.ckpt"


def _is_local(path: str | os.PathLike[str]) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _fsync_directory(directory: Path) -> None:
    """Makes a rename durable: the directory entry is flushed like the file's bytes."""
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``<name>.tmp-<pid>``, fsync, ``os.replace`` onto ``<name>``.

    Lightning's own save serialises to memory first but then writes the target in place (or via
    a temporary file that is not fsynced, possibly on another filesystem). Remote (fsspec)
    paths keep Lightning's behaviour: object stores replace whole objects anyway.
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f"{target.name}{TEMP_MARKER}{os.getpid()}")
        try:
            with open(temp, "wb") as stream:
                torch.save(checkpoint, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temp, target)
        except BaseException:
            # BaseException too: a Ctrl-C mid-write must not leave a stray temporary file.
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            raise
        _fsync_directory(target.parent)

    @override
    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        # Checkpoints may come from elsewhere: never unpickle arbitrary objects.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Loads a Lightning checkpoint as weights-only (tensors, containers, numbers, strings)."""
    fs = get_filesystem(str(path))
    with fs.open(str(path), "rb") as stream:
        checkpoint = torch.load(stream, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        raise ValueError("not a Lightning checkpoint (no state_dict/global_step)")
    return checkpoint


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, newest first: ``checkpoints/*.ckpt`` and Lightning's SLURM ones."""
    files = [*Path(run_dir).glob("checkpoints/*.ckpt"), *Path(run_dir).glob(HPC_PATTERN)]
    # The write order is the training order (every file is renamed into place when complete).
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def find_resume_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint under ``run_dir`` that loads weights-only, with its contents.

    Half-written temporaries and files that fail to load (truncated, corrupt, not a checkpoint)
    are skipped with a warning that names them; None when no valid checkpoint exists.
    """
    for temp in sorted(Path(run_dir).glob(f"checkpoints/*.ckpt{TEMP_MARKER}*")):
        log.warning("resume=auto: ignoring %s, a checkpoint whose writing was interrupted", temp)
    for path in checkpoint_candidates(run_dir):
        try:
            return path, load_checkpoint(path)
        except Exception as error:  # truncated zip, bad pickle, unsafe global, wrong layout
            log.warning("resume=auto: skipping %s, which does not load (%s)", path, _short(error))
    return None


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}"


def resolve_resume(resume: str | None, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """``resume``: None (start fresh), ``auto`` (newest valid checkpoint in ``run_dir``; fresh
    start when there is none yet, so a requeued job can always pass it) or a checkpoint path."""
    if resume in (None, "", "null", "none"):
        return None
    if str(resume) == "auto":
        found = find_resume_checkpoint(run_dir)
        if found is None:
            log.info("resume=auto: no valid checkpoint under %s; starting from scratch", run_dir)
        return found
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise ConfigError(f"resume={resume}: no such checkpoint file")
    try:
        return path, load_checkpoint(path)
    except Exception as error:
        raise ConfigError(
            f"resume={resume}: the checkpoint does not load weights-only ({_short(error)})"
        ) from error
