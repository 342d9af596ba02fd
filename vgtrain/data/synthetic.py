"""Embedded default dataset: synthetic scenes of coloured shapes.

Each image holds one or two flat-coloured shapes on a plain background and its
caption is a pure function of the rendered pixels (colour, shape, size and
position are all unambiguous), so a captioner can in principle reach zero error.
A few (colour, shape) pairs are held out of train/val for a compositional test.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tqdm import tqdm

from vgtrain.data.shards import brace_pattern, shard_path, write_shard
from vgtrain.files import atomic_write_text

RGB = tuple[int, int, int]

FORMAT_VERSION = 1
BACKGROUND: RGB = (220, 220, 220)
# Saturated, mutually distant colours; no anti-aliasing is used, so pixels are exact.
COLORS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Width of a shape's bounding box as a fraction of the image size.
SIZES: dict[str, float] = {"small": 0.20, "large": 0.38}
VERTICAL: tuple[str, ...] = ("top", "middle", "bottom")
HORIZONTAL: tuple[str, ...] = ("left", "center", "right")
SPLITS: tuple[str, ...] = ("train", "val", "heldout")

ALL_PAIRS: frozenset[tuple[str, str]] = frozenset(product(COLORS, SHAPES))
# One pair per shape and distinct colours: every colour and shape still occurs
# in training with three (colour) / five (shape) other partners.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "diamond"), ("blue", "circle"), ("yellow", "square")}
)
TRAIN_PAIRS: frozenset[tuple[str, str]] = ALL_PAIRS - HELDOUT_PAIRS


@dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    size: str
    cx: float  # bounding-box centre, pixels
    cy: float


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # 1 or 2; with 2, shapes[0] is the left one
    image_size: int

    def to_dict(self) -> dict[str, Any]:
        # Explicit fields rather than dataclasses.asdict (deep-copies, ~4x slower).
        shapes = [
            {"color": s.color, "shape": s.shape, "size": s.size, "cx": s.cx, "cy": s.cy} for s in self.shapes
        ]
        return {"image_size": self.image_size, "shapes": shapes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        return cls(tuple(Shape(**s) for s in data["shapes"]), int(data["image_size"]))


def half_extent(size: str, image_size: int) -> float:
    """Half the side of a shape's bounding square, in pixels."""
    return SIZES[size] * image_size / 2


def _cell_index(coord: float, image_size: int) -> int:
    return min(2, max(0, int(coord * 3 // image_size)))


def _uniform_in_cell(rng: random.Random, cell: int, half: float, image_size: int) -> float:
    """Centre coordinate near the middle of grid cell ``cell`` that keeps the shape inside the image."""
    third = image_size / 3
    nominal = (cell + 0.5) * third
    # Jitter of +-S/15 keeps even a large triangle's pixel centroid (offset by
    # half/3 below its box centre) inside the named cell, with a clear gap between cells.
    jitter = image_size / 15
    lo = max(nominal - jitter, half + 1)
    hi = min(nominal + jitter, image_size - half - 1)
    value = rng.uniform(lo, hi)
    if lo > hi or _cell_index(value, image_size) != cell:
        raise ValueError(f"image_size {image_size} too small for the shape grid")
    return value


def sample_scene(
    rng: random.Random,
    image_size: int,
    allowed_pairs: AbstractSet[tuple[str, str]],
    *,
    required_pairs: AbstractSet[tuple[str, str]] | None = None,
    two_shape_share: float = 0.5,
) -> Scene:
    """Draw a random scene whose objects' (colour, shape) pairs come from ``allowed_pairs``.

    A scene has one shape placed in a 3x3 grid cell, or (``two_shape_share`` of
    them, half by default) two shapes, one per image half. With ``required_pairs`` one object (chosen at
    random) is drawn from those pairs instead, e.g. for the held-out split.
    """
    # Sorted: set iteration order depends on PYTHONHASHSEED, the draws must not.
    allowed = sorted(allowed_pairs)
    required = sorted(required_pairs or ())
    num = 1 if rng.random() < 1.0 - two_shape_share else 2
    special = rng.randrange(num) if required else -1
    pairs = [rng.choice(required if i == special else allowed) for i in range(num)]
    sizes = [rng.choice(tuple(SIZES)) for _ in range(num)]
    if num == 1:
        half = half_extent(sizes[0], image_size)
        cx = _uniform_in_cell(rng, rng.randrange(3), half, image_size)
        cy = _uniform_in_cell(rng, rng.randrange(3), half, image_size)
        return Scene((Shape(*pairs[0], sizes[0], cx, cy),), image_size)
    shapes = []
    mid = image_size / 2
    for i, ((color, kind), size) in enumerate(zip(pairs, sizes, strict=True)):
        half = half_extent(size, image_size)
        # Each shape lies entirely inside its half (1px gap to the midline), so
        # the two never overlap and "left of" is unambiguous.
        lo, hi = (half + 1, mid - half - 1) if i == 0 else (mid + half + 1, image_size - half - 1)
        cx = rng.uniform(lo, hi)
        cy = rng.uniform(half + 1, image_size - half - 1)
        shapes.append(Shape(color, kind, size, cx, cy))
    return Scene(tuple(shapes), image_size)


def _describe(shape: Shape) -> str:
    return f"a {shape.size} {shape.color} {shape.shape}"


def grid_cell(shape: Shape, image_size: int) -> str:
    """The 3x3 cell a shape lies in: "top left", ..., "center" (the middle one)."""
    row = VERTICAL[_cell_index(shape.cy, image_size)]
    col = HORIZONTAL[_cell_index(shape.cx, image_size)]
    return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


def place_phrase(shape: Shape, image_size: int) -> str:
    """Where a shape lies, as captions say it: "at the top left", "in the center"."""
    cell = grid_cell(shape, image_size)
    return "in the center" if cell == "center" else f"at the {cell}"


def describe_placed(shape: Shape, image_size: int) -> str:
    """One shape with its place: "a large red circle at the top left", "... in the center"."""
    return f"{_describe(shape)} {place_phrase(shape, image_size)}"


def caption(scene: Scene) -> str:
    """Caption of ``scene``, derived only from what is drawn.

    One shape: "a large red circle at the top left", "a small blue square in
    the center", "a small green diamond at the middle right".
    Two shapes: "a small red circle left of a large blue square".
    """
    if len(scene.shapes) == 1:
        return describe_placed(scene.shapes[0], scene.image_size)
    left, right = sorted(scene.shapes, key=lambda s: s.cx)
    return f"{_describe(left)} left of {_describe(right)}"


def caption_vocabulary() -> list[str]:
    """Every word that can appear in a caption, sorted."""
    words = {"a", "at", "in", "the", "left", "of"}
    words.update(COLORS, SHAPES, SIZES, VERTICAL, HORIZONTAL)
    return sorted(words)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, image_size: int) -> None:
    r = half_extent(shape.size, image_size)
    x, y = shape.cx, shape.cy
    fill = COLORS[shape.color]
    if shape.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape.shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    elif shape.shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    elif shape.shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape.shape!r}")


def render(scene: Scene, image_size: int) -> Image.Image:
    """Render ``scene`` as an RGB image of ``image_size`` x ``image_size`` pixels."""
    if image_size != scene.image_size:
        # Positions are in pixels of scene.image_size; rescale to keep the layout.
        factor = image_size / scene.image_size
        shapes = tuple(Shape(s.color, s.shape, s.size, s.cx * factor, s.cy * factor) for s in scene.shapes)
        scene = Scene(shapes, image_size)
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)  # no anti-aliasing: colours stay exact
    for shape in scene.shapes:
        _draw_shape(draw, shape, image_size)
    return image


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _split_samples(split: str, count: int, image_size: int, seed: int) -> Iterator[dict[str, Any]]:
    # One RNG stream per split (str seeds hash deterministically via SHA-512),
    # so e.g. changing num_train leaves val and heldout unchanged.
    rng = random.Random(f"vgtrain-shapes:{seed}:{split}")
    allowed = ALL_PAIRS if split == "heldout" else TRAIN_PAIRS
    required = HELDOUT_PAIRS if split == "heldout" else None
    for i in range(count):
        scene = sample_scene(rng, image_size, allowed, required_pairs=required)
        yield {
            "__key__": f"{split}_{i:07d}",
            "png": _png_bytes(render(scene, image_size)),
            "txt": caption(scene),
            "json": json.dumps(scene.to_dict(), sort_keys=True),
        }


def _chunks(items: Iterator[dict[str, Any]], size: int, total: int, bar: tqdm) -> Iterator[Iterator[Any]]:
    """Split ``items`` into consecutive shards of ``size``, ticking ``bar`` per sample."""

    def shard(n: int) -> Iterator[dict[str, Any]]:
        for _ in range(n):
            yield next(items)
            bar.update(1)

    for start in range(0, total, size):
        yield shard(min(size, total - start))


def _layout(out_dir: Path, counts: dict[str, int], samples_per_shard: int) -> dict[str, Any]:
    shards = {
        s: [shard_path(out_dir, s, i).name for i in range(math.ceil(n / samples_per_shard))]
        for s, n in counts.items()
    }
    patterns = {s: brace_pattern(out_dir, s, len(names)) if names else None for s, names in shards.items()}
    return {"shards": shards, "patterns": patterns}


def write_shapes_dataset(
    out_dir: Path,
    *,
    num_train: int = 20000,
    num_val: int = 1000,
    num_heldout: int = 1000,
    image_size: int = 64,
    samples_per_shard: int = 5000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the train/val/heldout shards and ``manifest.json`` into ``out_dir``.

    Deterministic in ``seed`` (byte-identical shards). If a manifest with the same
    options already exists and its shards are present, it is returned as is.
    The manifest is written last, so its presence means the dataset is complete.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    out_dir = Path(out_dir).resolve()  # absolute URL patterns in the manifest
    counts = {"train": num_train, "val": num_val, "heldout": num_heldout}
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"sample counts must be >= 0, got {counts}")
    options = {
        "format_version": FORMAT_VERSION,
        "image_size": image_size,
        "num_heldout": num_heldout,
        "num_train": num_train,
        "num_val": num_val,
        "samples_per_shard": samples_per_shard,
        "seed": seed,
    }
    layout = _layout(out_dir, counts, samples_per_shard)
    existing = _complete_dataset(out_dir, options, layout)
    if existing is not None:
        return existing
    with tqdm(total=sum(counts.values()), desc="shapes dataset", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            samples = _split_samples(split, counts[split], image_size, seed)
            chunks = _chunks(samples, samples_per_shard, counts[split], bar)
            for name, chunk in zip(layout["shards"][split], chunks, strict=True):
                write_shard(out_dir / name, chunk)

    manifest = {
        "format": "vgtrain-shapes",
        "format_version": FORMAT_VERSION,
        "options": options,
        "counts": counts,
        "patterns": layout["patterns"],
        "shards": layout["shards"],
        "heldout_pairs": [list(p) for p in sorted(HELDOUT_PAIRS)],
        "vocabulary": caption_vocabulary(),
    }
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _complete_dataset(
    out_dir: Path, options: dict[str, Any], layout: dict[str, Any], extra_files: tuple[str, ...] = ()
) -> dict[str, Any] | None:
    """The manifest of a complete dataset written with ``options`` into this folder (not moved),
    all its shards and ``extra_files`` present; else None, with any stale manifest removed (so a
    crash while rewriting cannot leave it vouching for mixed shards) and the folder made."""
    manifest_path = out_dir / "manifest.json"
    existing = _load_manifest(manifest_path)
    names = [name for split in layout["shards"].values() for name in split] + list(extra_files)
    if (
        existing is not None
        and existing.get("options") == options
        and existing.get("patterns") == layout["patterns"]
        and all((out_dir / name).is_file() for name in names)
    ):
        return existing
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    return None


def _load_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
