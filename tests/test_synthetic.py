"""Tests for vgtrain.data.synthetic: scene sampling, rendering, captions and shards."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from vgtrain.data import synthetic as syn

SMALL = {"num_train": 50, "num_val": 20, "num_heldout": 20, "samples_per_shard": 16, "progress": False}


def _read_split(manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    return list(wds.WebDataset(manifest["patterns"][split], shardshuffle=False))


def _shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("shapes")
    return out, syn.write_shapes_dataset(out, seed=3, **SMALL)


def test_vocabulary_constants() -> None:
    assert len(syn.COLORS) == 6 and len(set(syn.COLORS.values())) == 6
    assert len(syn.HELDOUT_PAIRS) == 4 and syn.HELDOUT_PAIRS <= syn.ALL_PAIRS
    # Each colour and each shape still occurs in training with other partners.
    assert {c for c, _ in syn.TRAIN_PAIRS} == set(syn.COLORS)
    assert {s for _, s in syn.TRAIN_PAIRS} == set(syn.SHAPES)


def test_sample_scene_respects_pairs_and_layout() -> None:
    rng = random.Random(0)
    allowed = {("red", "circle"), ("blue", "square")}
    counts = {1: 0, 2: 0}
    for _ in range(400):
        scene = syn.sample_scene(rng, 64, allowed)
        counts[len(scene.shapes)] += 1
        assert all((s.color, s.shape) in allowed for s in scene.shapes)
        if len(scene.shapes) == 2:
            left, right = scene.shapes
            assert left.cx < 32 < right.cx
    assert 140 < counts[1] < 260  # about half one-shape scenes
    required = syn.sample_scene(rng, 64, syn.ALL_PAIRS, required_pairs=syn.HELDOUT_PAIRS)
    assert any((s.color, s.shape) in syn.HELDOUT_PAIRS for s in required.shapes)


def test_caption_grammar() -> None:
    one = syn.Scene((syn.Shape("red", "circle", "large", 12.0, 10.0),), 64)
    assert syn.caption(one) == "a large red circle at the top left"
    centre = syn.Scene((syn.Shape("blue", "square", "small", 32.0, 33.0),), 64)
    assert syn.caption(centre) == "a small blue square in the center"
    edge = syn.Scene((syn.Shape("green", "diamond", "small", 53.0, 30.0),), 64)
    assert syn.caption(edge) == "a small green diamond at the middle right"
    two = syn.Scene(
        (syn.Shape("red", "circle", "small", 10, 40), syn.Shape("blue", "square", "large", 48, 20)), 64
    )
    assert syn.caption(two) == "a small red circle left of a large blue square"
    vocab = set(syn.caption_vocabulary())
    rng = random.Random(1)
    for _ in range(300):
        assert set(syn.caption(syn.sample_scene(rng, 64, syn.ALL_PAIRS)).split()) <= vocab


def _foreground(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image)
    return np.any(pixels != np.array(syn.BACKGROUND, dtype=np.uint8), axis=-1)


@pytest.mark.parametrize("image_size", [64, 96])
def test_render_matches_one_shape_caption(image_size: int) -> None:
    rng = random.Random(7)
    seen_cells = set()
    for _ in range(300):
        scene = syn.sample_scene(rng, image_size, syn.ALL_PAIRS)
        if len(scene.shapes) != 1:
            continue
        words = syn.caption(scene).split()
        _, size, color, shape = words[:4]
        row, col = ("middle", "center") if words[4] == "in" else (words[6], words[7])
        image = syn.render(scene, image_size)
        assert image.mode == "RGB" and image.size == (image_size, image_size)
        mask = _foreground(image)
        ys, xs = np.nonzero(mask)
        cell = image_size / 3
        assert syn.VERTICAL[int(ys.mean() // cell)] == row
        assert syn.HORIZONTAL[int(xs.mean() // cell)] == col
        # Every shape pixel has exactly the named colour (no anti-aliasing).
        assert {tuple(p) for p in np.asarray(image)[mask]} == {syn.COLORS[color]}
        width = xs.max() - xs.min() + 1
        assert abs(width - syn.SIZES[size] * image_size) <= 2, (shape, width)
        seen_cells.add((row, col))
    assert len(seen_cells) == 9


def test_render_two_shapes_left_object_first() -> None:
    rng = random.Random(11)
    for _ in range(200):
        scene = syn.sample_scene(rng, 64, syn.ALL_PAIRS)
        if len(scene.shapes) != 2:
            continue
        left_color = syn.caption(scene).split()[2]
        right_color = syn.caption(scene).split()[-2]
        pixels = np.asarray(syn.render(scene, 64))
        mask = _foreground(Image.fromarray(pixels))
        assert {tuple(p) for p in pixels[:, :32][mask[:, :32]]} == {syn.COLORS[left_color]}
        assert {tuple(p) for p in pixels[:, 32:][mask[:, 32:]]} == {syn.COLORS[right_color]}


def test_manifest_and_roundtrip(dataset: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = dataset
    assert manifest["counts"] == {"train": 50, "val": 20, "heldout": 20}
    assert sorted(map(tuple, manifest["heldout_pairs"])) == sorted(syn.HELDOUT_PAIRS)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for split, count in manifest["counts"].items():
        pattern = manifest["patterns"][split]
        assert Path(pattern).is_absolute()
        assert [Path(p).name for p in braceexpand(pattern)] == manifest["shards"][split]
        samples = _read_split(manifest, split)
        assert len(samples) == count
        assert [s["__key__"] for s in samples] == [f"{split}_{i:07d}" for i in range(count)]
        for sample in samples:
            image = Image.open(io.BytesIO(sample["png"]))
            scene = syn.Scene.from_dict(json.loads(sample["json"]))
            assert image.size == (64, 64) and image.mode == "RGB"
            assert sample["txt"].decode("utf-8") == syn.caption(scene)
            # The stored image is exactly the rendering of the stored scene.
            assert np.array_equal(np.asarray(image), np.asarray(syn.render(scene, 64)))


def test_heldout_pairs_split(dataset: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = dataset
    for split in ("train", "val"):
        for sample in _read_split(manifest, split):
            shapes = json.loads(sample["json"])["shapes"]
            assert all((s["color"], s["shape"]) not in syn.HELDOUT_PAIRS for s in shapes)
    for sample in _read_split(manifest, "heldout"):
        shapes = json.loads(sample["json"])["shapes"]
        assert any((s["color"], s["shape"]) in syn.HELDOUT_PAIRS for s in shapes)


def test_same_seed_identical_bytes(dataset: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, manifest = dataset
    again = syn.write_shapes_dataset(tmp_path, seed=3, **SMALL)
    assert _shard_bytes(tmp_path) == _shard_bytes(out)
    assert again["options"] == manifest["options"]
    captions = [s["txt"] for s in _read_split(manifest, "train")]
    assert [s["txt"] for s in _read_split(again, "train")] == captions


def test_different_seed_differs(dataset: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    _, manifest = dataset
    other = syn.write_shapes_dataset(tmp_path, seed=4, **SMALL)
    for split in ("train", "val", "heldout"):
        assert [s["txt"] for s in _read_split(other, split)] != [
            s["txt"] for s in _read_split(manifest, split)
        ]


def test_val_independent_of_num_train(dataset: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, _ = dataset
    syn.write_shapes_dataset(tmp_path, seed=3, **{**SMALL, "num_train": 7})
    for name in ("val-000000.tar", "heldout-000000.tar"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_idempotent(tmp_path: Path) -> None:
    first = syn.write_shapes_dataset(tmp_path, seed=0, **SMALL)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert syn.write_shapes_dataset(tmp_path, seed=0, **SMALL) == first
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    # Different options regenerate; no temporary files are left behind.
    changed = syn.write_shapes_dataset(tmp_path, seed=1, **SMALL)
    assert changed["options"]["seed"] == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # A missing shard also triggers regeneration.
    (tmp_path / "val-000000.tar").unlink()
    assert syn.write_shapes_dataset(tmp_path, seed=1, **SMALL) == changed
    assert (tmp_path / "val-000000.tar").is_file()
