"""COCO-format captions: the official ``captions_*.json`` (``images`` + ``annotations``) with an
image root, optionally split by Karpathy's ``dataset_coco.json``; or Karpathy's file on its own
(its ``sentences`` are the captions, its ``split`` the split; ``restval`` counts as train)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from vgtrain.data.ingest.records import (
    ImageRef,
    IngestError,
    Record,
    RecordSet,
    SkipLog,
    add_caption,
    clean_caption,
    make_key,
    normalize_split,
)


@lru_cache(maxsize=4)
def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IngestError(f"{path}: cannot read it as JSON ({error})") from error
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise IngestError(f"{path}: not a COCO captions file or a Karpathy split file (no 'images' list)")
    return data


def json_kind(path: Path) -> str:
    """``coco`` (has ``annotations``) or ``karpathy`` (images carry ``sentences``)."""
    data = _load(path)
    if "annotations" in data:
        return "coco"
    if data["images"] and "sentences" in data["images"][0]:
        return "karpathy"
    raise IngestError(
        f"{path}: neither COCO captions ('annotations') nor a Karpathy split file ('sentences')"
    )


def _find(roots: list[Path], names: list[str]) -> Path | None:
    return next((root / name for root in roots for name in names if (root / name).is_file()), None)


def karpathy_splits(path: Path) -> dict[Any, tuple[str | None, str]]:
    """COCO image id (and file name) -> (split, sub-folder) from a Karpathy split file."""
    splits: dict[Any, tuple[str | None, str]] = {}
    for image in _load(path)["images"]:
        entry = (normalize_split(image.get("split")), str(image.get("filepath") or ""))
        if "cocoid" in image:
            splits[image["cocoid"]] = entry
        if "filename" in image:
            splits[str(image["filename"])] = entry
    return splits


def read_coco(
    paths: list[Path], image_roots: list[Path], log: SkipLog, karpathy: Path | None = None
) -> list[Record]:
    """Records of one or more COCO captions files (e.g. train2014 and val2014 together)."""
    splits = karpathy_splits(karpathy) if karpathy else None
    found = RecordSet(log)
    for path in paths:
        data = _load(path)
        if "annotations" not in data:
            raise IngestError(f"{path}: no 'annotations' list; is it a COCO captions file?")
        roots = image_roots or [path.parent]
        images = {image.get("id"): image for image in data["images"]}
        captions: dict[Any, list[tuple[Any, Any]]] = {}
        for annotation in data["annotations"]:
            image_id = annotation.get("image_id")
            if image_id not in images:
                log.skip(
                    "unknown_image_id", f"{path}: annotation {annotation.get('id')} names image {image_id}"
                )
                continue
            captions.setdefault(image_id, []).append((annotation.get("id"), annotation.get("caption")))
        for image_id, image in sorted(images.items(), key=lambda item: str(item[1].get("file_name"))):
            name = str(image.get("file_name") or "")
            where = f"{path}: image {image_id} ({name})"
            split, folder = None, ""
            if splits is not None:
                if image_id not in splits and name not in splits:
                    log.skip("not_in_split_file", where)
                    continue
                split, folder = splits.get(image_id) or splits[name]
            file = _find(roots, [name, f"{folder}/{name}"] if folder else [name])
            if file is None:
                log.skip("missing_image", f"{where} not found under {', '.join(map(str, roots))}")
                continue
            record = Record(
                make_key(Path(name).with_suffix("").as_posix()),
                ImageRef(file),
                [],
                split,
                {"source": name, "coco_id": image_id},
            )
            for annotation_id, raw in captions.get(image_id, []):
                caption, reason = clean_caption("" if raw is None else str(raw))
                if reason:
                    log.skip(reason, f"{path}: annotation {annotation_id}")
                else:
                    add_caption(record, caption, log, f"{path}: annotation {annotation_id}")
            if not record.captions:
                log.skip("missing_caption", where)
                continue
            found.add(record, where)
    return found.records()


def read_karpathy(path: Path, image_roots: list[Path], log: SkipLog) -> list[Record]:
    """Records of a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``, ...);
    images are looked up as ``root/filepath/filename``, then ``root/filename``."""
    roots = image_roots or [path.parent]
    found = RecordSet(log)
    for image in _load(path)["images"]:
        name, folder = str(image.get("filename") or ""), str(image.get("filepath") or "")
        where = f"{path}: {folder}/{name}" if folder else f"{path}: {name}"
        file = _find(roots, [f"{folder}/{name}", name] if folder else [name])
        if file is None:
            log.skip("missing_image", f"{where} not found under {', '.join(map(str, roots))}")
            continue
        meta = {"source": f"{folder}/{name}" if folder else name, "coco_id": image.get("cocoid")}
        record = Record(
            make_key(Path(name).with_suffix("").as_posix()),
            ImageRef(file),
            [],
            normalize_split(image.get("split")),
            meta,
        )
        for sentence in image.get("sentences", []):
            caption, reason = clean_caption(str(sentence.get("raw", "")))
            if reason:
                log.skip(reason, f"{where}: sentence {sentence.get('sentid')}")
            else:
                add_caption(record, caption, log, where)
        if not record.captions:
            log.skip("missing_caption", where)
            continue
        found.add(record, where)
    return found.records()
