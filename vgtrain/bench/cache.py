"""Feature-caching section: images/s of ``vgtrain cache``'s engine (``write_cache``: shards ->
decoded by worker processes -> the frozen tower on the device -> feature shards), at the demo's
64 px tower and the ViT-B/32-sized 224 px one, by number of decoding workers.

Each run starts from no cache (the feature folder is removed) and is timed whole, worker start-up
and writing included: what a user waits for. ``cache.images_per_s`` is the ViT-B/32-sized tower's
best rate.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vgtrain.bench.data import shapes_shards
from vgtrain.bench.sizes import Size
from vgtrain.data.feature_store import FEATURES_DIR, write_cache
from vgtrain.data.pipeline import expand_urls
from vgtrain.models.backbones import build_vision


def time_cache(urls: list[str], vision: Any, *, batch_size: int, workers: int, device: torch.device) -> float:
    """Images/s of one full ``write_cache`` over ``urls``, from an empty cache."""
    for folder in {Path(url).parent / FEATURES_DIR for url in urls}:
        shutil.rmtree(folder, ignore_errors=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    totals = write_cache(
        urls, vision, batch_size=batch_size, workers=workers, device=str(device), progress=False
    )
    return totals["samples"] / (time.perf_counter() - start)


def run_cache(size: Size, workdir: Path, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    by_scale: dict[str, Any] = {}
    for scale in (size.tiny, size.clipcap):
        vision = build_vision(**scale.vision)
        image_size = scale.vision["arch"]["image_size"]
        urls = expand_urls(shapes_shards(workdir / "cache", image_size, size.cache_images))
        # Warm-up on the device (kernels, allocator, autotuning) outside the timed runs.
        write_cache(
            urls[:1], vision, batch_size=size.cache_batch, workers=0, device=str(device), progress=False
        )
        rates = {
            str(workers): time_cache(
                urls, vision, batch_size=size.cache_batch, workers=workers, device=device
            )
            for workers in size.cache_workers
        }
        by_scale[scale.name] = {
            "image_size": image_size,
            "images": size.cache_images,
            "batch_size": size.cache_batch,
            "images_per_s_by_workers": rates,
        }
        log(
            f"  {scale.name:<13} {image_size:>3}px  "
            + "  ".join(f"{w} workers {r:7.1f} img/s" for w, r in rates.items())
        )
    headline = by_scale[size.clipcap.name]["images_per_s_by_workers"]
    return {"images_per_s": max(headline.values()), "device": str(device), "by_scale": by_scale}
