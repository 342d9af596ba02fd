"""Sweeps through the real CLI: an Optuna search and a grid, each trial its own run and wandb run."""

import json
import subprocess
from pathlib import Path

import yaml

from tests.conftest import TINY_MODEL_OVERRIDES, run_vgtrain
from vgtrain.data.synthetic import write_shapes_dataset

TINY_TRIAL = [
    "evaluate.enabled=false",
    "data.cache_features=false",
    "data.num_workers=0",
    "data.batch_size=8",
    "data.val_batch_size=8",
    "data.synthetic.num_train=32",
    "data.synthetic.num_val=8",
    "data.synthetic.num_heldout=8",
    "data.synthetic.image_size=32",
    "data.synthetic.samples_per_shard=16",
    # prefix length and depth are left to the search space
    *[
        o
        for o in TINY_MODEL_OVERRIDES
        if not o.startswith(("model.mapper.prefix_length", "model.mapper.num_layers"))
    ],
    "model.scheduler.warmup_steps=1",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
]

# Looks like a wandb API key; it must never reach a file or the console.
FAKE_API_KEY = "0123456789abcdef0123456789abcdef01234567"


def _sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    write_shapes_dataset(
        tmp_path / "shapes",
        num_train=32,
        num_val=8,
        num_heldout=8,
        image_size=32,
        samples_per_shard=16,
        progress=False,
    )
    return run_vgtrain(
        "train", "-m", *TINY_TRIAL, f"paths.data_dir={tmp_path}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *overrides, cwd=tmp_path, env={"WANDB_API_KEY": FAKE_API_KEY},
    )  # fmt: skip


def test_optuna_search_runs_four_trials_and_records_the_best(tmp_path):
    result = _sweep(tmp_path, "hparams_search=mapper_optuna", "hydra.sweeper.n_trials=4", "logger=csv")
    assert result.returncode == 0, result.stderr[-4000:]
    sweep = tmp_path / "sweep"
    summary = json.loads((sweep / "trials.json").read_text())
    assert summary["num_trials"] == 4 and summary["optimized_metric"] == "val/loss"
    values = [trial["value"] for trial in summary["trials"]]
    assert all(trial["status"] == "completed" for trial in summary["trials"])
    assert summary["best"]["value"] == min(values)
    # The value each trial returned is the val/loss it wrote to its own run directory.
    for trial in summary["trials"]:
        assert trial["metrics"]["val/loss"] == trial["value"]
        assert Path(trial["output_dir"], "metrics.json").is_file()
    # The searched parameters vary across trials, and Optuna's own record agrees on the best.
    assert len({" ".join(trial["overrides"]) for trial in summary["trials"]}) == 4
    optuna_best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert abs(optuna_best["best_value"] - summary["best"]["value"]) < 1e-9


def test_grid_sweep_trials_are_wandb_runs_grouped_by_sweep_without_the_api_key(tmp_path):
    result = _sweep(tmp_path, "model.optimizer.lr=1e-3,3e-3", "logger=wandb")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "sweep" / "trials.json").read_text())
    assert summary["num_trials"] == 2
    learning_rates = [o for trial in summary["trials"] for o in trial["overrides"] if "optimizer.lr" in o]
    assert learning_rates == ["model.optimizer.lr=0.001", "model.optimizer.lr=0.003"]
    runs = sorted((tmp_path / "sweep").glob("*/wandb/offline-run-*"))
    assert len(runs) == 2  # one wandb run per trial
    group = b"sweep-" + tmp_path.name.encode() + b"-sweep"
    for run in runs:
        assert any(group in f.read_bytes() for f in run.rglob("*.wandb")), run
    # The resolved config went to wandb, and no file or console line holds the API key.
    assert any(b"optimizer" in f.read_bytes() for f in runs[0].rglob("*") if f.is_file())
    assert FAKE_API_KEY not in result.stdout + result.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert FAKE_API_KEY.encode() not in path.read_bytes(), path
