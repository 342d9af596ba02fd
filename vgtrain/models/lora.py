"""LoRA on the frozen LLM, through peft (``model/llm_adapter=lora``).

The LoRA layers are injected into the Hugging Face model in place (``peft.inject_adapter_in_model``),
so the LLM keeps its class, ``generate`` and KV cache; the base weights stay frozen and only the
``lora_A``/``lora_B`` tensors train (and are all a checkpoint or export holds of the LLM).

Targets are found by structure, not by name lists per family: the linear layers (``nn.Linear``,
or GPT-2's ``Conv1D``) inside the LLM's attention modules (``attention``: GPT-2 ``c_attn``/``c_proj``,
OPT ``q/k/v/out_proj``, Llama-family ``q/k/v/o_proj``), or in its MLPs too (``attention+mlp``),
or an explicit list of module-name suffixes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

LORA_MARK = "lora_"
TARGET_SETS = ("attention", "attention+mlp")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_lora_targets(model: nn.Module, targets: str | Sequence[str] = "attention") -> list[str]:
    """Full module names of the frozen linear layers LoRA wraps (see the module docstring)."""
    modules = dict(model.named_modules())
    found = []
    for name, module in modules.items():
        if not _is_linear(module) or "." not in name:
            continue
        parent = type(modules[name.rsplit(".", 1)[0]]).__name__.lower()
        if isinstance(targets, str):
            if targets not in TARGET_SETS:
                raise ValueError(
                    f"lora targets must be one of {TARGET_SETS} or a list of names, got {targets!r}"
                )
            wanted = "attention" in parent or (targets == "attention+mlp" and "mlp" in parent)
        else:
            wanted = any(name == t or name.endswith("." + t) for t in targets)
        if wanted and not any(p.requires_grad for p in module.parameters()):
            found.append(name)
    if not found:
        raise ValueError(
            f"no LoRA target found in {type(model).__name__} for targets={targets!r}; "
            "give model.llm_adapter.targets as a list of module names"
        )
    return found


def add_lora(
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: str | Sequence[str] = "attention",
) -> list[str]:
    """Injects LoRA into ``model`` (in place) and leaves only the LoRA tensors trainable; returns
    the wrapped module names. LoRA B starts at zero, so the LLM's outputs are unchanged at first."""
    from peft import LoraConfig, inject_adapter_in_model

    names = find_lora_targets(model, targets)
    fan_in_fan_out = any(type(dict(model.named_modules())[n]).__name__ == "Conv1D" for n in names)
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=names,
        fan_in_fan_out=fan_in_fan_out,  # GPT-2's Conv1D stores weights transposed
        bias="none",
    )
    inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = LORA_MARK in name
    return names


def base_state(model: nn.Module) -> dict[str, Any]:
    """The model's tensors as they were before LoRA: LoRA tensors left out, the wrapped layers'
    ``base_layer`` names restored (for weight digests that LoRA must not change)."""
    return {
        key.replace(".base_layer.", "."): value
        for key, value in model.state_dict().items()
        if LORA_MARK not in key
    }


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every LoRA layer into its base weight and removes the wrappers (in place)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer()
            )
    return model
