"""Answers and conversations: prompts rendered by the training template code
(:mod:`vgtrain.models.chat_template`), the visual prefix where ``<image>`` stands."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vgtrain.models.backbones.vision import VisualFeatures
from vgtrain.models.chat_template import EncodedConversation, stop_token_ids
from vgtrain.models.prefix_lm import VisualPrefixLM


def conversation_inputs(
    model: VisualPrefixLM, features: VisualFeatures, encodings: Sequence[EncodedConversation]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[pad; text before the image; prefix; text after]`` per row (one row per encoding, its
    image in ``features``' same row), left-padded so every row ends where generation starts."""
    tokenizer = model.llm.tokenizer
    device = features.tokens.device
    width = max(len(e.ids) for e in encodings)
    ids = torch.full((len(encodings), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, encoded in enumerate(encodings):
        if encoded.ids:
            ids[row, width - len(encoded.ids) :] = torch.tensor(encoded.ids, device=device)
            mask[row, width - len(encoded.ids) :] = 1
    position = torch.tensor(
        [width - len(e.ids) + e.image_index for e in encodings], dtype=torch.long, device=device
    )
    # Left padding sits before the image: the prefix goes after it (at position pad + index).
    return model.input_embeddings(features, ids, mask, image_position=position)


@torch.no_grad()
def generate_answers(
    model: VisualPrefixLM,
    features: VisualFeatures,
    encodings: Sequence[EncodedConversation],
    *,
    max_new_tokens: int = 16,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy answers (unless ``generate_kwargs`` says otherwise), one per encoding; each must
    end with the generation prompt (``encode(..., add_generation_prompt=True)``)."""
    tokenizer = model.llm.tokenizer
    embeds, mask = conversation_inputs(model, features, encodings)
    options = {"do_sample": False, "num_beams": 1, **generate_kwargs}
    with model.visual_context(features):
        new_tokens = model.llm.model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
