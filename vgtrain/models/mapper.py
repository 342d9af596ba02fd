"""Mapping networks: visual features -> K prefix embeddings in the LLM's input space (ClipCap).

Every mapper is sized from the backbones (``in_dim``, ``out_dim`` are never written in a config)
and reads either the pooled CLIP embedding or the patch tokens, as its ``source`` says.
"""

from __future__ import annotations

import inspect
import math
from typing import Literal

import torch
from torch import nn

from vgtrain.models.backbones.vision import VisualFeatures
from vgtrain.models.positions import patch_positions
from vgtrain.models.resampler import PerceiverResampler

Source = Literal["pooled", "tokens"]


class Mapper(nn.Module):
    """Base class: ``forward(features) -> [B, prefix_length, out_dim]``."""

    source: Source = "pooled"
    # Prefix position j is visual token j (one embedding per token, in the tower's grid order).
    per_token: bool = False

    def __init__(self, prefix_length: int) -> None:
        super().__init__()
        if prefix_length < 1:
            raise ValueError(f"prefix_length must be >= 1, got {prefix_length}")
        self.prefix_length = prefix_length

    def select(self, features: VisualFeatures) -> torch.Tensor:
        return features.tokens if self.source == "tokens" else features.pooled


def one_per_token(prefix_length: int | None, num_tokens: int | None, who: str) -> int:
    """The prefix length of a mapper with one prefix embedding per visual token: the token count;
    a ``prefix_length`` that says otherwise is refused."""
    if num_tokens is None:
        raise ValueError(f"{who} needs the number of visual tokens (num_input_tokens)")
    if prefix_length not in (None, num_tokens):
        raise ValueError(
            f"{who} makes one prefix embedding per visual token ({num_tokens}); "
            f"set prefix_length to {num_tokens} or null, not {prefix_length}"
        )
    return num_tokens


class LinearMapper(Mapper):
    """One linear map from the pooled embedding to all K prefix embeddings."""

    def __init__(self, in_dim: int, out_dim: int, prefix_length: int = 10) -> None:
        super().__init__(prefix_length)
        self.out_dim = out_dim
        self.proj = nn.Linear(in_dim, prefix_length * out_dim)

    def forward(self, features: VisualFeatures) -> torch.Tensor:
        return self.proj(self.select(features)).view(-1, self.prefix_length, self.out_dim)


class MLPMapper(Mapper):
    """ClipCap's MLP: Linear -> tanh -> Linear, pooled embedding -> K prefix embeddings."""

    def __init__(
        self, in_dim: int, out_dim: int, prefix_length: int = 10, hidden_dim: int | None = None
    ) -> None:
        super().__init__(prefix_length)
        self.out_dim = out_dim
        hidden_dim = hidden_dim or (out_dim * prefix_length) // 2
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, prefix_length * out_dim)
        )

    def forward(self, features: VisualFeatures) -> torch.Tensor:
        return self.net(self.select(features)).view(-1, self.prefix_length, self.out_dim)


class ProjectorMapper(Mapper):
    """LLaVA-1.5's projector: Linear -> GELU -> Linear on each visual token on its own (``depth``
    linear layers: LLaVA's ``mlp{depth}x_gelu``).

    The prefix is one embedding per patch token (``prefix_length`` = the number of tokens), and no
    token sees another: each keeps only what its place in the image holds, and the LLM relates the
    places itself (the transformer mapper's attention mixes them before the LLM sees them).

    ``grid_kernel`` > 0 adds MobileVLM's local context: a depthwise convolution over the square
    token grid after the first layer (residual, zero at the start, so training starts from the
    plain projector), letting each token read the parts of an object that lie in its neighbours.
    """

    source: Source = "tokens"
    per_token = True

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_input_tokens: int | None = None,
        prefix_length: int | None = None,
        hidden_dim: int | None = None,
        depth: int = 2,
        grid_kernel: int = 0,
        source: Source = "tokens",
    ) -> None:
        if source != "tokens":
            raise ValueError(f"the projector maps patch tokens (source=tokens), got source={source!r}")
        super().__init__(one_per_token(prefix_length, num_input_tokens, "the projector"))
        if depth < 2:
            raise ValueError(f"the projector has at least 2 linear layers (depth), got {depth}")
        hidden_dim = hidden_dim or out_dim  # LLaVA-1.5: the LLM's width
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
        for _ in range(depth - 2):
            layers += [nn.GELU(), nn.Linear(hidden_dim, hidden_dim)]
        self.net = nn.Sequential(*layers, nn.GELU(), nn.Linear(hidden_dim, out_dim))
        self.grid_conv: nn.Conv2d | None = None
        if grid_kernel:
            self.grid_side = math.isqrt(self.prefix_length)
            if grid_kernel < 0 or grid_kernel % 2 == 0 or self.grid_side**2 != self.prefix_length:
                raise ValueError(
                    f"grid_kernel must be an odd size over a square token grid; got {grid_kernel} "
                    f"over {self.prefix_length} tokens"
                )
            self.grid_conv = nn.Conv2d(
                hidden_dim, hidden_dim, grid_kernel, padding=grid_kernel // 2, groups=hidden_dim
            )
            nn.init.zeros_(self.grid_conv.weight)
            nn.init.zeros_(self.grid_conv.bias)

    def forward(self, features: VisualFeatures) -> torch.Tensor:
        if self.grid_conv is None:
            return self.net(features.tokens)
        hidden = self.net[:2](features.tokens)
        batch, _, width = hidden.shape
        grid = hidden.transpose(1, 2).reshape(batch, width, self.grid_side, self.grid_side)
        hidden = hidden + self.grid_conv(grid).flatten(2).transpose(1, 2)
        return self.net[2:](hidden)


class TransformerMapper(Mapper):
    """ClipCap's transformer mapper: K learned constant queries attend over the visual inputs.

    With ``source="pooled"`` the pooled embedding is first expanded into ``clip_length`` tokens
    (as in ClipCap); with ``source="tokens"`` the patch tokens are the inputs. Inputs and
    queries go through one pre-norm transformer encoder and the query outputs are the prefix.

    ``output="inputs"`` has no queries: the encoder's output at every input token is the prefix
    (``prefix_length`` = the number of inputs), as LLaVA's projector passes every patch token on.
    The LLM then reads each place of the image itself instead of a summary of K tokens.
    """

    source: Source = "tokens"

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        prefix_length: int | None = 10,
        source: Source = "tokens",
        width: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        clip_length: int = 10,
        dropout: float = 0.0,
        num_input_tokens: int | None = None,
        output: Literal["queries", "inputs"] = "queries",
    ) -> None:
        if output not in ("queries", "inputs"):
            raise ValueError(f"transformer mapper output must be queries or inputs, got {output!r}")
        num_inputs = clip_length if source == "pooled" else num_input_tokens
        if output == "inputs":
            prefix_length = one_per_token(prefix_length, num_inputs, "output=inputs")
        elif prefix_length is None:
            raise ValueError("the transformer mapper needs prefix_length (its number of queries)")
        super().__init__(prefix_length)
        self.source = source
        self.per_token = output == "inputs" and source == "tokens"
        self.clip_length = clip_length
        if source == "pooled":
            self.input_proj: nn.Module = nn.Linear(in_dim, clip_length * width)
            num_input_tokens = clip_length
        else:
            self.input_proj = nn.Linear(in_dim, width)
        # Attention is blind to order: patch tokens need to say where they sit in the image.
        self.input_pos = patch_positions(num_input_tokens, width) if num_input_tokens else None
        self.queries = nn.Parameter(torch.randn(prefix_length, width) * 0.02) if output == "queries" else None
        layer = nn.TransformerEncoderLayer(
            width,
            num_heads,
            dim_feedforward=int(width * mlp_ratio),
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.output_proj = nn.Linear(width, out_dim)

    def forward(self, features: VisualFeatures) -> torch.Tensor:
        x = self.input_proj(self.select(features))
        if self.source == "pooled":
            x = x.view(x.shape[0], self.clip_length, -1)
        if self.input_pos is not None:
            x = x + self.input_pos
        if self.queries is None:
            return self.output_proj(self.norm(self.encoder(x)))
        queries = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        hidden = self.encoder(torch.cat([x, queries], dim=1))
        return self.output_proj(self.norm(hidden[:, -self.prefix_length :]))


class PerceiverMapper(Mapper):
    """A perceiver resampler over the patch tokens whose latents, projected into the LLM's
    input space, are the prefix (``prefix_length`` = number of latents)."""

    source: Source = "tokens"

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        prefix_length: int = 16,
        width: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        ff_mult: int = 2,
        num_input_tokens: int | None = None,
    ) -> None:
        super().__init__(prefix_length)
        self.resampler = PerceiverResampler(
            in_dim, width, prefix_length, num_layers, num_heads, ff_mult, num_input_tokens=num_input_tokens
        )
        self.output_proj = nn.Linear(width, out_dim)

    def forward(self, features: VisualFeatures) -> torch.Tensor:
        return self.output_proj(self.resampler(features.tokens))


MAPPERS: dict[str, type[Mapper]] = {
    "linear": LinearMapper,
    "mlp": MLPMapper,
    "transformer": TransformerMapper,
    "projector": ProjectorMapper,
    "perceiver": PerceiverMapper,
}


def build_mapper(
    name: str,
    *,
    vision_token_dim: int,
    vision_embed_dim: int,
    out_dim: int,
    vision_num_tokens: int | None = None,
    **options,
) -> Mapper:
    """Builds a registered mapper, choosing its input width from the features it reads."""
    if name not in MAPPERS:
        raise ValueError(f"unknown mapper {name!r}; registered: {', '.join(sorted(MAPPERS))}")
    cls = MAPPERS[name]
    source = options.get("source", cls.source)
    in_dim = vision_token_dim if source == "tokens" else vision_embed_dim
    if source == "tokens" and "num_input_tokens" in inspect.signature(cls).parameters:
        options.setdefault("num_input_tokens", vision_num_tokens)
    return cls(in_dim=in_dim, out_dim=out_dim, **options)
