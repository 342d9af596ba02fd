"""Tiny checkpoints trained through Lightning in a few steps, shared by the export and decode tests.

Each variant trains once per session (memoised here, since the two test modules both ask for them).
"""

from __future__ import annotations

import json
import tarfile
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from tests.conftest import TINY_LLM, TINY_MAPPER, TINY_VISION, quiet_trainer
from vgtrain.data.collate import CaptionCollator
from vgtrain.training.datamodule import CaptionDataModule
from vgtrain.training.module import CaptioningModule


@dataclass
class Trained:
    checkpoint: Path
    module: CaptioningModule  # the in-memory model the checkpoint was saved from


_TRAINED: dict[str, Trained] = {}


def tiny_llama_folder(root: Path) -> Path:
    """A random tiny Llama (SmolLM2's architecture) saved as a local HF folder with the tiny tokenizer."""
    from vgtrain.models.backbones.tiny import build_tiny_llama, build_tiny_tokenizer

    folder = root / "tiny-llama"
    if not (folder / "config.json").is_file():
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_llama(tokenizer, width=64, layers=2, heads=2, kv_heads=1, mlp_width=128)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def train_tiny(
    root: Path,
    shapes_dir: Path,
    variant: str,
    *,
    llm: dict[str, Any] | None = None,
    prompt: str = "",
    steps: int = 6,
    mapper: dict[str, Any] | None = TINY_MAPPER,
    xattn: dict[str, Any] | None = None,
) -> Trained:
    """Fits the tiny model for ``steps`` steps on cached features and saves a checkpoint."""
    if variant in _TRAINED:
        return _TRAINED[variant]
    module = CaptioningModule(
        vision=dict(TINY_VISION),
        llm=llm or dict(TINY_LLM),
        mapper=dict(mapper) if mapper else None,
        optimizer=partial(torch.optim.AdamW, lr=3e-3),
        scheduler={"warmup_steps": 2, "min_lr_ratio": 0.1},
        prompt=prompt,
        xattn=dict(xattn) if xattn else None,
    )
    patterns = json.loads((shapes_dir / "manifest.json").read_text())["patterns"]
    collator = CaptionCollator(
        module.model.llm.tokenizer, prefix_length=module.model.prefix_length, prompt=prompt
    )
    datamodule = CaptionDataModule(
        patterns["train"],
        patterns["val"],
        module.model.vision.transform,
        collator,
        batch_size=16,
        val_batch_size=32,
        num_workers=0,
        cache_features=True,
        vision=module.model.vision,
    )
    trainer = quiet_trainer(
        root,
        steps,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():  # frozen backbones are in eval mode on purpose
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        trainer.fit(module, datamodule=datamodule)
    path = root / f"{variant}.ckpt"
    trainer.save_checkpoint(path)
    module.eval()
    _TRAINED[variant] = Trained(path, module)
    return _TRAINED[variant]


def heldout_images(shapes_dir: Path, out_dir: Path, count: int = 4) -> list[Path]:
    """The first ``count`` held-out images of the shapes dataset, as PNG files."""
    shard = shapes_dir / json.loads((shapes_dir / "manifest.json").read_text())["shards"]["heldout"][0]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.endswith(".png") and len(paths) < count:
                path = out_dir / Path(member.name).name
                path.write_bytes(tar.extractfile(member).read())
                paths.append(path)
    return paths
