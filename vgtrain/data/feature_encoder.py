"""The frozen vision tower as a feature-caching engine, shared by both feature caches.

- On the device (``device="auto"``: the current CUDA device when there is one), in bf16 autocast
  there (``precision="auto"``); fp32 on the CPU, where a bf16 tower was measured 6x slower.
- Overlapped: :func:`encode_overlapped` launches batch i's forward pass before it copies batch
  i-1's features back to the host, so the device computes while the host converts and writes.
  Batches come from a DataLoader whose workers decode images meanwhile (pinned on CUDA, so the
  host-to-device copy is asynchronous).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch

from vgtrain.models.backbones.vision import VisionBackbone, VisualFeatures

PRECISIONS = ("auto", "bf16", "fp32")
T = TypeVar("T")


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: the current CUDA device if CUDA is available, else the CPU."""
    if str(device) == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    return torch.device(device)


class FeatureEncoder:
    """Pixels ``[B, 3, H, W]`` (any device) -> the tower's features on its device."""

    def __init__(
        self, vision: VisionBackbone, device: str | torch.device = "auto", precision: str = "auto"
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"feature precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        self.device = resolve_device(device)
        self.vision = vision.to(self.device).eval()
        bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> VisualFeatures:
        pixels = pixels.to(self.device, non_blocking=True)
        with self.autocast:
            return self.vision.encode(pixels)


def host_float32(features: VisualFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, pooled) as float32 CPU tensors (waits for the device's work on them)."""
    return features.tokens.float().cpu(), features.pooled.float().cpu()


def encode_overlapped(
    encoder: FeatureEncoder, batches: Iterable[T], pixels_of: Any
) -> Iterator[tuple[T, tuple[torch.Tensor, torch.Tensor] | None]]:
    """``(batch, (tokens, pooled) on the host)`` for each batch, in order; ``pixels_of(batch)``
    gives its pixels or None (nothing decodable: features None). One batch stays in flight."""
    pending: tuple[T, VisualFeatures | None] | None = None
    for batch in batches:
        pixels = pixels_of(batch)
        launched = (batch, encoder(pixels) if pixels is not None else None)
        if pending is not None:
            yield pending[0], host_float32(pending[1]) if pending[1] is not None else None
        pending = launched
    if pending is not None:
        yield pending[0], host_float32(pending[1]) if pending[1] is not None else None
