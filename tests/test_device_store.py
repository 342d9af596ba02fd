"""Device-resident training data: a batch indexed out of the store is the collator's batch, only
the features the adapter reads are kept, and training from it resumes at the exact batch."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.conftest import quiet_trainer, tiny_datamodule, tiny_module
from vgtrain.data.collate import CaptionCollator
from vgtrain.data.device_store import DeviceFeatureStore
from vgtrain.data.feature_cache import CachedFeatures
from vgtrain.training.recovery import RNGState

CAPTIONS = [
    "a small red circle at the top left",
    "a large blue square",
    "a green star left of a small purple diamond",
    "a tiny cyan triangle",
    "two shapes",
]


def _cache(size: int = 10) -> CachedFeatures:
    generator = torch.Generator().manual_seed(0)
    return CachedFeatures(
        torch.randn(size, 3, 8, generator=generator),
        torch.randn(size, 5, generator=generator),
        [CAPTIONS[i % len(CAPTIONS)] + " " * (i % 2) for i in range(size)],
        [f"k{i}" for i in range(size)],
    )


@pytest.mark.parametrize("prompt", ["", "a picture of"])
@pytest.mark.parametrize("prefix_length", [0, 4])
def test_a_store_batch_is_the_collated_batch(tiny_model, prompt, prefix_length):
    cache = _cache()
    collator = CaptionCollator(tiny_model.llm.tokenizer, prefix_length=prefix_length, prompt=prompt)
    store = DeviceFeatureStore(
        cache, collator, needs={"pooled", "tokens"}, device=torch.device("cpu"), dtype=torch.float32
    )
    indices = torch.tensor([7, 2, 3, 9])
    ours = store.batch(indices)
    reference = collator([cache[int(i)] for i in indices])
    for key in (
        "input_ids",
        "attention_mask",
        "labels",
        "loss_index",
        "loss_targets",
        "visual_tokens",
        "visual_pooled",
    ):
        assert torch.equal(ours[key], reference[key]), key
    assert list(ours["keys"]) == reference["keys"]


def test_only_the_features_the_adapter_reads_are_kept(tiny_model):
    collator = CaptionCollator(tiny_model.llm.tokenizer, prefix_length=4)
    store = DeviceFeatureStore(
        _cache(), collator, needs={"pooled"}, device=torch.device("cpu"), dtype=torch.bfloat16
    )
    assert store.tokens is None and store.pooled.dtype == torch.bfloat16
    batch = store.batch(torch.tensor([0, 1]))
    assert batch["visual_tokens"].shape == (2, 0) and batch["visual_pooled"].shape == (2, 5)


class Seen(L.Callback):
    def __init__(self) -> None:
        self.keys: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys.append(list(batch["keys"]))


def _fit(shapes_dir, folder, steps: int, ckpt_path=None) -> Seen:
    module = tiny_module()
    patterns = json.loads((shapes_dir / "manifest.json").read_text())["patterns"]
    data = tiny_datamodule(
        module,
        patterns["train"],
        cache_features=True,
        device_resident=True,
        feature_needs=module.model.feature_needs(),
        batch_size=48,  # 256 samples: 5 batches an epoch, so the run crosses an epoch
    )
    seen = Seen()
    every_step = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = quiet_trainer(folder, steps, limit_val_batches=0, callbacks=[seen, every_step, RNGState()])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return seen


def test_device_resident_training_resumes_at_the_exact_batch(shapes_dir, tmp_path):
    reference = _fit(shapes_dir, tmp_path / "a", 8)
    assert len({key for keys in reference.keys[:5] for key in keys}) == 5 * 48  # one epoch, no repeats
    resumed = _fit(shapes_dir, tmp_path / "b", 8, ckpt_path=tmp_path / "a" / "step=3.ckpt")
    assert resumed.keys == reference.keys[3:]
