"""VQA accuracy of a demo_vqa evaluation by question type and number of shapes in the scene.

Joins `vgtrain eval task=vqa`'s `predictions.jsonl` with the scenes stored in the evaluated
split's shards (each sample's json lists its shapes). docs/vqa_demo.md quotes what it
printed for the shipped run:

    vgtrain eval task=vqa export=EXPORT data=shapes_vqa decode=greedy
    .venv/bin/python bench/vqa_by_scene.py RUN/predictions.jsonl 'DATA/shapes_vqa/val-*.tar'
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import tarfile


def shapes_per_scene(pattern: str) -> dict[str, int]:
    """Sample key -> number of shapes, from the shards' json members."""
    counts: dict[str, int] = {}
    shards = sorted(glob.glob(pattern))
    if not shards:
        raise SystemExit(f"no shard matches {pattern!r}")
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    scene = json.load(tar.extractfile(member))
                    counts[member.name[: -len(".json")]] = len(scene["shapes"])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", help="predictions.jsonl of `vgtrain eval task=vqa`")
    parser.add_argument("shards", help="glob of the evaluated split's shards")
    args = parser.parse_args()
    shapes = shapes_per_scene(args.shards)
    scores: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    with open(args.predictions) as lines:
        for line in lines:
            row = json.loads(line)
            if row["key"] not in shapes:
                raise SystemExit(
                    f"{row['key']} of {args.predictions} is in none of the shards {args.shards!r}"
                )
            scores[(row["type"], shapes[row["key"]])].append(row["score"])
    everything = [s for values in scores.values() for s in values]
    print(f"{len(everything)} answers, VQA accuracy {sum(everything) / len(everything):.3f}")
    print(f"{'type':>10} | {'one shape':>16} | {'two shapes':>16}")
    for kind in sorted({kind for kind, _ in scores}):
        cells = []
        for num in (1, 2):
            values = scores.get((kind, num), [])
            cells.append(f"{sum(values) / len(values):.3f} of {len(values):4d}" if values else "-")
        print(f"{kind:>10} | {cells[0]:>16} | {cells[1]:>16}")


if __name__ == "__main__":
    main()
