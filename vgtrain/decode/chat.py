"""Answers and conversations: prompts rendered by the training template code
(:mod:`vgtrain.models.chat_template`), the visual prefix where ``<image>`` stands."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from vgtrain.decode.base import DecodeInputs, Decoding, Result
from vgtrain.decode.images import ImageError, image_name, open_image
from vgtrain.decode.strategies import get_strategy
from vgtrain.models.backbones.vision import VisualFeatures
from vgtrain.models.chat_template import ConversationRenderer, EncodedConversation, stop_token_ids
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


def renderer_for(decoder: Any) -> ConversationRenderer:
    """The renderer an export was trained with (its ``chat`` block), else the LLM's own chat
    template or the default plain one."""
    return ConversationRenderer.from_config(
        decoder.model.llm.tokenizer, decoder.chat_config, decoder.model.prefix_length
    )


def chat(
    decoder: Any,
    images: Any,
    messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
    strategy: str = "greedy",
    **options: Any,
) -> list[Result]:
    """One :class:`Result` (the next assistant turn) per image. ``messages``: one conversation
    (``{role, content}`` turns ending on a user turn) asked of every image, or one per image.
    An unreadable image gets an error result naming its file, as in ``caption``."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if messages and isinstance(messages[0], (list, tuple)):
        conversations = [list(c) for c in messages]
    else:
        conversations = [list(messages)] * len(images)
    if len(conversations) != len(images):
        raise ValueError(f"got {len(conversations)} conversations for {len(images)} images")
    get_strategy(strategy).resolve(options)
    renderer = renderer_for(decoder)
    encodings = [renderer.encode(c, add_generation_prompt=True) for c in conversations]
    names = [image_name(image, i) for i, image in enumerate(images)]
    results: list[Result | None] = [None] * len(images)
    loaded: list[tuple[int, torch.Tensor]] = []
    for index, image in enumerate(images):
        try:
            loaded.append((index, decoder.model.vision.transform(open_image(image))))
        except ImageError as error:
            results[index] = Result("", None, [], names[index], error=str(error))
    if loaded:
        with torch.no_grad():
            features = decoder.model.vision.encode(torch.stack([p for _, p in loaded]).to(decoder.device))
            embeds, mask = conversation_inputs(decoder.model, features, [encodings[i] for i, _ in loaded])
        job = Decoding(
            llm=decoder.model.llm,
            inputs=DecodeInputs(embeds=embeds, attention_mask=mask, image_embeds=features.pooled),
            clip=lambda: decoder.clip,
            bind_memory=partial(decoder.bind_memory, features),
            xattn=decoder.model.xattn,
        )
        for (index, _), group in zip(loaded, get_strategy(strategy).decode(job, options), strict=True):
            results[index] = Result.best_of(group, names[index])
    return [result for result in results if result is not None]
