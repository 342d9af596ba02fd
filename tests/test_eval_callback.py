"""Caption metrics during training: val/bleu_4, val/cider... beside val/loss, and the best
checkpoint chosen by one of them."""

from __future__ import annotations

import csv

import pytest
import torch

from tests.test_cli import TINY_OVERRIDES
from vgtrain.cli import main as cli_main
from vgtrain.metrics import caption_metrics


def test_caption_metrics_are_logged_and_pick_the_best_checkpoint(tmp_path, monkeypatch) -> None:
    import vgtrain.training.caption_metrics as callback_module

    scored: list[tuple[dict, dict, dict]] = []  # (predictions, references, values) per validation

    def recording(predictions, references, **kwargs):
        report = caption_metrics(predictions, references, **kwargs)
        scored.append((predictions, references, report.values))
        return report

    monkeypatch.setattr(callback_module, "caption_metrics", recording)
    run_dir = tmp_path / "run"
    overrides = [
        o for o in TINY_OVERRIDES if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))
    ]
    code = cli_main(
        [
            "train",
            *overrides,
            "trainer.max_steps=12",
            "trainer.val_check_interval=6",
            "evaluate.enabled=false",
            "callbacks.caption_metrics.num_images=20",
            "callbacks.caption_metrics.max_new_tokens=8",
            "callbacks.model_checkpoint.monitor=val/cider",
            "callbacks.model_checkpoint.mode=max",
            f"hydra.run.dir={run_dir}",
            f"paths.data_dir={tmp_path}",
        ]
    )
    assert code == 0
    rows = list(csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()))
    validations = [r for r in rows if r.get("val/loss")]
    assert len(validations) == 2
    assert len(scored) == 2  # one scoring per validation (none in the sanity check)
    for row, (predictions, references, values) in zip(validations, scored, strict=True):
        # 20 validation images, each with its own caption(s) as references
        assert len(predictions) == len(references) == 20
        assert all(refs and all(isinstance(r, str) and r for r in refs) for refs in references.values())
        # logged at the same step as val/loss, the values the predictions scored (float32 in the log)
        for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"):
            assert float(row[f"val/{key}"]) == pytest.approx(values[key], rel=1e-6, abs=1e-7), key
    ciders = [float(r["val/cider"]) for r in validations]
    # ModelCheckpoint keeps the first of equal scores.
    best_step = int(validations[0 if ciders[0] >= ciders[1] else 1]["step"]) + 1
    (best,) = (run_dir / "checkpoints").glob("best-step*.ckpt")
    assert best.name == f"best-step{best_step:06d}.ckpt"
    callbacks = torch.load(best, weights_only=False)["callbacks"]
    state = next(v for k, v in callbacks.items() if k.startswith("ModelCheckpoint") and "val/cider" in k)
    assert state["best_model_score"].item() == max(ciders)
