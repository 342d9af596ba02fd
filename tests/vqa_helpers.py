"""A tiny VQA dataset and tiny models trained on it through Lightning (shared by VQA tests)."""

from __future__ import annotations

import json
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch

from tests.conftest import TINY_LLM, TINY_MAPPER, TINY_VISION, quiet_trainer
from vgtrain.data.conversation import conversation_collator
from vgtrain.training.datamodule import CaptionDataModule
from vgtrain.training.module import CaptioningModule

LORA = {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.0, "targets": "attention"}
PLAIN_CHAT = {"template": "plain", "plain": {"user": "Q: {content} A:", "assistant": " {content}"}}


def write_tiny_vqa(root: Path) -> Path:
    from vgtrain.data.shapes_vqa import write_shapes_vqa_dataset

    write_shapes_vqa_dataset(
        root,
        num_train=128,
        num_val=16,
        num_phrasing=16,
        image_size=32,
        samples_per_shard=128,
        conversations_per_image=3,
        eval_conversations_per_image=2,
        progress=False,
    )
    return root


def train_vqa(
    root: Path,
    data_dir: Path,
    *,
    llm_adapter: dict[str, Any] | None = LORA,
    steps: int = 6,
    lr: float = 3e-3,
    llm: dict[str, Any] | None = None,
    mapper: dict[str, Any] | None = TINY_MAPPER,
) -> tuple[CaptioningModule, Path, Any]:
    """Fits a tiny conversation model; returns the module, its checkpoint and the datamodule."""
    module = CaptioningModule(
        vision=dict(TINY_VISION),
        llm=llm or dict(TINY_LLM),
        mapper=dict(mapper) if mapper else None,
        optimizer=partial(torch.optim.AdamW, lr=lr),
        scheduler={"warmup_steps": 2, "min_lr_ratio": 0.1},
        llm_adapter=llm_adapter,
        chat=PLAIN_CHAT,
    )
    patterns = json.loads((data_dir / "manifest.json").read_text())["patterns"]
    collator = conversation_collator(
        module.model.llm.tokenizer, module.model.prefix_length, dict(PLAIN_CHAT), seed=0
    )
    datamodule = CaptionDataModule(
        patterns["train"],
        patterns["val"],
        module.model.vision.transform,
        collator,
        batch_size=16,
        val_batch_size=16,
        num_workers=0,
        cache_features=True,
        vision=module.model.vision,
    )
    trainer = quiet_trainer(
        root, steps, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        trainer.fit(module, datamodule=datamodule)
    path = root / "vqa.ckpt"
    trainer.save_checkpoint(path)
    module.eval()
    return module, path, datamodule
