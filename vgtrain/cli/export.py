"""`vgtrain export CKPT OUT_DIR`: a Lightning checkpoint -> a small, self-describing export
(:mod:`vgtrain.export.writer`), optionally logged as a wandb ``model`` artifact."""

from __future__ import annotations

import argparse
import sys

from vgtrain.export.artifact import ArtifactError
from vgtrain.export.writer import export_checkpoint
from vgtrain.models.backbones import BackboneError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vgtrain export", description="Export a trained adapter checkpoint."
    )
    parser.add_argument("checkpoint", help="a Lightning checkpoint written by `vgtrain train` (.ckpt)")
    parser.add_argument("out_dir", help="the export directory to write (created atomically)")
    parser.add_argument(
        "--bundle-backbones",
        action="store_true",
        help="copy backbones given by local path into the export, so it can move to another machine",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    parser.add_argument(
        "--merge-lora",
        action="store_true",
        help="LoRA-trained LLM: merge LoRA into its weights and bundle the merged LLM folder",
    )
    parser.add_argument(
        "--wandb-artifact",
        action="store_true",
        help="also log the export folder as a wandb `model` artifact (offline unless logged in)",
    )
    parser.add_argument("--wandb-project", default="vgtrain", help="wandb project of the artifact")
    parser.add_argument(
        "--wandb-dir", default=None, help="where wandb keeps its run files (default: ./wandb)"
    )
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(
            args.checkpoint,
            args.out_dir,
            bundle_backbones=args.bundle_backbones,
            overwrite=args.overwrite,
            merge_lora=args.merge_lora,
        )
    except (ArtifactError, BackboneError, OSError) as error:
        print(f"vgtrain export: error: {error}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"exported {args.checkpoint} -> {out} ({size / 1e6:.2f} MB)")
    if args.wandb_artifact:
        from vgtrain.training.wandb_artifact import log_wandb_artifact  # wandb only when asked for

        print(f"wandb artifact: {log_wandb_artifact(out, args.wandb_project, args.wandb_dir)}")
    return 0
