"""In-memory cache of frozen vision features, for datasets that fit in memory.

The vision tower is frozen and the demo's transform has no augmentation, so a sample's features
never change: computing them once and training from the cache removes the vision forward pass
(about half of the demo's step) and the image decoding from every step.

vgtrain has two feature caches because they serve two sizes of data:

- this one (``data.cache_features=true``): computed at the start of every run over the training
  split and held in RAM; nothing to prepare or keep on disk, and training visits the samples in
  a (seed, epoch) permutation that resumes exactly. Right for small data (the demo: 16,000
  scenes, 38 s to compute);
- the on-disk one (:mod:`vgtrain.data.feature_store`, ``vgtrain cache`` then
  ``data.use_cached_features=true``): computed once per backbone and reused by every later run,
  streamed from shards like the images, so it suits data that does not fit in RAM or is trained
  on many times.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from vgtrain.data.conversation import Visit, visit_conversation, visit_length
from vgtrain.data.feature_encoder import FeatureEncoder, encode_overlapped
from vgtrain.models.backbones.vision import VisionBackbone


class CachedFeatures(Dataset):
    """Samples ``{"tokens", "pooled", "caption", "key"}`` with precomputed visual features."""

    def __init__(
        self,
        tokens: torch.Tensor,
        pooled: torch.Tensor,
        captions: list[str],
        keys: list[str],
        skipped: dict[str, int] | None = None,
        conversations: list[list[Any]] | None = None,
        regions: list[list[Any]] | None = None,
    ) -> None:
        if not (len(tokens) == len(pooled) == len(captions) == len(keys)):
            raise ValueError("cached features, captions and keys differ in length")
        self.skipped: dict[str, int] = dict(skipped or {})  # bad samples met while caching
        self.tokens = tokens
        self.pooled = pooled
        self.captions = captions
        self.keys = keys
        # Per sample, its conversations (none: a caption sample); the collator draws one per visit.
        self.conversations = conversations if conversations and any(conversations) else None
        # Per sample, its grounding regions (models/grounding.py), when any sample has some.
        self.regions = regions if regions and any(regions) else None

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int | tuple[int, Visit]) -> dict[str, Any]:
        """The sample at ``index``; at ``(index, visit)`` (a training sampler's draw, see
        :class:`~vgtrain.training.visit_sampler.VisitSampler`) with the ``conversation`` that
        visit trains on (None: the caption) for the collator to render."""
        visit: Visit | None = None
        if isinstance(index, tuple):
            index, visit = index
        item = {
            "tokens": self.tokens[index],
            "pooled": self.pooled[index],
            "caption": self.captions[index],
            "key": self.keys[index],
        }
        if self.conversations is not None and self.conversations[index]:
            item["conversations"] = self.conversations[index]
        if self.regions is not None:
            item["regions"] = self.regions[index]
        if visit is not None:
            item["conversation"] = visit_conversation(item.get("conversations") or [], visit)
        return item

    def visit_length(self, index: int, visit: Visit) -> int:
        return visit_length(self.captions[index], self.conversation_lists(index), visit)

    def conversation_lists(self, index: int) -> list[list[Any]]:
        return (self.conversations[index] or []) if self.conversations is not None else []


@torch.no_grad()
def compute_features(
    vision: VisionBackbone,
    batches: Iterable[dict[str, Any]],
    description: str,
    device: str | torch.device = "auto",
    precision: str = "auto",
) -> CachedFeatures:
    """Runs the vision tower once over every batch (each must carry ``pixel_values``) on
    ``device`` (``auto``: CUDA when available, bf16 autocast there; see
    :mod:`vgtrain.data.feature_encoder`), overlapped with the loader's workers decoding the next
    batches. Features come back as float32 on the CPU; the tower goes back to where it was."""
    home = next(vision.parameters()).device
    encoder = FeatureEncoder(vision, device, precision)
    tokens, pooled, captions, keys, conversations, regions = [], [], [], [], [], []
    skipped: Counter[str] = Counter()
    try:
        encoded = encode_overlapped(encoder, batches, lambda batch: batch["pixel_values"])
        with tqdm(desc=description, unit="img") as bar:
            for batch, (batch_tokens, batch_pooled) in encoded:
                skipped.update(batch.get("skipped", {}))
                tokens.append(batch_tokens)
                pooled.append(batch_pooled)
                captions.extend(batch["captions"])
                keys.extend(batch["keys"])
                conversations.extend(batch.get("conversations") or [[]] * len(batch["keys"]))
                regions.extend(batch.get("regions") or [[]] * len(batch["keys"]))
                bar.update(len(batch["keys"]))
    finally:
        vision.to(home)
    if not captions:
        raise ValueError(f"{description}: no samples to cache")
    return CachedFeatures(
        torch.cat(tokens), torch.cat(pooled), captions, keys, dict(skipped), conversations, regions
    )
