"""Callbacks: throughput, skipped-sample accounting, parameter counts at start."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

log = logging.getLogger(__name__)


class TrainingStats(L.Callback):
    """Logs ``train/samples_per_s``, ``data/skipped`` (cumulative, and by reason) and, once at
    the start, the trainable vs frozen parameter counts."""

    def __init__(self, log_every_n_steps: int = 10) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.skipped: Counter[str] = Counter()
        self._window_start = 0.0
        self._window_samples = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = list(pl_module.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        frozen = sum(p.numel() for p in params if not p.requires_grad)
        rank_zero_info(f"parameters: {trainable:,} trainable, {frozen:,} frozen")
        for logger in trainer.loggers:
            logger.log_hyperparams({"params/trainable": trainable, "params/frozen": frozen})
        self._window_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict[str, Any], batch_idx: int
    ) -> None:
        self._window_samples += int(batch["input_ids"].shape[0])
        self.skipped.update(batch.get("skipped", {}))
        if (trainer.global_step % self.log_every_n_steps) != 0:
            return
        now = time.perf_counter()
        elapsed = now - self._window_start
        metrics = {"train/samples_per_s": self._window_samples / elapsed if elapsed > 0 else 0.0}
        metrics["data/skipped"] = float(sum(self.skipped.values()))
        metrics.update({f"data/skipped/{reason}": float(n) for reason, n in self.skipped.items()})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._window_start, self._window_samples = now, 0

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.skipped.update(batch.get("skipped", {}))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.skipped:
            rank_zero_info(f"skipped samples by reason: {dict(self.skipped)}")
