"""VQA and dialogue evaluation: every assistant turn of every conversation is answered greedily
from the image and the conversation so far (the reference history, as VQA dialogue benchmarks
do), then scored with VQA accuracy (several references) or exact match (one), overall and per
question type (an assistant turn's ``type``). With ``shuffle_images`` each conversation is asked
about another sample's image (the batch rolled by one): what the language prior alone reaches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from vgtrain.decode.chat import generate_answers
from vgtrain.metrics.vqa import answer_score, exact_match
from vgtrain.models import VisualPrefixLM
from vgtrain.models.backbones.vision import VisualFeatures
from vgtrain.models.chat_template import ConversationRenderer, normalize_messages

UNTYPED = "all"


@dataclass
class Question:
    """One assistant turn to answer: the conversation up to it, its references and type."""

    row: int  # the sample (image) in the batch
    history: list[dict[str, str]]
    references: list[str]
    kind: str
    key: str


@dataclass
class VQAEvaluation:
    accuracy: float
    exact_match: float
    num_questions: int
    by_type: dict[str, tuple[float, int]]  # type -> (accuracy, count)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {
            f"{prefix}/vqa_accuracy": self.accuracy,
            f"{prefix}/exact_match": self.exact_match,
            f"{prefix}/num_questions": float(self.num_questions),
        }
        out.update({f"{prefix}/vqa_accuracy/{kind}": acc for kind, (acc, _) in sorted(self.by_type.items())})
        return out


def questions_of(batch: dict[str, Any]) -> list[Question]:
    """Every assistant turn of every conversation in a collated batch."""
    out: list[Question] = []
    for row, (key, conversations) in enumerate(zip(batch["keys"], batch["conversations"], strict=True)):
        for conversation in conversations:
            turns = normalize_messages(conversation)
            for index, turn in enumerate(conversation):
                if turns[index]["role"] != "assistant":
                    continue
                listed = [a for a in turn.get("answers") or [] if isinstance(a, str) and a.strip()]
                out.append(
                    Question(
                        row,
                        turns[:index],
                        listed or [turns[index]["content"]],
                        str(turn.get("type") or UNTYPED),
                        str(key),
                    )
                )
    return out


def batch_features(model: VisualPrefixLM, batch: dict[str, Any]) -> VisualFeatures:
    if "visual_tokens" in batch:
        return VisualFeatures(batch["visual_tokens"], batch["visual_pooled"])
    return model.features(pixel_values=batch["pixel_values"])


@torch.no_grad()
def evaluate_vqa(
    model: VisualPrefixLM,
    batches: Iterable[dict[str, Any]],
    renderer: ConversationRenderer,
    *,
    max_new_tokens: int = 16,
    shuffle_images: bool = False,
    keep_examples: int = 8,
    chunk_size: int = 256,
    description: str = "evaluating",
) -> VQAEvaluation:
    was_training = model.training
    model.eval()
    scores: dict[str, list[float]] = defaultdict(list)
    exact: list[float] = []
    examples: list[dict[str, Any]] = []
    try:
        for batch in tqdm(batches, desc=description, unit="batch", leave=False):
            features = batch_features(model, batch)
            if shuffle_images:
                features = features.index_select(torch.roll(torch.arange(features.pooled.shape[0]), 1))
            questions = questions_of(batch)
            for start in range(0, len(questions), chunk_size):
                chunk = questions[start : start + chunk_size]
                rows = torch.tensor([q.row for q in chunk], device=features.pooled.device)
                encodings = [renderer.encode(q.history, add_generation_prompt=True) for q in chunk]
                answers = generate_answers(
                    model, features.index_select(rows), encodings, max_new_tokens=max_new_tokens
                )
                for question, answer in zip(chunk, answers, strict=True):
                    scores[question.kind].append(answer_score(answer, question.references))
                    exact.append(exact_match(answer, question.references[:1]))
                    if len(examples) < keep_examples:
                        examples.append(example(question, answer))
    finally:
        model.train(was_training)
    total = sum(len(values) for values in scores.values())
    if total == 0:
        raise ValueError(f"{description}: the split has no conversations to answer")
    by_type = {kind: (sum(values) / len(values), len(values)) for kind, values in scores.items()}
    accuracy = sum(sum(values) for values in scores.values()) / total
    return VQAEvaluation(accuracy, sum(exact) / total, total, by_type, examples)


def example(question: Question, answer: str) -> dict[str, Any]:
    asked = question.history[-1]["content"].replace("<image>", "").strip()
    return {
        "key": question.key,
        "type": question.kind,
        "question": asked,
        "history": [dict(turn) for turn in question.history[:-1]],
        "answer": answer,
        "references": question.references,
        "score": answer_score(answer, question.references),
    }


def format_type_table(results: dict[str, VQAEvaluation]) -> str:
    """Accuracy per question type (rows) for each evaluated split (columns)."""
    names = list(results)
    kinds = sorted({kind for result in results.values() for kind in result.by_type})
    header = f"{'question type':<14}" + "".join(f"{name:>22}" for name in names)
    lines = [header, "-" * len(header)]
    for kind in [*kinds, "overall"]:
        cells = []
        for name in names:
            result = results[name]
            if kind == "overall":
                acc, count = result.accuracy, result.num_questions
            elif kind in result.by_type:
                acc, count = result.by_type[kind]
            else:
                cells.append(f"{'-':>22}")
                continue
            cells.append(f"{acc:>14.3f} ({count:>5})")
        lines.append(f"{kind:<14}" + "".join(cells))
    return "\n".join(lines)


def format_vqa_examples(examples: list[dict[str, Any]]) -> str:
    lines = []
    for item in examples:
        before = " / ".join(f"{t['role']}: {t['content']}" for t in item["history"])
        context = f" [after: {before}]" if before else ""
        mark = "" if item["score"] >= 1.0 else "   (x)"
        lines.append(
            f"{item['question']}{context} -> {item['answer']!r} (ref {item['references'][0]!r}){mark}"
        )
    return "\n".join(lines)


def evaluate_vqa_splits(
    model: VisualPrefixLM,
    datamodule: Any,
    renderer: ConversationRenderer,
    split_urls: dict[str, str | None],
    shuffled_control: str | None,
    *,
    max_new_tokens: int = 16,
    keep_examples: int = 8,
) -> dict[str, float]:
    """Evaluates each split with shards (``datamodule.loader(urls, train=False)`` batches) and
    the shuffled-image control on ``shuffled_control``; prints the per-type table and examples;
    returns flat metrics."""
    runs = [(split, urls, False) for split, urls in split_urls.items() if urls]
    if shuffled_control and split_urls.get(shuffled_control):
        runs.append((f"{shuffled_control}_shuffled", split_urls[shuffled_control], True))
    results: dict[str, VQAEvaluation] = {}
    for name, urls, shuffled in runs:
        results[name] = evaluate_vqa(
            model,
            datamodule.loader(urls, train=False),
            renderer,
            max_new_tokens=max_new_tokens,
            shuffle_images=shuffled,
            keep_examples=keep_examples,
            description=f"evaluating {name}",
        )
        if not shuffled:
            print(f"\n{name}: {results[name].num_questions} answers, greedy decoding")
            print(format_vqa_examples(results[name].examples))
    if results:
        print("\nVQA accuracy by question type (answers in parentheses)\n" + format_type_table(results))
    return {key: value for name, result in results.items() for key, value in result.metrics(name).items()}


# -- `vgtrain eval task=vqa`: an export answers a split's questions ---------------------------


def split_questions(key: str, conversations: list[list[dict[str, Any]]]) -> list[Question]:
    """Every assistant turn of one image's conversations (``row`` unused: 0)."""
    return questions_of({"keys": [key], "conversations": [conversations]})


def answer_split(
    decoder: Any,
    samples: Iterable[tuple[str, Any, list[list[dict[str, Any]]]]],
    *,
    strategy: str = "greedy",
    options: dict[str, Any] | None = None,
    batch_size: int = 32,
    keep_images: int = 24,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Answers every assistant turn of ``(key, PIL image, conversations)`` samples with the
    export's decoder (``VisualDecoder.chat``: the training template). Returns one row per
    answer (question, history, answer, references, type, score, exact_match) and, for the
    report, the first ``keep_images`` answers with their image as a data URI."""
    from vgtrain.evaluation.report import image_data_uri

    rows: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    pending: list[tuple[Question, Any]] = []

    def flush() -> None:
        if not pending:
            return
        results = decoder.chat(
            [image for _, image in pending], [q.history for q, _ in pending], strategy, **(options or {})
        )
        for (question, image), result in zip(pending, results, strict=True):
            row = {
                **example(question, result.text),
                "exact_match": exact_match(result.text, question.references[:1]),
            }
            rows.append(row)
            if len(examples) < keep_images:
                examples.append({**row, "image": image_data_uri(image)})
        pending.clear()

    for key, image, conversations in samples:
        for question in split_questions(key, conversations):
            pending.append((question, image))
            if len(pending) >= batch_size:
                flush()
    flush()
    if not rows:
        raise ValueError("the split has no conversations to answer (no sample's .json has 'conversations')")
    return rows, examples


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Overall VQA accuracy and exact match, and VQA accuracy per question type."""
    by_type: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        by_type[row["type"]].append(row["score"])
    metrics = {
        "vqa_accuracy": sum(r["score"] for r in rows) / len(rows),
        "exact_match": sum(r["exact_match"] for r in rows) / len(rows),
        "num_questions": float(len(rows)),
    }
    metrics.update({f"vqa_accuracy/{kind}": sum(v) / len(v) for kind, v in sorted(by_type.items())})
    return metrics


def report_cards(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Answers as report cards: the image, the question (after the history) and the answer in
    bold, the references below."""
    cards = []
    for item in examples:
        before = " / ".join(f"{t['role']}: {t['content']}" for t in item["history"])
        asked = f"[{before}] " if before else ""
        cards.append(
            {
                "key": f"{item['key']} ({item['type']}, score {item['score']:.2f})",
                "image": item["image"],
                "prediction": f"{asked}Q: {item['question']} A: {item['answer']}",
                "references": item["references"],
            }
        )
    return cards
