"""Speed settings of the training step (``speed:`` in conf/train.yaml, ``trainer.compile``).

Each is a switch; the defaults are on where they were measured to be safe and not slower:

- ``tf32``: TF32 matmuls on CUDA (``torch.set_float32_matmul_precision("high")``); no effect on CPU.
- ``fused_optimizer``: the fused (single-kernel) AdamW/Adam/SGD step where the optimizer has one
  (CUDA and CPU; on the CPU here 5x faster than the default for a 31M-parameter ClipCap mapper).
  It also lets NonFiniteGuard skip a step and clip gradients on the device, with no host sync.
- ``frozen_bf16``: store the frozen LLM's weights in bf16 under ``bf16-mixed`` instead of having
  autocast re-cast fp32 weights in every step (on the AMX CPU here the GPT-2-small-sized step took
  19% less CPU time; GPUs gain more). The frozen vision tower stays fp32: its strided bf16
  attention was 6x slower on the CPU.
- ``fast_gelu``: GPT-2's tanh GELU as one fused op instead of eight elementwise ones (the same
  function, to rounding).
- ``lm_loss``: how the output head and cross-entropy run (see vgtrain/models/lm_loss.py).
- ``cpu_bf16_math_attention``: under bf16 autocast on the CPU, SDPA's plain (math) kernel instead
  of its flash kernel, whose bf16 backward is ~8x slower than in fp32 there (AMX matmuls then do
  the work); no effect on GPUs or in fp32.
- ``compile`` (``trainer.compile``): ``torch.compile`` of the model's forward (and so backward).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from omegaconf import DictConfig, open_dict
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vgtrain.errors import ConfigError
from vgtrain.models import VisualPrefixLM
from vgtrain.models.lm_loss import LOSS_IMPLEMENTATIONS

log = logging.getLogger(__name__)


@dataclass
class SpeedSettings:
    tf32: bool = True
    fused_optimizer: bool = True
    frozen_bf16: bool = True
    fast_gelu: bool = True
    lm_loss: str = "auto"
    cpu_bf16_math_attention: bool = True
    compile: bool = False

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> SpeedSettings:
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"speed: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        settings = cls(**options)
        if settings.lm_loss not in LOSS_IMPLEMENTATIONS:
            raise ConfigError(
                f"speed.lm_loss={settings.lm_loss!r}; choose from {', '.join(LOSS_IMPLEMENTATIONS)}"
            )
        return settings

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_trainer_config(trainer: DictConfig) -> tuple[DictConfig, bool]:
    """The trainer config without vgtrain's ``compile`` key (Lightning's Trainer has none), and
    that key's value."""
    settings = trainer.copy()
    with open_dict(settings):
        compile_step = bool(settings.pop("compile", False))
    return settings, compile_step


def optimizer_options(factory: Any, settings: SpeedSettings) -> dict[str, Any]:
    """``fused=True`` for optimizers that take it (torch's Adam, AdamW, SGD, Adagrad), unless the
    config already chose ``fused``/``foreach`` itself."""
    keywords = getattr(factory, "keywords", {}) or {}
    target = getattr(factory, "func", factory)
    if not settings.fused_optimizer or "fused" in keywords or "foreach" in keywords:
        return {}
    if target in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD, torch.optim.Adagrad):
        return {"fused": True}
    return {}


def use_fast_gelu(model: nn.Module) -> int:
    """Swaps transformers' ``NewGELUActivation`` (GPT-2's ``gelu_new``) for ``nn.GELU("tanh")``,
    the same function in one op; returns how many were swapped."""
    try:
        from transformers.activations import NewGELUActivation
    except ImportError:  # pragma: no cover - transformers always has it
        return 0
    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


def apply_to_model(model: VisualPrefixLM, settings: SpeedSettings) -> None:
    """Device-independent settings, applied when the module is built."""
    model.lm_loss = settings.lm_loss
    if settings.fast_gelu:
        use_fast_gelu(model.llm)


def attention_context(settings: SpeedSettings, device: torch.device) -> contextlib.AbstractContextManager:
    """The SDPA kernel choice for one training or validation step."""
    if (
        settings.cpu_bf16_math_attention
        and device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    ):
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def apply_at_fit_start(
    model: VisualPrefixLM, settings: SpeedSettings, device: torch.device, precision: str
) -> None:
    """Settings that depend on the device and precision the trainer chose."""
    if device.type == "cuda" and settings.tf32:
        torch.set_float32_matmul_precision("high")
    if settings.frozen_bf16 and precision == "bf16-mixed" and not model.llm.trainable:
        model.llm.to(torch.bfloat16)
        log.info("frozen LLM weights stored in bf16 (speed.frozen_bf16)")


def restore_at_fit_end(model: VisualPrefixLM) -> None:
    """Back to fp32 after a fit that stored the frozen LLM in bf16, so that evaluation and
    decoding afterwards (and a later fit in another precision) get fp32 modules, as built. The
    weights keep their bf16 rounding: the values the run trained against."""
    if not model.llm.trainable and any(p.dtype == torch.bfloat16 for p in model.llm.parameters()):
        model.llm.to(torch.float32)
