"""Norm clipping reuses NonFiniteGuard's gradient norm: the result must be clip_grad_norm_'s."""

import json
from functools import partial

import lightning as L
import pytest
import torch

from tests.conftest import TINY_LLM, TINY_MAPPER, TINY_VISION, quiet_trainer
from vgtrain.data.collate import CaptionCollator
from vgtrain.training.callbacks import NonFiniteGuard
from vgtrain.training.datamodule import CaptionDataModule
from vgtrain.training.module import CaptioningModule


class PreClipNorm(L.Callback):
    """Runs after the guard, before clipping: the total norm clipping starts from."""

    norm = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.norm = float(torch.nn.utils.get_total_norm(grads))


@pytest.mark.parametrize("clip", [1e-3, 1e6])
def test_clipping_with_the_guard_norm_matches_clip_grad_norm(shapes_dir, tmp_path, clip):
    module = CaptioningModule(
        vision=dict(TINY_VISION),
        llm=dict(TINY_LLM),
        mapper=dict(TINY_MAPPER),
        optimizer=partial(torch.optim.SGD, lr=0.0),  # parameters stay put; the gradients are what we read
        scheduler={"warmup_steps": 1},
    )
    patterns = json.loads((shapes_dir / "manifest.json").read_text())["patterns"]
    collator = CaptionCollator(module.model.llm.tokenizer, prefix_length=module.model.prefix_length)
    data = CaptionDataModule(
        patterns["train"], None, module.model.vision.transform, collator, batch_size=8, num_workers=0
    )
    pre = PreClipNorm()
    trainer = quiet_trainer(
        tmp_path, 1, callbacks=[NonFiniteGuard(), pre], gradient_clip_val=clip, limit_val_batches=0
    )
    trainer.fit(module, datamodule=data)
    grads = [p.grad for p in module.model.parameters() if p.grad is not None]
    after = float(torch.nn.utils.get_total_norm(grads))
    assert pre.norm is not None and pre.norm > 0
    assert after == pytest.approx(min(pre.norm, clip), rel=1e-4)
