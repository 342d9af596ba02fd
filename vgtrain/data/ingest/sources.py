"""Sources of image-caption pairs -> :class:`Record` lists; bad items are counted, never fatal.

- ``folder``: images with same-named ``.txt`` files (one caption per line), searched recursively;
  this also reads img2dataset's ``files`` output format.
- ``table``: a ``.csv``/``.tsv``/``.jsonl`` with a file column and a caption column (names
  configurable); rows naming the same file add captions to that image.
- ``img2dataset``: a folder of WebDataset tars as img2dataset writes them (``{key}.jpg``,
  ``{key}.txt``, ``{key}.json``); members are validated and re-sharded.
- ``coco`` / ``karpathy``: see :mod:`vgtrain.data.ingest.coco`.
"""

from __future__ import annotations

import csv
import json
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vgtrain.data.ingest.records import (
    IMAGE_SUFFIXES,
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

TABLE_NAMES = ("captions.csv", "captions.tsv", "captions.jsonl")
TAR_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


def read_folder(root: Path, log: SkipLog) -> list[Record]:
    """Images and same-named ``.txt`` caption files under ``root`` (any depth)."""
    images: dict[str, list[Path]] = {}
    texts: dict[str, Path] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stem = path.relative_to(root).with_suffix("").as_posix()
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            images.setdefault(stem, []).append(path)
        elif suffix == ".txt":
            texts[stem] = path
    found = RecordSet(log)
    for stem in sorted(images.keys() | texts.keys()):
        paths, text = images.get(stem, []), texts.get(stem)
        if not paths:
            log.skip("missing_image", f"{text}: no image with this name")
            continue
        if text is None:
            log.skip("missing_caption", f"{paths[0]}: no {Path(stem).name}.txt beside it")
            continue
        record = Record(
            make_key(stem), ImageRef(paths[0]), [], meta={"source": paths[0].relative_to(root).as_posix()}
        )
        captions = _caption_lines(text.read_bytes(), log, str(text))
        if not captions:
            continue
        for caption in captions:
            add_caption(record, caption, log, str(text))
        for extra in paths[1:]:  # cat.jpg and cat.png share cat.txt: one image per key
            log.skip("duplicate_key", f"{extra} (same name as {paths[0].name})")
        found.add(record, str(paths[0]))
    return found.records()


def _caption_lines(raw: bytes, log: SkipLog, where: str) -> list[str]:
    """Captions of a .txt file, one per non-blank line; the whole file is counted once if bad."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        log.skip("invalid_utf8", where)
        return []
    lines = [" ".join(line.split()) for line in text.removeprefix("\ufeff").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        log.skip("empty_caption", where)
    return lines


def _table_rows(path: Path) -> Iterable[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, row, problem) for each row of a CSV/TSV/JSONL file."""
    if path.suffix.lower() == ".jsonl":
        with open(path, "rb") as stream:
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    yield number, None, "invalid_utf8"
                    continue
                except json.JSONDecodeError:
                    yield number, None, "invalid_json_line"
                    continue
                yield (number, row, None) if isinstance(row, dict) else (number, None, "invalid_json_line")
        return
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # surrogateescape: a row with bad bytes is read and counted (clean_caption), not fatal.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as stream:
        reader = csv.DictReader(stream, delimiter=delimiter)
        for row in reader:
            yield reader.line_num, row, None


def _only_subfolder_holding(folder: Path, name: str) -> Path | None:
    """The one direct subfolder of ``folder`` that has the file ``name``; None if none or several."""
    holding = [sub for sub in sorted(folder.iterdir()) if sub.is_dir() and (sub / name).is_file()]
    return holding[0] if len(holding) == 1 else None


def read_table(
    path: Path,
    image_roots: list[Path],
    log: SkipLog,
    *,
    file_column: str = "file",
    caption_column: str = "caption",
    split_column: str | None = None,
) -> list[Record]:
    """Rows of (file, caption[, split]); file paths are relative to the image roots (the first
    that has the file wins), default the table's folder. A JSONL caption may be a list."""
    roots = image_roots or [path.parent]
    by_image: dict[Path, Record] = {}
    missing: set[str] = set()
    found = RecordSet(log)
    columns_checked = False
    searched_subfolders = False
    for number, row, problem in _table_rows(path):
        where = f"{path}:{number}"
        if problem:
            log.skip(problem, where)
            continue
        assert row is not None
        if not columns_checked:
            wanted = [c for c in (file_column, caption_column, split_column) if c]
            absent = [c for c in wanted if c not in row]
            if absent:
                raise IngestError(
                    f"{path}: no column {absent[0]!r} (columns: {', '.join(map(str, row))}); "
                    "name the columns with --file-column/--caption-column/--split-column"
                )
            columns_checked = True
        name = str(row.get(file_column) or "").strip()
        if not name:
            log.skip("missing_file_name", where)
            continue
        values = row.get(caption_column)
        captions = []
        for value in values if isinstance(values, list) else [values]:
            caption, reason = clean_caption("" if value is None else str(value))
            if reason:
                log.skip(reason, where)
            else:
                captions.append(caption)
        if not captions:
            continue
        image = next((root / name for root in roots if (root / name).is_file()), None)
        if image is None and not image_roots and not searched_subfolders:
            searched_subfolders = True
            subfolder = _only_subfolder_holding(path.parent, name)
            if subfolder is not None:
                roots = [*roots, subfolder]
                image = subfolder / name
                log.note(
                    f"{path.name} names files relative to {subfolder}, not to {path.parent}: images are "
                    f"looked up there (the only subfolder holding {name}); --image-root chooses another folder"
                )
        if image is None:
            if name not in missing:  # one count per missing image, however many rows name it
                missing.add(name)
                log.skip("missing_image", f"{where}: {name} not found under {', '.join(map(str, roots))}")
            continue
        record = by_image.get(image)
        if record is None:
            record = Record(
                make_key(Path(name).with_suffix("").as_posix()), ImageRef(image), [], meta={"source": name}
            )
            if split_column:
                record.split = normalize_split(row.get(split_column))
            if not found.add(record, where):
                continue
            by_image[image] = record
        for caption in captions:
            add_caption(record, caption, log, where)
    if not columns_checked:
        raise IngestError(f"{path}: no rows to read")
    return found.records()


def read_img2dataset(
    root: Path, log: SkipLog, split_column: str | None = None
) -> tuple[list[Record], dict[str, Any]]:
    """Samples of img2dataset's WebDataset output (``root/*.tar``), and the totals its
    ``*_stats.json`` files report (what failed to download never reached the tars).

    From each sample's ``.json`` (img2dataset's metadata, with the columns passed to its
    ``--save_additional_columns``): the split under ``split_column``, and more captions under
    ``captions`` (a list of strings, or such a list JSON-encoded in a string column)."""
    tars = sorted(root.glob("*.tar"))
    if not tars:
        raise IngestError(f"{root}: no .tar files; is this img2dataset output with output_format=webdataset?")
    found = RecordSet(log)
    for tar_path in tars:
        size = tar_path.stat().st_size
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(tar_path) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base, _, suffix = member.name.rpartition("/")[2].partition(".")
                    prefix = member.name.rpartition("/")[0]
                    members.setdefault(f"{prefix}/{base}" if prefix else base, {})[suffix.lower()] = member
        except (tarfile.TarError, OSError) as error:  # members read before the damage are kept
            log.skip("unreadable_tar", f"{tar_path}: {error}")
        for name, parts in members.items():
            where = f"{tar_path}:{name}"
            image = next((parts[s] for s in TAR_IMAGE_SUFFIXES if s in parts), None)
            if image is None:
                log.skip("missing_image", where)
                continue
            if image.offset_data + image.size > size:
                log.skip("corrupt_image", f"{where}: cut off at the end of the tar")
                continue
            if "txt" not in parts or parts["txt"].offset_data + parts["txt"].size > size:
                log.skip("missing_caption", where)
                continue
            caption, reason = clean_caption(_member_bytes(tar_path, parts["txt"]))
            if reason:
                log.skip(reason, where)
                continue
            meta = {"source": f"{tar_path.name}:{name}"}
            record = Record(
                make_key(name), ImageRef(tar_path, image.offset_data, image.size), [caption], meta=meta
            )
            extra = _sample_metadata(tar_path, parts.get("json"), size)
            if split_column:
                record.split = normalize_split(extra.get(split_column))
            for more in _listed_captions(extra.get("captions")):
                more_caption, reason = clean_caption(more)
                if reason:
                    log.skip(reason, f"{where} (json captions)")
                elif more_caption not in record.captions:  # the .txt is usually the first of them
                    record.captions.append(more_caption)
            found.add(record, where)
    stats: dict[str, int] = {}
    for stats_file in sorted(root.glob("*_stats.json")):
        try:
            data = json.loads(stats_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.skip("unreadable_stats_file", str(stats_file))
            continue
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            if isinstance(data.get(key), int):
                stats[key] = stats.get(key, 0) + data[key]
    return found.records(), {"tars": len(tars), "img2dataset_stats": stats}


def _member_bytes(tar_path: Path, member: tarfile.TarInfo) -> bytes:
    return ImageRef(tar_path, member.offset_data, member.size).read()


def _sample_metadata(tar_path: Path, member: tarfile.TarInfo | None, size: int) -> dict[str, Any]:
    if member is None or member.offset_data + member.size > size:
        return {}
    try:
        data = json.loads(_member_bytes(tar_path, member).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _listed_captions(value: Any) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def detect_format(sources: list[Path]) -> str:
    """``folder``, ``table``, ``coco``, ``karpathy`` or ``img2dataset``, from what the path holds."""
    first = sources[0]
    if first.is_dir():
        if any((first / name).is_file() for name in TABLE_NAMES):
            return "table"
        return "img2dataset" if any(first.glob("*.tar")) else "folder"
    suffix = first.suffix.lower()
    if suffix in (".csv", ".tsv", ".jsonl"):
        return "table"
    if suffix == ".json":
        from vgtrain.data.ingest.coco import json_kind
        from vgtrain.data.ingest.conversations import conversation_kind

        return conversation_kind(first) or json_kind(first)
    raise IngestError(
        f"{first}: cannot tell its format (a folder, .csv/.tsv/.jsonl, a COCO/Karpathy .json); pass --format"
    )


def table_in(folder: Path) -> Path:
    """The captions table inside a folder source."""
    for name in TABLE_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise IngestError(f"{folder}: no {', '.join(TABLE_NAMES)} in this folder")
