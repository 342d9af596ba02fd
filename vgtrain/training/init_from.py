"""``init_from=EXPORT_DIR``: start training from an exported adapter (fine-tuning on new data).

Only the weights come from the export; the optimizer, schedule and step start fresh (the run's own
config), unlike ``resume``, which continues a run. The export's backbone facts (names, sizes,
weight digests) and tensor shapes are checked against the model the config builds, with the same
check a resumed checkpoint goes through.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vgtrain.errors import CheckpointMismatchError, UserError
from vgtrain.export.artifact import ADAPTER_FILE, MANIFEST_FILE, ArtifactError, load_adapter, read_manifest
from vgtrain.training.module import CaptioningModule

log = logging.getLogger(__name__)


class InitFromError(UserError):
    """An ``init_from`` directory that is not a readable export."""


def init_from_export(module: CaptioningModule, export_dir: str | Path) -> dict[str, Any]:
    """Loads the export's adapter (and fine-tuned LLM) tensors into ``module``; returns what the
    export says about itself (steps trained, prompt) for the log."""
    export_dir = Path(export_dir)
    try:
        manifest = read_manifest(export_dir)
        tensors = load_adapter(export_dir, manifest)
    except ArtifactError as error:
        raise InitFromError(f"init_from={export_dir}: {error}") from None
    if manifest["adapter"].get("includes_llm") and not module.model.llm.trainable:
        raise CheckpointMismatchError(
            f"init_from={export_dir}: the export fine-tuned its LLM (the weights are in {ADAPTER_FILE}); "
            "set model.llm.trainable=true to start from them"
        )
    state = {f"model.{key}": value for key, value in tensors.items()}
    current = module.state_dict()
    # An export with a frozen LLM, into a run that trains it: the LLM starts from its own weights.
    for key in module.model.trainable_state_dict():
        if f"model.{key}" not in state and key.startswith(("llm.", "vision.")):
            state[f"model.{key}"] = current[f"model.{key}"]
    facts = {part: manifest["backbones"][part]["facts"] for part in ("vision", "llm")}
    try:
        module.check_checkpoint({"vgtrain": facts, "state_dict": state})
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"init_from={export_dir / MANIFEST_FILE}: {error}") from None
    loaded = module.load_state_dict(state, strict=False)  # frozen tensors are not in an export
    assert not loaded.unexpected_keys, loaded.unexpected_keys  # check_checkpoint refused those
    if manifest.get("prompt", "") != module.prompt:
        log.warning(
            "init_from=%s was trained with prompt %r, this run uses model.prompt=%r: the loss will not "
            "start where the export left it",
            export_dir,
            manifest.get("prompt", ""),
            module.prompt,
        )
    info = {
        "export": str(export_dir),
        "steps": manifest["checkpoint"].get("global_step"),
        "tensors": len(state),
    }
    log.info(
        "initialised the adapter from %s (trained %s steps); fresh optimizer and schedule",
        export_dir,
        info["steps"],
    )
    return info
