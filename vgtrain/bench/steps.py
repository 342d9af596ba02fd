"""Timing one training configuration: vgtrain's Lightning step, measured between batch ends."""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vgtrain.bench.machine import PeakMemory, synchronize
from vgtrain.bench.sizes import Scale
from vgtrain.config.paths import CONF_DIR
from vgtrain.training.callbacks import NonFiniteGuard, TrainingStats
from vgtrain.training.datamodule import CaptionDataModule
from vgtrain.training.module import CaptioningModule
from vgtrain.training.speed import split_trainer_config

PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed"}
# ClipCap's optimizer settings (AdamW, lr 2e-5, linear warmup); the loop baseline uses the same.
LEARNING_RATE = 2e-5
WARMUP_STEPS = 5


def quiet_lightning() -> None:
    """Lightning's per-fit banners (accelerator, TPU, ...) would bury the bench table."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


@dataclass
class Timing:
    """Per-step wall times (after warm-up) of one run, and the time spent between steps waiting
    for the next batch (data loading plus the trainer's own bookkeeping)."""

    batch_size: int
    step_s: list[float]
    wait_s: list[float] = field(default_factory=list)
    # Process CPU time per step (all threads): on a shared machine it counts the work done rather
    # than the time other processes held the cores, so ratios of it are steadier than wall ratios.
    cpu_s: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    memory_kind: str = "rss"
    added_bytes: int = 0  # peak minus the memory in use when the run began (models already resident)

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(self.cpu_s) if self.cpu_s else float("nan")

    @property
    def samples_per_s(self) -> float:
        return self.batch_size / self.median_step_s

    @property
    def wait_fraction(self) -> float:
        return statistics.median(self.wait_s) / self.median_step_s if self.wait_s else 0.0


def pooled(timings: list[Timing]) -> Timing:
    """The steps of repeated (interleaved) runs of one configuration, as one sample."""
    return Timing(
        timings[0].batch_size,
        [s for t in timings for s in t.step_s],
        [s for t in timings for s in t.wait_s],
        [s for t in timings for s in t.cpu_s],
        max(t.peak_bytes for t in timings),
        timings[0].memory_kind,
        max(t.added_bytes for t in timings),
    )


class StepTimer(L.Callback):
    """Batch start and end times; a step is the time from one batch end to the next (the whole
    loop iteration: fetching the batch, forward, backward, clipping, optimizer, callbacks)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        synchronize(self.device)
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())

    def timing(self, batch_size: int, warmup: int) -> Timing:
        """``warmup`` (at least 1) untimed steps first: the first step's start has no batch end before it."""
        ends = self.ends[warmup - 1 :]
        steps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
        waits = [s - e for e, s in zip(self.ends[warmup - 1 : -1], self.starts[warmup:], strict=False)]
        cpu = self.cpu_ends[warmup - 1 :]
        return Timing(batch_size, steps, waits, [b - a for a, b in zip(cpu, cpu[1:], strict=False)])


def build_module(scale: Scale, route: str) -> CaptioningModule:
    """vgtrain's LightningModule for a route, as `vgtrain train` builds it (frozen backbones)."""
    mapper, xattn = scale.adapters(route)
    return CaptioningModule(
        vision=dict(scale.vision),
        llm=dict(scale.llm),
        mapper=mapper,
        optimizer=partial(torch.optim.AdamW, lr=LEARNING_RATE, weight_decay=0.01),
        scheduler={"warmup_steps": WARMUP_STEPS, "min_lr_ratio": 0.1},
        xattn=xattn,
    )


def make_trainer(steps: int, precision: str, device: torch.device, timer: StepTimer) -> L.Trainer:
    """A Trainer from the shipped trainer config (precision, gradient clipping, checkpoint IO) with
    the per-step callbacks of conf/callbacks/default.yaml; no logger, progress bar or checkpoints,
    which act every N steps or on the console, not in the step being timed."""
    settings, _ = split_trainer_config(OmegaConf.load(CONF_DIR / "trainer" / "cpu.yaml"))
    settings.default_root_dir = tempfile.mkdtemp(prefix="vgtrain-bench-")
    return instantiate(
        settings,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        precision=PRECISION[precision],
        max_steps=steps,
        logger=False,
        callbacks=[NonFiniteGuard(max_consecutive=5), TrainingStats(log_every_n_steps=10), timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        val_check_interval=1.0,
        check_val_every_n_epoch=1,
    )


def time_fit(
    module: CaptioningModule,
    datamodule: CaptionDataModule,
    scale: Scale,
    precision: str,
    device: torch.device,
) -> Timing:
    """Fits ``warmup + timed`` steps and times the timed ones."""
    timer = StepTimer(device)
    trainer = make_trainer(scale.warmup_steps + scale.timed_steps, precision, device, timer)
    with PeakMemory(device) as memory:
        trainer.fit(module, datamodule=datamodule)
    timing = timer.timing(scale.batch_size, scale.warmup_steps)
    timing.peak_bytes, timing.memory_kind = memory.peak_bytes, memory.kind
    timing.added_bytes = memory.peak_bytes - memory.start_bytes
    return timing
