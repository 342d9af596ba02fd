"""The Lightning side of device-resident training data (``data.device_resident``): the store is
built on the trainer's device in the training precision's dtype, and batches come from the same
resumable (seed, epoch)-shuffled sampler as the in-memory cache's, split across ranks, so a
resumed run continues at the batch where it stopped and each DDP rank draws its own slice."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from vgtrain.data.collate import CaptionCollator
from vgtrain.data.device_store import DeviceFeatureStore
from vgtrain.data.feature_cache import CachedFeatures
from vgtrain.training.resumable import ResumableDataLoader, ResumableSampler

log = logging.getLogger(__name__)


def store_dtype(trainer: L.Trainer) -> torch.dtype:
    """bf16 features under bf16 precision (the adapter reads them in bf16 anyway), else fp32."""
    return torch.bfloat16 if str(trainer.precision).startswith("bf16") else torch.float32


def build_store(
    cache: CachedFeatures, collator: CaptionCollator, needs: set[str], trainer: L.Trainer
) -> DeviceFeatureStore:
    device = trainer.strategy.root_device
    store = DeviceFeatureStore(cache, collator, needs=needs, device=device, dtype=store_dtype(trainer))
    log.info(
        "training data on %s: %d samples, %.1f MiB (%s)",
        device,
        len(store),
        store.nbytes() / 2**20,
        ", ".join(sorted(needs)),
    )
    return store


def device_train_loader(
    store: DeviceFeatureStore, trainer: L.Trainer | None, batch_size: int, seed: int, skipped: dict[str, int]
) -> ResumableDataLoader:
    """Index batches of ``store``; each becomes a whole batch on the device, with no collation
    on the host and no copy but the index."""
    sampler = ResumableSampler(
        store,
        num_replicas=trainer.world_size if trainer is not None else 1,
        rank=trainer.global_rank if trainer is not None else 0,
        seed=seed,
    )
    return ResumableDataLoader(
        store, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=_Batches(store, skipped)
    )


class _Batches:
    """Index tensor -> device batch; the first batch carries the skips counted while caching."""

    def __init__(self, store: DeviceFeatureStore, skipped: dict[str, int]) -> None:
        self.store = store
        self.pending = dict(skipped)

    def __call__(self, indices: torch.Tensor) -> dict[str, Any]:
        batch = self.store.batch(indices)
        batch["skipped"], self.pending = self.pending, {}
        return batch
