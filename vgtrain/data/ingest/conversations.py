"""Instruction and VQA sources -> records whose ``{key}.json`` holds ``conversations``.

- ``llava``: LLaVA-style instruction JSON, a list of ``{image, conversations: [{from: human|gpt,
  value}]}`` (``<image>`` marks the image's place, as in LLaVA); items about the same image are
  one record with several conversations.
- ``vqav2``: a VQAv2 questions file and its annotations file (``--format vqav2 Q.json A.json``);
  each question becomes a one-turn conversation whose answer is the ``multiple_choice_answer``,
  with all ten answers kept as references (``answers``) and the answer type as ``type``.

Bad items are counted by reason: ``no_image`` (no image named), ``missing_image`` (not found
under the image roots), ``no_assistant_turn``, ``turns_out_of_order``, ``empty_answer``,
``bad_turn`` (a turn that is not a role and text), ``no_answer`` (a question without annotation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vgtrain.data.ingest.records import ImageRef, IngestError, Record, SkipLog, make_key
from vgtrain.models.chat_template import ConversationError, normalize_messages


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IngestError(f"{path}: cannot read it as JSON ({error})") from error


def conversation_kind(path: Path) -> str | None:
    """``llava`` (a list of items with ``conversations``), ``vqav2`` (a questions or annotations
    file), or None (another format)."""
    data = _load_json(path)
    if isinstance(data, list) and data and isinstance(data[0], dict) and "conversations" in data[0]:
        return "llava"
    if isinstance(data, dict) and ("questions" in data or "annotations" in data and "images" not in data):
        return "vqav2"
    return None


def _find(roots: list[Path], names: list[str]) -> Path | None:
    return next((root / name for root in roots for name in names if (root / name).is_file()), None)


def check_turns(turns: Any) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The conversation with roles normalised (extra keys kept), or ``(None, reason)``."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return None, "bad_turn"
    try:
        normalized = normalize_messages(turns)
    except ConversationError as error:
        return None, "turns_out_of_order" if "out of order" in str(error) else "bad_turn"
    answers = [t["content"] for t in normalized if t["role"] == "assistant"]
    if not answers:
        return None, "no_assistant_turn"
    if not all(a.strip() for a in answers):
        return None, "empty_answer"
    extras = [{k: v for k, v in t.items() if k not in ("from", "value", "role", "content")} for t in turns]
    return [{**n, **e} for n, e in zip(normalized, extras, strict=True)], None


def _record(records: dict[str, Record], file: Path, root: Path | None, split: str | None) -> Record:
    relative = str(file.relative_to(root)) if root is not None else file.name
    key = make_key(str(Path(relative).with_suffix("")))
    if key not in records:
        records[key] = Record(key, ImageRef(file), [], split, {"conversations": []})
    return records[key]


def read_llava(path: Path, image_roots: list[Path], log: SkipLog) -> list[Record]:
    data = _load_json(path)
    if not isinstance(data, list):
        raise IngestError(f"{path}: LLaVA instruction data is a JSON list of items")
    roots = image_roots or [path.parent]
    records: dict[str, Record] = {}
    for index, item in enumerate(data):
        where = f"{path} item {index}" + (f" (id {item.get('id')})" if isinstance(item, dict) else "")
        image = item.get("image") if isinstance(item, dict) else None
        if not image:
            log.skip("no_image", where)
            continue
        file = _find(roots, [str(image)])
        if file is None:
            log.skip("missing_image", f"{where}: {image} not found under {', '.join(map(str, roots))}")
            continue
        turns, problem = check_turns(item.get("conversations"))
        if problem:
            log.skip(problem, where)
            continue
        root = next((r for r in roots if file.is_relative_to(r)), None)
        _record(records, file, root, None).meta["conversations"].append(turns)
    return list(records.values())


def read_vqav2(paths: list[Path], image_roots: list[Path], log: SkipLog) -> list[Record]:
    """Questions + annotations files (either order); images ``COCO_{subtype}_{id:012d}.jpg``
    found under the image roots (or their ``{subtype}/`` folders)."""
    if len(paths) != 2:
        raise IngestError("--format vqav2 takes two files: the questions .json and the annotations .json")
    loaded = [_load_json(p) for p in paths]
    questions_data = next((d for d in loaded if isinstance(d, dict) and "questions" in d), None)
    annotations_data = next((d for d in loaded if isinstance(d, dict) and "annotations" in d), None)
    if questions_data is None or annotations_data is None:
        raise IngestError(
            f"{paths[0]}, {paths[1]}: need one file with 'questions' and one with 'annotations'"
        )
    subtype = str(questions_data.get("data_subtype") or annotations_data.get("data_subtype") or "")
    split = (
        "train"
        if "train" in subtype
        else "val"
        if "val" in subtype
        else "test"
        if "test" in subtype
        else None
    )
    annotations = {a.get("question_id"): a for a in annotations_data["annotations"] if isinstance(a, dict)}
    roots = image_roots or [paths[0].parent]
    records: dict[str, Record] = {}
    for question in questions_data["questions"]:
        where = f"question {question.get('question_id')} (image {question.get('image_id')})"
        image_id = question.get("image_id")
        if image_id is None:
            log.skip("no_image", where)
            continue
        name = f"COCO_{subtype}_{int(image_id):012d}.jpg"
        file = _find(roots, [name, f"{subtype}/{name}", f"{int(image_id):012d}.jpg"])
        if file is None:
            log.skip("missing_image", f"{where}: {name} not found under {', '.join(map(str, roots))}")
            continue
        annotation = annotations.get(question.get("question_id"))
        if annotation is None:
            log.skip("no_answer", where)
            continue
        answers = [
            str(a.get("answer", "")).strip() for a in annotation.get("answers") or [] if isinstance(a, dict)
        ]
        best = str(annotation.get("multiple_choice_answer") or "").strip()
        if not best or not str(question.get("question") or "").strip():
            log.skip("empty_answer" if not best else "bad_turn", where)
            continue
        turns = [
            {"role": "user", "content": str(question["question"]).strip()},
            {
                "role": "assistant",
                "content": best,
                "answers": answers or [best],
                "type": str(annotation.get("answer_type") or "all"),
                "question_type": annotation.get("question_type"),
                "question_id": question.get("question_id"),
            },
        ]
        _record(records, file, None, split).meta["conversations"].append(turns)
    return list(records.values())
