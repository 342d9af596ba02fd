"""On-disk cache of frozen vision features, written by ``vgtrain cache`` beside the shards.

Layout, for a shard ``DIR/train-000003.tar`` and a vision backbone whose identity hashes to TAG::

    DIR/features/TAG/cache.json            the backbone facts + preprocessing the features belong to
    DIR/features/TAG/train-000003.tar      per sample: tokens.npy, pooled.npy, txt (and json)
    DIR/features/TAG/train-000003.tar.json source shard size, samples written, samples skipped

TAG is ``{backbone name}-{sha256 of the identity}``: another backbone (other weights, pooling,
image size or transform) looks in another folder, and ``cache.json`` is compared field by field
before any feature is read, so a cache is never used with a backbone it was not computed with.
A shard's cache is complete when its tar and sidecar exist (both written atomically) and the
source shard's size is the recorded one: an interrupted ``vgtrain cache`` resumes at the first
shard not done. The cache shards hold the captions too, so training from them reads no image.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import groupby
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from vgtrain.data.feature_encoder import FeatureEncoder, encode_overlapped
from vgtrain.data.pipeline import CaptionPicker, SampleDecoder, SkipCounter, sample_text
from vgtrain.data.shards import write_shard
from vgtrain.errors import UserError
from vgtrain.files import atomic_write_text
from vgtrain.models.backbones.vision import VisionBackbone

FEATURES_DIR = "features"
INFO_FILE = "cache.json"
FORMAT_VERSION = 1
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
T = TypeVar("T")


class FeatureCacheError(UserError):
    """A feature cache that is missing, incomplete or computed with another backbone."""


def cache_identity(vision: VisionBackbone) -> dict[str, Any]:
    """What the features depend on: the tower's facts (weights digest included), its token
    pooling and its preprocessing (the transform's repr, object addresses removed)."""
    facts = {key: value for key, value in vision.describe().items() if key != "source"}
    preprocessing = {
        "transform": _ADDRESS.sub("", repr(vision.transform)),
        "pool_tokens": vision.pool_tokens,
        "token_pooling": vision.token_pooling,
    }
    return {"format_version": FORMAT_VERSION, "backbone": facts, "preprocessing": preprocessing}


def cache_tag(identity: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9_-]+', '_', identity['backbone']['name'])}-{digest}"


def _local(url: str) -> Path:
    if "://" in url or url.startswith("pipe:"):
        raise FeatureCacheError(f"{url}: the feature cache works with local shards only")
    return Path(url)


def cache_path(shard: str, tag: str) -> Path:
    path = _local(shard)
    return path.parent / FEATURES_DIR / tag / path.name


def _first_difference(saved: Any, current: Any, where: str = "") -> str:
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(saved.keys() | current.keys()):
            if saved.get(key) != current.get(key):
                return _first_difference(saved.get(key), current.get(key), f"{where}.{key}" if where else key)
    return f"{where}: cached {saved!r}, this run {current!r}"


def cached_urls(urls: list[str], vision: VisionBackbone) -> list[str]:
    """The cache shard of every shard in ``urls``, after checking that each exists, is complete
    and was computed by this backbone with this preprocessing; else one line saying what to run."""
    identity = cache_identity(vision)
    tag = cache_tag(identity)
    checked: set[Path] = set()
    result = []
    for url in urls:
        path = cache_path(url, tag)
        info = path.parent / INFO_FILE
        if path.parent not in checked:
            if not info.is_file():
                raise FeatureCacheError(
                    f"{info}: no feature cache for vision backbone {identity['backbone']['name']!r} "
                    f"(tag {tag}) beside {url}; run `vgtrain cache` with this run's overrides first, "
                    "or set data.use_cached_features=false"
                )
            saved = json.loads(info.read_text(encoding="utf-8"))
            if saved.get("identity") != identity:
                raise FeatureCacheError(
                    f"{info}: these features were computed with another vision backbone or preprocessing "
                    f"({_first_difference(saved.get('identity'), identity)}); rerun `vgtrain cache`"
                )
            checked.add(path.parent)
        if not _complete(url, path):
            raise FeatureCacheError(
                f"{path}: feature cache of {url} is missing or stale (interrupted `vgtrain cache`, or the "
                "shard was rewritten); rerun `vgtrain cache` with this run's overrides (it resumes)"
            )
        result.append(str(path))
    return result


def _complete(url: str, path: Path) -> bool:
    sidecar = path.with_name(path.name + ".json")
    if not (path.is_file() and sidecar.is_file()):
        return False
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record.get("source_size") == Path(url).stat().st_size


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _array(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


class CachedSampleDecoder:
    """Cache sample -> {"tokens", "pooled", "caption", "key"}, or None (skipped, counted)."""

    def __init__(self, counter: SkipCounter, caption_seed: int | None = None) -> None:
        self.counter = counter
        self.picker = CaptionPicker(caption_seed)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key = str(sample.get("__key__"))
        where = f"{key} in {sample.get('__url__')}"
        if "tokens.npy" not in sample or "pooled.npy" not in sample:
            self.counter.skip("missing_features", where)
            return None
        text = sample_text(sample, self.counter, where, self.picker)  # caption (and conversations)
        if text is None:
            return None
        try:
            tokens, pooled = _array(sample["tokens.npy"]), _array(sample["pooled.npy"])
        except (ValueError, OSError) as error:
            self.counter.skip("bad_features", f"{where}: {error}")
            return None
        return {"tokens": tokens, "pooled": pooled, "key": key, **text}


def cached_decoder(caption_seed: int | None) -> Callable[[SkipCounter], CachedSampleDecoder]:
    """The ``decoder`` factory for :func:`vgtrain.data.pipeline.caption_dataset`."""
    return lambda counter: CachedSampleDecoder(counter, caption_seed)


class ShardBatches(IterableDataset):
    """Decoded batches of the pending shards, in order, for a DataLoader with ``workers`` processes.

    Every worker reads every shard (reading a tar is cheap next to decoding its images) and cuts
    it into the same chunks of ``batch_size`` samples; worker w decodes chunks w, w + W, w + 2W...
    The DataLoader takes batches from its workers round-robin, so they arrive in shard order.
    Each shard yields at least one item (an empty shard still gets its, empty, cache shard).
    """

    def __init__(self, urls: list[str], transform: Callable[[Any], torch.Tensor], batch_size: int) -> None:
        self.urls = urls
        self.transform = transform
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counter, tar_errors = SkipCounter(), SkipCounter()
        decode = SampleDecoder(self.transform, counter)  # same decoding and transform as training
        chunk = 0
        for index, url in enumerate(self.urls):
            stream = wds.DataPipeline(
                wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=tar_errors.tar_error)
            )
            for raws in _chunks(iter(stream), self.batch_size, at_least_one=True):
                errors = tar_errors.take()  # every worker meets them: the chunk's owner reports them
                if chunk % workers == worker:
                    yield self._decode(index, raws, decode, counter, errors)
                chunk += 1

    @staticmethod
    def _decode(
        shard: int,
        raws: list[dict[str, Any]],
        decode: SampleDecoder,
        counter: SkipCounter,
        errors: dict[str, int],
    ) -> dict[str, Any]:
        decoded = [(raw, item) for raw, item in ((raw, decode(raw)) for raw in raws) if item]
        skipped = counter.take()
        for reason, count in errors.items():
            skipped[reason] = skipped.get(reason, 0) + count
        return {
            "shard": shard,
            "seen": len(raws),
            "skipped": skipped,
            "pixels": torch.stack([item["image"] for _, item in decoded]) if decoded else None,
            # what the cache shard keeps of each sample besides its features: key and captions, as stored
            "samples": [{k: raw[k] for k in ("__key__", "txt", "json") if k in raw} for raw, _ in decoded],
        }


def _chunks(items: Iterator[T], size: int, at_least_one: bool) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk or at_least_one:
        yield chunk


def _cache_samples(
    items: Iterator[tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor] | None]],
    dtype: np.dtype,
    counter: Counter[str],
    bar: tqdm,
) -> Iterator[dict[str, Any]]:
    """One shard's encoded batches -> its cache samples (features stored in ``dtype``)."""
    for batch, features in items:
        bar.update(batch["seen"])
        counter.update(batch["skipped"])
        if features is None:
            continue
        tokens, pooled = (x.numpy().astype(dtype) for x in features)
        for index, sample in enumerate(batch["samples"]):
            yield {**sample, "tokens.npy": _npy(tokens[index]), "pooled.npy": _npy(pooled[index])}


def write_cache(
    urls: list[str],
    vision: VisionBackbone,
    *,
    batch_size: int = 256,
    dtype: str = "float16",
    device: str = "auto",
    precision: str = "auto",
    workers: int = 2,
    progress: bool = True,
    description: str = "caching features",
) -> dict[str, Any]:
    """Caches every shard of ``urls`` not cached yet; returns counts (done now / before).

    Images are decoded by ``workers`` DataLoader processes (0: in this process) while the tower
    encodes on ``device`` (see :mod:`vgtrain.data.feature_encoder`); each shard's cache is written
    atomically as soon as its last batch is encoded, so an interruption loses one shard at most."""
    identity = cache_identity(vision)
    tag = cache_tag(identity)
    totals: dict[str, Any] = {
        "tag": tag,
        "shards_written": 0,
        "shards_reused": 0,
        "samples": 0,
        "skipped": {},
    }
    pending = []
    for url in urls:
        out = cache_path(url, tag)
        info = out.parent / INFO_FILE
        if not info.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                info, json.dumps({"identity": identity, "tag": tag}, indent=2, sort_keys=True) + "\n"
            )
        if _complete(url, out):
            totals["shards_reused"] += 1
        else:
            pending.append((url, out))
    if not pending:
        return totals
    encoder = FeatureEncoder(vision, device, precision)
    loader = DataLoader(
        ShardBatches([url for url, _ in pending], vision.transform, batch_size),
        batch_size=None,
        num_workers=workers,
        pin_memory=encoder.device.type == "cuda",
        # DataLoader's default prefetch of 2 batches per worker: a 256-image batch of 224 px
        # pixels is 154 MB of shared memory, so more would only cost memory.
    )
    encoded = encode_overlapped(encoder, loader, lambda batch: batch["pixels"])
    with tqdm(desc=description, unit="img", disable=not progress) as bar:
        for shard, items in groupby(encoded, key=lambda item: item[0]["shard"]):
            url, out = pending[shard]
            counter: Counter[str] = Counter()
            out.parent.mkdir(parents=True, exist_ok=True)
            written = write_shard(out, _cache_samples(items, np.dtype(dtype), counter, bar))
            record = {
                "source": str(Path(url).resolve()),
                "source_size": Path(url).stat().st_size,
                "samples": written,
                "skipped": dict(counter),
            }
            atomic_write_text(
                out.with_name(out.name + ".json"), json.dumps(record, indent=2, sort_keys=True) + "\n"
            )
            totals["shards_written"] += 1
            totals["samples"] += written
            for reason, count in counter.items():
                totals["skipped"][reason] = totals["skipped"].get(reason, 0) + count
    return totals
