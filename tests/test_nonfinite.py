"""The numerical guard: non-finite steps are skipped and counted; too many in a row stop the run."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from tests.conftest import quiet_trainer, tiny_datamodule, tiny_module
from vgtrain.cli.explain import explain
from vgtrain.errors import NonFiniteError
from vgtrain.training.callbacks import NonFiniteGuard
from vgtrain.training.module import CaptioningModule


class PoisonBatches(L.Callback):
    """Test-only: turns the visual features of the chosen batches into NaN before the step, and
    records the adapter weights around the first poisoned step."""

    def __init__(self, batches: set[int]) -> None:
        self.batches = batches
        self.keys: dict[int, list[str]] = {}
        self.around: list[dict[str, torch.Tensor]] = []

    def _mapper(self, module: CaptioningModule) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in module.model.mapper.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx in self.batches:
            batch["visual_tokens"].fill_(float("nan"))
            self.keys[trainer.global_step] = list(batch["keys"])
            if not self.around:
                self.around.append(self._mapper(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx in self.batches and len(self.around) == 1:
            self.around.append(self._mapper(pl_module))


def _fit(
    shapes_dir, tmp_path, poison: PoisonBatches, guard: NonFiniteGuard, steps: int
) -> tuple[L.Trainer, CaptioningModule]:
    module = tiny_module()
    patterns = json.loads((shapes_dir / "manifest.json").read_text())["patterns"]
    datamodule = tiny_datamodule(module, patterns["train"], cache_features=True)
    trainer = quiet_trainer(
        tmp_path,
        steps,
        enable_checkpointing=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        callbacks=[poison, guard],
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer, module


def test_a_nan_batch_is_skipped_counted_and_training_goes_on(shapes_dir, tmp_path):
    poison, guard = PoisonBatches({3}), NonFiniteGuard(max_consecutive=2)
    trainer, module = _fit(shapes_dir, tmp_path, poison, guard, steps=8)

    assert guard.skipped == 1 and guard.consecutive == 0
    assert trainer.callback_metrics["train/skipped_nonfinite"] == 1
    before, after = poison.around
    assert all(torch.equal(before[k], after[k]) for k in before), "the NaN step must not move the adapter"
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))  # the last step's loss
    assert all(torch.isfinite(p).all() for p in module.parameters())
    states = trainer.optimizers[0].state.values()
    assert all(torch.isfinite(v).all() for state in states for v in state.values() if torch.is_tensor(v))


def test_too_many_nonfinite_steps_in_a_row_stop_the_run_naming_step_and_keys(shapes_dir, tmp_path):
    poison, guard = PoisonBatches({2, 3, 4, 5}), NonFiniteGuard(max_consecutive=2)
    with pytest.raises(NonFiniteError) as stop:
        _fit(shapes_dir, tmp_path, poison, guard, steps=8)
    message = str(stop.value)
    assert "stopping at step 4" in message and "train.max_consecutive_nonfinite=2" in message
    assert poison.keys[4][0] in message  # the batch that tipped it over
    assert explain(stop.value) == message  # the CLI prints it as is, on one line
    assert "\n" not in message
