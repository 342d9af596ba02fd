"""Resume after a crash: same result as an uninterrupted run, corrupt checkpoints skipped,
checkpoints on preemption signals, atomic writes, reseeded streams."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from tests.test_cli import TINY_OVERRIDES
from vgtrain.errors import ConfigError, Preempted
from vgtrain.training.checkpointing import AtomicCheckpointIO, find_resume_checkpoint, resolve_resume
from vgtrain.training.recovery import PreemptionCheckpoint, RNGState
from vgtrain.training.resumable import ResumableDataLoader, ResumableSampler

# ---------------------------------------------------------------- the real CLI, killed and resumed


def _train_command(run_dir: Path, shapes_dir: Path, *extra: str) -> list[str]:
    patterns = json.loads((shapes_dir / "manifest.json").read_text())["patterns"]
    return [
        sys.executable,
        "-m",
        "vgtrain.cli",
        "train",
        *TINY_OVERRIDES,
        "data.synthetic=null",
        f"data.train_urls='{patterns['train']}'",
        f"data.val_urls='{patterns['val']}'",
        "trainer.max_steps=30",
        "trainer.val_check_interval=10",
        "trainer.limit_val_batches=1",
        "train.checkpoint_every_n_steps=10",
        "evaluate.enabled=false",
        "model.mapper.dropout=0.1",  # dropout draws on the global RNG: resume must restore it
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def _env() -> dict[str, str]:
    # One thread each: the two runs share the CPU, and results stay bitwise reproducible.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(shapes_dir, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    kwargs = {
        "cwd": tmp_path,
        "env": _env(),
        "stdout": subprocess.PIPE,
        "stderr": subprocess.STDOUT,
        "text": True,
    }
    reference = subprocess.Popen(_train_command(whole, shapes_dir), **kwargs)
    victim = subprocess.Popen(_train_command(broken, shapes_dir), **kwargs)
    deadline = time.monotonic() + 300
    while not (broken / "checkpoints" / "step000010.ckpt").exists():
        assert victim.poll() is None, victim.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no periodic checkpoint within 300 s"
        time.sleep(0.02)
    victim.kill()  # SIGKILL: no handler runs, nothing gets flushed
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    resumed = subprocess.run(_train_command(broken, shapes_dir, "resume=auto"), **kwargs, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    step = int(resumed.stdout.split("resuming from ")[1].split("(step ")[1].split(")")[0])
    assert 10 <= step < 30
    assert reference.wait(timeout=300) == 0, reference.communicate()[0][-3000:]

    expected = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    actual = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=True)
    assert actual["global_step"] == expected["global_step"] == 30
    assert expected["state_dict"].keys() == actual["state_dict"].keys()
    for key, tensor in expected["state_dict"].items():  # exact: same ops, same order, one thread
        assert torch.equal(tensor, actual["state_dict"][key]), key


# ---------------------------------------------------------------- in-process, on a toy module


class Recorder(L.LightningModule):
    """Records the batches it trains on; dropout makes the result depend on the RNG state."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 4)
        self.dropout = nn.Dropout(0.5)
        self.seen: list[list[int]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.tolist())
        return self.dropout(self.layer(batch.float().unsqueeze(-1))).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def _loader() -> ResumableDataLoader:
    data = list(range(20))  # 5 batches of 4 per epoch
    return ResumableDataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=3), drop_last=True)


def _trainer(tmp_path: Path, *callbacks: L.Callback, steps: int = 12) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[*callbacks, RNGState()],
        plugins=[AtomicCheckpointIO()],
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Recorder]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    every_step = ModelCheckpoint(
        dirpath=folder / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1
    )
    L.seed_everything(0)
    model = Recorder()
    _trainer(folder, every_step).fit(model, train_dataloaders=_loader())
    return folder, model


@pytest.mark.parametrize("step", [3, 5, 7], ids=["mid-epoch", "epoch-end", "second-epoch"])
def test_sample_order_and_weights_after_resume_match(uninterrupted, tmp_path, step):
    folder, reference = uninterrupted
    L.seed_everything(123)  # a different init and RNG: everything must come from the checkpoint
    model = Recorder()
    _trainer(tmp_path).fit(
        model, train_dataloaders=_loader(), ckpt_path=folder / "ckpt" / f"step={step}.ckpt"
    )
    assert model.seen == reference.seen[step:]
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_resume_auto_skips_a_truncated_checkpoint(tmp_path, caplog):
    periodic = ModelCheckpoint(
        dirpath=tmp_path / "checkpoints",
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        monitor="step",
        mode="max",
        every_n_train_steps=2,
        save_top_k=3,
        save_last=True,
    )
    _trainer(tmp_path, periodic, steps=6).fit(Recorder(), train_dataloaders=_loader())
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "last.ckpt",
        "step000002.ckpt",
        "step000004.ckpt",
        "step000006.ckpt",
    ]
    for name in ("step000006.ckpt", "last.ckpt"):  # the newest two hold step 6: cut both in half
        path = checkpoints / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (checkpoints / "step000008.ckpt.tmp-4242").write_bytes(b"half a checkpoint")

    with caplog.at_level(logging.WARNING, logger="vgtrain.training.checkpointing"):
        path, checkpoint = find_resume_checkpoint(tmp_path)
    assert path.name == "step000004.ckpt" and checkpoint["global_step"] == 4
    warned = caplog.text
    assert "step000006.ckpt" in warned and "last.ckpt" in warned and "step000008.ckpt.tmp-4242" in warned

    model = Recorder()
    trainer = _trainer(tmp_path / "again", steps=8)
    trainer.fit(model, train_dataloaders=_loader(), ckpt_path=path)
    assert trainer.global_step == 8 and len(model.seen) == 4  # steps 5..8 only


class SendSignal(L.Callback):
    def __init__(self, signum: int, at_step: int) -> None:
        self.signum, self.at_step = signum, at_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_writes_a_checkpoint_then_exits(tmp_path, signum):
    before = signal.getsignal(signum)
    saver = PreemptionCheckpoint(dirpath=str(tmp_path / "checkpoints"))
    with pytest.raises(Preempted) as stop:
        _trainer(tmp_path, SendSignal(signum, at_step=3), saver).fit(Recorder(), train_dataloaders=_loader())
    assert stop.value.code == 128 + signum
    assert f"stopped by {signal.Signals(signum).name} at step 3" in stop.value.message
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert signal.getsignal(signum) == before  # handlers are given back


def test_final_step_is_saved_when_not_a_multiple_of_the_period(tmp_path):
    periodic = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=4, save_last=True)
    saver = PreemptionCheckpoint(dirpath=str(tmp_path / "checkpoints"))
    _trainer(tmp_path, periodic, saver, steps=6).fit(Recorder(), train_dataloaders=_loader())
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


# ---------------------------------------------------------------- atomic writes, safe loads


def test_atomic_checkpoint_io_keeps_the_previous_file_when_a_write_fails(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "a.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    def crash(obj: object, stream) -> None:
        stream.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]  # no temporary left behind
    assert io.load_checkpoint(path)["global_step"] == 1


class Payload:
    """Not a tensor, container or number: a weights-only load must refuse to build it."""


def test_checkpoints_are_loaded_weights_only(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 0, "payload": Payload()}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)  # the caller cannot opt out
    with pytest.raises(ConfigError, match="evil.ckpt"):
        resolve_resume(str(path), tmp_path)


def test_resampled_stream_is_reseeded_on_resume(shapes_dir):
    from vgtrain.data.collate import CaptionCollator
    from vgtrain.data.pipeline import caption_dataset, stream_seed
    from vgtrain.models.backbones.tiny import build_tiny_tokenizer

    pattern = json.loads((shapes_dir / "manifest.json").read_text())["patterns"]["train"]
    collate = CaptionCollator(build_tiny_tokenizer(), prefix_length=2)

    def first_keys(seed: int) -> list[str]:
        stream = iter(
            caption_dataset(
                pattern,
                transform=lambda image: torch.zeros(1),
                collate=collate,
                batch_size=32,
                train=True,
                shuffle_buffer=64,
                seed=seed,
            )
        )
        return [key for _ in range(2) for key in next(stream)["keys"]]

    assert stream_seed(5, 0) == 5 and stream_seed(5, 100) != stream_seed(5, 200)
    assert first_keys(5) == first_keys(5)  # reproducible for a seed
    assert first_keys(stream_seed(5, 100)) != first_keys(5)  # a resumed run does not replay it
