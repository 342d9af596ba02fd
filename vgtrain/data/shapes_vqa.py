"""Embedded VQA demo data: questions and two-turn dialogues about the shapes scenes.

The scenes, images and captions are those of :mod:`vgtrain.data.synthetic`; every answer is a pure
function of the scene. Question types: ``color``, ``shape``, ``size``, ``position`` (one-shape
scenes), ``count``, ``relation`` (left/right, two-shape scenes), ``yes_no``, and ``followup``
(the second turn of a dialogue, which says "it" for the object of the first turn, so it can only
be answered with the history). Each type has training phrasings and held-out ones: the ``val``
split asks with the training phrasings about unseen scenes, the ``phrasing`` split with held-out
phrasings only.

Shards hold ``{key}.png``, ``{key}.txt`` (the caption) and ``{key}.json``: the scene,
``conversations`` (several per image; assistant turns carry ``type``) and ``regions`` (each shape's
box and words, for ``model.grounding``). The questions themselves
are drawn by :mod:`vgtrain.data.shapes_questions`; this module writes the splits.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vgtrain.data.shapes_questions import PHRASINGS, QUESTION_TYPES, TRAINING_ONLY_TYPES, QuestionMaker
from vgtrain.data.shards import write_shard
from vgtrain.data.synthetic import (
    ALL_PAIRS,
    Scene,
    _chunks,
    _complete_dataset,
    _layout,
    _png_bytes,
    caption,
    half_extent,
    render,
    sample_scene,
)
from vgtrain.files import atomic_write_text

# 2: samples' .json carry `regions` (boxes and words, for the grounding loss)
FORMAT_VERSION = 2
CORPUS_FILE = "corpus.txt"
SPLITS: tuple[str, ...] = ("train", "val", "phrasing")


def _scenes(
    split: str,
    count: int,
    image_size: int,
    seed: int,
    per_image: int,
    dialogue_share: float,
    type_weights: dict[str, float] | None = None,
    two_shape_share: float = 0.5,
) -> Iterator[tuple[Scene, list[list[dict[str, str]]]]]:
    """(scene, its conversations) for a split; one RNG stream per split, as the captioning data."""
    rng = random.Random(f"vgtrain-shapes-vqa:{seed}:{split}")
    maker = QuestionMaker(rng, heldout_phrasing=split == "phrasing", type_weights=type_weights)
    for _ in range(count):
        scene = sample_scene(rng, image_size, ALL_PAIRS, two_shape_share=two_shape_share)
        yield scene, [maker.conversation(scene, rng.random() < dialogue_share) for _ in range(per_image)]


def _split_samples(
    split: str, scenes: Iterator[tuple[Scene, list[list[dict[str, str]]]]], image_size: int
) -> Iterator[dict[str, Any]]:
    """The shard samples of a split's scenes (see :func:`_scenes`)."""
    for i, (scene, conversations) in enumerate(scenes):
        yield {
            "__key__": f"{split}_{i:07d}",
            "png": _png_bytes(render(scene, image_size)),
            "txt": caption(scene),
            "json": json.dumps(
                {**scene.to_dict(), "conversations": conversations, "regions": regions(scene)}, sort_keys=True
            ),
        }


def regions(scene: Scene) -> list[dict[str, Any]]:
    """Each shape's box (fractions of the image) and words, for the grounding loss
    (vgtrain/models/grounding.py): its size, colour and kind."""
    size = scene.image_size
    boxes = []
    for shape in scene.shapes:
        r = half_extent(shape.size, size)
        box = [max(0.0, (shape.cx - r) / size), max(0.0, (shape.cy - r) / size)]
        box += [min(1.0, (shape.cx + r) / size), min(1.0, (shape.cy + r) / size)]
        boxes.append({"box": [round(v, 4) for v in box], "words": [shape.size, shape.color, shape.shape]})
    return boxes


def _training_only(phrasing_key: str) -> bool:
    return any(phrasing_key == kind or phrasing_key.startswith(f"{kind}_") for kind in TRAINING_ONLY_TYPES)


def write_corpus(path: Path, image_size: int, seed: int, dialogue_share: float) -> None:
    """Text to learn the tiny tokenizer's merges from (``model.llm.tokenizer_corpus``): training
    conversations in their natural word frequencies, plus every held-out phrasing once, so the
    demo's questions are a few tokens each instead of one per byte."""
    lines: list[str] = []
    for scene, conversations in _scenes("corpus", 2000, image_size, seed, 2, dialogue_share):
        lines.append(caption(scene))
        lines.extend(turn["content"] for conversation in conversations for turn in conversation)
    # Training-only types' phrasings (keys "present_color", "verify_exists", ...) stay out: the
    # corpus (so the tokenizer, so every run) is the same whether or not such types exist.
    lines += [p for key, (_, heldout) in PHRASINGS.items() if not _training_only(key) for p in heldout]
    lines.append("Q: A:")
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_shapes_vqa_dataset(
    out_dir: Path,
    *,
    num_train: int = 16000,
    num_val: int = 500,
    num_phrasing: int = 500,
    image_size: int = 64,
    samples_per_shard: int = 5000,
    seed: int = 0,
    conversations_per_image: int = 6,
    eval_conversations_per_image: int = 4,
    dialogue_share: float = 0.3,
    train_type_weights: dict[str, float] | None = None,
    train_two_shape_share: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Writes train/val/phrasing shards and ``manifest.json`` (last: its presence means the
    dataset is complete). Deterministic in the options; an existing complete dataset with the
    same options is returned as it is.

    ``train_type_weights`` (question type -> weight, default 1) skews the training split's
    one-turn questions towards some types (those a model learns last); val and phrasing keep
    every type equally likely, so scores stay comparable. Training-only types
    (:data:`TRAINING_ONLY_TYPES`, default weight 0) are asked only where given a weight.

    ``train_two_shape_share`` (default 0.5, as val and phrasing) is the share of training scenes
    with two shapes: one-shape scenes are learnt first, two-shape ones (which object is "the
    circle") last."""
    weights = dict(train_type_weights or {})
    # follow-ups come with dialogues
    askable = [kind for kind in QUESTION_TYPES if kind != "followup"] + list(TRAINING_ONLY_TYPES)
    unknown = sorted(set(weights) - set(askable))
    if unknown or any(weight < 0 for weight in weights.values()):
        raise ValueError(
            f"data.synthetic.train_type_weights: unknown type(s) {unknown} or a negative weight; "
            f"types: {', '.join(askable)}"
        )
    share = 0.5 if train_two_shape_share is None else train_two_shape_share
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"data.synthetic.train_two_shape_share must lie in [0, 1], got {share}")
    out_dir = Path(out_dir).resolve()
    counts = {"train": num_train, "val": num_val, "phrasing": num_phrasing}
    options = {
        "format_version": FORMAT_VERSION,
        "image_size": image_size,
        "counts": counts,
        "samples_per_shard": samples_per_shard,
        "seed": seed,
        "conversations_per_image": conversations_per_image,
        "eval_conversations_per_image": eval_conversations_per_image,
        "dialogue_share": dialogue_share,
    }
    if weights:  # only when set: datasets written before the option keep their options
        options["train_type_weights"] = dict(sorted(weights.items()))
    if train_two_shape_share is not None:
        options["train_two_shape_share"] = train_two_shape_share
    layout = _layout(out_dir, counts, samples_per_shard)
    existing = _complete_dataset(out_dir, options, layout, extra_files=(CORPUS_FILE,))
    if existing is not None:
        return existing
    per_split: dict[str, Callable[[], Iterator[dict[str, Any]]]] = {
        split: (
            lambda split=split: _split_samples(
                split,
                _scenes(
                    split,
                    counts[split],
                    image_size,
                    seed,
                    conversations_per_image if split == "train" else eval_conversations_per_image,
                    dialogue_share,
                    (weights or None) if split == "train" else None,
                    share if split == "train" else 0.5,
                ),
                image_size,
            )
        )
        for split in SPLITS
    }
    write_corpus(out_dir / CORPUS_FILE, image_size, seed, dialogue_share)
    with tqdm(total=sum(counts.values()), desc="shapes VQA dataset", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            chunks = _chunks(per_split[split](), samples_per_shard, counts[split], bar)
            for name, chunk in zip(layout["shards"][split], chunks, strict=True):
                write_shard(out_dir / name, chunk)
    manifest = {
        "format": "vgtrain-shapes-vqa",
        "format_version": FORMAT_VERSION,
        "options": options,
        "counts": counts,
        "patterns": layout["patterns"],
        "shards": layout["shards"],
        "question_types": list(QUESTION_TYPES),
        "num_shards": {split: math.ceil(n / samples_per_shard) for split, n in counts.items()},
        "corpus": CORPUS_FILE,
    }
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
