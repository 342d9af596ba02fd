"""Pure-torch models: backbones (+registry), mappers and the composed visual-prefix LM."""

from __future__ import annotations

from typing import Any

from vgtrain.models.backbones import build_llm, build_vision
from vgtrain.models.mapper import build_mapper
from vgtrain.models.prefix_lm import VisualPrefixLM


def build_model(vision: dict[str, Any], llm: dict[str, Any], mapper: dict[str, Any]) -> VisualPrefixLM:
    """Builds backbones from their registry names, then sizes the mapper from them."""
    vision_backbone = build_vision(**vision)
    language_model = build_llm(**llm)
    mapper_options = dict(mapper)
    adapter = build_mapper(
        mapper_options.pop("name"),
        vision_token_dim=vision_backbone.token_dim,
        vision_embed_dim=vision_backbone.embed_dim,
        vision_num_tokens=vision_backbone.num_tokens,
        out_dim=language_model.hidden_size,
        **mapper_options,
    )
    return VisualPrefixLM(vision_backbone, language_model, adapter)


__all__ = ["VisualPrefixLM", "build_model"]
