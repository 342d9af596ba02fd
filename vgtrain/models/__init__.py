"""Pure-torch models: backbones (+registry), mappers, cross-attention and the composed model."""

from __future__ import annotations

from typing import Any

from vgtrain.models.backbones import LanguageModel, VisionBackbone, build_llm, build_vision
from vgtrain.models.lora import add_lora
from vgtrain.models.mapper import build_mapper
from vgtrain.models.prefix_lm import VisualPrefixLM
from vgtrain.models.resampler import PerceiverResampler
from vgtrain.models.xattn import CrossAttentionAdapter


def build_model(
    vision: dict[str, Any],
    llm: dict[str, Any],
    mapper: dict[str, Any] | None,
    xattn: dict[str, Any] | None = None,
    llm_adapter: dict[str, Any] | None = None,
) -> VisualPrefixLM:
    """Builds backbones from their registry names, then sizes the adapters from them.

    ``mapper`` or ``xattn`` may be None (or ``{"name": "none"}``) to leave that route out;
    ``llm_adapter`` (``{"name": "lora", rank, alpha, dropout, targets}``) adds LoRA to the LLM.
    """
    vision_backbone = build_vision(**vision)
    language_model = build_llm(**llm)
    add_llm_adapter(language_model, llm_adapter)
    prefix_mapper = None
    if mapper and mapper.get("name", "none") != "none":
        mapper_options = dict(mapper)
        prefix_mapper = build_mapper(
            mapper_options.pop("name"),
            vision_token_dim=vision_backbone.token_dim,
            vision_embed_dim=vision_backbone.embed_dim,
            vision_num_tokens=vision_backbone.num_tokens,
            out_dim=language_model.hidden_size,
            **mapper_options,
        )
    cross_attention, memory = None, None
    if xattn and xattn.get("name", "none") != "none":
        cross_attention, memory = build_cross_attention(xattn, vision_backbone, language_model)
    return VisualPrefixLM(vision_backbone, language_model, prefix_mapper, cross_attention, memory)


def add_llm_adapter(llm: LanguageModel, options: dict[str, Any] | None) -> None:
    """LoRA on the frozen LLM (before any cross-attention layer is inserted, so those stay whole)."""
    if not options or options.get("name", "none") == "none":
        return
    options = dict(options)
    name = options.pop("name")
    if name != "lora":
        raise ValueError(f"unknown LLM adapter {name!r}; registered: lora, none")
    if llm.trainable:
        raise ValueError(
            "model.llm.trainable=true trains the whole LLM; LoRA (model/llm_adapter=lora) is for a frozen "
            "one: set model.llm.trainable=false or model/llm_adapter=none"
        )
    add_lora(llm.model, **options)


def build_cross_attention(
    options: dict[str, Any], vision: VisionBackbone, llm: LanguageModel
) -> tuple[CrossAttentionAdapter, PerceiverResampler | None]:
    """Gated cross-attention over the patch tokens, or over a perceiver resampler's latents."""
    options = dict(options)
    name = options.pop("name")
    if name != "gated":
        raise ValueError(f"unknown cross-attention kind {name!r}; registered: gated, none")
    resampler_options = options.pop("resampler", None)
    resampler = None
    memory_dim = vision.token_dim
    if resampler_options:
        resampler = PerceiverResampler(
            vision.token_dim, num_input_tokens=vision.num_tokens, **resampler_options
        )
        memory_dim = resampler.width
    adapter = CrossAttentionAdapter(llm.model, llm.hidden_size, memory_dim, **options)
    return adapter, resampler


__all__ = ["VisualPrefixLM", "add_llm_adapter", "build_cross_attention", "build_model"]
