"""Tests for vgtrain.data.shards: atomic shard/text writing and shard naming."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from vgtrain.data.shards import brace_pattern, shard_path, write_shard
from vgtrain.files import atomic_write_text


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _samples(n: int) -> list[dict[str, Any]]:
    return [{"__key__": f"s_{i:04d}", "png": _png(i), "txt": f"caption {i}"} for i in range(n)]


def test_write_shard_roundtrip_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a-000000.tar"
    assert write_shard(target, _samples(5)) == 5
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    read = list(wds.WebDataset(str(target), shardshuffle=False))
    assert [s["__key__"] for s in read] == [f"s_{i:04d}" for i in range(5)]
    assert [s["txt"].decode() for s in read] == [f"caption {i}" for i in range(5)]
    assert Image.open(io.BytesIO(read[3]["png"])).getpixel((0, 0)) == (3, 0, 0)


def test_write_shard_is_byte_deterministic(tmp_path: Path) -> None:
    # TarWriter would otherwise stamp members with the current time.
    write_shard(tmp_path / "x.tar", _samples(3))
    write_shard(tmp_path / "y.tar", _samples(3))
    assert (tmp_path / "x.tar").read_bytes() == (tmp_path / "y.tar").read_bytes()


def test_write_shard_failure_leaves_nothing(tmp_path: Path) -> None:
    def failing() -> Iterator[dict[str, Any]]:
        yield from _samples(2)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_shard(tmp_path / "a.tar", failing())
    assert list(tmp_path.iterdir()) == []


def test_write_shard_failure_keeps_previous_target(tmp_path: Path) -> None:
    target = tmp_path / "a.tar"
    write_shard(target, _samples(2))
    before = target.read_bytes()
    with pytest.raises(ValueError):
        write_shard(target, [{"no_key": b"x"}])  # TarWriter rejects samples without __key__
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar"]


def test_atomic_write_text(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write_text(target, "one\n")
    atomic_write_text(target, "two ü\n")
    assert target.read_text(encoding="utf-8") == "two ü\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


@pytest.mark.parametrize("count", [2, 4, 11])
def test_brace_pattern_expands_to_shard_paths(tmp_path: Path, count: int) -> None:
    pattern = brace_pattern(tmp_path, "train", count)
    expected = [str(shard_path(tmp_path, "train", i)) for i in range(count)]
    assert list(braceexpand(pattern)) == expected
    assert expected[0] == str(tmp_path / "train-000000.tar")


def test_brace_pattern_single_and_options(tmp_path: Path) -> None:
    assert brace_pattern(tmp_path, "val", 1) == str(tmp_path / "val-000000.tar")
    assert brace_pattern(Path("/x"), "train", 4) == "/x/train-{000000..000003}.tar"
    assert list(braceexpand(brace_pattern(Path("/x"), "t", 3, suffix=".tgz", width=2))) == [
        "/x/t-00.tgz",
        "/x/t-01.tgz",
        "/x/t-02.tgz",
    ]
    with pytest.raises(ValueError):
        brace_pattern(tmp_path, "train", 0)
