"""`vgtrain shards`: dirty sources -> exact counts in the manifest, every good item once, atomic."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import tiny_datamodule, tiny_module
from tests.ingest_fixtures import (
    CONVERTED,
    GOOD,
    SKIPPED,
    TABLE_SKIPPED,
    write_dirty_folder,
    write_dirty_table,
)
from vgtrain.cli import main
from vgtrain.data.shards import write_shard


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard in ``out``, by key; a key seen twice fails."""
    samples: dict[str, dict[str, bytes]] = {}
    manifest = json.loads((out / "manifest.json").read_text())
    for names in manifest["shards"].values():
        for name in names:
            with tarfile.open(out / name) as tar:
                seen_here: dict[str, dict[str, bytes]] = {}
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    seen_here.setdefault(key, {})[ext] = tar.extractfile(member).read()
            for key, parts in seen_here.items():
                assert key not in samples, f"{key} is in two shards"
                samples[key] = parts
    return samples


def _shards(*args: str) -> int:
    return main(["shards", *args, "--no-progress"])


def test_dirty_folder_gives_exact_counts_and_every_good_item_once(tmp_path, capsys):
    source = write_dirty_folder(tmp_path / "src")
    out = tmp_path / "out"
    assert (
        _shards(
            str(source),
            "--out",
            str(out),
            "--samples-per-shard",
            "4",
            "--val-fraction",
            "0.3",
            "--workers",
            "2",
        )
        == 0
    )
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == SKIPPED
    assert manifest["converted"] == CONVERTED
    assert manifest["counts"]["written"] == len(GOOD)
    assert sum(manifest["counts"]["captions"].values()) == sum(len(c) for c in GOOD.values())
    assert set(manifest["shards"]) == {"train", "val"} and manifest["counts"]["images"]["val"] > 0
    assert f"data.train_urls='{manifest['patterns']['train']}'" in printed
    samples = _samples(out)
    assert set(samples) == set(GOOD)
    for key, parts in samples.items():
        assert json.loads(parts["json"])["captions"] == GOOD[key]
        assert parts["txt"].decode() == GOOD[key][0]
        image_ext = next(ext for ext in ("jpg", "png") if ext in parts)
        with Image.open(io.BytesIO(parts[image_ext])) as image:
            assert image.mode == "RGB"
    with Image.open(io.BytesIO(samples["rgba"]["jpg"])) as image:
        assert image.size == (40, 40)
    # The same output for any number of workers; a finished folder is not overwritten by mistake.
    again = tmp_path / "again"
    assert (
        _shards(
            str(source),
            "--out",
            str(again),
            "--samples-per-shard",
            "4",
            "--val-fraction",
            "0.3",
            "--workers",
            "1",
        )
        == 0
    )
    for name in manifest["shards"]["train"]:
        assert (again / name).read_bytes() == (out / name).read_bytes()
    assert _shards(str(source), "--out", str(out)) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_interrupted_run_leaves_no_half_written_shard(tmp_path, monkeypatch):
    import vgtrain.data.ingest.writer as writer

    source = write_dirty_folder(tmp_path / "src")
    out = tmp_path / "out"
    real, calls = writer.prepare_job, []

    def interrupted(job):
        calls.append(job)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(writer, "prepare_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _shards(str(source), "--out", str(out), "--samples-per-shard", "2", "--workers", "1")
    left = sorted(path.name for path in out.iterdir())
    assert left and "manifest.json" not in left and not any(".tmp-" in name for name in left)
    for name in left:  # whatever is there is a complete tar
        with tarfile.open(out / name) as tar:
            assert len(tar.getmembers()) == 6
    monkeypatch.setattr(writer, "prepare_job", real)
    (out / "train-000099.tar").write_bytes(b"stale")  # from a run that wrote more shards
    assert _shards(str(source), "--out", str(out), "--samples-per-shard", "2", "--workers", "1") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert not (out / "train-000099.tar").exists()
    assert set(_samples(out)) == set(GOOD) and manifest["skipped"] == SKIPPED


def test_csv_with_columns_splits_and_several_captions(tmp_path):
    source = write_dirty_table(tmp_path / "src")
    out = tmp_path / "out"
    args = ["--file-column", "image", "--caption-column", "text", "--split-column", "split"]
    assert _shards(str(source / "captions.csv"), "--out", str(out), *args, "--workers", "1") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == TABLE_SKIPPED
    assert manifest["converted"] == {"converted_cmyk": 1}
    assert manifest["counts"]["images"] == {"train": 2, "val": 1}
    samples = _samples(out)
    assert json.loads(samples["img_cat"]["json"])["captions"] == ["a cat on a mat", "a cat, asleep"]
    assert set(samples) == {"img_cat", "img_cmyk", "img_dog"}
    # A misnamed column is a one-line error naming the file and the columns it has.
    assert (
        _shards(str(source / "captions.csv"), "--out", str(tmp_path / "x"), "--caption-column", "caption")
        == 1
    )


def test_coco_json_with_karpathy_split(tmp_path):
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    for index in range(4):
        Image.new("RGB", (24, 24), (index * 50, 0, 0)).save(
            root / "val2014" / f"COCO_val2014_{index:012d}.jpg"
        )
    images = [
        {"id": index, "file_name": f"COCO_val2014_{index:012d}.jpg"} for index in range(5)
    ]  # 4 is missing
    annotations = [
        {"id": 10 * i + j, "image_id": i, "caption": f"picture {i} caption {j}"}
        for i in range(5)
        for j in range(2)
    ]
    annotations.append({"id": 999, "image_id": 77, "caption": "no such image"})
    (root / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    splits = ["train", "restval", "val", "test", "train"]
    karpathy = {
        "images": [
            {
                "filepath": "val2014",
                "filename": img["file_name"],
                "cocoid": img["id"],
                "split": split,
                "sentences": [],
            }
            for img, split in zip(images[:3] + images[4:], splits[:3] + splits[4:], strict=True)
        ]
    }  # image 3 is in no split
    (root / "dataset_coco.json").write_text(json.dumps(karpathy))
    out = tmp_path / "out"
    args = ["--image-root", str(root), "--karpathy", str(root / "dataset_coco.json"), "--workers", "1"]
    assert _shards(str(root / "captions_val2014.json"), "--out", str(out), *args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"missing_image": 1, "not_in_split_file": 1, "unknown_image_id": 1}
    assert manifest["counts"]["images"] == {"train": 2, "val": 1}
    assert manifest["counts"]["captions"] == {"train": 4, "val": 2}


def test_img2dataset_output_is_validated_and_resharded(tmp_path):
    source = tmp_path / "i2d"
    source.mkdir()

    def jpeg(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (20, 20), (value, value, 0)).save(buffer, format="JPEG")
        return buffer.getvalue()

    two = json.dumps(["photo 1", "another view of 1"])  # img2dataset saves a JSON-encoded column as is
    write_shard(
        source / "00000.tar",
        [
            {"__key__": f"0000{i:05d}", "jpg": jpeg(i), "txt": f"photo {i}", "json": meta}
            for i, meta in enumerate(
                [{"split": "val"}, {"split": "train", "captions": two}, *[{"split": "train"}] * 3]
            )
        ],
    )
    write_shard(
        source / "00001.tar",
        [
            {"__key__": "000100000", "jpg": jpeg(9), "txt": "fine", "json": {"split": "restval"}},
            {"__key__": "000100001", "jpg": jpeg(8)},  # no caption
            {"__key__": "000000001", "jpg": jpeg(7), "txt": "a key already taken"},
            {"__key__": "000100002", "jpg": b"garbage", "txt": "not an image", "json": {"split": "train"}},
        ],
    )
    (source / "00000_stats.json").write_text(
        json.dumps({"count": 6, "successes": 5, "failed_to_download": 1})
    )
    out = tmp_path / "out"
    args = ["--workers", "1", "--samples-per-shard", "3", "--max-side", "16", "--split-column", "split"]
    assert _shards(str(source), "--out", str(out), *args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "img2dataset"
    assert manifest["skipped"] == {"duplicate_key": 1, "missing_caption": 1, "not_an_image": 1}
    assert manifest["counts"]["images"] == {"train": 5, "val": 1} and len(manifest["shards"]["train"]) == 2
    assert manifest["counts"]["captions"] == {"train": 6, "val": 1}
    assert manifest["source"]["img2dataset_stats"]["failed_to_download"] == 1
    samples = _samples(out)
    assert json.loads(samples["000000001"]["json"])["captions"] == ["photo 1", "another view of 1"]
    with Image.open(io.BytesIO(samples["000000003"]["jpg"])) as image:
        assert image.size == (16, 16)  # --max-side resized it


def test_written_shards_train_and_every_good_item_reaches_the_model(tmp_path):
    """The shards go through the training pipeline: nothing skipped there, every good item read
    once per pass, several captions per image drawn in training; a few steps train."""

    import torch

    from tests.conftest import quiet_trainer
    from vgtrain.training.callbacks import TrainingStats

    out = tmp_path / "out"
    assert (
        _shards(
            str(write_dirty_folder(tmp_path / "src")),
            "--out",
            str(out),
            "--samples-per-shard",
            "3",
            "--workers",
            "1",
        )
        == 0
    )
    pattern = json.loads((out / "manifest.json").read_text())["patterns"]["train"]
    module = tiny_module()
    datamodule = tiny_datamodule(module, pattern, batch_size=4, shuffle_buffer=8)
    keys, skipped = [], {}
    for batch in datamodule.loader(pattern, train=False):
        keys += batch["keys"]
        skipped.update(batch["skipped"])
    assert sorted(keys) == sorted(GOOD) and not skipped
    drawn = set()
    for _, batch in zip(range(30), datamodule.loader(pattern, train=True), strict=False):
        drawn.update(
            caption
            for key, caption in zip(batch["keys"], batch["captions"], strict=True)
            if key == "sub_multi"
        )
    assert drawn == set(GOOD["sub_multi"])  # both captions of the two-caption image are used
    stats = TrainingStats(log_every_n_steps=1)
    trainer = quiet_trainer(tmp_path, 4, enable_checkpointing=False, limit_val_batches=0, callbacks=[stats])
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 4 and torch.isfinite(trainer.callback_metrics["train/loss"])


def _photos_with_images_in_a_subfolder(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rows = ["file,caption"]
    for index in range(4):
        Image.new("RGB", (24, 24), (60 * index, 0, 0)).save(root / "images" / f"p{index}.jpg")
        rows.append(f"p{index}.jpg,photo number {index}")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


def test_images_in_the_only_subfolder_are_found_and_the_manifest_says_so(tmp_path, capsys):
    source = _photos_with_images_in_a_subfolder(tmp_path / "photos")
    out = tmp_path / "out"
    assert _shards(str(source), "--out", str(out), "--val-fraction", "0", "--workers", "1") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["images"] == {"train": 4} and manifest["skipped"] == {}
    (note,) = manifest["notes"]
    assert str(source / "images") in note and "--image-root" in note
    assert f"note: {note}" in capsys.readouterr().out


def test_no_images_found_names_a_path_looked_up_and_suggests_image_root(tmp_path, capsys):
    source = _photos_with_images_in_a_subfolder(tmp_path / "photos")
    (source / "other").mkdir()
    for index in range(4):  # two subfolders hold the images: no guess is made
        Image.new("RGB", (24, 24)).save(source / "other" / f"p{index}.jpg")
    assert _shards(str(source), "--out", str(tmp_path / "out"), "--workers", "1") == 1
    error = capsys.readouterr().err
    assert "missing_image': 4" in error and "--image-root" in error
    assert f"p0.jpg not found under {source}" in error
