"""Atomic writes: all or nothing, and the modes any new file gets."""

import os
import stat

import pytest

from vgtrain.files import atomic_path, atomic_write_text


def test_atomic_write_replaces_whole_and_follows_the_umask(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    previous = os.umask(0o027)
    try:
        atomic_write_text(target, "new")
    finally:
        os.umask(previous)
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "shard.tar"
    target.write_text("complete")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        tmp.chmod(0o600)
        raise RuntimeError("interrupted")
    assert target.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["shard.tar"]


def test_a_private_temporary_gets_the_public_mode(tmp_path):
    target = tmp_path / "adapter.bin"
    previous = os.umask(0o022)
    try:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x")
            tmp.chmod(0o600)  # as safetensors and mkstemp create files
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
