"""The VQA demo, exactly as `vgtrain train experiment=demo_vqa` runs it (minutes on 2 CPU cores)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_vqa_answers_from_the_image(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "vgtrain.cli", "train", "experiment=demo_vqa", "logger=csv"]
    result = subprocess.run(
        [*command, f"hydra.run.dir={run_dir}", f"paths.data_dir={tmp_path}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/vqa_accuracy"] >= 0.90
    # The language prior alone (images shuffled) is clearly lower, on every image-bound type.
    assert metrics["val_shuffled/vqa_accuracy"] <= metrics["val/vqa_accuracy"] - 0.2
    for kind in ("color", "shape", "size", "position", "count", "relation", "yes_no", "followup"):
        assert f"val/vqa_accuracy/{kind}" in metrics and f"phrasing/vqa_accuracy/{kind}" in metrics
    assert metrics["wall_seconds"] <= 600
