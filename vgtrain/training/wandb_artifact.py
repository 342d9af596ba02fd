"""An export folder as a wandb ``model`` artifact (`vgtrain export ... --wandb-artifact`).

A module of its own so that `vgtrain.export.writer` never imports wandb: decoding an export needs only
torch, transformers, open_clip and safetensors.
"""

from __future__ import annotations

from pathlib import Path

import wandb

from vgtrain.export.artifact import read_manifest


def log_wandb_artifact(export_dir: Path, project: str, wandb_dir: str | None = None) -> str:
    """Logs an export folder as a wandb ``model`` artifact named after the folder (its manifest
    as metadata) in a short run of its own; returns the artifact's name."""
    run = wandb.init(project=project, job_type="export", name=f"export-{export_dir.name}", dir=wandb_dir)
    try:
        artifact = wandb.Artifact(export_dir.name, type="model", metadata=read_manifest(export_dir))
        artifact.add_dir(str(export_dir))
        run.log_artifact(artifact)
    finally:
        run.finish()
    return f"{project}/{export_dir.name}"
