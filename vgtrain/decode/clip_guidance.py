"""CLIP image-text similarity for guided decoding (MAGIC) and re-ranking.

The image side is the vision backbone's pooled output, which *is* the CLIP image embedding; only
the text tower is kept from the full open_clip model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vgtrain.decode.lm import upcast
from vgtrain.models.backbones import BackboneError
from vgtrain.models.backbones.registry import build_clip
from vgtrain.models.backbones.vision import VisionBackbone


class ClipGuide(nn.Module):
    """``similarity(image_embeds, texts)`` = logit_scale · cos(image, text), as CLIP's logits."""

    def __init__(self, clip: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer

    @classmethod
    def for_vision(cls, vision_config: dict[str, Any], vision: VisionBackbone) -> ClipGuide:
        """Builds the CLIP model of the same registry entry; refuses one whose image tower is not
        the decoder's (its text embeddings would live in another space)."""
        clip, tokenizer = build_clip(**vision_config)
        theirs, ours = clip.visual.state_dict(), vision.visual.state_dict()
        if theirs.keys() != ours.keys() or any(
            not torch.equal(theirs[k], ours[k].to(theirs[k].device)) for k in ours
        ):
            raise BackboneError(
                f"CLIP guidance: the open_clip model built for vision backbone {vision_config.get('name')!r} "
                "has another image tower than the decoder's; its text embeddings would not match"
            )
        del clip.visual  # the decoder's vision backbone already computes the image embedding
        return cls(clip, tokenizer)

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        device = self.clip.logit_scale.device
        return F.normalize(upcast(self.clip.encode_text(self.tokenizer(texts).to(device))), dim=-1)

    @torch.no_grad()
    def similarity(self, image_embeds: torch.Tensor, texts: list[list[str]]) -> torch.Tensor:
        """``[B, n]`` CLIP logits of image ``b`` against each of its ``n`` texts."""
        batch, n = len(texts), len(texts[0])
        text = self.text_embeds([t for group in texts for t in group]).view(batch, n, -1)
        image = F.normalize(image_embeds.to(text), dim=-1)
        return self.clip.logit_scale.exp().to(text) * torch.einsum("be,bne->bn", image, text)
