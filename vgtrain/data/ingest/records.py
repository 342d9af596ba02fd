"""What a source yields (one :class:`Record` per image) and how bad input is counted.

Sources never raise for a bad item: they count it by reason in a :class:`SkipLog`, which also keeps
the first few offending paths per reason, so the manifest says what was left out and where.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vgtrain.errors import UserError

# Formats PIL reads that a source may list; anything that is not really an image is caught later.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EXAMPLES_PER_REASON = 5
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
# Split names users write, folded onto the ones the data configs use (Karpathy: restval is train).
SPLIT_ALIASES = {"restval": "train", "training": "train", "validation": "val", "valid": "val", "dev": "val"}


class IngestError(UserError):
    """A source that cannot be read at all (missing file, unknown column); names the file."""


@dataclass(frozen=True)
class ImageRef:
    """Where an image's bytes are: a file, or a byte range of a file (a member of a tar)."""

    path: Path
    offset: int = 0
    size: int | None = None  # None: the whole file

    def read(self) -> bytes:
        with open(self.path, "rb") as stream:
            if self.size is None:
                return stream.read()
            stream.seek(self.offset)
            return stream.read(self.size)

    def describe(self) -> str:
        return str(self.path) if self.size is None else f"{self.path}@{self.offset}"


@dataclass
class Record:
    """One image and its captions (one or more), as found in the source."""

    key: str
    image: ImageRef
    captions: list[str]
    split: str | None = None  # from the source (a column, a split file); None: decided later
    meta: dict[str, Any] = field(default_factory=dict)  # stored in {key}.json with the captions


class SkipLog:
    """Counts skipped source items and converted images by reason, with a few examples each."""

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()
        self.converted: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.notes: list[str] = []  # decisions made on the user's behalf, shown and kept in the manifest

    def note(self, text: str) -> None:
        self.notes.append(text)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self._example(reason, where)

    def convert(self, reason: str, where: str) -> None:
        self.converted[reason] += 1
        self._example(reason, where)

    def _example(self, reason: str, where: str) -> None:
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(where)


def make_key(relative: str) -> str:
    """A WebDataset key from a relative path without its suffix. WebDataset splits a member name
    at its first dot and treats slashes as folders, so both become underscores."""
    key = _UNSAFE_KEY_CHARS.sub("_", relative).strip("_")
    return key or "_"


def clean_caption(raw: bytes | str) -> tuple[str | None, str | None]:
    """``(caption, None)`` or ``(None, reason)``: bytes must be UTF-8 (a BOM is dropped); a string
    read with ``errors="surrogateescape"`` carries undecodable bytes as surrogates, caught here.
    Runs of whitespace (newlines included) become one space."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8"
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        return None, "invalid_utf8"
    text = " ".join(raw.removeprefix("\ufeff").split())
    return (text, None) if text else (None, "empty_caption")


def normalize_split(value: str | None) -> str | None:
    """A split name from the source, folded (``restval`` -> ``train``); None when blank."""
    if value is None or not str(value).strip():
        return None
    name = str(value).strip().lower()
    name = SPLIT_ALIASES.get(name, name)
    return make_key(name).lower()


def add_caption(record: Record, caption: str, log: SkipLog, where: str) -> None:
    """Adds a caption to an image's list; an exact repeat is counted, not stored twice."""
    if caption in record.captions:
        log.skip("duplicate_caption", where)
    else:
        record.captions.append(caption)


class RecordSet:
    """Records by key, in insertion order. A second image under a key already taken is counted as
    ``duplicate_key`` and left out (the first one, in sorted source order, is kept)."""

    def __init__(self, log: SkipLog) -> None:
        self.log = log
        self.by_key: dict[str, Record] = {}

    def add(self, record: Record, where: str) -> bool:
        if record.key in self.by_key:
            self.log.skip(
                "duplicate_key",
                f"{where} (key {record.key!r} is already {self.by_key[record.key].image.describe()})",
            )
            return False
        self.by_key[record.key] = record
        return True

    def records(self) -> list[Record]:
        return list(self.by_key.values())
