"""What a `vgtrain train` run logs besides the loss: Lightning's throughput figures (counting
caption samples), the cross-attention gates and skipped samples, read back from the CSV log."""

from __future__ import annotations

import csv
import math

import torch

from tests.test_cli import TINY_OVERRIDES
from vgtrain.cli import main as cli_main

STEPS, BATCH, WINDOW = 6, 16, 3


def test_throughput_and_gates_are_logged(tmp_path) -> None:
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith(("trainer.", "data.batch_size"))]
    code = cli_main(
        [
            "train",
            *overrides,
            "model/xattn=gated_every_k",  # both routes: prefix and gated cross-attention
            f"data.batch_size={BATCH}",
            f"trainer.max_steps={STEPS}",
            f"trainer.val_check_interval={STEPS}",
            "trainer.log_every_n_steps=1",
            "callbacks.training_stats.log_every_n_steps=1",
            f"callbacks.throughput.window_size={WINDOW}",
            "callbacks.caption_metrics.num_images=2",
            "callbacks.caption_metrics.max_new_tokens=2",
            "evaluate.enabled=false",
            f"hydra.run.dir={run_dir}",
            f"paths.data_dir={tmp_path}",
        ]
    )
    assert code == 0
    rows = list(csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()))

    def column(key: str) -> list[tuple[int, float]]:
        return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]

    # Throughput (Lightning's ThroughputMonitor): cumulative counts of caption samples, and a
    # rate once its window of steps is full. One process: no all-ranks figure besides the device's.
    assert max(v for _, v in column("train/samples")) == STEPS * BATCH
    assert max(v for _, v in column("train/batches")) == STEPS
    rates = column("train/device/samples_per_sec")
    assert len(rates) == STEPS - WINDOW + 1 and all(math.isfinite(v) and v > 0 for _, v in rates), rates
    assert "train/samples_per_sec" not in rows[0]

    # Gates: one column per cross-attention layer, open after the first step (they start shut),
    # and the last logged values are those of the checkpoint written at the end.
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    layers = sorted(
        int(key.split(".")[3])
        for key in state
        if key.startswith("model.xattn.blocks.") and key.endswith("attn_gate")
    )
    gate_columns = sorted(key for key in rows[0] if key.startswith("gates/"))
    assert layers and gate_columns == sorted(f"gates/layer_{i}" for i in layers)
    for i in layers:
        logged = column(f"gates/layer_{i}")
        assert len(logged) == STEPS and all(0 < v < 1 for _, v in logged), logged
        final = torch.tanh(state[f"model.xattn.blocks.{i}.attn_gate"]).abs().item()
        assert logged[-1][1] == final

    assert all(v == 0 for _, v in column("data/skipped"))  # clean synthetic shards
