"""Frozen CLIP vision tower over open_clip, exposing patch tokens and the pooled embedding."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vgtrain.models.backbones.frozen import FrozenModule


@dataclass
class VisualFeatures:
    """What the vision tower hands the adapters.

    tokens: patch tokens [B, N, token_dim] (after the tower's final norm, before its projection).
    pooled: the CLIP image embedding [B, embed_dim] (after the projection, not normalised).
    """

    tokens: torch.Tensor
    pooled: torch.Tensor

    def index_select(self, index: torch.Tensor) -> VisualFeatures:
        return VisualFeatures(self.tokens.index_select(0, index), self.pooled.index_select(0, index))


class VisionBackbone(FrozenModule):
    """Wraps an open_clip ``VisualTransformer``; ``encode(images)`` returns :class:`VisualFeatures`.

    ``pool_tokens`` merges each ``pool x pool`` block of the patch grid into one token (2 -> 4x
    fewer tokens), which shortens every attention over the visual memory downstream.
    ``token_pooling="mean"`` averages the block; ``"concat"`` stacks it along the channels
    (space-to-depth), keeping every patch's information at ``pool**2`` times the width.
    """

    def __init__(
        self,
        visual: nn.Module,
        transform: Callable[[Any], torch.Tensor],
        *,
        name: str,
        source: str,
        pool_tokens: int = 1,
        token_pooling: str = "mean",
        trainable: bool = False,
    ) -> None:
        super().__init__(trainable=trainable)
        if not hasattr(visual, "output_tokens"):
            raise TypeError(
                f"vision backbone {name!r}: {type(visual).__name__} does not expose patch tokens; "
                "vgtrain supports open_clip ViT towers"
            )
        visual.output_tokens = True
        self.visual = visual
        self.transform = transform
        self.name = name
        self.source = source
        if token_pooling not in ("mean", "concat"):
            raise ValueError(f"token_pooling must be 'mean' or 'concat', got {token_pooling!r}")
        self.pool_tokens = pool_tokens
        self.token_pooling = token_pooling
        grid = visual.grid_size
        self.grid_size: tuple[int, int] = (grid[0] // pool_tokens, grid[1] // pool_tokens)
        self.image_size: int = (
            int(visual.image_size[0]) if isinstance(visual.image_size, tuple) else int(visual.image_size)
        )
        width = int(visual.transformer.width)
        self.token_dim: int = (
            width * pool_tokens**2 if token_pooling == "concat" and pool_tokens > 1 else width
        )
        self.embed_dim: int = int(visual.output_dim)
        self.freeze_if_needed()

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def encode(self, images: torch.Tensor) -> VisualFeatures:
        # Under CPU bf16 autocast open_clip's tower runs ~6x slower than in fp32 (one strided bf16
        # bmm per block copies its input element-wise, measured); on the CPU it runs in fp32.
        cpu_autocast = images.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        precision = torch.autocast("cpu", enabled=False) if cpu_autocast else contextlib.nullcontext()
        with precision, torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            pooled, tokens = self.visual(images)
        if self.pool_tokens > 1:
            b, n, d = tokens.shape
            h, w = self.visual.grid_size
            grid = tokens.transpose(1, 2).reshape(b, d, h, w)
            if self.token_pooling == "mean":
                grid = F.avg_pool2d(grid, self.pool_tokens)
            else:
                grid = F.pixel_unshuffle(grid, self.pool_tokens)
            tokens = grid.flatten(2).transpose(1, 2)
        return VisualFeatures(tokens=tokens, pooled=pooled)

    def describe(self) -> dict[str, Any]:
        """The facts a checkpoint or export records to refuse a mismatched backbone later."""
        return {
            "name": self.name,
            "source": self.source,
            "token_dim": self.token_dim,
            "embed_dim": self.embed_dim,
            "num_tokens": self.num_tokens,
            "image_size": self.image_size,
            "weights_digest": weights_digest(self.visual),
        }


def weights_digest(module: nn.Module | dict[str, torch.Tensor]) -> str:
    """A short content digest of a module's tensors (or a state dict's): names, shapes, values."""
    digest = hashlib.sha256()
    state = module if isinstance(module, dict) else module.state_dict()
    for key, tensor in sorted(state.items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
