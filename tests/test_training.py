"""Training through Lightning on tiny backbones: what changes, what must not, what is saved."""

import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import TINY_MAPPER, TINY_VISION, quiet_trainer, tiny_datamodule, tiny_module
from vgtrain.training.datamodule import CaptionDataModule
from vgtrain.training.module import CaptioningModule, warmup_cosine

_module = tiny_module


def _datamodule(module: CaptioningModule, shapes_dir: Path, cache_features: bool) -> CaptionDataModule:
    patterns = json.loads((shapes_dir / "manifest.json").read_text())["patterns"]
    return tiny_datamodule(
        module, patterns["train"], patterns["val"], val_batch_size=32, cache_features=cache_features
    )


def _fit(module, datamodule, tmp_path: Path, steps: int = 12) -> L.Trainer:
    trainer = quiet_trainer(
        tmp_path,
        steps,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


@pytest.mark.parametrize("cache_features", [False, True])
def test_adapter_trains_while_backbones_stay_bit_identical(shapes_dir, tmp_path, cache_features):
    module = _module()
    frozen_before = {
        k: v.clone() for k, v in module.model.state_dict().items() if not k.startswith("mapper.")
    }
    mapper_before = {k: v.clone() for k, v in module.model.mapper.state_dict().items()}
    _fit(module, _datamodule(module, shapes_dir, cache_features), tmp_path)
    for key, value in module.model.state_dict().items():
        if key in frozen_before:
            assert torch.equal(value, frozen_before[key]), f"frozen tensor changed: {key}"
    assert any(not torch.equal(v, mapper_before[k]) for k, v in module.model.mapper.state_dict().items())
    assert not module.model.vision.training and not module.model.llm.training


def test_checkpoint_holds_adapter_only_and_reloads(shapes_dir, tmp_path):
    module = _module()
    trainer = _fit(module, _datamodule(module, shapes_dir, cache_features=True), tmp_path)
    path = tmp_path / "adapter.ckpt"
    trainer.save_checkpoint(path)

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert keys and all(key.startswith("model.mapper.") for key in keys)
    backbone_bytes = sum(
        t.numel() * t.element_size()
        for t in (*module.model.vision.parameters(), *module.model.llm.parameters())
    )
    adapter_bytes = sum(t.numel() * t.element_size() for t in checkpoint["state_dict"].values())
    assert adapter_bytes < backbone_bytes
    assert (
        checkpoint["vgtrain"]["vision"]["weights_digest"] == module.model.vision.describe()["weights_digest"]
    )

    restored = CaptioningModule.load_from_checkpoint(path, optimizer=partial(torch.optim.AdamW))
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, restored.model.state_dict()[key]), key


def test_trainable_llm_is_checkpointed_and_trained(shapes_dir, tmp_path):
    module = _module(trainable=True)
    llm_before = {k: v.clone() for k, v in module.model.llm.state_dict().items()}
    trainer = _fit(module, _datamodule(module, shapes_dir, cache_features=True), tmp_path, steps=4)
    assert any(not torch.equal(v, llm_before[k]) for k, v in module.model.llm.state_dict().items())
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    keys = torch.load(tmp_path / "full.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("model.llm.") for k in keys)
    assert not any(k.startswith("model.vision.") for k in keys)


def test_checkpoint_from_another_vision_backbone_is_refused(shapes_dir, tmp_path):
    module = _module()
    trainer = _fit(module, _datamodule(module, shapes_dir, cache_features=True), tmp_path, steps=2)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="weights_digest"):
        CaptioningModule.load_from_checkpoint(
            tmp_path / "a.ckpt", optimizer=partial(torch.optim.AdamW), vision={**TINY_VISION, "init_seed": 7}
        )


def test_warmup_then_cosine_schedule():
    values = [warmup_cosine(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for s in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))


def test_warmup_stable_decay_schedule_holds_the_peak_then_decays_over_its_share():
    values = [
        warmup_cosine(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1, decay_fraction=0.25)
        for s in range(111)
    ]
    assert values[9] == pytest.approx(1.0) and values[85] == pytest.approx(1.0)
    assert values[86] < 1.0 and values[110] == pytest.approx(0.1)
    assert 0.5 < values[98] < 0.6  # about halfway through the last 25 steps (0.55 at 97.5)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))


def test_checkpoint_with_another_adapter_shape_is_refused(shapes_dir, tmp_path):
    module = _module()
    trainer = _fit(module, _datamodule(module, shapes_dir, cache_features=True), tmp_path, steps=2)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(RuntimeError, match="mapper"):
        CaptioningModule.load_from_checkpoint(
            tmp_path / "a.ckpt", optimizer=partial(torch.optim.AdamW), mapper={**TINY_MAPPER, "width": 32}
        )


class _StepRecorder(L.Callback):
    """Each training step's loss, and whether autocast was on while the LLM ran its matmuls."""

    def __init__(self, llm: torch.nn.Module) -> None:
        self.losses: list[float] = []
        self.matmul_dtypes: set[torch.dtype] = set()
        self.autocast_on: set[bool] = set()
        for layer in llm.modules():
            if isinstance(layer, torch.nn.Linear) or type(layer).__name__ == "Conv1D":  # GPT-2's linear
                layer.register_forward_hook(self._seen)

    def _seen(self, layer: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # training steps only, not generation or validation
            self.matmul_dtypes.add(output.dtype)
            self.autocast_on.add(torch.is_autocast_enabled("cpu"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_bf16_mixed_precision_trains_on_cpu(shapes_dir, tmp_path):
    """bf16-mixed on CPU: autocast is on in the LLM's matmuls (bf16 activations), the weights stay
    fp32 (master weights), and the loss falls. The LLM trains too: a frozen random LLM behind a
    fresh mapper moves the loss too little in a few steps to tell learning from noise."""
    torch.manual_seed(0)
    module = _module(lr=3e-3, trainable=True)  # the LM head learns the caption words in a few steps
    recorder = _StepRecorder(module.model.llm)
    steps = 8
    trainer = quiet_trainer(
        tmp_path, steps, precision="bf16-mixed", limit_val_batches=0, callbacks=[recorder]
    )
    trainer.fit(module, datamodule=_datamodule(module, shapes_dir, cache_features=True))
    assert recorder.autocast_on == {True}
    assert recorder.matmul_dtypes == {torch.bfloat16}
    assert module.model.mapper.output_proj.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in module.model.llm.parameters())
    losses = recorder.losses
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    # Mean of the last three steps well below the first three (different batches: not step by step).
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, losses  # 6.2 -> 4.6 here
