"""Caption metrics as the field reports them: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE (the COCO
caption evaluation), CLIPScore and RefCLIPScore.

:func:`caption_metrics` tokenizes like the reference (PTB tokens, punctuation removed) and returns
every COCO metric: a metric that cannot be computed here is ``None`` with its reason in ``skipped``.
Pure Python apart from METEOR and SPICE, which run the reference Java tools when present.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vgtrain.metrics import java
from vgtrain.metrics.clipscore import ClipScorer, clip_scores
from vgtrain.metrics.ngram import bleu, cider_d, rouge_l
from vgtrain.metrics.tokenizer import tokenize, tokenize_caption

METRIC_KEYS = (
    "bleu_1",
    "bleu_2",
    "bleu_3",
    "bleu_4",
    "meteor",
    "rouge_l",
    "cider",
    "spice",
    "clipscore",
    "refclipscore",
)
# Cheap enough to compute during training (no Java, no CLIP).
FAST_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider")


@dataclass
class MetricReport:
    values: dict[str, float | None] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it is None
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)  # image id -> metric -> value

    def skip(self, metric: str, reason: str) -> None:
        self.values[metric] = None
        self.skipped[metric] = reason


def caption_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Iterable[str]],
    *,
    metrics: Iterable[str] = ("bleu", "meteor", "rouge_l", "cider", "spice"),
) -> MetricReport:
    """COCO caption metrics of one prediction per image against its references (raw text; tokenized
    here). ``metrics`` picks among bleu, meteor, rouge_l, cider, spice."""
    wanted = set(metrics)
    unknown = wanted - {"bleu", "meteor", "rouge_l", "cider", "spice"}
    if unknown:
        raise ValueError(
            f"unknown caption metrics {sorted(unknown)}; known: bleu, meteor, rouge_l, cider, spice"
        )
    keys = [str(key) for key in predictions]
    candidates = tokenize({str(k): [v] for k, v in predictions.items()})
    refs = tokenize({str(k): list(v) for k, v in references.items() if str(k) in candidates})
    report = MetricReport(per_image={key: {} for key in keys})
    if not keys:
        for metric in METRIC_KEYS[:8]:
            report.skip(metric, "no predictions to score")
        return report
    if "bleu" in wanted:
        corpus, per_image = bleu(candidates, refs)
        for k, value in enumerate(corpus):
            report.values[f"bleu_{k + 1}"] = value
            for key, score in zip(keys, per_image[k], strict=True):
                report.per_image[key][f"bleu_{k + 1}"] = score
    for name, function in (("rouge_l", rouge_l), ("cider", cider_d)):
        if name in wanted:
            score, scores = function(candidates, refs)
            report.values[name] = score
            for key, value in zip(keys, scores, strict=True):
                report.per_image[key][name] = value
    for name, function in (("meteor", java.meteor), ("spice", java.spice)):
        if name in wanted:
            value, reason = function(candidates, refs)
            if reason is None:
                report.values[name] = value
            else:
                report.skip(name, reason)
    return report


__all__ = [
    "FAST_METRICS",
    "METRIC_KEYS",
    "ClipScorer",
    "MetricReport",
    "bleu",
    "caption_metrics",
    "cider_d",
    "clip_scores",
    "rouge_l",
    "tokenize",
    "tokenize_caption",
]
