"""Linear probes of what each visual token holds in the VQA demo's two-shape scenes.

For each object of a two-shape scene (one per image half, so never two objects in one token of
the 4x4 grid) it takes the token at the object's centre, from the frozen tower's output and from
the mapper's output (the LLM's prefix embedding), and fits least-squares probes (70 % of the
objects; accuracy on the rest) for that object's colour and shape and for the other object's.
A token that holds its own object's colour but not the other's lets the LLM tell which object is
which. docs/vqa_demo.md quotes what it printed:

    vgtrain export RUN_DIR/checkpoints/last.ckpt probe-export
    .venv/bin/python bench/probe_binding.py probe-export 'DATA/shapes_vqa/train-000000.tar'
"""

from __future__ import annotations

import argparse
import io
import json

import torch
from PIL import Image
from probe_yes_no import probe_accuracy, shard_samples

from vgtrain.data.synthetic import COLORS, SHAPES
from vgtrain.decode import VisualDecoder


def two_shape_scenes(pattern: str, limit: int) -> list[tuple[bytes, list[dict]]]:
    scenes = []
    for sample in shard_samples(pattern):
        shapes = json.loads(sample["json"])["shapes"]
        if len(shapes) == 2:
            scenes.append((sample["png"], shapes))
    return scenes[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", help="a `vgtrain export` folder of an experiment=demo_vqa run")
    parser.add_argument("shards", help="glob of the run's shards")
    parser.add_argument("--limit", type=int, default=1500)
    args = parser.parse_args()
    colours = sorted(COLORS)
    model = VisualDecoder.from_export(args.export).model
    rows, cols = model.vision.grid_size
    size = model.vision.image_size
    features: dict[str, list[torch.Tensor]] = {"tower token": [], "prefix embedding": []}
    labels: dict[str, list[int]] = {"own colour": [], "other colour": [], "own shape": [], "other shape": []}
    scenes = two_shape_scenes(args.shards, args.limit)
    with torch.no_grad():
        for png, shapes in scenes:
            image = model.vision.transform(Image.open(io.BytesIO(png)).convert("RGB"))[None]
            visual = model.features(image)
            prefix = model.mapper(visual)[0]
            for own, other in ((0, 1), (1, 0)):
                shape = shapes[own]
                token = int(shape["cy"] * rows // size) * cols + int(shape["cx"] * cols // size)
                features["tower token"].append(visual.tokens[0, token].float())
                features["prefix embedding"].append(prefix[token].float())
                labels["own colour"].append(colours.index(shape["color"]))
                labels["other colour"].append(colours.index(shapes[other]["color"]))
                labels["own shape"].append(SHAPES.index(shape["shape"]))
                labels["other shape"].append(SHAPES.index(shapes[other]["shape"]))
    print(f"{len(scenes)} two-shape scenes, {2 * len(scenes)} objects")
    for name, values in features.items():
        x = torch.stack(values)
        probes = "  ".join(
            f"{what} {probe_accuracy(x, torch.tensor(y), len(colours if 'colour' in what else SHAPES)):.2f}"
            for what, y in labels.items()
        )
        print(f"{name:>16}: {probes}")


if __name__ == "__main__":
    main()
