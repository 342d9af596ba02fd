"""The real command line, end to end, on tiny backbones and a tiny shapes dataset."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

TINY_OVERRIDES = [
    "logger=csv",
    "data.synthetic.num_train=256",
    "data.synthetic.num_val=64",
    "data.synthetic.num_heldout=32",
    "data.synthetic.image_size=32",
    "data.synthetic.samples_per_shard=128",
    "data.batch_size=16",
    "data.val_batch_size=32",
    "data.num_workers=0",
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
    "model.optimizer.lr=3e-3",
    "model.scheduler.warmup_steps=5",
    "trainer.max_steps=40",
    "trainer.val_check_interval=20",
    "trainer.log_every_n_steps=5",
    "evaluate.max_new_tokens=12",
]


def _vgtrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "vgtrain.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_train_runs_end_to_end_and_loss_goes_down(tmp_path):
    run_dir = tmp_path / "run"
    result = _vgtrain(
        "train", *TINY_OVERRIDES, f"hydra.run.dir={run_dir}", f"paths.data_dir={tmp_path}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(run_dir)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in (
        "val/exact_match",
        "val/token_accuracy",
        "heldout/exact_match",
        "val_shuffled/exact_match",
        "val_shuffled/token_accuracy",
        "wall_seconds",
    ):
        assert key in metrics
    assert metrics["global_step"] == 40

    rows = list(csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 4 and sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 40
    assert not any(key.startswith("model.vision.") for key in checkpoint["state_dict"])
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()


def test_help_and_config_printing(tmp_path):
    top = _vgtrain("--help", cwd=tmp_path)
    assert top.returncode == 0 and "train" in top.stdout
    job = _vgtrain("train", "--cfg", "job", "model/mapper=mlp", "trainer.max_steps=7", cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    assert "name: mlp" in job.stdout and "max_steps: 7" in job.stdout
    bad = _vgtrain("train", "trainer.max_stepz=5", cwd=tmp_path)
    assert bad.returncode != 0 and "max_stepz" in bad.stderr
