"""Caption generation during training and evaluation: the prefix (and prompt) go in as embeddings;
greedy runs on vgtrain's static KV cache (vgtrain.decode.search) where the LLM family allows, other
searches (``generate_kwargs``) on transformers' ``generate``."""

from __future__ import annotations

from typing import Any

import torch

from vgtrain.decode.search import Limits, sample_or_greedy
from vgtrain.decode.static_lm import engine, supports
from vgtrain.models.backbones.vision import VisualFeatures
from vgtrain.models.prefix_lm import VisualPrefixLM, prompt_token_ids


@torch.no_grad()
def generate_captions(
    model: VisualPrefixLM,
    features: VisualFeatures,
    *,
    prompt: str = "",
    max_new_tokens: int = 24,
    **generate_kwargs: Any,
) -> list[str]:
    """Decodes one caption per image; greedy unless ``generate_kwargs`` asks otherwise."""
    tokenizer = model.llm.tokenizer
    batch = features.pooled.shape[0]
    prompt_ids = torch.tensor([prompt_token_ids(tokenizer, prompt, model.prefix_length)], dtype=torch.long)
    prompt_ids = prompt_ids.to(features.pooled.device).expand(batch, -1)
    mask = torch.ones_like(prompt_ids)
    embeds, mask = model.input_embeddings(features, prompt_ids, mask)
    options = {"do_sample": False, "num_beams": 1, **generate_kwargs}
    with model.visual_context(features):
        if not generate_kwargs and supports(model.llm) is None:
            memory = model.xattn.memory if model.xattn is not None else None
            lm, step = engine(model.llm, mask, mask.shape[1] + max_new_tokens, model.xattn, memory)
            limits = Limits(max_new_tokens, 0, model.llm.eos_token_id, tokenizer.pad_token_id)
            new_tokens = sample_or_greedy(lm, embeds, limits, step=step)
            texts = tokenizer.batch_decode(cut_after_eos(new_tokens, limits), skip_special_tokens=True)
            return [text.strip() for text in texts]
        new_tokens = model.llm.model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=model.llm.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def cut_after_eos(tokens: torch.Tensor, limits: Limits) -> list[list[int]]:
    """Rows up to their first EOS: what ``generate`` returns once decoded with special tokens
    skipped (a padding token that is not special would otherwise show in the text)."""
    rows = tokens.tolist()
    return [row[: row.index(limits.eos)] if limits.eos in row else row for row in rows]
