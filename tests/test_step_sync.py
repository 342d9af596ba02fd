"""The lean training step: caption positions as index tensors, the head + cross-entropy
implementations, clipping and the non-finite skip decided on the device, no host reads between
logging steps (and, on CUDA, no synchronisation at all)."""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import quiet_trainer, tiny_datamodule, tiny_module
from vgtrain.data.collate import CaptionCollator
from vgtrain.models import lm_loss
from vgtrain.models.lm_loss import caption_loss, caption_positions
from vgtrain.training.callbacks import NonFiniteGuard


def _fixed_batch(model, size: int = 6) -> dict:
    collator = CaptionCollator(model.llm.tokenizer, prefix_length=model.prefix_length)
    captions = ["a small red circle at the top left", "a large blue square", "a green star"] * (size // 3)
    torch.manual_seed(0)
    batch = collator([{"caption": c} for c in captions])
    batch["visual_tokens"] = torch.randn(size, model.vision.num_tokens, model.vision.token_dim)
    batch["visual_pooled"] = torch.randn(size, model.vision.embed_dim)
    return batch


def _reference_loss(model, batch) -> torch.Tensor:
    """The step's loss as it was computed before positions became index tensors: boolean-mask
    indexing, logits of the caption positions, fp32 cross-entropy."""
    from vgtrain.models.backbones.vision import VisualFeatures

    features = VisualFeatures(batch["visual_tokens"], batch["visual_pooled"])
    embeds, mask = model.input_embeddings(features, batch["input_ids"], batch["attention_mask"])
    hidden = model.llm(embeds, mask).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = model.llm.logits(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


@pytest.mark.parametrize("implementation", ["torch", "chunked"])
def test_loss_on_a_fixed_batch_equals_the_masked_reference(tiny_model, implementation, monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", 7 * 512)  # several chunks for the chunked loss
    tiny_model.lm_loss = implementation
    batch = _fixed_batch(tiny_model)
    from vgtrain.models.backbones.vision import VisualFeatures

    features = VisualFeatures(batch["visual_tokens"], batch["visual_pooled"])
    out = tiny_model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        features=features,
        loss_index=batch["loss_index"],
        loss_targets=batch["loss_targets"],
    )
    reference = _reference_loss(tiny_model, batch)
    assert float(out.loss) == pytest.approx(float(reference), rel=1e-6)
    assert int(out.num_tokens) == int((batch["labels"][:, 1:] != -100).sum())


@pytest.mark.parametrize("weight_trainable", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_head_cross_entropy_matches_torch_in_value_and_gradients(
    monkeypatch, weight_trainable, autocast
):
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", 5 * 97)  # 5 positions per chunk
    torch.manual_seed(0)
    hidden = torch.randn(3, 9, 16)
    labels = torch.randint(0, 97, (3, 9))
    labels[:, :3] = -100
    labels[0, 7:] = -100
    weight = torch.randn(97, 16) * 0.3
    index, targets = caption_positions(labels)
    results = {}
    for how in ("torch", "chunked"):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(weight_trainable)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = caption_loss(h, index, targets, w, implementation=how)
        out.loss.backward()
        results[how] = (out.loss.detach(), out.num_correct, h.grad, w.grad)
    tolerance = {"rtol": 2e-2, "atol": 2e-3} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    (loss_a, correct_a, gh_a, gw_a), (loss_b, correct_b, gh_b, gw_b) = results["torch"], results["chunked"]
    torch.testing.assert_close(loss_b, loss_a, **tolerance)
    torch.testing.assert_close(gh_b, gh_a, **tolerance)
    if weight_trainable:
        torch.testing.assert_close(gw_b, gw_a, **tolerance)
    else:
        assert gw_a is None and gw_b is None
    if not autocast:
        assert int(correct_a) == int(correct_b)


def test_collator_positions_pick_exactly_the_labelled_tokens(tiny_model):
    batch = _fixed_batch(tiny_model)
    flat = batch["labels"][:, 1:].flatten()
    assert torch.equal(flat[batch["loss_index"]], batch["loss_targets"])
    assert int((flat != -100).sum()) == batch["loss_index"].numel()


@pytest.mark.parametrize("clip", [1e-3, 1e6])
def test_clipping_on_the_device_takes_the_step_clip_grad_norm_would(clip):
    """A fused AdamW step with the guard's grad_scale equals clip_grad_norm_ + AdamW (foreach)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(4))]
    grads = [torch.randn_like(p) * 3 for p in params]

    def step(fused: bool) -> list[torch.Tensor]:
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for copy, grad in zip(copies, grads, strict=True):
            copy.grad = grad.clone()
        optimizer = torch.optim.AdamW(copies, lr=0.1, fused=fused, foreach=None if fused else True)
        if fused:
            norm = torch.nn.utils.get_total_norm([c.grad for c in copies])
            optimizer.grad_scale = ((norm + 1e-6) / clip).clamp(min=1.0)
            optimizer.found_inf = torch.zeros(())
        else:
            torch.nn.utils.clip_grad_norm_(copies, clip)
        optimizer.step()
        return [c.detach() for c in copies]

    for a, b in zip(step(True), step(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class HostReads(L.Callback):
    """Counts Python-level reads of tensor values (item, bool, float, tolist) during the steps
    between logging steps (steps 2..8 of a run logging every 10)."""

    READS = ("item", "__bool__", "__float__", "__int__", "tolist")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.reads: list[str] = []
        self.active = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 2:
            for name in self.READS:
                original = getattr(torch.Tensor, name)

                def counted(tensor, *args, _name=name, _original=original, **kwargs):
                    if self.active:
                        self.reads.append(_name)
                    return _original(tensor, *args, **kwargs)

                self.monkeypatch.setattr(torch.Tensor, name, counted)
        self.active = 2 <= batch_idx <= 7

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.active = False


def test_no_tensor_value_is_read_between_logging_steps(shapes_dir, tmp_path, monkeypatch):
    module = tiny_module()
    patterns = json.loads((shapes_dir / "manifest.json").read_text())["patterns"]
    datamodule = tiny_datamodule(module, patterns["train"], cache_features=True)
    reads = HostReads(monkeypatch)
    trainer = quiet_trainer(
        tmp_path,
        12,
        enable_checkpointing=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        log_every_n_steps=10,
        callbacks=[NonFiniteGuard(), reads],
    )
    trainer.fit(module, datamodule=datamodule)
    assert reads.reads == []
    assert trainer.optimizers[0].defaults["fused"]  # the path without reads is the fused one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_steps_do_not_synchronise_on_cuda(shapes_dir, tmp_path):
    """Steps between logging steps run under sync debug mode "error": any host sync raises."""

    class SyncDebug(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            torch.cuda.set_sync_debug_mode("error" if 3 <= batch_idx <= 8 else "default")

        def on_train_end(self, trainer, pl_module) -> None:
            torch.cuda.set_sync_debug_mode("default")

    module = tiny_module()
    patterns = json.loads((shapes_dir / "manifest.json").read_text())["patterns"]
    datamodule = tiny_datamodule(module, patterns["train"], cache_features=True, device_resident=True)
    trainer = quiet_trainer(
        tmp_path,
        12,
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        enable_checkpointing=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        log_every_n_steps=10,
        callbacks=[NonFiniteGuard(), SyncDebug()],
    )
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.global_step == 12


def test_a_custom_optimizer_without_fused_still_gets_the_guard(shapes_dir, tmp_path):
    module = tiny_module()
    module.optimizer_factory = partial(torch.optim.AdamW, lr=1e-3, foreach=True)  # the user's choice wins
    patterns = json.loads((shapes_dir / "manifest.json").read_text())["patterns"]
    trainer = quiet_trainer(
        tmp_path, 2, enable_checkpointing=False, limit_val_batches=0, callbacks=[NonFiniteGuard()]
    )
    trainer.fit(module, datamodule=tiny_datamodule(module, patterns["train"], cache_features=True))
    assert not trainer.optimizers[0].defaults.get("fused")
