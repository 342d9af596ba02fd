"""Language-model steps for hand-written decoding loops: explicit positions and an explicit cache.

Batches are left-padded, so a row's positions start at its first real token (as transformers'
``generate`` computes them from the attention mask); these helpers do the same.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

import torch

from vgtrain.models.backbones.llm import LanguageModel


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision -> float32 for scores and softmaxes; float32 and float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0-based positions counted over real tokens only; padding gets 0 (it is masked anyway)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


@cache
def _cache_argument(model_class: type) -> str:
    # transformers 5 renamed `past_key_values` to `cache`; both spellings are supported.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def lm_forward(
    llm: LanguageModel,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    cache: Any = None,
    use_cache: bool = False,
) -> tuple[torch.Tensor, Any]:
    """Final hidden states ``[B, T, D]`` (before the output head) and the updated KV cache."""
    base = llm.model.base_model
    extra = {_cache_argument(type(base)): cache} if cache is not None else {}
    out = base(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=use_cache,
        **extra,
    )
    if not use_cache:
        return out.last_hidden_state, None
    # transformers 5 returns `cache`; older versions `past_key_values` (reading that in 5 warns).
    return out.last_hidden_state, out.cache if "cache" in out else out.past_key_values


@torch.no_grad()
def sequence_log_probs(
    llm: LanguageModel, embeds: torch.Tensor, attention_mask: torch.Tensor, tokens: list[list[int]]
) -> torch.Tensor:
    """``[N]`` total log p(tokens | context) for each row's continuation, in one no-cache pass."""
    length = max((len(t) for t in tokens), default=0)
    if length == 0:
        return torch.zeros(len(tokens))
    ids = torch.full(
        (len(tokens), length), llm.tokenizer.pad_token_id, dtype=torch.long, device=embeds.device
    )
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(tokens):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    full_mask = torch.cat([attention_mask, mask], dim=1)
    hidden, _ = lm_forward(
        llm, torch.cat([embeds, llm.embed(ids).to(embeds.dtype)], 1), full_mask, position_ids(full_mask)
    )
    start = embeds.shape[1] - 1  # the last context position predicts the first new token
    log_probs = upcast(llm.logits(hidden[:, start : start + length])).log_softmax(-1)
    return (log_probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask).sum(1).cpu()
