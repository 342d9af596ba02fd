"""Small random-init backbones that build offline, deterministically, for tests and the demo.

Their weights are never saved: the same ``init_seed`` rebuilds the same tensors anywhere, so a
checkpoint can leave them out exactly as it leaves out downloaded weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

EOS = "<|endoftext|>"
PAD = "<|pad|>"

# The tiny tokenizer learns its merges from this text unless a corpus file is given. It holds the
# vocabulary of short image captions (objects, colours, sizes, places, relations), so such words
# become single tokens; any other text still encodes, byte by byte.
BUILTIN_CORPUS = """
a an the of on in at to and with is are this that there image photo picture of showing
small large big tiny little medium red green blue yellow purple orange black white grey gray
brown pink cyan circle square triangle diamond star rectangle shape shapes object objects
top bottom middle center centre left right above below beside next near far corner side
one two three some many several dog cat man woman person people car tree house table
sitting standing holding looking walking playing street room water field sky
"""


def tiny_open_clip_config(
    image_size: int = 64, patch_size: int = 8, width: int = 192, layers: int = 2, embed_dim: int = 128
) -> dict:
    """An open_clip model config for a small ViT (the text tower is minimal: it is discarded)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": 64,
            "patch_size": patch_size,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1},
    }


def build_tiny_tokenizer(vocab_size: int = 512, corpus_file: str | None = None) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer (GPT-2's scheme) offline, deterministically."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if corpus_file is not None:
        lines = Path(corpus_file).read_text(encoding="utf-8").splitlines()
    else:
        lines = BUILTIN_CORPUS.split()
    tokenizer.train_from_iterator(lines, trainer=trainer)
    # A pad token of its own: with pad = EOS, transformers cannot tell padding from a caption's end
    # and warns about a missing attention mask on every call.
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=PAD)


TINY_LM_FAMILIES = ("gpt2", "llama")


def build_tiny_lm(
    tokenizer: PreTrainedTokenizerFast, *, family: str = "gpt2", **arch: int
) -> GPT2LMHeadModel | LlamaForCausalLM:
    """A tiny random-init causal LM of the family ``model.llm.arch.family`` names."""
    if family == "gpt2":
        return build_tiny_gpt2(tokenizer, **arch)
    if family == "llama":
        return build_tiny_llama(tokenizer, **arch)
    raise ValueError(f"model.llm.arch.family={family!r}; tiny LMs are {', '.join(TINY_LM_FAMILIES)}")


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    *,
    width: int = 192,
    layers: int = 3,
    heads: int = 4,
    kv_heads: int | None = None,
    mlp_width: int | None = None,
    max_positions: int = 128,
    init_seed: int = 0,
    vocab_size: int | None = None,
) -> LlamaForCausalLM:
    """A Llama-family LM (SmolLM2's blocks: RMSNorm, rotary positions, a gated SiLU MLP) of
    GPT-2's tiny size: the MLP's hidden width is by default 8/3 x ``width`` (rounded up to a
    multiple of 8), so its three matrices hold as many weights as GPT-2's two of 4 x ``width``;
    ``kv_heads`` below ``heads``: grouped-query attention. Offline, it runs SmolLM2's code paths
    (rotary positions, the Llama decoder in lean decoding, LoRA targets) at test size.
    """
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), vocab_size or 0),
        hidden_size=width,
        intermediate_size=mlp_width or 8 * math.ceil(width / 3),  # 8/3 x width, a multiple of 8
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return LlamaForCausalLM(config)


def build_tiny_gpt2(
    tokenizer: PreTrainedTokenizerFast,
    *,
    width: int = 192,
    layers: int = 3,
    heads: int = 4,
    mlp_width: int | None = None,
    max_positions: int = 128,
    init_seed: int = 0,
    vocab_size: int | None = None,
) -> GPT2LMHeadModel:
    """``mlp_width``: the MLP's hidden width (GPT-2's ``n_inner``; default 4 x ``width``).
    ``vocab_size`` pads the embedding and output head beyond the tokenizer (never fewer rows):
    with width 768, 12 layers, 12 heads and 50257 it is GPT-2 small's size (124M), for benchmarks."""
    config = GPT2Config(
        vocab_size=max(len(tokenizer), vocab_size or 0),
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        n_inner=mlp_width,
        n_positions=max_positions,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Dropout would only add noise to a frozen function; a trainable tiny LM learns faster without.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return GPT2LMHeadModel(config)
