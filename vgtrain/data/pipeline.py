"""WebDataset pipeline: shard URLs -> decoded, transformed, tokenised batches.

Bad samples (unreadable tar members, undecodable images, missing or empty captions) are skipped
and counted by reason; the counts ride along with each batch (``batch["skipped"]``) so they reach
the training process from any DataLoader worker and are logged as ``data/skipped``.
"""

from __future__ import annotations

import io
import json
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
from vgtrain.data.conversation import ConversationError, attach_conversations
from vgtrain.errors import ConfigError, ShardNotFoundError
from vgtrain.models.grounding import RegionError, read_regions

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


def decode_sample_image(sample: dict[str, Any], counter: SkipCounter) -> Image.Image | None:
    """A raw WebDataset sample's image as RGB, or None with the reason counted (no image member,
    or bytes PIL cannot read)."""
    where = f"{sample.get('__key__')} in {sample.get('__url__')}"
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        counter.skip("missing_image", where)
        return None
    try:
        with Image.open(io.BytesIO(sample[ext])) as handle:
            return handle.convert("RGB")
    except Exception as error:  # PIL raises many types for corrupt data
        counter.skip("bad_image", f"{where}: {error}")
        return None


GLOB_CHARACTERS = ("*", "?", "[")


def _expand_local_glob(url: str) -> list[str]:
    """A local path with glob characters (``photos-wds/train-*.tar``) -> its files, sorted; any
    other URL as it is. A glob that matches nothing is kept, to be reported as missing."""
    if "://" in url or url.startswith("pipe:") or not any(c in url for c in GLOB_CHARACTERS):
        return [url]
    path = Path(url)
    anchor = Path(path.anchor) if path.is_absolute() else Path()
    matches = sorted(str(match) for match in anchor.glob(str(path.relative_to(anchor))) if match.is_file())
    return matches or [url]


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace-expands ``urls`` (``::``-separated lists allowed), expands local globs
    (``data/train-*.tar``) and checks local shards exist.

    Only the expanded URLs are ever opened: tar members are read into memory, never extracted,
    and WebDataset skips links and other non-regular members, so a shard cannot make the
    pipeline read a path outside this list.
    """
    patterns = urls.split("::") if isinstance(urls, str) else list(urls or [])
    patterns = [pattern.strip() for pattern in patterns if pattern and pattern.strip()]
    expanded = [
        url
        for pattern in patterns
        for braced in braceexpand.braceexpand(pattern)
        for url in _expand_local_glob(braced)
    ]
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


class CaptionPicker:
    """Several captions per image (``{key}.json`` holding ``{"captions": [...]}``, as ``vgtrain
    shards`` writes): with a seed (training) each visit draws one, from an RNG seeded per rank and
    worker; without one (evaluation, caching) the ``.txt`` caption is used."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._rng: random.Random | None = None  # made in the worker process that uses it

    @staticmethod
    def listed(sample: dict[str, Any]) -> list[str]:
        """The non-empty captions of the sample's ``.json`` list (none when it has no usable one)."""
        if "json" not in sample:
            return []
        try:
            listed = json.loads(sample["json"]).get("captions")
        except (ValueError, AttributeError):
            return []  # no usable list: the .txt caption stands
        return [" ".join(c.split()) for c in listed or [] if isinstance(c, str) and c.strip()]

    def __call__(self, sample: dict[str, Any], caption: str) -> str:
        if self.seed is None:
            return caption
        choices = self.listed(sample)
        if len(choices) < 2:
            return caption
        if self._rng is None:
            self._rng = random.Random(wds.utils.make_seed(wds.utils.pytorch_worker_seed(), self.seed))
        return self._rng.choice(choices)


def sample_caption(
    sample: dict[str, Any], counter: SkipCounter, where: str, picker: CaptionPicker | None = None
) -> str | None:
    """The caption of a raw sample (its ``.txt``, or a draw by ``picker``), or None (counted)."""
    caption = sample.get("txt")
    if caption is None:
        counter.skip("missing_caption", where)
        return None
    try:
        caption = caption.decode("utf-8").strip() if isinstance(caption, bytes) else str(caption).strip()
    except UnicodeDecodeError:
        counter.skip("bad_caption_encoding", where)
        return None
    if not caption:
        counter.skip("empty_caption", where)
        return None
    return picker(sample, caption) if picker is not None else caption


def sample_text(
    sample: dict[str, Any], counter: SkipCounter, where: str, picker: CaptionPicker
) -> dict[str, Any] | None:
    """``{"caption"}`` and, for a sample whose ``.json`` has ``conversations``, those too (see
    vgtrain/data/conversation.py; evaluation pins the first, training leaves the draw to the
    collator); None when unusable (counted). A conversation-only sample needs no caption."""
    raw_json = sample.get("json", b"")
    conversational = b'"conversations"' in raw_json
    grounded = b'"regions"' in raw_json  # boxes with words, for the grounding loss
    parsed = _parsed_json(raw_json) if conversational or grounded else None  # once for both
    if conversational and "txt" not in sample:
        caption: str | None = ""  # instruction or VQA data
    else:
        caption = sample_caption(sample, counter, where, picker)
        if caption is None:
            return None
    text: dict[str, Any] = {"caption": caption}
    if conversational:
        try:
            attach_conversations(text, raw_json if parsed is None else parsed, pin_first=picker.seed is None)
        except ConversationError as error:
            counter.skip("bad_conversation", f"{where}: {error}")
            return None
    if grounded:
        try:
            if not isinstance(parsed, dict):
                raise RegionError("the .json is not a JSON object")
            if "regions" in parsed:
                text["regions"] = read_regions(parsed["regions"])
        except RegionError as error:
            counter.skip("bad_regions", f"{where}: {error}")
            return None
    return text


def _parsed_json(raw: bytes) -> Any:
    """A sample's ``.json``, parsed; None when it is not JSON."""
    try:
        return json.loads(raw)
    except ValueError:
        return None


class SampleDecoder:
    """Raw tar sample -> {"image": tensor, "caption": str, "key": str}, or None (skipped, counted)."""

    def __init__(
        self,
        transform: Callable[[Image.Image], torch.Tensor],
        counter: SkipCounter,
        caption_seed: int | None = None,
    ) -> None:
        self.transform = transform
        self.counter = counter
        self.picker = CaptionPicker(caption_seed)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key = str(sample.get("__key__"))
        where = f"{key} in {sample.get('__url__')}"
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image_ext is None:
            self.counter.skip("missing_image", where)
            return None
        text = sample_text(sample, self.counter, where, self.picker)
        if text is None:
            return None
        try:
            with Image.open(io.BytesIO(sample[image_ext])) as image:
                pixels = self.transform(image.convert("RGB"))
        except Exception as error:  # PIL raises many types for corrupt data
            self.counter.skip("bad_image", f"{where}: {error}")
            return None
        decoded = {"image": pixels, "key": key, **text}
        references = CaptionPicker.listed(sample)
        if len(references) > 1:  # every caption of the image: references for caption metrics
            decoded["references"] = references
        return decoded


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
    resampled: bool = True,
    batches_per_epoch: int | None = None,
    decoder: Callable[[SkipCounter], Callable[[dict[str, Any]], dict[str, Any] | None]] | None = None,
) -> wds.DataPipeline:
    """Shards -> batches, each rank and DataLoader worker reading its own part.

    Training, ``resampled``: shards drawn with replacement forever, seeded per rank and worker
    (webdataset's worker seed is ``rank * 1000 + worker``), then a sample shuffle. Training, not
    ``resampled``: the shard list, shuffled alike on every rank by (seed, pass), is dealt out to
    ranks then workers, so each reads disjoint shards, pass after pass.
    ``batches_per_epoch`` (this worker's share) cuts either stream into epochs of known length.
    Evaluation: each shard once, in order, split across ranks and workers, last batch kept.
    ``decoder`` builds the per-sample decoder from the skip counter (default: decode the image
    with ``transform``; cached features use :func:`vgtrain.data.feature_store.cached_decoder`)."""
    shard_list = expand_urls(urls)
    counter = SkipCounter()
    if train and resampled:
        stages: list[Any] = [wds.ResampledShards(shard_list, seed=seed, deterministic=True)]
    elif train:
        # The same shard order on every rank (detshuffle has no rank in its seed) before
        # splitting: ranks get disjoint shards, and a new order every pass.
        stages = [wds.SimpleShardList(shard_list), wds.detshuffle(len(shard_list), len(shard_list), seed)]
        stages += [wds.split_by_node, wds.split_by_worker]
    else:
        stages = [wds.SimpleShardList(shard_list), wds.split_by_node, wds.split_by_worker]
    stages.append(wds.tarfile_to_samples(handler=counter.tar_error))
    if train and shuffle_buffer > 1:
        stages.append(WorkerShuffle(shuffle_buffer, min(shuffle_buffer, 100), seed))
    caption_seed = seed if train else None  # training draws among several captions per image
    stages.append(wds.map(decoder(counter) if decoder else SampleDecoder(transform, counter, caption_seed)))
    stages.append(CountingBatcher(batch_size, collate, counter, partial=not train))
    pipeline = wds.DataPipeline(*stages)
    if train and batches_per_epoch:
        pipeline = pipeline.with_epoch(nbatches=batches_per_epoch)
    return pipeline


def check_shard_split(num_shards: int, world_size: int, num_workers: int, urls: str) -> None:
    """Disjoint shard reading needs a shard for every (rank, worker); say what to change."""
    readers = world_size * max(1, num_workers)
    if num_shards < readers:
        raise ConfigError(
            f"data.train_urls has {num_shards} shard(s) for {world_size} rank(s) x {max(1, num_workers)} "
            f"worker(s) = {readers} readers, and data.resampled=false gives each reader its own shards: "
            f"write more, smaller shards, lower data.num_workers, or set data.resampled=true ({urls!r})"
        )
