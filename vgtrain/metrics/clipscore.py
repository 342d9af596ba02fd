"""CLIPScore and RefCLIPScore (Hessel et al., 2021) with any open_clip backbone of the registry.

CLIP-S(c, v) = w * max(cos(E_c, E_v), 0) with w = 2.5; RefCLIP-S(c, R, v) is the harmonic mean of
CLIP-S(c, v) and max(max_r cos(E_c, E_r), 0). Texts get the paper's prefix "A photo depicts" before
encoding. Both are averaged over images. Scores are only as meaningful as the CLIP weights: the
offline ``tiny`` backbone is random-init, so its scores measure nothing but still exercise the code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

W = 2.5
TEXT_PREFIX = "A photo depicts "


def clip_scores(
    image_embeds: torch.Tensor,
    candidate_embeds: torch.Tensor,
    reference_embeds: Sequence[torch.Tensor] | None = None,
    w: float = W,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-image CLIP-S ``[B]`` and RefCLIP-S ``[B]`` (None without references) from embeddings:
    image ``[B, E]``, candidate ``[B, E]``, references one ``[R_i, E]`` per image. Not normalised
    beforehand: cosines are taken here."""
    image = F.normalize(image_embeds.float(), dim=-1)
    candidate = F.normalize(candidate_embeds.float(), dim=-1)
    clip_s = w * (image * candidate).sum(-1).clamp(min=0)
    if reference_embeds is None:
        return clip_s, None
    if len(reference_embeds) != len(candidate):
        raise ValueError(f"{len(reference_embeds)} reference sets for {len(candidate)} candidates")
    text_s = torch.stack(
        [
            (F.normalize(refs.float(), dim=-1) @ cand).max().clamp(min=0)
            for refs, cand in zip(reference_embeds, candidate, strict=True)
        ]
    )
    total = clip_s + text_s
    ref_clip_s = torch.where(total > 0, 2 * clip_s * text_s / total.clamp(min=1e-12), torch.zeros_like(total))
    return clip_s, ref_clip_s


class ClipScorer:
    """Embeds images and texts with one open_clip model and scores captions."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, transform: Any, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.transform = transform
        self.device = torch.device(device)

    @classmethod
    def from_vision_config(cls, config: dict[str, Any], device: str = "cpu") -> ClipScorer:
        """The CLIP model of a vision registry entry (e.g. an export's vision backbone config, or
        ``{"name": "clip_vit_b32", "pretrained": "/path/to/open_clip.bin"}``)."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        from vgtrain.models.backbones.registry import build_clip

        model, tokenizer = build_clip(**config)
        # The model's own preprocessing (size, resize mode, normalisation), as open_clip records it.
        preprocess = PreprocessCfg(**model.visual.preprocess_cfg)
        return cls(model, tokenizer, image_transform_v2(preprocess, is_train=False), device)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch_size):
            pixels = torch.stack(
                [self.transform(image.convert("RGB")) for image in images[start : start + batch_size]]
            )
            out.append(self.model.encode_image(pixels.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer([TEXT_PREFIX + t for t in texts[start : start + batch_size]])
            out.append(self.model.encode_text(tokens.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score(
        self,
        images: Sequence[Image.Image],
        candidates: Sequence[str],
        references: Sequence[Sequence[str]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-image CLIP-S and RefCLIP-S (see :func:`clip_scores`)."""
        image = self.embed_images(images)
        candidate = self.embed_texts(candidates)
        refs = None
        if references is not None:
            flat = self.embed_texts([r for group in references for r in group])
            sizes = [len(group) for group in references]
            refs = list(torch.split(flat, sizes))
        return clip_scores(image, candidate, refs)
