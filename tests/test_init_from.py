"""`init_from=EXPORT_DIR`: fine-tuning starts from the exported adapter's loss, not from scratch,
with a fresh optimizer and schedule; an export of other backbones is refused."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_LLM, TINY_MODEL_OVERRIDES, run_vgtrain
from tests.tiny_checkpoints import train_tiny
from vgtrain.cli import main
from vgtrain.data.collate import CaptionCollator
from vgtrain.data.pipeline import caption_dataset
from vgtrain.errors import CheckpointMismatchError
from vgtrain.export.writer import export_checkpoint
from vgtrain.training.init_from import InitFromError, init_from_export
from vgtrain.training.module import CaptioningModule

# `vgtrain train experiment=custom` with the backbones and mapper of tests.conftest's TINY_* dicts.
TINY = [
    "experiment=custom",
    "model/vision=tiny",
    "model/llm=tiny",
    "model.llm.trainable=true",
    "model.vision.token_pooling=mean",
    *TINY_MODEL_OVERRIDES,
    "model.scheduler.warmup_steps=5",
    "data.batch_size=16",
    "data.val_batch_size=32",
    "data.num_workers=0",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "evaluate.enabled=false",
]


def _train(run_dir: Path, *overrides: str) -> list[float]:
    """`vgtrain train experiment=custom ...` in a subprocess; returns the logged training losses."""
    result = run_vgtrain("train", *TINY, *overrides, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open())
    return [float(row["train/loss"]) for row in rows if row.get("train/loss")]


def _eval_loss(module: CaptioningModule, urls: str) -> float:
    collator = CaptionCollator(module.model.llm.tokenizer, prefix_length=module.model.prefix_length)
    batches = caption_dataset(
        urls, transform=module.model.vision.transform, collate=collator, batch_size=32, train=False
    )
    batch = next(iter(batches))
    module.eval()
    with torch.no_grad():
        out = module.model(
            batch["input_ids"], batch["attention_mask"], batch["labels"], pixel_values=batch["pixel_values"]
        )
    return float(out.loss)


def _module_like(hparams: dict, **vision_changes) -> CaptioningModule:
    return CaptioningModule(
        vision={**hparams["vision"], **vision_changes},
        llm=hparams["llm"],
        mapper=hparams["mapper"],
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        scheduler={},
        prompt=hparams.get("prompt", ""),
    )


def test_fine_tuning_starts_from_the_export(tmp_path, shapes_dir, monkeypatch):
    patterns = json.loads((shapes_dir / "manifest.json").read_text())["patterns"]
    # The adapter to start from: trained in-process on the shapes training split (the same
    # backbones and mapper as TINY builds), then exported.
    llm = {**TINY_LLM, "trainable": True}  # the LLM learns the caption language fast: a clear gap
    first = train_tiny(tmp_path, shapes_dir, "init_from_base", llm=llm, steps=25)
    export = export_checkpoint(first.checkpoint, tmp_path / "export")
    hparams = torch.load(first.checkpoint, weights_only=True)["hyper_parameters"]
    # The new data: held-out scenes. The export's loss there, and a fresh adapter's.
    torch.manual_seed(123)
    scratch = _eval_loss(_module_like(hparams), patterns["heldout"])
    torch.manual_seed(123)
    module = _module_like(hparams)
    init_from_export(module, export)
    exported = _eval_loss(module, patterns["heldout"])
    assert scratch - exported > 1.0, (scratch, exported)

    # Fine-tune on the held-out scenes from their stored features (`vgtrain cache`, in-process).
    new_data = tmp_path / "new" / Path(patterns["heldout"]).name
    new_data.parent.mkdir()
    shutil.copy(patterns["heldout"], new_data)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the CLI rewrites sys.argv
    assert main(["cache", *TINY, f"data.train_urls={new_data}", "--no-progress", "--dtype", "float32"]) == 0
    second = tmp_path / "second"
    overrides = [f"data.train_urls={new_data}", "data.use_cached_features=true", f"init_from={export}"]
    losses = _train(second, *overrides, "trainer.max_steps=3")
    print(f"held-out loss: fresh adapter {scratch:.3f}, export {exported:.3f}; fine-tuning losses {losses}")
    assert abs(losses[0] - exported) < 0.2 * (scratch - exported), (losses[0], exported, scratch)
    checkpoint = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3  # its own step count, optimizer and schedule
    assert checkpoint["optimizer_states"][0]["state"][0]["step"] == 3

    # An export of other backbones is refused, naming the manifest and the differing fact.
    with pytest.raises(CheckpointMismatchError, match=r"vgtrain\.json.*vision backbone.*weights_digest"):
        init_from_export(_module_like(hparams, init_seed=1), export)
    frozen_llm = {**hparams, "llm": {**hparams["llm"], "trainable": False}}
    with pytest.raises(CheckpointMismatchError, match="fine-tuned its LLM.*model.llm.trainable=true"):
        init_from_export(_module_like(frozen_llm), export)
    with pytest.raises(InitFromError, match="not an export directory"):
        init_from_export(_module_like(hparams), tmp_path / "nowhere")
