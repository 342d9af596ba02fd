"""Records -> WebDataset shards per split + ``manifest.json``.

Each sample is ``{key}.jpg|png|webp`` (checked, converted to RGB, optionally resized),
``{key}.txt`` (its first caption, what any WebDataset reader takes) and ``{key}.json``
(``{"captions": [...], "source": ...}``: vgtrain's training pipeline draws one caption per visit).
Images are prepared in worker processes; shards are written in order by this process, each to a
temporary name renamed into place, and the manifest last: a folder without a manifest is an
interrupted run, which a rerun cleans up (our shard names only) and writes again.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import random
import re
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vgtrain.data.ingest.images import ImageOptions, PreparedImage, prepare_job
from vgtrain.data.ingest.records import IngestError, Record, SkipLog
from vgtrain.data.shards import brace_pattern, shard_path, write_shard
from vgtrain.files import atomic_write_text

FORMAT = "vgtrain-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_OUR_FILES = re.compile(r"^[a-z0-9_]+-\d{6}\.tar(\.tmp-\d+)?$")


def assign_splits(
    records: list[Record], val_fraction: float, seed: int, log: SkipLog, by_source: bool
) -> None:
    """Splits from the source (``by_source``; records without one are counted and left out) or
    by ``val_fraction``: a hash of (seed, key), so a record's split does not depend on the order
    or on what else is in the source."""
    for record in records:
        if by_source:
            if record.split is None:
                log.skip("missing_split", f"{record.image.describe()} (key {record.key})")
            continue
        draw = int.from_bytes(hashlib.sha256(f"{seed}:{record.key}".encode()).digest()[:8], "big") / 2**64
        record.split = "val" if draw < val_fraction else "train"


def _prepared(
    jobs: list[tuple[Record, ImageOptions]], workers: int
) -> Iterator[tuple[Record, PreparedImage]]:
    """Prepared images in input order (so output is the same for any number of workers)."""
    if workers <= 1:
        yield from map(prepare_job, jobs)
        return
    # spawn: the caller may hold torch threads, which a fork would copy in an unknown state.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(prepare_job, jobs, chunksize=8)


def clean_interrupted(out_dir: Path, overwrite: bool) -> None:
    """Refuses a finished dataset unless ``overwrite``; removes shards and temporary files of an
    interrupted run (names this writer produces only), so no stale shard joins the new ones."""
    manifest = out_dir / MANIFEST
    if manifest.is_file() and not overwrite:
        raise IngestError(f"{out_dir}: already holds a dataset ({manifest}); pass --overwrite to replace it")
    manifest.unlink(missing_ok=True)
    if out_dir.is_dir():
        for path in out_dir.iterdir():
            if path.is_file() and _OUR_FILES.match(path.name):
                path.unlink()


def no_pairs_message(source: dict[str, Any], log: SkipLog) -> str:
    """Why nothing could be written: the counts, an example of each reason, and what to try."""
    examples = "; ".join(
        f"{reason}: e.g. {items[0]}" for reason, items in sorted(log.examples.items()) if items
    )
    message = f"no usable image-caption pairs in {source.get('paths')}; skipped: {dict(log.skipped)}"
    if examples:
        message += f" ({examples})"
    if log.skipped.get("missing_image"):
        message += "; if the file names are relative to another folder, pass it with --image-root FOLDER"
    return message


def write_dataset(
    records: list[Record],
    out_dir: Path,
    log: SkipLog,
    *,
    source: dict[str, Any],
    options: dict[str, Any],
    image_options: ImageOptions,
    samples_per_shard: int,
    seed: int,
    workers: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Writes the shards of every split and the manifest; returns the manifest."""
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    by_split: dict[str, list[Record]] = {}
    for record in records:
        if record.split is not None:
            by_split.setdefault(record.split, []).append(record)
    rng = random.Random(seed)
    jobs: list[tuple[Record, ImageOptions]] = []
    for split in sorted(by_split):
        rng.shuffle(by_split[split])  # neighbours in a shard should not be neighbours in the source
        jobs.extend((record, image_options) for record in by_split[split])
    shards: dict[str, list[str]] = {split: [] for split in sorted(by_split)}
    images = {split: 0 for split in shards}
    captions = {split: 0 for split in shards}
    pending: list[dict[str, Any]] = []
    pending_split: str | None = None

    def flush() -> None:
        nonlocal pending
        if pending and pending_split is not None:
            path = shard_path(out_dir, pending_split, len(shards[pending_split]))
            write_shard(path, pending)
            shards[pending_split].append(path.name)
        pending = []

    with tqdm(total=len(jobs), desc="writing shards", unit="img", disable=not progress) as bar:
        for record, prepared in _prepared(jobs, workers):
            bar.update(1)
            if record.split != pending_split or len(pending) >= samples_per_shard:
                flush()
                pending_split = record.split
            if prepared.problem:
                log.skip(prepared.problem, prepared.detail)
                continue
            for reason in prepared.converted:
                log.convert(reason, record.image.describe())
            meta = {
                **record.meta,
                "captions": record.captions,
                "width": prepared.size[0],
                "height": prepared.size[1],
            }
            sample = {"__key__": record.key, prepared.ext: prepared.data, "json": meta}
            if record.captions:  # conversation-only records (instruction, VQA data) have no .txt
                sample["txt"] = record.captions[0]
            pending.append(sample)
            images[record.split] += 1
            captions[record.split] += len(record.captions)
        flush()
    seconds = time.perf_counter() - started
    empty = [split for split, names in shards.items() if not names]
    for split in empty:
        del shards[split], images[split], captions[split]
    if not shards:
        raise IngestError(no_pairs_message(source, log))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source,
        "options": {
            **options,
            "image": asdict(image_options),
            "samples_per_shard": samples_per_shard,
            "seed": seed,
        },
        "counts": {
            "images": images,
            "captions": captions,
            "written": sum(images.values()),
            "skipped": sum(log.skipped.values()),
            "converted": sum(log.converted.values()),
        },
        "skipped": dict(sorted(log.skipped.items())),
        "converted": dict(sorted(log.converted.items())),
        "examples": dict(sorted(log.examples.items())),
        "notes": log.notes,
        "shards": shards,
        "patterns": {split: brace_pattern(out_dir, split, len(names)) for split, names in shards.items()},
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    manifest["seconds"] = seconds  # printed, not stored: reruns give byte-identical manifests
    return manifest
