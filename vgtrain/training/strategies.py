"""Lightning strategies configured for frozen backbones + small trainable adapters.

FSDP shards the frozen LLM one decoder block at a time (each block its own FSDP unit, found by
structure as cross-attention finds it, so any supported LLM works without a list of classes);
everything else (vision tower, embeddings, mapper, cross-attention adapters) stays in the root
unit. ``use_orig_params`` lets one unit hold frozen and trainable tensors side by side.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from vgtrain.models.backbones.llm import LanguageModel
from vgtrain.models.xattn import find_decoder_layers


class DecoderBlockPolicy:
    """FSDP wrapping (or activation-checkpointing) policy: the LLM's decoder blocks.

    FSDP calls a policy on the root module first (``recurse=True``); the block class is looked
    up there, once, from the LLM found inside it.
    """

    def __init__(self) -> None:
        self.block_types: tuple[type[nn.Module], ...] | None = None

    def find_blocks(self, root: nn.Module) -> tuple[type[nn.Module], ...]:
        llm = next((module for module in root.modules() if isinstance(module, LanguageModel)), None)
        if llm is None:
            raise TypeError(f"no LanguageModel inside {type(root).__name__}: nothing for FSDP to shard")
        return tuple({type(block) for block in find_decoder_layers(llm.model)})

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        if self.block_types is None:
            self.block_types = self.find_blocks(module)
        if recurse:
            return True
        return isinstance(module, self.block_types)


def fsdp(activation_checkpointing: bool = False, **kwargs: Any) -> FSDPStrategy:
    """FSDPStrategy wrapping each LLM decoder block; ``activation_checkpointing`` recomputes the
    blocks' activations in the backward pass (less memory for long captions or large batches)."""
    kwargs.setdefault("use_orig_params", True)
    return FSDPStrategy(
        auto_wrap_policy=DecoderBlockPolicy(),
        activation_checkpointing_policy=DecoderBlockPolicy() if activation_checkpointing else None,
        **kwargs,
    )
