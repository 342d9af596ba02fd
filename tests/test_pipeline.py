import io
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vgtrain.data.collate import CaptionCollator
from vgtrain.data.pipeline import caption_dataset, expand_urls
from vgtrain.data.shards import write_shard
from vgtrain.models.backbones.tiny import build_tiny_tokenizer


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _transform(image: Image.Image):
    import torchvision.transforms.functional as TF

    return TF.to_tensor(image.resize((16, 16)))


def _dataset(urls: str, *, train: bool, batch_size: int = 4):
    collate = CaptionCollator(build_tiny_tokenizer(), prefix_length=2)
    return caption_dataset(urls, transform=_transform, collate=collate, batch_size=batch_size, train=train)


def test_bad_samples_are_skipped_and_counted(tmp_path: Path):
    samples = [{"__key__": f"good{i}", "png": _png((i * 20, 0, 0)), "txt": f"caption {i}"} for i in range(6)]
    samples += [
        {"__key__": "corrupt", "png": b"\x89PNG\r\n\x1a\nnot really a png", "txt": "broken image"},
        {"__key__": "empty", "png": _png((0, 0, 255)), "txt": "   "},
        {"__key__": "nocaption", "png": _png((0, 255, 0))},
        {"__key__": "noimage", "txt": "caption without image"},
    ]
    shard = tmp_path / "mixed-000000.tar"
    write_shard(shard, samples)

    batches = list(_dataset(str(shard), train=False))
    keys = [key for batch in batches for key in batch["keys"]]
    assert sorted(keys) == sorted(f"good{i}" for i in range(6))
    skipped = Counter()
    for batch in batches:
        skipped.update(batch["skipped"])
    assert skipped == {"bad_image": 1, "empty_caption": 1, "missing_caption": 1, "missing_image": 1}
    assert batches[0]["pixel_values"].shape == (4, 3, 16, 16)


def test_shards_round_trip_through_the_pipeline(shapes_dir: Path):
    import json

    manifest = json.loads((shapes_dir / "manifest.json").read_text())
    batches = list(_dataset(manifest["patterns"]["val"], train=False, batch_size=16))
    assert sum(len(b["captions"]) for b in batches) == manifest["counts"]["val"]
    assert all(c.startswith("a ") for b in batches for c in b["captions"])


def test_training_stream_is_endless_and_shuffled(shapes_dir: Path):
    import json

    pattern = json.loads((shapes_dir / "manifest.json").read_text())["patterns"]["train"]
    stream = iter(_dataset(pattern, train=True, batch_size=64))
    keys = [key for _ in range(6) for key in next(stream)["keys"]]  # 384 > 256 samples: wraps around
    assert len(keys) == 384
    assert keys[:64] != sorted(keys[:64])


def test_missing_shard_is_named(tmp_path: Path):
    write_shard(tmp_path / "d-000000.tar", [{"__key__": "a", "png": _png((1, 2, 3)), "txt": "x"}])
    with pytest.raises(FileNotFoundError, match="d-000001.tar"):
        expand_urls(str(tmp_path / "d-{000000..000001}.tar"))


def test_local_globs_expand_to_their_shards_in_order(tmp_path: Path, monkeypatch):
    for index in (1, 0, 2):
        write_shard(
            tmp_path / f"train-{index:06d}.tar", [{"__key__": "a", "png": _png((1, 2, 3)), "txt": "x"}]
        )
    expected = [str(tmp_path / f"train-{index:06d}.tar") for index in range(3)]
    assert expand_urls(str(tmp_path / "train-*.tar")) == expected
    monkeypatch.chdir(tmp_path)  # relative, as a user types it
    assert expand_urls("train-*.tar::train-00000[01].tar") == [Path(u).name for u in expected] + [
        "train-000000.tar",
        "train-000001.tar",
    ]
    with pytest.raises(FileNotFoundError, match="val-\\*.tar"):
        expand_urls("val-*.tar")


def test_every_caption_of_an_image_reaches_the_batch_as_its_references(tmp_path: Path):
    import json

    samples = [
        {"__key__": "two", "png": _png((255, 0, 0)), "txt": "a red square",
         "json": json.dumps({"captions": ["a red square", "a  square that is red "]})},
        {"__key__": "one", "png": _png((0, 0, 255)), "txt": "a blue square"},
    ]  # fmt: skip
    shard = tmp_path / "refs-000000.tar"
    write_shard(shard, samples)
    (batch,) = list(_dataset(str(shard), train=False))
    assert batch["captions"] == ["a red square", "a blue square"]  # evaluation: the .txt caption
    assert batch["references"] == [["a red square", "a square that is red"], ["a blue square"]]
