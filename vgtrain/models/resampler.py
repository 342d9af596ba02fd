"""Flamingo's perceiver resampler: L learned latents attend over the patch tokens (and
themselves) for a few layers, giving a fixed number of visual tokens whatever the grid size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vgtrain.models.positions import patch_positions


class PerceiverLayer(nn.Module):
    def __init__(self, width: int, num_heads: int, ff_mult: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_latents = nn.LayerNorm(width)
        self.norm_inputs = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_kv = nn.Linear(width, 2 * width, bias=False)
        self.to_out = nn.Linear(width, width, bias=False)
        self.ff = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, ff_mult * width, bias=False),
            nn.GELU(),
            nn.Linear(ff_mult * width, width, bias=False),
        )

    def forward(self, latents: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        normed = self.norm_latents(latents)
        context = torch.cat([self.norm_inputs(inputs), normed], dim=1)  # latents also see themselves
        heads = lambda x: x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731
        k, v = heads(self.to_kv(context)).chunk(2, dim=-1)
        attended = F.scaled_dot_product_attention(heads(self.to_q(normed)), k, v)
        latents = latents + self.to_out(attended.transpose(1, 2).flatten(2))
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """[B, N, in_dim] patch tokens -> [B, num_latents, width] visual tokens."""

    def __init__(
        self,
        in_dim: int,
        width: int = 256,
        num_latents: int = 16,
        num_layers: int = 2,
        num_heads: int = 4,
        ff_mult: int = 2,
        num_input_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.width = width
        self.num_latents = num_latents
        self.input_proj = nn.Linear(in_dim, width)
        self.input_pos = patch_positions(num_input_tokens, width) if num_input_tokens else None
        self.latents = nn.Parameter(torch.randn(num_latents, width) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(width, num_heads, ff_mult) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        inputs = self.input_proj(tokens)
        if self.input_pos is not None:
            inputs = inputs + self.input_pos
        latents = self.latents.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, inputs)
        return self.norm(latents)
