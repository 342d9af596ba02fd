"""WebDataset pipeline: shard URLs -> decoded, transformed, tokenised batches.

Bad samples (unreadable tar members, undecodable images, missing or empty captions) are skipped
and counted by reason; the counts ride along with each batch (``batch["skipped"]``) so they reach
the training process from any DataLoader worker and are logged as ``data/skipped``.
"""

from __future__ import annotations

import io
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import braceexpand
import torch
import webdataset as wds
from PIL import Image

from vgtrain.data.collate import CaptionCollator
from vgtrain.errors import ShardNotFoundError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class SkipCounter:
    """Counts skipped samples by reason, inside whichever process runs the pipeline."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.warned: set[str] = set()

    def skip(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        if reason not in self.warned:  # one warning per reason, then counts only
            self.warned.add(reason)
            log.warning("skipping sample (%s): %s; further ones are counted in data/skipped", reason, detail)

    def tar_error(self, error: Exception) -> bool:
        """A webdataset handler: count the error and keep reading."""
        self.skip("unreadable_tar_member", repr(error))
        return True

    def take(self) -> dict[str, int]:
        counts, self.counts = dict(self.counts), Counter()
        return counts


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace-expands ``urls`` (``::``-separated lists allowed) and checks local shards exist.

    Only the expanded URLs are ever opened: tar members are read into memory, never extracted,
    and WebDataset skips links and other non-regular members, so a shard cannot make the
    pipeline read a path outside this list.
    """
    patterns = urls.split("::") if isinstance(urls, str) else list(urls or [])
    patterns = [pattern.strip() for pattern in patterns if pattern and pattern.strip()]
    expanded = [url for pattern in patterns for url in braceexpand.braceexpand(pattern)]
    if not expanded:
        raise ShardNotFoundError(f"no shards: the shard pattern {urls!r} is empty")
    local = [url for url in expanded if "://" not in url and not url.startswith("pipe:")]
    missing = [url for url in local if not Path(url).is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ShardNotFoundError(f"shard not found: {', '.join(missing[:3])}{more} (from {urls!r})")
    return expanded


def stream_seed(seed: int, resume_step: int) -> int:
    """Seed of the resampled training stream: a resumed run gets a fresh one, so it does not
    replay the shard and sample order the run already trained on before the interruption."""
    return seed if resume_step == 0 else wds.utils.make_seed(seed, resume_step)


class WorkerShuffle:
    """Buffered sample shuffle seeded by (rank, worker, seed): reproducible for a given seed,
    and different in every DataLoader worker and rank (each reads different shards anyway)."""

    def __init__(self, bufsize: int, initial: int, seed: int) -> None:
        self.bufsize, self.initial, self.seed = bufsize, initial, seed

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = random.Random(wds.utils.make_seed(wds.utils.pytorch_worker_seed(), self.seed))
        return wds.filters.shuffle(self.bufsize, self.initial, rng=rng)(samples)


class SampleDecoder:
    """Raw tar sample -> {"image": tensor, "caption": str, "key": str}, or None (skipped, counted)."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], counter: SkipCounter) -> None:
        self.transform = transform
        self.counter = counter

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key = str(sample.get("__key__"))
        where = f"{key} in {sample.get('__url__')}"
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image_ext is None:
            self.counter.skip("missing_image", where)
            return None
        caption = sample.get("txt")
        if caption is None:
            self.counter.skip("missing_caption", where)
            return None
        try:
            caption = caption.decode("utf-8").strip() if isinstance(caption, bytes) else str(caption).strip()
        except UnicodeDecodeError:
            self.counter.skip("bad_caption_encoding", where)
            return None
        if not caption:
            self.counter.skip("empty_caption", where)
            return None
        try:
            with Image.open(io.BytesIO(sample[image_ext])) as image:
                pixels = self.transform(image.convert("RGB"))
        except Exception as error:  # PIL raises many types for corrupt data
            self.counter.skip("bad_image", f"{where}: {error}")
            return None
        return {"image": pixels, "caption": caption, "key": key}


class CountingBatcher:
    """Batches decoded samples and attaches the skip counts gathered since the last batch."""

    def __init__(
        self, batch_size: int, collate: CaptionCollator, counter: SkipCounter, partial: bool
    ) -> None:
        self.batch_size = batch_size
        self.collate = collate
        self.counter = counter
        self.partial = partial

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        pending: list[dict[str, Any]] = []
        for sample in samples:
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield self._emit(pending)
                pending = []
        if pending and self.partial:
            yield self._emit(pending)
        elif pending:
            self.counter.skip("dropped_partial_batch", f"{len(pending)} samples")

    def _emit(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(samples)
        batch["skipped"] = self.counter.take()
        return batch


def caption_dataset(
    urls: str | list[str],
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    collate: CaptionCollator,
    batch_size: int,
    train: bool,
    shuffle_buffer: int = 1000,
    seed: int = 0,
) -> wds.DataPipeline:
    """Training: shards resampled with replacement forever (per-worker seeds), sample shuffle.
    Evaluation: each shard once, in order, split across nodes and workers, last batch kept."""
    shard_list = expand_urls(urls)
    counter = SkipCounter()
    if train:
        stages: list[Any] = [wds.ResampledShards(shard_list, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(shard_list), wds.split_by_node, wds.split_by_worker]
    stages.append(wds.tarfile_to_samples(handler=counter.tar_error))
    if train and shuffle_buffer > 1:
        stages.append(WorkerShuffle(shuffle_buffer, min(shuffle_buffer, 100), seed))
    stages.append(wds.map(SampleDecoder(transform, counter)))
    stages.append(CountingBatcher(batch_size, collate, counter, partial=not train))
    return wds.DataPipeline(*stages)
