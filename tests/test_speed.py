"""Speed switches (model.speed.*): each keeps the loss on a fixed batch (to rounding) and does
what it says; unknown settings are refused."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.nn.attention import SDPBackend

from tests.conftest import TINY_LLM, TINY_MAPPER, TINY_VISION
from tests.test_step_sync import _fixed_batch
from vgtrain.errors import ConfigError
from vgtrain.models.backbones.vision import VisualFeatures
from vgtrain.training.module import CaptioningModule
from vgtrain.training.speed import (
    SpeedSettings,
    apply_at_fit_start,
    attention_context,
    optimizer_options,
    restore_at_fit_end,
)


def _module(**speed) -> CaptioningModule:
    torch.manual_seed(0)  # the same adapter init for every variant
    return CaptioningModule(
        vision=dict(TINY_VISION),
        llm=dict(TINY_LLM),
        mapper=dict(TINY_MAPPER),
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        scheduler={"warmup_steps": 1},
        speed=speed,
    )


def _loss(module: CaptioningModule, batch: dict, autocast: bool = False) -> float:
    features = VisualFeatures(batch["visual_tokens"], batch["visual_pooled"])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module.forward_step(
            batch["input_ids"], batch["attention_mask"], batch["labels"], features=features
        )
    return float(out.loss)


def test_fast_gelu_swaps_the_activation_and_keeps_the_loss():
    slow, fast = _module(fast_gelu=False), _module(fast_gelu=True)
    activations = {type(m).__name__ for m in fast.model.llm.modules()}
    assert "GELU" in activations and "NewGELUActivation" not in activations
    batch = _fixed_batch(slow.model)
    assert _loss(fast, batch) == pytest.approx(_loss(slow, batch), rel=1e-5)


def test_math_attention_under_cpu_bf16_autocast_only():
    settings = SpeedSettings()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with attention_context(settings, torch.device("cpu")):
            from torch.nn.attention import _cur_sdpa_kernel_backends

            assert _cur_sdpa_kernel_backends() == [SDPBackend.MATH]
    with attention_context(settings, torch.device("cpu")):
        from torch.nn.attention import _cur_sdpa_kernel_backends

        assert SDPBackend.FLASH_ATTENTION in _cur_sdpa_kernel_backends()  # fp32: untouched
    module = _module()
    batch = _fixed_batch(module.model)
    math = _loss(module, batch, autocast=True)
    module.speed.cpu_bf16_math_attention = False
    assert math == pytest.approx(_loss(module, batch, autocast=True), rel=2e-2)


def test_frozen_bf16_stores_the_frozen_llm_in_bf16_and_keeps_the_digests():
    module = _module(frozen_bf16=True)
    facts = module.backbone_facts()
    apply_at_fit_start(module.model, module.speed, torch.device("cpu"), "bf16-mixed")
    assert {p.dtype for p in module.model.llm.parameters()} == {torch.bfloat16}
    assert module.backbone_facts() == facts  # checkpoints still name the fp32 weights
    batch = _fixed_batch(module.model)
    assert torch.isfinite(torch.tensor(_loss(module, batch, autocast=True)))
    restore_at_fit_end(module.model)  # what on_fit_end does
    assert {p.dtype for p in module.model.llm.parameters()} == {torch.float32}
    for options, precision in (({"frozen_bf16": False}, "bf16-mixed"), ({}, "32-true")):
        untouched = _module(**options)
        apply_at_fit_start(untouched.model, untouched.speed, torch.device("cpu"), precision)
        assert {p.dtype for p in untouched.model.llm.parameters()} == {torch.float32}


def test_fused_optimizer_unless_the_config_chose():
    settings = SpeedSettings()
    assert optimizer_options(partial(torch.optim.AdamW, lr=1.0), settings) == {"fused": True}
    assert optimizer_options(partial(torch.optim.AdamW, lr=1.0, foreach=True), settings) == {}
    assert optimizer_options(partial(torch.optim.RMSprop, lr=1.0), settings) == {}
    assert optimizer_options(partial(torch.optim.AdamW), SpeedSettings(fused_optimizer=False)) == {}


def test_unknown_or_invalid_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="speed: unknown setting.*turbo"):
        SpeedSettings.from_options({"turbo": True})
    with pytest.raises(ConfigError, match="speed.lm_loss='fast'"):
        SpeedSettings.from_options({"lm_loss": "fast"})


def test_frozen_bf16_llm_with_cross_attention_trains_a_step():
    from tests.conftest import TINY_LLM, TINY_VISION

    torch.manual_seed(0)
    module = CaptioningModule(
        vision=dict(TINY_VISION),
        llm=dict(TINY_LLM),
        mapper={"name": "none"},
        xattn={"name": "gated", "every": 1, "num_heads": 2, "head_dim": 32, "ff_mult": 2},
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        scheduler={"warmup_steps": 1},
    )
    apply_at_fit_start(module.model, module.speed, torch.device("cpu"), "bf16-mixed")
    batch = _fixed_batch(module.model)
    features = VisualFeatures(batch["visual_tokens"], batch["visual_pooled"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module.forward_step(
            batch["input_ids"], batch["attention_mask"], batch["labels"], features=features
        )
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in module.model.xattn.parameters() if p.requires_grad)


def test_compiled_forward_gives_the_eager_loss(monkeypatch):
    """trainer.compile: the step runs through the compiled module (which, unlike a plain module,
    has no truth value) and gives the eager loss. The eager backend keeps the test fast; what
    is checked is vgtrain's side of the wrapping, not inductor."""
    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda model, **options: real_compile(model, backend="eager", **options)
    )
    eager, compiled = _module(), _module(compile=True)
    batch = _fixed_batch(eager.model)
    assert compiled.__dict__["_compiled"] is not None
    assert _loss(compiled, batch) == pytest.approx(_loss(eager, batch), abs=1e-6)
