"""LightningDataModule over WebDataset shards, optionally training from cached vision features."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vgtrain.data.collate import CaptionCollator
from vgtrain.data.conversation import ConversationPicker
from vgtrain.data.device_store import DeviceFeatureStore, gather_cached
from vgtrain.data.feature_cache import CachedFeatures, compute_features
from vgtrain.data.feature_store import cached_decoder, cached_urls
from vgtrain.data.pipeline import caption_dataset, check_shard_split, expand_urls, stream_seed
from vgtrain.errors import ConfigError
from vgtrain.models.backbones.vision import VisionBackbone
from vgtrain.training.device_data import build_store, device_train_loader
from vgtrain.training.resumable import ResumableDataLoader, ResumableSampler
from vgtrain.training.visit_sampler import VisitSampler

log = logging.getLogger(__name__)


class CaptionDataModule(L.LightningDataModule):
    """Trains on resampled shards (an endless stream: the run's length is ``trainer.max_steps``)
    and validates on each validation shard once. A resumed run reseeds the stream from its step.

    With ``cache_features`` the training split is read once, passed through the frozen
    ``vision`` tower, and training samples shuffled batches of those features from memory, in an
    order fixed by (seed, epoch) that a resumed run picks up at the batch where it stopped.
    With ``use_cached_features`` training and validation read the features ``vgtrain cache``
    stored beside the shards (see data/feature_cache.py for when to use which).
    """

    def __init__(
        self,
        train_urls: str,
        val_urls: str | None,
        transform: Callable[[Image.Image], torch.Tensor],
        collator: CaptionCollator,
        batch_size: int = 64,
        val_batch_size: int = 256,
        num_workers: int = 1,
        shuffle_buffer: int = 2000,
        seed: int = 0,
        cache_features: bool = False,
        vision: VisionBackbone | None = None,
        resampled: bool = True,
        samples_per_epoch: int | None = None,
        use_cached_features: bool = False,
        device_resident: bool = False,
        feature_needs: set[str] | None = None,
        length_group_batches: int = 0,
    ) -> None:
        super().__init__()
        if length_group_batches and not cache_features:
            raise ConfigError(
                "data.length_group_batches groups the in-memory feature cache's batches by length; "
                "it needs data.cache_features=true (set it to 0 otherwise)"
            )
        if length_group_batches and device_resident:
            raise ConfigError(
                "data.length_group_batches does not apply to device-resident data; set "
                "data.device_resident=false (or data.length_group_batches=0)"
            )
        self.length_group_batches = length_group_batches
        # Applies to cached features only (either kind); images are decoded per step, on the host.
        self.device_resident = device_resident and (cache_features or use_cached_features)
        # The features the adapter reads; a device-resident store keeps only those.
        self.feature_needs = set(feature_needs) if feature_needs is not None else {"pooled", "tokens"}
        self._store: DeviceFeatureStore | None = None
        if (cache_features or use_cached_features) and vision is None:
            raise ValueError("cached features need the vision backbone that computes (or computed) them")
        if cache_features and use_cached_features:
            raise ConfigError(
                "data.cache_features=true (compute features in memory at start) and "
                "data.use_cached_features=true (read the ones `vgtrain cache` stored) exclude each other; "
                "set one to false"
            )
        self.use_cached_features = use_cached_features
        self.train_urls = train_urls
        self.val_urls = val_urls
        self.transform = transform
        self.collator = collator
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.cache_features = cache_features
        self.resampled = resampled
        self.samples_per_epoch = samples_per_epoch
        self.vision = vision
        self.train_cache: CachedFeatures | None = None

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.use_cached_features:  # fail before training if a cache is missing
            for urls in (self.train_urls, self.val_urls):
                if urls:
                    cached_urls(expand_urls(urls), self.vision)
        if stage == "fit" and self.cache_features and self.train_cache is None:
            self.train_cache = compute_features(
                self.vision, self.loader(self.train_urls, train=False), "caching train features"
            )
            log.info("cached features of %d training samples", len(self.train_cache))
        if stage == "fit" and self.use_cached_features and self.device_resident and self.train_cache is None:
            self.train_cache = gather_cached(
                self.loader(self.train_urls, train=False, cached=True), "reading cached train features"
            )

    def loader(self, urls: str, *, train: bool, seed: int | None = None, cached: bool = False) -> DataLoader:
        """Shard stream -> batches. ``train``: an endless shuffled stream (resampled shards, or
        disjoint shards per rank and worker), cut into epochs of ``samples_per_epoch``; else each
        shard once. ``cached``: the stored features of those shards instead of their images."""
        seed = self.seed if seed is None else seed
        dataset = caption_dataset(
            cached_urls(expand_urls(urls), self.vision) if cached else urls,
            transform=self.transform,
            collate=self.collator,
            batch_size=self.batch_size if train else self.val_batch_size,
            train=train,
            shuffle_buffer=self.shuffle_buffer,
            seed=seed,
            resampled=self.resampled,
            batches_per_epoch=self.worker_batches_per_epoch() if train else None,
            decoder=cached_decoder(seed if train else None) if cached else None,
        )
        if train and self.samples_per_epoch:
            # A length lets Lightning know the steps per epoch (progress bar, epoch-based schedules).
            dataset = dataset.with_length(
                self.worker_batches_per_epoch() * max(1, self.num_workers), silent=True
            )
        return DataLoader(
            dataset,
            batch_size=None,  # the pipeline batches (and counts skips) itself
            num_workers=self.num_workers,
            persistent_workers=train and self.num_workers > 0,
            prefetch_factor=4 if self.num_workers > 0 else None,
            # Its own generator: starting an iterator (every validation) must not draw on the
            # global RNG, or a resumed run's dropout masks would drift from an uninterrupted one's.
            generator=torch.Generator().manual_seed(seed),
        )

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def worker_batches_per_epoch(self) -> int | None:
        """One DataLoader worker's batches per epoch: ``samples_per_epoch`` over the global batch
        (per-device batch x ranks), shared among the workers (rounded down, at least 1)."""
        if not self.samples_per_epoch:
            return None
        per_rank = self.samples_per_epoch // (self.batch_size * self.world_size)
        if per_rank < 1:
            raise ConfigError(
                f"data.samples_per_epoch={self.samples_per_epoch} is less than one global batch "
                f"(data.batch_size={self.batch_size} x {self.world_size} rank(s))"
            )
        return max(1, per_rank // max(1, self.num_workers))

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        resume_step = trainer.global_step if trainer is not None else 0
        if self.train_cache is None and not self.resampled:
            if self.world_size > 1 and not self.samples_per_epoch:
                raise ConfigError(
                    "data.resampled=false on several ranks needs data.samples_per_epoch, so that every "
                    "rank takes the same number of steps per epoch (ranks' shards may differ in size)"
                )
            check_shard_split(
                len(expand_urls(self.train_urls)), self.world_size, self.num_workers, self.train_urls
            )
        if self.train_cache is None:
            # Resampled stream: a resumed run continues with a fresh seed rather than replaying.
            return self.loader(
                self.train_urls,
                train=True,
                seed=stream_seed(self.seed, resume_step),
                cached=self.use_cached_features,
            )
        # Skips met while caching were counted before an interruption; the restored counts hold them.
        skipped = self.train_cache.skipped if resume_step == 0 else {}
        if self.device_resident:
            if self._store is None:
                self._store = build_store(self.train_cache, self.collator, self.feature_needs, trainer)
            return device_train_loader(self._store, trainer, self.batch_size, self.seed, skipped)
        sampler = self.cached_sampler(
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
        )
        return ResumableDataLoader(
            self.train_cache,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=_ReportOnce(self.collator, skipped),
        )

    def cached_sampler(self, *, num_replicas: int, rank: int) -> ResumableSampler:
        """The in-memory cache's training order. Conversation data draws each visit's text in
        the sampler (so it can group batches by length); caption data just shuffles."""
        assert self.train_cache is not None
        picker = getattr(self.collator, "picker", None)
        if picker is None and not self.length_group_batches:
            return ResumableSampler(self.train_cache, num_replicas=num_replicas, rank=rank, seed=self.seed)
        return VisitSampler(
            self.train_cache,
            picker or ConversationPicker(self.seed),
            batch_size=self.batch_size,
            group_batches=self.length_group_batches,
            num_replicas=num_replicas,
            rank=rank,
            seed=self.seed,
        )

    def val_dataloader(self) -> DataLoader | list[Any]:
        if not self.val_urls:
            return []
        return self.loader(self.val_urls, train=False, cached=self.use_cached_features)


class _ReportOnce:
    """Collates cached samples; the first batch carries the skips counted while caching."""

    def __init__(self, collate: CaptionCollator, skipped: dict[str, int]) -> None:
        self.collate = collate
        self.pending = dict(skipped)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(samples)
        batch["skipped"], self.pending = self.pending, {}
        return batch
