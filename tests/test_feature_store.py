"""`vgtrain cache` + data.use_cached_features: same losses as training on images, never another
backbone's features, resumable per shard."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import webdataset as wds

from tests.conftest import TINY_LLM, TINY_MAPPER, TINY_VISION, quiet_trainer, tiny_datamodule, tiny_module
from vgtrain.data.collate import CaptionCollator
from vgtrain.data.feature_cache import compute_features
from vgtrain.data.feature_store import (
    FeatureCacheError,
    _array,
    cache_identity,
    cache_tag,
    cached_urls,
    write_cache,
)
from vgtrain.data.pipeline import SampleDecoder, SkipCounter, expand_urls
from vgtrain.models.backbones import build_vision
from vgtrain.models.backbones.vision import VisualFeatures
from vgtrain.training.datamodule import CaptionDataModule
from vgtrain.training.module import CaptioningModule


@pytest.fixture(scope="module")
def shards(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A private copy of the shapes shards (the cache is written beside them)."""
    root = tmp_path_factory.mktemp("cached")
    for path in shapes_dir.glob("*.tar"):
        shutil.copy(path, root / path.name)
    patterns = json.loads((shapes_dir / "manifest.json").read_text())["patterns"]
    return {split: patterns[split].replace(str(shapes_dir), str(root)) for split in ("train", "val")}


class LossLog(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.inputs: set[str] = set()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.inputs.add("features" if "visual_tokens" in batch else "images")


def _train(tmp_path: Path, shards: dict[str, str], cached: bool, steps: int = 5) -> list[float]:
    """Per-step training losses; fails unless every batch carried the expected input."""
    L.seed_everything(0)
    module = tiny_module()
    datamodule = tiny_datamodule(
        module,
        shards["train"],
        shards["val"],
        batch_size=8,
        shuffle_buffer=32,
        seed=0,
        use_cached_features=cached,
    )
    log = LossLog()
    trainer = quiet_trainer(tmp_path, steps, enable_checkpointing=False, limit_val_batches=0, callbacks=[log])
    trainer.fit(module, datamodule=datamodule)
    assert log.inputs == {"features" if cached else "images"}
    return log.losses


def test_cached_features_train_to_the_same_losses_as_images(tmp_path, shards):
    vision = build_vision(**TINY_VISION)
    for split in ("train", "val"):
        totals = write_cache(
            expand_urls(shards[split]), vision, batch_size=48, dtype="float32", progress=False
        )
        assert totals["shards_written"] >= 1 and totals["samples"] > 0 and not totals["skipped"]
    from_images = _train(tmp_path / "images", shards, cached=False)
    from_cache = _train(tmp_path / "cache", shards, cached=True)
    assert len(from_images) == len(from_cache) == 5
    print("losses from images", from_images, "from cached features", from_cache)
    assert from_cache == pytest.approx(from_images, rel=1e-4, abs=1e-5)
    assert from_images[-1] < from_images[0]  # it trains


def test_a_cache_of_another_backbone_is_never_used(tmp_path, shards):
    vision = build_vision(**TINY_VISION)
    urls = expand_urls(shards["val"])
    write_cache(urls, vision, dtype="float16", progress=False)
    assert len(cached_urls(urls, vision)) == len(urls)
    other = build_vision(**{**TINY_VISION, "init_seed": 1})  # same shapes, other weights
    with pytest.raises(FeatureCacheError, match="no feature cache for vision backbone 'tiny'"):
        cached_urls(urls, other)
    # Even a cache folder renamed to the other backbone's tag is refused, naming cache.json.
    folder = Path(cached_urls(urls, vision)[0]).parent
    shutil.copytree(folder, folder.parent / cache_tag(cache_identity(other)))
    with pytest.raises(FeatureCacheError, match=r"cache\.json: .*another vision backbone.*weights_digest"):
        cached_urls(urls, other)


def test_cache_resumes_per_shard_and_detects_a_rewritten_shard(tmp_path, shards):
    vision = build_vision(**TINY_VISION)
    urls = expand_urls(shards["train"])
    write_cache(urls, vision, dtype="float32", progress=False)
    again = write_cache(urls, vision, dtype="float32", progress=False)
    assert again["shards_written"] == 0 and again["shards_reused"] == len(urls)
    sidecar = Path(cached_urls(urls, vision)[0] + ".json")
    sidecar.unlink()  # as if interrupted between the shard and its record
    with pytest.raises(FeatureCacheError, match="missing or stale"):
        cached_urls(urls, vision)
    assert write_cache(urls, vision, dtype="float32", progress=False)["shards_written"] == 1
    assert len(cached_urls(urls, vision)) == len(urls)


def test_fp16_cache_loss_matches_images_closely(shards):
    """The default float16 store changes the first loss by well under a percent."""
    torch.manual_seed(0)
    module = CaptioningModule(
        vision=dict(TINY_VISION),
        llm=dict(TINY_LLM),
        mapper=dict(TINY_MAPPER),
        optimizer=partial(torch.optim.AdamW, lr=3e-3),
        scheduler={},
    ).eval()
    urls = expand_urls(shards["val"])
    write_cache(urls, module.model.vision, dtype="float16", progress=False)
    collator = CaptionCollator(module.model.llm.tokenizer, prefix_length=module.model.prefix_length)
    datamodule = CaptionDataModule(
        shards["train"],
        None,
        module.model.vision.transform,
        collator,
        val_batch_size=64,
        num_workers=0,
        vision=module.model.vision,
    )
    with torch.no_grad():
        image_batch = next(iter(datamodule.loader(urls[0], train=False)))
        cached_batch = next(iter(datamodule.loader(urls[0], train=False, cached=True)))
        assert image_batch["keys"] == cached_batch["keys"] and "pixel_values" not in cached_batch
        loss_images = module.model(*_text(image_batch), pixel_values=image_batch["pixel_values"]).loss
        features = VisualFeatures(cached_batch["visual_tokens"], cached_batch["visual_pooled"])
        loss_cached = module.model(*_text(cached_batch), features=features).loss
    assert float(loss_cached) == pytest.approx(float(loss_images), rel=5e-3)


def _text(batch: dict) -> tuple[torch.Tensor, ...]:
    return batch["input_ids"], batch["attention_mask"], batch["labels"]


def _serial_features(url: str, vision) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """The reference: every decodable image of ``url`` through the tower alone, one at a time."""
    counter = SkipCounter()
    decode = SampleDecoder(vision.transform, counter)
    reference = {}
    for raw in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
        item = decode(raw)
        if item is not None:
            with torch.no_grad():
                features = vision.encode(item["image"].unsqueeze(0))
            reference[item["key"]] = (raw["txt"], features.tokens[0], features.pooled[0])
    return reference


@pytest.mark.parametrize("workers", [0, 2])
def test_worker_pool_cache_holds_the_serial_features_in_shard_order(tmp_path, shards, workers):
    """Decoding in worker processes, batches striding over shards (7 does not divide a shard), and
    the encoder one batch ahead of the writer change neither the features nor the order."""
    vision = build_vision(**TINY_VISION)
    urls = expand_urls(shards["val"]) + expand_urls(shards["train"])[:1]
    for url in urls:
        shutil.copy(url, tmp_path / Path(url).name)
    urls = [str(tmp_path / Path(url).name) for url in urls]
    totals = write_cache(urls, vision, batch_size=7, dtype="float32", workers=workers, progress=False)
    assert totals["shards_written"] == len(urls) and not totals["skipped"]
    for url, cached in zip(urls, cached_urls(urls, vision), strict=True):
        reference = _serial_features(url, vision)
        samples = list(wds.DataPipeline(wds.SimpleShardList([cached]), wds.tarfile_to_samples()))
        assert [s["__key__"] for s in samples] == list(reference)  # every sample, in the shard's order
        for sample in samples:
            caption, tokens, pooled = reference[sample["__key__"]]
            assert sample["txt"] == caption  # stored as it was
            assert torch.allclose(_array(sample["tokens.npy"]), tokens, atol=1e-5)
            assert torch.allclose(_array(sample["pooled.npy"]), pooled, atol=1e-5)


def test_in_memory_cache_equals_the_tower_on_each_batch(shards):
    vision = build_vision(**TINY_VISION)
    batches = []
    for url in expand_urls(shards["val"]):
        reference = _serial_features(url, vision)
        keys = list(reference)
        for start in range(0, len(keys), 5):
            chunk = keys[start : start + 5]
            decode = SampleDecoder(vision.transform, SkipCounter())
            raws = {
                r["__key__"]: r
                for r in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples())
            }
            pixels = torch.stack([decode(raws[k])["image"] for k in chunk])
            batches.append(
                (
                    {
                        "pixel_values": pixels,
                        "captions": [reference[k][0].decode() for k in chunk],
                        "keys": chunk,
                    },
                    reference,
                )
            )
    cache = compute_features(vision, [batch for batch, _ in batches], "test", device="cpu")
    expected_tokens = torch.stack([ref[k][1] for batch, ref in batches for k in batch["keys"]])
    assert cache.keys == [k for batch, _ in batches for k in batch["keys"]]
    assert cache.tokens.dtype == torch.float32 and torch.allclose(cache.tokens, expected_tokens, atol=1e-5)
