"""What the bench measures at each size: backbones, adapter routes, batch sizes and step counts.

Two model scales: ``tiny`` is the demo's (64 px ViT, 3-layer width-192 GPT-2) and ``clipcap`` is
ClipCap's work at full size, built offline with random init through the ``tiny`` registry entries:
a ViT-B/32-sized open_clip tower (224 px, patch 32, width 768, 12 layers, 12 heads, embed 512)
and a GPT-2-small-sized LM (width 768, 12 layers, 12 heads, 50257-row vocabulary: 124M).
``smoke`` shrinks everything so the whole suite runs in seconds (for the test). ``gpu`` (chosen
on CUDA) times the ClipCap-scale steps at batch 256, 1,024 and 4,096 in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TINY_VISION = {
    "name": "tiny",
    "pool_tokens": 2,
    "token_pooling": "concat",
    "arch": {"image_size": 64, "patch_size": 8, "width": 192, "layers": 2, "embed_dim": 128},
}
TINY_LLM = {"name": "tiny", "arch": {"width": 192, "layers": 3, "heads": 4}}
TINY_PREFIX = {"name": "transformer", "prefix_length": 8, "width": 192, "num_layers": 2, "num_heads": 4}
TINY_XATTN = {"name": "gated", "every": 1, "num_heads": 4, "head_dim": 48, "ff_mult": 2}

VIT_B32_VISION = {
    "name": "tiny",
    "pool_tokens": 1,
    "token_pooling": "mean",
    "arch": {"image_size": 224, "patch_size": 32, "width": 768, "layers": 12, "embed_dim": 512},
}
GPT2_SMALL_LLM = {
    "name": "tiny",
    "arch": {"width": 768, "layers": 12, "heads": 12, "max_positions": 1024, "vocab_size": 50257},
}
CLIPCAP_PREFIX = {"name": "mlp", "prefix_length": 10}  # ClipCap's MLP: hidden = 768 * 10 / 2
CLIPCAP_XATTN = {"name": "gated", "every": 4, "num_heads": 12, "head_dim": 64, "ff_mult": 2}

SMOKE_VISION = {
    "name": "tiny",
    "pool_tokens": 1,
    "arch": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "embed_dim": 32},
}
SMOKE_LLM = {"name": "tiny", "arch": {"width": 64, "layers": 2, "heads": 2, "vocab_size": 1000}}
SMOKE_PREFIX = {"name": "mlp", "prefix_length": 4}
SMOKE_XATTN = {"name": "gated", "every": 1, "num_heads": 2, "head_dim": 32, "ff_mult": 2}

ROUTES = ("prefix", "xattn", "both")


@dataclass(frozen=True)
class Scale:
    """One model scale: backbones, the adapter of each route, and how long to time it."""

    name: str
    vision: dict[str, Any]
    llm: dict[str, Any]
    prefix: dict[str, Any]
    xattn: dict[str, Any]
    batch_size: int
    warmup_steps: int  # steps run before timing starts (allocator, autotuning, first-call costs)
    timed_steps: int

    def adapters(self, route: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(mapper, xattn) configs of a route; the unused one is ``{"name": "none"}``."""
        none = {"name": "none"}
        return {
            "prefix": (dict(self.prefix), none),
            "xattn": (none, dict(self.xattn)),
            "both": (dict(self.prefix), dict(self.xattn)),
        }[route]


@dataclass(frozen=True)
class Size:
    name: str
    tiny: Scale  # the full route x dtype x source matrix
    clipcap: Scale  # loop baseline, cached vs images, MFU; the route matrix on cached features
    loop_rounds: int  # interleaved vgtrain / loop rounds, steps pooled (against shared-machine noise)
    # The demo's LM behind the ViT-B/32-sized tower: cached vs images where the tower dominates the step.
    vit_tiny_lm: Scale | None = None
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    data_batches: int = 20
    data_workers: tuple[int, ...] = (0, 1, 2)
    decode_images: int = 8
    decode_tokens: int = 20  # decode.kv_cache_speedup is defined at 20 new tokens
    decode_repeats: int = 3
    magic_k: int = 8
    decode_clipcap: bool = True  # also greedy with/without cache on the GPT-2-small-sized LM
    cache_images: int = 256  # images `vgtrain cache` encodes per timed run, per tower
    cache_batch: int = 64
    cache_workers: tuple[int, ...] = (0, 2)  # decoding worker processes (0: in the main process)
    peak_matmul_n: int = 2048
    # GPU size: the ClipCap-scale prefix and cross-attention steps at these batch sizes in bf16,
    # the loop beside the prefix one (instead of the CPU-sized ClipCap section).
    gpu_batch_sizes: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list)


DEFAULT = Size(
    name="default",
    tiny=Scale("tiny", TINY_VISION, TINY_LLM, TINY_PREFIX, TINY_XATTN, 32, 3, 8),
    clipcap=Scale("clipcap", VIT_B32_VISION, GPT2_SMALL_LLM, CLIPCAP_PREFIX, CLIPCAP_XATTN, 8, 2, 4),
    loop_rounds=4,
    vit_tiny_lm=Scale("vitb32-tinylm", VIT_B32_VISION, TINY_LLM, TINY_PREFIX, TINY_XATTN, 8, 2, 4),
)

SMOKE = Size(
    name="smoke",
    tiny=Scale("tiny-smoke", SMOKE_VISION, SMOKE_LLM, SMOKE_PREFIX, SMOKE_XATTN, 4, 1, 2),
    clipcap=Scale("clipcap-smoke", SMOKE_VISION, SMOKE_LLM, SMOKE_PREFIX, SMOKE_XATTN, 4, 1, 2),
    loop_rounds=1,
    dtypes=("fp32",),
    data_batches=3,
    data_workers=(0,),
    decode_images=2,
    decode_tokens=4,
    decode_repeats=1,
    magic_k=4,
    decode_clipcap=False,
    cache_images=16,
    cache_batch=8,
    cache_workers=(0,),
    peak_matmul_n=256,
)

GPU = Size(
    name="gpu",
    tiny=Scale("tiny", TINY_VISION, TINY_LLM, TINY_PREFIX, TINY_XATTN, 256, 3, 10),
    clipcap=Scale("clipcap", VIT_B32_VISION, GPT2_SMALL_LLM, CLIPCAP_PREFIX, CLIPCAP_XATTN, 8, 3, 10),
    loop_rounds=2,
    gpu_batch_sizes=(256, 1024, 4096),
    peak_matmul_n=8192,
)

SIZES = {"default": DEFAULT, "smoke": SMOKE, "gpu": GPU}
