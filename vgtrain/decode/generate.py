"""Caption generation: the prefix (and prompt) go in as ``inputs_embeds``; transformers'
``generate`` does the search with its KV cache."""

from __future__ import annotations

from typing import Any

import torch

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
        new_tokens = model.llm.model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=model.llm.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
