"""Flamingo-style gated cross-attention, injected into a frozen causal LM without touching it.

Each chosen decoder block gets a forward pre-hook that runs a :class:`GatedCrossAttentionBlock`
on the block's input hidden states (text queries, visual keys/values) before the block itself,
as Flamingo's gated xattn-dense layers do. The LLM's modules and state-dict keys are unchanged
(a bare LLM checkpoint still loads), and the new parameters live in one place,
:class:`CrossAttentionAdapter`. Both tanh gates start at 0, so at initialisation the LLM's
logits are exactly its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class GatedCrossAttentionBlock(nn.Module):
    """Pre-norm multi-head cross-attention then a feed-forward, each behind a tanh gate at 0."""

    def __init__(
        self, dim: int, memory_dim: int, num_heads: int = 8, head_dim: int = 64, ff_mult: int = 4
    ) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.memory_norm = nn.LayerNorm(memory_dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(memory_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ff_mult * dim, bias=False),
            nn.GELU(),
            nn.Linear(ff_mult * dim, dim, bias=False),
        )
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.attend(hidden, self.memory_keys_values(memory))

    def memory_keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory's keys and values, ``[B, heads, M, head_dim]`` each: a decoder computes them
        once per image instead of once per generated token."""
        k, v = self._heads(self.to_kv(self.memory_norm(memory))).chunk(2, dim=-1)
        return k, v

    def attend(self, hidden: torch.Tensor, keys_values: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self._heads(self.to_q(self.norm(hidden)))
        attended = F.scaled_dot_product_attention(q, *keys_values).transpose(1, 2).flatten(2)
        hidden = hidden + torch.tanh(self.attn_gate) * self.to_out(attended)
        return hidden + torch.tanh(self.ff_gate) * self.ff(hidden)


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder block stack, found by structure: the ModuleList of ``num_hidden_layers``
    modules of one class (GPT-2 ``transformer.h``, OPT ``model.decoder.layers``, Llama/Qwen2
    ``model.layers``, ...)."""
    config = getattr(model, "config", None)
    expected = getattr(config, "num_hidden_layers", None)
    candidates = [
        module
        for module in model.modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(child) for child in module}) == 1
        and (expected is None or len(module) == expected)
    ]
    if not candidates:
        raise TypeError(
            f"cannot find the decoder layer stack of {type(model).__name__}: no ModuleList of "
            f"{expected} identical blocks; cross-attention needs one"
        )
    return max(candidates, key=len)


class CrossAttentionAdapter(nn.Module):
    """Gated cross-attention blocks for the chosen layers of a causal LM, and the hooks that run
    them. Bind the visual memory with :meth:`bind` around any forward or ``generate`` call."""

    def __init__(
        self,
        llm: nn.Module,
        hidden_size: int,
        memory_dim: int,
        *,
        every: int = 1,
        layers: Sequence[int] | None = None,
        num_heads: int = 8,
        head_dim: int = 64,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        stack = find_decoder_layers(llm)
        indices = sorted(set(layers)) if layers is not None else list(range(every - 1, len(stack), every))
        bad = [i for i in indices if not 0 <= i < len(stack)]
        if bad or not indices:
            raise ValueError(f"cross-attention layers {bad or indices} not in the LLM's {len(stack)} blocks")
        self.layer_indices = indices
        self.blocks = nn.ModuleDict(
            {
                str(i): GatedCrossAttentionBlock(hidden_size, memory_dim, num_heads, head_dim, ff_mult)
                for i in indices
            }
        )
        self._memory: torch.Tensor | None = None
        # Hooks hold the blocks by closure; the LLM's own modules and keys stay as they were.
        self._handles = [
            stack[i].register_forward_pre_hook(self._hook(self.blocks[str(i)]), with_kwargs=True)
            for i in indices
        ]

    def _hook(self, block: GatedCrossAttentionBlock):
        def run(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
            if self._memory is None:
                raise RuntimeError(
                    "cross-attention layers ran without visual memory: wrap the call in adapter.bind(memory)"
                )
            hidden = args[0] if args else kwargs["hidden_states"]
            memory = self._memory
            if memory.shape[0] != hidden.shape[0]:
                # generate() expands the batch for beams / multiple returns with repeat_interleave.
                if hidden.shape[0] % memory.shape[0]:
                    raise RuntimeError(
                        f"text batch {hidden.shape[0]} is not a multiple of image batch {memory.shape[0]}"
                    )
                memory = memory.repeat_interleave(hidden.shape[0] // memory.shape[0], dim=0)
            # In the LLM's dtype again: the fp32 gates would promote a bf16-stored LLM's stream.
            hidden = block(hidden, memory.to(hidden.dtype)).to(hidden.dtype)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return run

    @property
    def memory(self) -> torch.Tensor | None:
        """The bound visual memory, or None outside :meth:`bind`."""
        return self._memory

    @contextlib.contextmanager
    def bind(self, memory: torch.Tensor) -> Iterator[None]:
        """Makes ``memory`` [B, M, memory_dim] the keys/values of every block for the duration."""
        previous, self._memory = self._memory, memory
        try:
            yield
        finally:
            self._memory = previous

    def gates(self) -> dict[str, float]:
        """tanh of each layer's gates: how much each block currently changes the LLM."""
        return {
            f"layer_{i}": float(torch.tanh(self.blocks[str(i)].attn_gate).detach().abs().item())
            for i in self.layer_indices
        }

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
