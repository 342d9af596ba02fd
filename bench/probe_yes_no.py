"""Linear probes at the answer position of the VQA demo's "Is the <shape> <colour>?" questions.

For one-shape scenes of a `experiment=demo_vqa` run's training shards, it reads the tiny LM's
hidden state at the position that predicts the answer, after each block, and fits a least-squares
linear probe (70 % of the questions; accuracy on the other 30 %) for the object's colour, the asked
colour and the answer (yes/no). docs/vqa_demo.md quotes what it printed:

    vgtrain export RUN_DIR/checkpoints/last.ckpt probe-export
    .venv/bin/python bench/probe_yes_no.py probe-export 'DATA/shapes_vqa/train-00000[01].tar'
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import random
import tarfile
from collections.abc import Iterator

import torch
from PIL import Image

from vgtrain.data.synthetic import COLORS
from vgtrain.decode import VisualDecoder
from vgtrain.decode.chat import renderer_for


def shard_samples(pattern: str) -> Iterator[dict[str, bytes]]:
    """Each sample of the shards matching ``pattern``: its members' bytes by extension."""
    for shard in sorted(glob.glob(pattern)):
        with tarfile.open(shard) as tar:
            files: dict[str, dict[str, bytes]] = {}
            for member in tar:
                key, ext = member.name.rsplit(".", 1)
                files.setdefault(key, {})[ext] = tar.extractfile(member).read()
        yield from files.values()


def questions(pattern: str, limit: int) -> list[tuple[bytes, str, str, str, str]]:
    """(png, question, answer, object colour, asked colour) for is-colour questions in one-shape
    scenes (those asked a position question), the object's colour read from the caption."""
    items = []
    for sample in shard_samples(pattern):
        conversations = json.loads(sample["json"])["conversations"]
        colours = [w for w in sample["txt"].decode().replace(",", " ").split() if w in COLORS]
        if len(colours) != 1 or not any(c[1].get("type") == "position" for c in conversations):
            continue
        for question, answer in (c[:2] for c in conversations):
            asked = question["content"].rstrip("?").split()[-1]
            if (
                answer.get("type") == "yes_no"
                and question["content"].startswith("Is the")
                and asked in COLORS
            ):
                items.append((sample["png"], question["content"], answer["content"], colours[0], asked))
    random.Random(0).shuffle(items)
    return items[:limit]


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, classes: int) -> float:
    split = int(len(labels) * 0.7)
    x = torch.cat([features, torch.ones(len(features), 1)], 1).double()
    targets = torch.nn.functional.one_hot(labels, classes).double()
    weights = torch.linalg.lstsq(x[:split], targets[:split], driver="gelsd").solution
    return float(((x[split:] @ weights).argmax(1) == labels[split:]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", help="a `vgtrain export` folder of an experiment=demo_vqa run")
    parser.add_argument("shards", help="glob of the run's training shards")
    parser.add_argument("--limit", type=int, default=1500)
    args = parser.parse_args()
    decoder = VisualDecoder.from_export(args.export)
    model = decoder.model
    tokenizer = model.llm.tokenizer
    renderer = renderer_for(decoder)
    items = questions(args.shards, args.limit)
    yes, no = (tokenizer(f" {w}", add_special_tokens=False).input_ids[0] for w in ("yes", "no"))
    hidden: list[list[torch.Tensor]] = []
    correct = 0
    with torch.no_grad():
        for png, question, answer, _, _ in items:
            image = model.vision.transform(Image.open(io.BytesIO(png)).convert("RGB"))[None]
            encoded = renderer.encode([{"role": "user", "content": question}], add_generation_prompt=True)
            ids = torch.tensor([encoded.ids])
            embeds, _ = model.input_embeddings(
                model.features(image), ids, torch.ones_like(ids), torch.tensor([encoded.image_index])
            )
            out = model.llm.model(inputs_embeds=embeds, output_hidden_states=True)
            hidden.append([state[0, -1] for state in out.hidden_states])
            logits = out.logits[0, -1]
            correct += (logits[yes] > logits[no]) == (answer == "yes")
    print(f"{len(items)} questions; the model answers {correct / len(items):.2f} of them right")
    names = sorted(COLORS)
    colour = torch.tensor([names.index(item[3]) for item in items])
    asked = torch.tensor([names.index(item[4]) for item in items])
    truth = torch.tensor([item[2] == "yes" for item in items]).long()
    for layer in range(len(hidden[0])):
        features = torch.stack([states[layer] for states in hidden]).float()
        name = "embeddings" if layer == 0 else f"after block {layer}"
        print(
            f"{name:>14}: object colour {probe_accuracy(features, colour, len(names)):.2f}  "
            f"asked colour {probe_accuracy(features, asked, len(names)):.2f}  "
            f"yes/no {probe_accuracy(features, truth, 2):.2f}"
        )


if __name__ == "__main__":
    main()
