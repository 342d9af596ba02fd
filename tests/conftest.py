"""Shared fixtures: tiny backbones and tiny shards, all offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# No test touches the network: hub lookups fail fast, wandb stays offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VISION = {
    "name": "tiny",
    "pool_tokens": 2,
    "arch": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "embed_dim": 32},
}
TINY_LLM = {"name": "tiny", "arch": {"width": 64, "layers": 2, "heads": 2}}
TINY_MAPPER = {"name": "transformer", "prefix_length": 4, "width": 64, "num_layers": 1, "num_heads": 2}
# The same backbones and mapper as `vgtrain train` overrides, for tests of the real command line.
TINY_MODEL_OVERRIDES = [
    "model.vision.arch.image_size=32",
    "model.vision.arch.width=64",
    "model.vision.arch.layers=1",
    "model.vision.arch.embed_dim=32",
    "model.llm.arch.width=64",
    "model.llm.arch.layers=2",
    "model.llm.arch.heads=2",
    "model.mapper.width=64",
    "model.mapper.num_layers=1",
    "model.mapper.num_heads=2",
    "model.mapper.prefix_length=4",
]


def tiny_module(lr: float = 3e-3, **llm_overrides):
    """A CaptioningModule on the TINY_* backbones and mapper (AdamW, short warmup)."""
    from functools import partial

    import torch

    from vgtrain.training.module import CaptioningModule

    return CaptioningModule(
        vision=dict(TINY_VISION),
        llm={**TINY_LLM, **llm_overrides},
        mapper=dict(TINY_MAPPER),
        optimizer=partial(torch.optim.AdamW, lr=lr),
        scheduler={"warmup_steps": 2, "min_lr_ratio": 0.1},
    )


def tiny_datamodule(module, train_urls: str, val_urls: str | None = None, **options):
    """A CaptionDataModule for ``module``'s backbones and tokenizer; ``options`` add to or
    override batch 16, no DataLoader workers."""
    from vgtrain.data.collate import CaptionCollator
    from vgtrain.training.datamodule import CaptionDataModule

    collator = CaptionCollator(module.model.llm.tokenizer, prefix_length=module.model.prefix_length)
    settings = {"batch_size": 16, "num_workers": 0, "vision": module.model.vision, **options}
    return CaptionDataModule(train_urls, val_urls, module.model.vision.transform, collator, **settings)


def run_vgtrain(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`vgtrain ARGS` in a fresh process (offline, one thread unless ``env`` says otherwise)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vgtrain.cli", *args],
        cwd=cwd,
        env={**environment, **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small shapes dataset (32 px images) shared by the whole session."""
    from vgtrain.data.synthetic import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(
        root, num_train=256, num_val=64, num_heldout=32, image_size=32, samples_per_shard=128, progress=False
    )
    return root


@pytest.fixture
def tiny_model():
    from vgtrain.models import build_model

    return build_model(dict(TINY_VISION), dict(TINY_LLM), dict(TINY_MAPPER))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection beyond this machine fails the test that makes it."""
    import ipaddress
    import socket

    real_connect = socket.socket.connect

    def guarded_connect(sock: socket.socket, address) -> None:
        host = address[0] if isinstance(address, tuple) else None
        if host is not None:
            try:
                local = ipaddress.ip_address(host).is_loopback
            except ValueError:
                local = host == "localhost"
            if not local:
                raise AssertionError(f"test tried to reach the network: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)


def quiet_trainer(tmp_path: Path, steps: int, **options):
    """A CPU Lightning Trainer for tests (no logger, progress bar or summary); ``options`` add
    to or override these settings."""
    import lightning as L

    settings = {
        "max_steps": steps,
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return L.Trainer(**{**settings, **options})
