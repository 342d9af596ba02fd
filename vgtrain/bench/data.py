"""Data-pipeline section: images/s from shards through decode + transform + tokenise + collate
(vgtrain's WebDataset pipeline in a DataLoader), by number of workers."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from vgtrain.bench.sizes import Scale, Size
from vgtrain.data.collate import CaptionCollator
from vgtrain.data.pipeline import caption_dataset
from vgtrain.data.synthetic import write_shapes_dataset
from vgtrain.models.backbones import build_vision
from vgtrain.models.backbones.tiny import build_tiny_tokenizer


def shapes_shards(root: Path, image_size: int, num_train: int) -> str:
    """Train shards of the embedded dataset at a tower's input size (written once, then reused)."""
    manifest = write_shapes_dataset(
        root / f"shapes-{image_size}px-{num_train}",
        num_train=num_train,
        num_val=0,
        num_heldout=0,
        image_size=image_size,
        samples_per_shard=max(1, num_train // 2),
        progress=False,
    )
    return manifest["patterns"]["train"]


def scale_shards(root: Path, scale: Scale) -> str:
    """The shards a scale trains on: 16 batches of its own image size."""
    return shapes_shards(root, scale.vision["arch"]["image_size"], 16 * scale.batch_size)


def images_per_s(
    urls: str, transform: Callable, collate: CaptionCollator, batch_size: int, workers: int, batches: int
) -> float:
    """Training stream (resampled shards, shuffle) -> batches; timed after the first batch, so
    worker start-up and the shuffle buffer's first fill are not counted."""
    dataset = caption_dataset(
        urls, transform=transform, collate=collate, batch_size=batch_size, train=True, shuffle_buffer=100
    )
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    iterator = iter(loader)
    next(iterator)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(iterator)["input_ids"])
    rate = images / (time.perf_counter() - start)
    del iterator  # stops the workers
    return rate


def run_data(size: Size, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Both scales' transforms (64 px demo tower, 224 px ViT-B/32-sized tower), every worker count."""
    collate = CaptionCollator(build_tiny_tokenizer(), prefix_length=10)
    by_scale: dict[str, Any] = {}
    for scale in (size.tiny, size.clipcap):
        transform = build_vision(**scale.vision).transform
        urls = scale_shards(workdir, scale)
        rates = {
            str(workers): images_per_s(urls, transform, collate, scale.batch_size, workers, size.data_batches)
            for workers in size.data_workers
        }
        image_size = scale.vision["arch"]["image_size"]
        by_scale[scale.name] = {
            "image_size": image_size,
            "batch_size": scale.batch_size,
            "images_per_s_by_workers": rates,
        }
        log(
            f"  {scale.name:<13} {image_size:>3}px  "
            + "  ".join(f"{w} workers {r:7.1f} img/s" for w, r in rates.items())
        )
    headline = by_scale[size.clipcap.name]["images_per_s_by_workers"]
    return {"images_per_s": max(headline.values()), "by_scale": by_scale}


def step_waits_on_data(data: dict[str, Any], train_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """For each training row on images: would the pipeline, running beside the step in one
    worker, keep up with the rate at which the step consumes images once data loading is out of
    it? (The rows load data inline, num_workers=0; ``data_wait_fraction`` is that share.)"""
    verdicts: dict[str, Any] = {}
    for row in train_rows:
        if row["source"] != "images" or row["runner"] != "vgtrain" or row["scale"] not in data["by_scale"]:
            continue
        rates = data["by_scale"][row["scale"]]["images_per_s_by_workers"]
        supply = rates.get("1", max(rates.values()))
        demand = row["samples_per_s"] / max(1e-9, 1.0 - row["data_wait_fraction"])
        verdicts[f"{row['scale']}/{row['route']}/{row['dtype']}"] = {
            "inline_data_fraction_of_step": row["data_wait_fraction"],
            "step_images_per_s_without_data": demand,
            "pipeline_images_per_s_1_worker": supply,
            "waits": supply < demand,
        }
    return verdicts
