"""The embedded default, exactly as `make train` runs it (about 8 minutes on 2 CPU cores)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_learns_from_the_image(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vgtrain.cli",
            "train",
            f"hydra.run.dir={run_dir}",
            f"paths.data_dir={tmp_path}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/exact_match"] >= 0.85  # issue 13: 0.938 measured (3,300 bf16 steps, 492 s)
    assert metrics["val/token_accuracy"] >= 0.93
    assert metrics["val_shuffled/exact_match"] <= 0.05
    assert metrics["wall_seconds"] <= 600
