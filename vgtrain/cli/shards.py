"""`vgtrain shards SOURCE... --out DIR`: image-text data -> WebDataset shards + manifest.json."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from vgtrain.cli.shell import command_line
from vgtrain.data.ingest.coco import read_coco, read_karpathy
from vgtrain.data.ingest.conversations import read_llava, read_vqav2
from vgtrain.data.ingest.images import ImageOptions
from vgtrain.data.ingest.records import IngestError, Record, SkipLog
from vgtrain.data.ingest.sources import detect_format, read_folder, read_img2dataset, read_table, table_in
from vgtrain.data.ingest.writer import assign_splits, clean_interrupted, write_dataset

FORMATS = ("auto", "folder", "table", "coco", "karpathy", "img2dataset", "llava", "vqav2")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vgtrain shards",
        description="Write WebDataset shards (+ manifest.json) from images with captions. Bad items are "
        "counted by reason in the manifest, never fatal.",
    )
    p.add_argument(
        "sources",
        nargs="+",
        type=Path,
        help="a folder of images + same-named .txt files; a folder with captions.csv/.tsv/.jsonl; a "
        ".csv/.tsv/.jsonl file; COCO captions .json file(s); a Karpathy split .json; img2dataset output; "
        "LLaVA-style instruction .json; VQAv2 questions .json + annotations .json (--format vqav2)",
    )
    p.add_argument("--out", "-o", type=Path, required=True, help="output folder for shards and manifest.json")
    p.add_argument("--format", choices=FORMATS, default="auto", help="source format (default: detected)")
    p.add_argument(
        "--image-root",
        type=Path,
        action="append",
        default=[],
        help="folder the table/COCO file names are relative to (repeatable; default: the file's folder)",
    )
    p.add_argument("--file-column", default="file", help="table column/key naming the image file")
    p.add_argument("--caption-column", default="caption", help="table column/key holding the caption")
    p.add_argument(
        "--split-column",
        help="table column (or img2dataset metadata key) naming the split (train/val/test; restval=train)",
    )
    p.add_argument("--karpathy", type=Path, help="Karpathy split file (dataset_coco.json) for COCO captions")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="fraction of images for a val split, chosen by a hash of (seed, key) (ignored with "
        "--split-column, --karpathy or a Karpathy source)",
    )
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--max-side", type=int, help="resize images whose longer side exceeds this (pixels)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded JPEGs")
    p.add_argument(
        "--reencode",
        action="store_true",
        help="re-encode every image as JPEG (default: keep RGB JPEG/PNG/WebP as they are)",
    )
    p.add_argument(
        "--workers", type=int, default=max(1, min(8, (os.cpu_count() or 1))), help="image worker processes"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the shard order and of --val-fraction")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already written in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def read_source(args: argparse.Namespace, log: SkipLog) -> tuple[list[Record], dict[str, Any]]:
    """The records of the sources, and what the manifest says about where they came from."""
    for path in [*args.sources, *args.image_root, *([args.karpathy] if args.karpathy else [])]:
        if not path.exists():
            raise IngestError(f"{path}: no such file or folder")
    kind = detect_format(args.sources) if args.format == "auto" else args.format
    if kind not in ("coco", "vqav2") and len(args.sources) > 1:
        raise IngestError(
            f"several sources are accepted for COCO captions and VQAv2 files only; {kind} takes one"
        )
    source = args.sources[0]
    roots = [root.resolve() for root in args.image_root]
    info: dict[str, Any] = {"kind": kind, "paths": [str(p.resolve()) for p in args.sources]}
    if kind == "folder":
        records = read_folder(source, log)
    elif kind == "table":
        table = table_in(source) if source.is_dir() else source
        info["table"] = str(table.resolve())
        records = read_table(
            table,
            roots,
            log,
            file_column=args.file_column,
            caption_column=args.caption_column,
            split_column=args.split_column,
        )
    elif kind == "coco":
        records = read_coco(args.sources, roots, log, args.karpathy)
        info["karpathy"] = str(args.karpathy.resolve()) if args.karpathy else None
    elif kind == "karpathy":
        records = read_karpathy(source, roots, log)
    elif kind == "llava":
        records = read_llava(source, roots, log)
    elif kind == "vqav2":
        records = read_vqav2(args.sources, roots, log)
    else:
        records, extra = read_img2dataset(source, log, args.split_column)
        info.update(extra)
    info["by_source_split"] = (
        bool(args.split_column)
        or bool(args.karpathy)
        or kind == "karpathy"
        or (kind == "vqav2" and any(r.split for r in records))
    )
    return records, info


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.samples_per_shard < 1 or not 0.0 <= args.val_fraction < 1.0 or not 1 <= args.jpeg_quality <= 100:
        raise IngestError(
            "--samples-per-shard must be >= 1, --val-fraction in [0, 1), --jpeg-quality in 1..100"
        )
    if any(args.out.resolve() == path.resolve() for path in [*args.sources, *args.image_root]):
        raise IngestError(f"{args.out}: --out must be a folder of its own, not the source or an image root")
    clean_interrupted(args.out, args.overwrite)
    log = SkipLog()
    records, source = read_source(args, log)
    assign_splits(records, args.val_fraction, args.seed, log, by_source=source.pop("by_source_split"))
    options = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in vars(args).items()
        if key in ("format", "file_column", "caption_column", "split_column", "karpathy", "val_fraction")
    }
    options["image_root"] = [str(root) for root in args.image_root]
    manifest = write_dataset(
        records,
        args.out,
        log,
        source=source,
        options=options,
        image_options=ImageOptions(args.max_side, args.jpeg_quality, args.reencode),
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        workers=args.workers,
        progress=not args.no_progress,
    )
    counts, seconds = manifest["counts"], manifest["seconds"]
    rate = counts["written"] / max(seconds, 1e-9)
    print(
        f"wrote {counts['written']} images ({sum(counts['captions'].values())} captions) in "
        f"{sum(len(v) for v in manifest['shards'].values())} shards to {args.out} ({seconds:.1f} s, {rate:.0f} images/s)"
    )
    for note in manifest["notes"]:
        print(f"note: {note}")
    if manifest["skipped"]:
        print("skipped: " + ", ".join(f"{reason} {n}" for reason, n in manifest["skipped"].items()))
    if manifest["converted"]:
        print("converted: " + ", ".join(f"{reason} {n}" for reason, n in manifest["converted"].items()))
    print(f"details: {args.out.resolve() / 'manifest.json'}\ntrain with:")
    urls = [
        f"data.{split}_urls={pattern}"
        for split, pattern in manifest["patterns"].items()
        if split in ("train", "val")
    ]
    print(f"  vgtrain train {command_line('experiment=custom', *urls)}")
    others = [split for split in manifest["patterns"] if split not in ("train", "val")]
    for split in others:
        print(f"  ({split} shards: {manifest['patterns'][split]})")
    return 0
