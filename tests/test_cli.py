"""The real command line, end to end, on tiny backbones and a tiny shapes dataset."""

import csv
import json

import torch

from tests.conftest import TINY_MODEL_OVERRIDES, run_vgtrain

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
    *TINY_MODEL_OVERRIDES,
    "model.optimizer.lr=3e-3",
    "model.scheduler.warmup_steps=5",
    "trainer.max_steps=40",
    "trainer.val_check_interval=20",
    "trainer.log_every_n_steps=5",
    "evaluate.max_new_tokens=12",
]


def test_train_runs_end_to_end_and_loss_goes_down(tmp_path):
    run_dir = tmp_path / "run"
    result = run_vgtrain(
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
    top = run_vgtrain("--help", cwd=tmp_path)
    assert top.returncode == 0 and "train" in top.stdout
    job = run_vgtrain("train", "--cfg", "job", "model/mapper=mlp", "trainer.max_steps=7", cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    assert "name: mlp" in job.stdout and "max_steps: 7" in job.stdout
    bad = run_vgtrain("train", "trainer.max_stepz=5", cwd=tmp_path)
    assert bad.returncode != 0 and "max_stepz" in bad.stderr
