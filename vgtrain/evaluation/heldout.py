"""Held-out captioning evaluation: greedy captions vs references, and a shuffled-image control.

``exact_match``: the decoded caption equals the reference (case and whitespace normalised).
``token_accuracy``: teacher-forced argmax accuracy over caption tokens and EOS.
With ``shuffle_images`` every caption is paired with another sample's image (the batch is rolled
by one), so a model that reads the image should collapse to chance.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from vgtrain.decode import generate_captions
from vgtrain.models import VisualPrefixLM


def normalize_caption(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


@dataclass
class CaptionEvaluation:
    exact_match: float
    token_accuracy: float
    num_samples: int
    examples: list[dict[str, str]] = field(default_factory=list)

    def metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}/exact_match": self.exact_match,
            f"{prefix}/token_accuracy": self.token_accuracy,
            f"{prefix}/num_samples": float(self.num_samples),
        }


@torch.no_grad()
def evaluate_captions(
    model: VisualPrefixLM,
    batches: Iterable[dict[str, Any]],
    *,
    prompt: str = "",
    max_new_tokens: int = 24,
    shuffle_images: bool = False,
    keep_examples: int = 8,
    description: str = "evaluating",
) -> CaptionEvaluation:
    was_training = model.training
    model.eval()
    matches = samples = correct = tokens = 0
    examples: list[dict[str, str]] = []
    try:
        for batch in tqdm(batches, desc=description, unit="batch", leave=False):
            features = model.features(pixel_values=batch["pixel_values"])
            if shuffle_images:
                order = torch.roll(torch.arange(features.pooled.shape[0]), 1)
                features = features.index_select(order)
            out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], features=features)
            correct += int(out.num_correct)
            tokens += int(out.num_tokens)
            predictions = generate_captions(model, features, prompt=prompt, max_new_tokens=max_new_tokens)
            for key, reference, prediction in zip(batch["keys"], batch["captions"], predictions, strict=True):
                matches += normalize_caption(prediction) == normalize_caption(reference)
                samples += 1
                if len(examples) < keep_examples:
                    examples.append({"key": str(key), "reference": reference, "prediction": prediction})
    finally:
        model.train(was_training)
    if samples == 0:
        raise ValueError(f"{description}: the evaluation split yielded no samples")
    return CaptionEvaluation(matches / samples, correct / max(tokens, 1), samples, examples)


def format_examples(examples: list[dict[str, str]]) -> str:
    width = max([len("reference")] + [len(e["reference"]) for e in examples])
    lines = [f"{'reference':<{width}} | generated", f"{'-' * width}-+-{'-' * width}"]
    for example in examples:
        mark = (
            ""
            if normalize_caption(example["reference"]) == normalize_caption(example["prediction"])
            else "   (x)"
        )
        lines.append(f"{example['reference']:<{width}} | {example['prediction']}{mark}")
    return "\n".join(lines)
