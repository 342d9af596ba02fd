"""`vgtrain cache [options] OVERRIDES...`: precompute the frozen vision features of a run's shards.

Takes the same Hydra overrides as `vgtrain train` (``experiment=custom data.train_urls=...
model/vision=clip_vit_b32``), builds only the vision tower that run would build, and writes its
features beside each shard of ``data.train_urls`` and ``data.val_urls`` (see
:mod:`vgtrain.data.feature_store`). Then ``vgtrain train <same overrides>
data.use_cached_features=true`` trains without decoding an image or running the tower.
Rerunning resumes: shards already cached by this backbone are kept.
"""

from __future__ import annotations

import argparse
import os
import time

from omegaconf import OmegaConf

from vgtrain.cli.shell import command_line

SPLITS = ("train", "val")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vgtrain cache",
        description="Precompute frozen vision features beside a run's shards. Arguments without a "
        "leading '-' are `vgtrain train` overrides, e.g. experiment=custom data.train_urls=...",
    )
    p.add_argument("--splits", nargs="+", default=list(SPLITS), help="which data.<split>_urls to cache")
    p.add_argument("--batch-size", type=int, default=256, help="images per vision forward pass")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored precision")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 autocast on CUDA"
    )
    p.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes decoding images (0: none)"
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    unknown = [item for item in overrides if item.startswith("-")]
    if unknown:
        build_parser().error(f"unrecognized arguments: {' '.join(unknown)}")
    from vgtrain.config.build import compose_train_config, prepare_synthetic_data
    from vgtrain.data.feature_store import write_cache
    from vgtrain.data.pipeline import expand_urls
    from vgtrain.errors import ConfigError
    from vgtrain.models.backbones import build_vision

    cfg = compose_train_config(overrides)
    prepare_synthetic_data(cfg)
    vision = build_vision(**OmegaConf.to_container(cfg.model.vision, resolve=True))
    done = False
    for split in args.splits:
        urls = cfg.data.get(f"{split}_urls")
        if not urls:
            continue
        started = time.perf_counter()
        totals = write_cache(
            expand_urls(urls),
            vision,
            batch_size=args.batch_size,
            dtype=args.dtype,
            device=args.device,
            precision=args.precision,
            workers=args.workers,
            progress=not args.no_progress,
            description=f"caching {split} features",
        )
        seconds = time.perf_counter() - started
        skipped = f", skipped {totals['skipped']}" if totals["skipped"] else ""
        print(
            f"{split}: {totals['samples']} samples in {totals['shards_written']} new shard(s), "
            f"{totals['shards_reused']} already cached ({seconds:.1f} s, "
            f"{totals['samples'] / max(seconds, 1e-9):.0f} img/s){skipped}; features/{totals['tag']}"
        )
        done = True
    if not done:
        raise ConfigError(f"nothing to cache: data.{'/'.join(args.splits)}_urls are not set")
    print(f"train with: vgtrain train {command_line(*overrides, 'data.use_cached_features=true')}")
    return 0
