"""Callbacks that make an interrupted run resumable: RNG state in checkpoints, and a checkpoint
written on preemption signals (SIGTERM, SIGUSR1) and at the end of training."""

from __future__ import annotations

import logging
import random
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vgtrain.errors import Preempted

log = logging.getLogger(__name__)


class RNGState(L.Callback):
    """Saves the torch, CUDA, NumPy and Python RNG states with every checkpoint and restores them
    on resume, so dropout and any other global-RNG draw continue as in an uninterrupted run.

    Lightning restores model, optimizer, schedulers and loop progress but not these. The NumPy
    state is stored as a list of ints so the checkpoint stays loadable with ``weights_only=True``.
    """

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class PreemptionCheckpoint(L.Callback):
    """Writes ``<dirpath>/last.ckpt`` when the job is asked to stop, then exits with
    :class:`~vgtrain.errors.Preempted` (status 128 + signal number).

    SIGTERM is caught by Lightning's own handler (``trainer.received_sigterm``); SIGUSR1, the
    usual "time is nearly up" signal of batch schedulers, by this callback. The checkpoint is
    taken at the end of the current batch, the same point periodic checkpoints use. Under SLURM
    with auto-requeue, Lightning's SIGUSR1 handler (checkpoint + requeue) is left in charge.
    Also writes ``last.ckpt`` at the end of training when the final step is not on disk yet.
    """

    def __init__(
        self, dirpath: str | None = None, filename: str = "last.ckpt", signals: tuple[str, ...] = ("SIGUSR1",)
    ):
        self.dirpath = dirpath
        self.filename = filename
        self.signals = [getattr(signal, name) for name in signals]
        self._requested: int | None = None
        self._previous: dict[int, Any] = {}
        self._saved_step = -1
        self.message: str | None = None  # set when SIGTERM ended training through Lightning's loop

    def path(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath) / self.filename
        callback = trainer.checkpoint_callback
        directory = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        return Path(directory) / self.filename

    def _handle(self, signum: int, frame: Any) -> None:
        self._requested = signum  # act at the next batch boundary, not inside the handler

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            return
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._saved_step = trainer.global_step  # whoever saved it, this step is on disk

    def _save(self, trainer: L.Trainer) -> Path:
        path = self.path(trainer)
        trainer.save_checkpoint(path)
        return path

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        requested = self._requested or (signal.SIGTERM if trainer.received_sigterm else 0)
        # Every rank must take part in the save: stop if any rank was signalled.
        if not trainer.strategy.reduce_boolean_decision(bool(requested), all=False):
            return
        signum = requested or signal.SIGTERM
        path = self._save(trainer)
        raise Preempted(signum, preempted_message(signum, trainer.global_step, path))

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # SIGTERM that arrived after this batch's check: Lightning stops the loop by itself.
        if isinstance(exception, SIGTERMException) and self._saved_step != trainer.global_step:
            path = self._save(trainer)
            self.message = preempted_message(signal.SIGTERM, trainer.global_step, path)
        self._restore_handlers()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 and self._saved_step != trainer.global_step:
            self._save(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()


def preempted_message(signum: int, step: int, path: Path) -> str:
    return (
        f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved to {path}. "
        f"Resume with the same command plus resume=auto hydra.run.dir={path.parent.parent}"
    )
