"""Dirty shards at training time: bad samples are skipped and counted, training goes on."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import torch
from PIL import Image

from tests.conftest import quiet_trainer, tiny_datamodule, tiny_module
from vgtrain.data.collate import CaptionCollator
from vgtrain.data.shards import write_shard
from vgtrain.training.callbacks import TrainingStats


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (value, 255 - value, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _good(prefix: str, n: int) -> list[dict]:
    return [
        {"__key__": f"{prefix}{i:03d}", "png": _png(i * 20), "txt": f"a red square {i}"} for i in range(n)
    ]


def _dirty_shards(folder: Path) -> str:
    write_shard(folder / "good-000000.tar", _good("good", 10))
    write_shard(
        folder / "dirty-000000.tar",
        [
            *_good("dirtyok", 4),
            {"__key__": "not_an_image", "png": b"<html>404 not found</html>", "txt": "a page, not a picture"},
            {"__key__": "no_caption", "png": _png(7)},
            *_good("dirtyok2", 4),
        ],
    )
    cut = folder / "cut-000000.tar"
    write_shard(cut, _good("cut", 10))
    with tarfile.open(cut) as tar:  # a download that died in the middle of the sixth image
        member = tar.getmembers()[10]
        end = member.offset_data + member.size // 2
    cut.write_bytes(cut.read_bytes()[:end])
    return "::".join(str(folder / f"{name}-000000.tar") for name in ("good", "dirty", "cut"))


def test_dirty_shard_stream_keeps_training_and_reports_counts(tmp_path):
    urls = _dirty_shards(tmp_path)
    module = tiny_module()
    datamodule = tiny_datamodule(module, urls, batch_size=4, shuffle_buffer=8, seed=0)
    stats = TrainingStats(log_every_n_steps=1)
    trainer = quiet_trainer(
        tmp_path,
        12,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=[stats],
    )
    trainer.fit(module, datamodule=datamodule)

    assert trainer.global_step == 12
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for reason in ("unreadable_tar_member", "bad_image", "missing_caption"):
        assert stats.skipped[reason] > 0, dict(stats.skipped)
        assert trainer.callback_metrics[f"data/skipped/{reason}"] == stats.skipped[reason]
    assert trainer.callback_metrics["data/skipped"] == sum(stats.skipped.values())


def test_shard_members_cannot_point_outside_the_shard(tmp_path):
    """Links and parent-directory names inside a tar are never followed: members are read into
    memory and non-regular ones are skipped, so a shard only yields its own bytes."""
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read me")
    shard = tmp_path / "evil-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("ok.png", _png(1)), ("ok.txt", b"a fine caption"), ("../../escape.png", _png(2))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("escape.txt")
        link.type, link.linkname = tarfile.SYMTYPE, str(secret)
        tar.addfile(link)

    from vgtrain.data.pipeline import caption_dataset
    from vgtrain.models.backbones.tiny import build_tiny_tokenizer

    dataset = caption_dataset(
        str(shard),
        transform=lambda image: torch.zeros(1),
        collate=CaptionCollator(build_tiny_tokenizer(), prefix_length=2),
        batch_size=4,
        train=False,
    )
    batches = list(dataset)
    assert [c for b in batches for c in b["captions"]] == ["a fine caption"]
    assert sum(b["skipped"].get("missing_caption", 0) for b in batches) == 1  # the symlink was not read
