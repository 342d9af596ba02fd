"""Frozen vision and language backbones, and the registry that builds them from config names."""

from vgtrain.models.backbones.llm import LanguageModel
from vgtrain.models.backbones.registry import (
    LLM_BACKBONES,
    VISION_BACKBONES,
    BackboneError,
    build_llm,
    build_vision,
)
from vgtrain.models.backbones.vision import VisionBackbone, VisualFeatures

__all__ = [
    "LLM_BACKBONES",
    "VISION_BACKBONES",
    "BackboneError",
    "LanguageModel",
    "VisionBackbone",
    "VisualFeatures",
    "build_llm",
    "build_vision",
]
