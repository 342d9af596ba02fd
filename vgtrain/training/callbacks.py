"""Callbacks: throughput (Lightning's monitor), skipped samples, gates and parameter counts, non-finite guard."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info

from vgtrain.errors import NonFiniteError

log = logging.getLogger(__name__)


def samples_in(batch: dict[str, Any]) -> int:
    """Samples in a collated batch: its rows of token ids, or its images where rows are packed
    (several samples to a row)."""
    if "pack_index" in batch:
        return len(batch["keys"])
    return int(batch["input_ids"].shape[0])


class SampleThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting caption samples: logs ``train/device/samples_per_sec``
    (this rank) and, on several ranks, ``train/samples_per_sec`` (all of them), averaged over the
    last ``window_size`` steps with validation time left out; likewise ``validate/...``."""

    def __init__(self, window_size: int = 10) -> None:
        super().__init__(batch_size_fn=samples_in, window_size=window_size)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # The module has no FLOP count (MFU is `vgtrain bench`'s job); without this, the monitor
        # warns on every run that a `flops_per_batch` attribute is missing.
        self._module_has_flops = False


class TrainingStats(L.Callback):
    """What ThroughputMonitor does not log: ``gpu/max_memory_allocated_gb`` on a GPU,
    ``data/skipped`` (cumulative, and by reason), the cross-attention gates (``gates/layer_i``)
    and, once at the start, the trainable vs frozen parameter counts."""

    def __init__(self, log_every_n_steps: int = 10) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.skipped: Counter[str] = Counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = list(pl_module.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        frozen = sum(p.numel() for p in params if not p.requires_grad)
        rank_zero_info(f"parameters: {trainable:,} trainable, {frozen:,} frozen")
        for logger in trainer.loggers:
            logger.log_hyperparams({"params/trainable": trainable, "params/frozen": frozen})

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
    ) -> None:
        self.skipped.update(batch.get("skipped", {}))
        if (trainer.global_step % self.log_every_n_steps) != 0:
            return
        metrics: dict[str, float] = {}
        if pl_module.device.type == "cuda":
            metrics["gpu/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        metrics["data/skipped"] = float(sum(self.skipped.values()))
        metrics.update({f"data/skipped/{reason}": float(n) for reason, n in self.skipped.items()})
        xattn = getattr(getattr(pl_module, "model", None), "xattn", None)
        if xattn is not None:  # how far each cross-attention gate has opened
            metrics.update({f"gates/{layer}": value for layer, value in xattn.gates().items()})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

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

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": dict(self.skipped)}  # counts survive a resume

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = Counter(state_dict.get("skipped", {}))


class NonFiniteGuard(L.Callback):
    """Skips optimizer steps whose loss or gradients are not finite, and counts them.

    The loss is checked before backward and the gradients just before the optimizer step (after
    any unscaling, before clipping). A skipped step leaves parameters and optimizer moments
    untouched; the schedule still advances, like for any step. ``train/skipped_nonfinite`` is
    the running count. More than ``max_consecutive`` bad steps in a row raise
    :class:`~vgtrain.errors.NonFiniteError` naming the step and batch keys.

    With a fused optimizer (``speed.fused_optimizer``, the default) everything is decided on the
    device: the skip is the optimizer's ``found_inf`` flag (the kernel leaves the step out) and
    the guard reads its flags back only every ``trainer.log_every_n_steps`` steps, at a
    checkpoint and at the end, so a run that must stop stops at that next read, naming the step
    where it went wrong. Other optimizers, sharded strategies and fp16 loss scaling read the flag
    at every step and drop the gradients instead.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._loss_ok: torch.Tensor | None = None  # on device: read once per step, not per micro-batch
        # The key sequences of the micro-batches accumulated into the coming step (kept as given;
        # read only when a step is bad: a device-resident batch looks its keys up on demand).
        self._keys: list[Any] = []  # sequences of keys
        # Steps decided on the device and not read yet: (step, bad flag on device, batch keys).
        self._pending: list[tuple[int, torch.Tensor, list[Any]]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(batch, dict):
            self._keys.append(batch.get("keys") or [])

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._loss_ok = finite if self._loss_ok is None else self._loss_ok & finite

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # One fused norm over all gradients (any inf/NaN makes it non-finite): a per-tensor check
        # costs ~100 small ops a step, which tiny models notice.
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
        checks = [torch.isfinite(norm)] if norm is not None else []
        if self._loss_ok is not None:
            checks.append(self._loss_ok.to(checks[0].device) if checks else self._loss_ok)
        keys, self._keys, self._loss_ok = self._keys, [], None
        if norm is not None and on_device(trainer, optimizer):
            bad = (~torch.stack(checks).all()).float()  # a 0-dim tensor, as the step counts are
            if trainer.world_size > 1:  # gradients agree across ranks; the loss check is per rank
                torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
            optimizer.found_inf = bad  # the fused kernel skips the whole update when it is 1
            optimizer.grad_scale = None  # clipping (configure_gradient_clipping) may set it
            pl_module.measured_gradient_norm = norm  # for its clipping: no second pass
            self._pending.append((trainer.global_step, bad, keys))
            return
        finite = bool(torch.stack(checks).all()) if checks else True  # one device sync per step
        # Gradients are already all-reduced; the loss check is per rank, so agree on it.
        bad = trainer.strategy.reduce_boolean_decision(not finite, all=False)
        if not bad:
            self.consecutive = 0
            # Known after the sync above; norm clipping reuses it instead of reading every gradient
            # again (CaptioningModule.configure_gradient_clipping). One process only: under DDP
            # the gradients agree but Lightning's own clipping stays in charge of sharded ones.
            if norm is not None and trainer.world_size == 1:
                pl_module.measured_gradient_norm = float(norm)
            return
        optimizer.zero_grad(set_to_none=True)
        self._count_bad_step(trainer.global_step, keys, trainer.global_step)

    def _count_bad_step(self, step: int, batches: list[Any], now: int | None) -> None:
        self.skipped += 1
        self.consecutive += 1
        total = sum(len(keys) for keys in batches)
        first = [str(key) for keys in batches for key in keys[:8]][:8]
        shown = ", ".join(first) + (f", ... ({total} in all)" if total > 8 else "")
        if self.consecutive > self.max_consecutive:
            noticed = f" (read at step {now})" if now is not None and now != step else ""
            raise NonFiniteError(
                f"stopping at step {step}: {self.consecutive} consecutive steps with a non-finite "
                f"loss or gradient (more than train.max_consecutive_nonfinite={self.max_consecutive}){noticed}; "
                f"last batch keys: {shown or 'unknown'}"
            )
        log.warning(
            "step %d: non-finite loss or gradient, optimizer step skipped (batch keys: %s)",
            step,
            shown or "unknown",
        )

    def read_flags(self, now: int | None = None) -> None:
        """Reads the device-decided steps back (one sync for all of them) and counts them."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flags = torch.stack([flag for _, flag, _ in pending]).tolist()
        for (step, _, keys), flag in zip(pending, flags, strict=True):
            if flag:
                self._count_bad_step(step, keys, now)
            else:
                self.consecutive = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        last = trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps
        if trainer._logger_connector.should_update_logs or last or self.consecutive:
            self.read_flags(trainer.global_step)
            pl_module.log("train/skipped_nonfinite", float(self.skipped), on_step=True, on_epoch=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.read_flags(trainer.global_step)

    def state_dict(self) -> dict[str, int]:
        self.read_flags()  # a checkpoint holds the counts of every step it covers
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


def on_device(trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> bool:
    """Whether a step can be skipped and clipped on the device: a fused optimizer (it honours
    ``found_inf`` and ``grad_scale``), whole gradients on every rank (one process or DDP) and no
    fp16 loss scaler (which sets those two itself)."""
    fused = bool(optimizer.defaults.get("fused"))
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    strategy = type(trainer.strategy).__name__
    return fused and scaler is None and strategy in ("SingleDeviceStrategy", "DDPStrategy")
