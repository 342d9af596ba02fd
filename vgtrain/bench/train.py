"""Training-step section: vgtrain's Lightning step by route, precision and input (cached features vs
images), the ClipCap loop baseline on the same work, model FLOPs and MFU."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vgtrain.bench.baseline_loop import time_loop
from vgtrain.bench.data import scale_shards, shapes_shards
from vgtrain.bench.machine import dtype_supported
from vgtrain.bench.mfu import counted_flops, llm_formula_for_batch, mfu
from vgtrain.bench.sizes import ROUTES, Scale, Size
from vgtrain.bench.steps import Timing, build_module, pooled, time_fit
from vgtrain.data.collate import CaptionCollator
from vgtrain.data.feature_cache import CachedFeatures
from vgtrain.training.datamodule import CaptionDataModule

MIB = 2**20


class Setup:
    """A route's module and its two data modules: cached features (in memory) and images (shards)."""

    def __init__(self, scale: Scale, route: str, urls: str, cache: CachedFeatures | None) -> None:
        self.scale, self.route = scale, route
        self.module = build_module(scale, route)
        self.collator = CaptionCollator(self.module.model.llm.tokenizer, self.module.model.prefix_length)
        common = {
            "train_urls": urls,
            "val_urls": None,
            "transform": self.module.model.vision.transform,
            "collator": self.collator,
            "batch_size": scale.batch_size,
            "val_batch_size": 32,
            "num_workers": 0,  # data work inline, in the step being timed (the data section varies it)
            "shuffle_buffer": 100,
        }
        # vgtrain's way with cached features: on the device, only what the adapter reads.
        self.cached = CaptionDataModule(
            **common,
            cache_features=True,
            vision=self.module.model.vision,
            device_resident=True,
            feature_needs=self.module.model.feature_needs(),
        )
        # The vision tower is frozen and seeded alike for every route: one feature cache per scale.
        self.cached.train_cache = cache
        self.images = CaptionDataModule(**common)

    def feature_cache(self, device: torch.device | None = None) -> CachedFeatures:
        if self.cached.train_cache is None:
            if device is not None and device.type == "cuda":  # the tower on the GPU, not in setup()
                self.cached.train_cache = encode_on(self.module, self.images, device)
            else:
                self.cached.setup("fit")
        assert self.cached.train_cache is not None
        return self.cached.train_cache

    def datamodule(self, source: str) -> CaptionDataModule:
        return self.cached if source == "cached" else self.images

    def one_batch(self, source: str) -> dict[str, Any]:
        if source == "cached":
            cache = self.feature_cache()
            return self.collator([cache[i] for i in range(self.scale.batch_size)])
        return next(iter(self.images.loader(self.images.train_urls, train=True)))


@torch.no_grad()
def encode_on(module: Any, images: CaptionDataModule, device: torch.device) -> CachedFeatures:
    """The feature cache, with the frozen tower run on ``device`` (back on the CPU after)."""
    vision = module.model.vision.to(device)
    tokens, pooled, captions, keys = [], [], [], []
    for batch in images.loader(images.train_urls, train=False):
        features = vision.encode(batch["pixel_values"].to(device))
        tokens.append(features.tokens.cpu())
        pooled.append(features.pooled.cpu())
        captions.extend(batch["captions"])
        keys.extend(batch["keys"])
    module.model.vision.to("cpu")
    return CachedFeatures(torch.cat(tokens), torch.cat(pooled), captions, keys)


class TrainBench:
    """Runs the section; ``log`` prints progress lines."""

    def __init__(
        self, size: Size, device: torch.device, workdir: Path, peaks: dict[str, float], log: Callable
    ) -> None:
        self.size, self.device, self.workdir, self.peaks, self.log = size, device, workdir, peaks, log
        self.rows: list[dict[str, Any]] = []
        self.dtypes = [d for d in size.dtypes if dtype_supported(d, device)]
        self._flops: dict[tuple[str, str, str], dict[str, float]] = {}
        self.headline: Setup | None = None  # the ClipCap prefix setup, reused by the decode section

    def flops(self, setup: Setup, source: str) -> dict[str, float]:
        key = (setup.scale.name, setup.route, source)
        if key not in self._flops:
            batch = setup.one_batch(source)
            counted = counted_flops(setup.module, batch, self.device)
            entry = {"flops_per_sample": counted / setup.scale.batch_size}
            if setup.route == "prefix" and hasattr(setup.module.model.llm.model.config, "n_layer"):
                formula = llm_formula_for_batch(setup.module, batch)
                entry["llm_formula_flops_per_sample"] = sum(formula.values()) / setup.scale.batch_size
            self._flops[key] = entry
        return self._flops[key]

    def record(self, setup: Setup, dtype: str, source: str, timing: Timing, runner: str = "vgtrain") -> dict:
        flops = self.flops(setup, source)
        row = {
            "scale": setup.scale.name,
            "route": setup.route,
            "dtype": dtype,
            "source": source,
            "runner": runner,
            "batch_size": timing.batch_size,
            "samples_per_s": timing.samples_per_s,
            "step_s": timing.median_step_s,
            "cpu_step_s": timing.median_cpu_s,
            "data_wait_fraction": timing.wait_fraction,
            "peak_memory_mib": timing.peak_bytes / MIB,
            "added_memory_mib": timing.added_bytes / MIB,
            "memory_kind": timing.memory_kind,
            **flops,
            "mfu": mfu(flops["flops_per_sample"], timing.samples_per_s, self.peaks[dtype]),
        }
        self.rows.append(row)
        self.log(
            f"  {row['scale']:<13} {row['route']:<6} {dtype:<4} {source:<6} {runner:<7} "
            f"{row['samples_per_s']:8.2f} samples/s  mfu {row['mfu']:.3f}"
        )
        return row

    def tiny_matrix(self) -> None:
        scale = self.size.tiny
        urls = scale_shards(self.workdir, scale)
        cache = None
        for route in ROUTES:
            setup = Setup(scale, route, urls, cache)
            cache = setup.feature_cache()
            for dtype in self.dtypes:
                for source in ("cached", "images"):
                    self.record(setup, dtype, source, self.fit(setup, dtype, source))

    def fit(self, setup: Setup, dtype: str, source: str) -> Timing:
        return time_fit(setup.module, setup.datamodule(source), setup.scale, dtype, self.device)

    def loop(self, setup: Setup, dtype: str) -> Timing:
        scale = setup.scale
        return time_loop(
            setup.module.model.llm.model,
            setup.feature_cache(),
            setup.collator,
            prefix_length=setup.module.model.prefix_length,
            batch_size=scale.batch_size,
            warmup_steps=scale.warmup_steps,
            timed_steps=scale.timed_steps,
            dtype=dtype,
            device=self.device,
        )

    def clipcap(self) -> dict[str, Any]:
        """The loop comparison and cached-vs-images, interleaved in rounds (their steps pooled), then the
        other precisions and the cross-attention routes on cached features."""
        scale = self.size.clipcap
        urls = scale_shards(self.workdir, scale)
        setup = Setup(scale, "prefix", urls, None)
        self.headline = setup
        self.log(f"  caching {scale.name} features ...")
        setup.feature_cache()
        summary: dict[str, Any] = {"by_dtype": {}}
        for dtype in self.dtypes:
            rounds = self.size.loop_rounds if dtype == self.dtypes[0] else max(1, self.size.loop_rounds // 2)
            runs: dict[str, list[Timing]] = {"vgtrain": [], "loop": [], "images": []}
            for round_ in range(rounds):  # interleaved: other processes' load falls on all alike
                runs["vgtrain"].append(self.fit(setup, dtype, "cached"))
                runs["loop"].append(self.loop(setup, dtype))
                if round_ < 2:  # image steps are slow and their ratio is far from any threshold
                    runs["images"].append(self.fit(setup, dtype, "images"))
            ours, loop, images = (pooled(runs[k]) for k in ("vgtrain", "loop", "images"))
            vg = self.record(setup, dtype, "cached", ours)
            lp = self.record(setup, dtype, "cached", loop, runner="loop")
            im = self.record(setup, dtype, "images", images)
            summary["by_dtype"][dtype] = {
                "rounds": rounds,
                "vgtrain_vs_loop": vg["samples_per_s"] / lp["samples_per_s"],
                "vgtrain_vs_loop_by_round": [
                    b.median_step_s / a.median_step_s
                    for a, b in zip(runs["vgtrain"], runs["loop"], strict=True)
                ],
                "vgtrain_vs_loop_fastest_step": min(loop.step_s) / min(ours.step_s),
                "vgtrain_vs_loop_cpu_time": loop.median_cpu_s / ours.median_cpu_s,
                "cached_vs_images": vg["samples_per_s"] / im["samples_per_s"],
                "cached_vs_images_cpu_time": images.median_cpu_s / ours.median_cpu_s,
                "cached_vs_images_flop_ratio": im["flops_per_sample"] / vg["flops_per_sample"],
                "mfu": vg["mfu"],
            }
        cache = setup.feature_cache()
        if self.size.vit_tiny_lm is not None:
            summary["vit_tiny_lm"] = self.vit_tiny_lm(self.size.vit_tiny_lm, urls, cache)
        for route in ROUTES[1:]:
            other = Setup(scale, route, urls, cache)
            for dtype in self.dtypes:
                self.record(other, dtype, "cached", self.fit(other, dtype, "cached"))
        return summary

    def gpu_matrix(self) -> dict[str, Any]:
        """ClipCap-scale prefix and cross-attention steps at each of the size's batch sizes in
        bf16 (the first supported dtype otherwise), the hand-written loop beside the prefix step."""
        dtype = "bf16" if "bf16" in self.dtypes else self.dtypes[0]
        base = self.size.clipcap
        largest = max(self.size.gpu_batch_sizes)
        urls = shapes_shards(self.workdir, base.vision["arch"]["image_size"], 2 * largest)
        cache = None
        by_batch: dict[str, Any] = {}
        for batch_size in self.size.gpu_batch_sizes:
            scale = replace(base, batch_size=batch_size)
            setup = Setup(scale, "prefix", urls, cache)
            if batch_size == self.size.gpu_batch_sizes[0]:
                self.headline = setup
            cache = setup.feature_cache(self.device)
            runs: dict[str, list[Timing]] = {"vgtrain": [], "loop": []}
            for _ in range(self.size.loop_rounds):
                runs["vgtrain"].append(self.fit(setup, dtype, "cached"))
                runs["loop"].append(self.loop(setup, dtype))
            vg = self.record(setup, dtype, "cached", pooled(runs["vgtrain"]))
            lp = self.record(setup, dtype, "cached", pooled(runs["loop"]), runner="loop")
            xattn = Setup(scale, "xattn", urls, cache)
            xa = self.record(xattn, dtype, "cached", self.fit(xattn, dtype, "cached"))
            by_batch[str(batch_size)] = {
                "prefix_samples_per_s": vg["samples_per_s"],
                "loop_samples_per_s": lp["samples_per_s"],
                "xattn_samples_per_s": xa["samples_per_s"],
                "vgtrain_vs_loop": vg["samples_per_s"] / lp["samples_per_s"],
                "wait_fraction": vg["data_wait_fraction"],
                "mfu": vg["mfu"],
            }
        first = by_batch[str(self.size.gpu_batch_sizes[0])]
        return {
            "by_dtype": {dtype: {"vgtrain_vs_loop": first["vgtrain_vs_loop"], "mfu": first["mfu"]}},
            "by_batch": by_batch,
            "dtype": dtype,
        }

    def vit_tiny_lm(self, scale: Scale, urls: str, cache: CachedFeatures) -> dict[str, Any]:
        """Cached vs images with the same tower in front of the demo's LM (the same frozen tower
        and seed as the ClipCap setup, so its feature cache is reused)."""
        setup = Setup(scale, "prefix", urls, cache)
        dtype = self.dtypes[0]
        runs: dict[str, list[Timing]] = {"cached": [], "images": []}
        for _ in range(min(2, self.size.loop_rounds)):
            for source in runs:
                runs[source].append(self.fit(setup, dtype, source))
        cached_timing, images_timing = pooled(runs["cached"]), pooled(runs["images"])
        cached = self.record(setup, dtype, "cached", cached_timing)
        images = self.record(setup, dtype, "images", images_timing)
        return {
            "dtype": dtype,
            "cached_vs_images": cached["samples_per_s"] / images["samples_per_s"],
            "cached_vs_images_cpu_time": images_timing.median_cpu_s / cached_timing.median_cpu_s,
            "cached_vs_images_flop_ratio": images["flops_per_sample"] / cached["flops_per_sample"],
        }

    def run(self) -> dict[str, Any]:
        self.log("train: tiny (demo-sized) backbones")
        self.tiny_matrix()
        self.log("train: GPT-2-small-sized LM + ViT-B/32-sized tower (ClipCap's work)")
        clipcap = self.gpu_matrix() if self.size.gpu_batch_sizes else self.clipcap()
        headline_dtype = clipcap.get("dtype", self.dtypes[0])
        first = clipcap["by_dtype"][headline_dtype]
        headline_batch = (
            self.size.gpu_batch_sizes[0] if self.size.gpu_batch_sizes else self.size.clipcap.batch_size
        )
        headline_row = next(
            r
            for r in self.rows
            if r["scale"] == self.size.clipcap.name
            and r["route"] == "prefix"
            and r["dtype"] == headline_dtype
            and r["source"] == "cached"
            and r["runner"] == "vgtrain"
            and r["batch_size"] == headline_batch
        )
        tiny_rates = {
            (r["route"], r["dtype"], r["source"]): r["samples_per_s"]
            for r in self.rows
            if r["scale"] == self.size.tiny.name
        }
        return {
            "vgtrain_vs_loop": first["vgtrain_vs_loop"],
            "vgtrain_vs_loop_cpu_time": first.get("vgtrain_vs_loop_cpu_time"),
            "vgtrain_vs_loop_fastest_step": first.get("vgtrain_vs_loop_fastest_step"),
            "cached_vs_images": first.get("cached_vs_images"),
            "cached_vs_images_tiny_lm": clipcap.get("vit_tiny_lm", {}).get("cached_vs_images"),
            "mfu": first["mfu"],
            # The best MFU of any vgtrain step measured (any scale, route, dtype, batch).
            "best_mfu": max(r["mfu"] for r in self.rows if r["runner"] == "vgtrain"),
            # Of the headline step, the share of time between one batch's end and the next one's start.
            "wait_fraction": headline_row["data_wait_fraction"],
            "headline": {
                "scale": self.size.clipcap.name,
                "route": "prefix",
                "dtype": headline_dtype,
                "batch_size": headline_batch,
            },
            "clipcap": clipcap["by_dtype"],
            "gpu_by_batch": clipcap.get("by_batch"),
            "vit_tiny_lm": clipcap.get("vit_tiny_lm"),
            "tiny_cached_vs_images": {
                f"{route}/{dtype}": tiny_rates[(route, dtype, "cached")]
                / tiny_rates[(route, dtype, "images")]
                for route in ROUTES
                for dtype in self.dtypes
            },
            "rows": self.rows,
        }
