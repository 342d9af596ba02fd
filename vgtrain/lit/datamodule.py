"""LightningDataModule over WebDataset shards."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vgtrain.data.collate import CaptionCollator
from vgtrain.data.pipeline import caption_dataset


class CaptionDataModule(L.LightningDataModule):
    """Train on resampled shards (an endless stream: training length is ``trainer.max_steps``);
    validate on each validation shard once."""

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
    ) -> None:
        super().__init__()
        self.train_urls = train_urls
        self.val_urls = val_urls
        self.transform = transform
        self.collator = collator
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed

    def _loader(self, urls: str, *, train: bool) -> DataLoader:
        dataset = caption_dataset(
            urls,
            transform=self.transform,
            collate=self.collator,
            batch_size=self.batch_size if train else self.val_batch_size,
            train=train,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
        )
        return DataLoader(
            dataset,
            batch_size=None,  # the pipeline batches (and counts skips) itself
            num_workers=self.num_workers,
            persistent_workers=train and self.num_workers > 0,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_urls, train=True)

    def val_dataloader(self) -> DataLoader | list[Any]:
        return self._loader(self.val_urls, train=False) if self.val_urls else []
