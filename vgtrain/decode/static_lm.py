"""A lean decoding step over a static (preallocated) KV cache, for the LLM families vgtrain ships.

transformers' ``generate`` spends most of a step outside the model when the model is small or the
device is fast: a cache object that grows by concatenation, mask and position bookkeeping, logits
processors, a host sync per token. :class:`StaticLM` runs the same frozen modules (the HF model's
own linear layers, norms, MLPs and rotary embedding) with:

- one zero-initialised cache tensor per layer, ``[B, kv_heads, prompt + max_new, head_dim]``,
  written in place at the current column (``index_copy_``); nothing grows, nothing is re-allocated;
- static shapes: every step attends over the whole buffer with a ``[B, S]`` validity mask (left
  padding off, later columns off), so a step can be captured by ``torch.compile`` / CUDA graphs;
- cross-attention blocks (vgtrain.models.xattn) run before their decoder block, as their hooks do
  inside ``generate``, with the visual memory's keys and values projected once per call.

Families: GPT-2 (``gpt2``) and Llama-style (``llama``, ``qwen2`` without sliding window); any other
model returns ``None`` from :func:`static_lm` and its strategies keep transformers' ``generate``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vgtrain.models.backbones.llm import LanguageModel
from vgtrain.models.xattn import CrossAttentionAdapter, find_decoder_layers

LLAMA_LIKE = ("llama", "qwen2")


def supports(llm: LanguageModel) -> str | None:
    """Why the lean step cannot run this LLM, or None when it can."""
    config = llm.model.config
    kind = getattr(config, "model_type", None)
    if kind == "gpt2":
        if (
            config.scale_attn_by_inverse_layer_idx
            or config.reorder_and_upcast_attn
            or config.add_cross_attention
        ):
            return "GPT-2 with layer-scaled, reordered or cross attention"
        return None
    if kind in LLAMA_LIKE:
        if getattr(config, "use_sliding_window", False):
            return f"{kind} with sliding-window attention"
        if getattr(config, "pretraining_tp", 1) != 1:
            return "Llama with tensor-parallel pretraining slices"
        return None
    return f"model type {kind!r} (lean decoding knows gpt2, {', '.join(LLAMA_LIKE)})"


class StaticLM:
    """Prefill then one-token steps for ``batch`` rows of at most ``length`` positions.

    Columns of the cache are the columns of the left-padded input (padding included), then one per
    generated token; positions count real tokens only, as ``generate`` derives them from the mask.
    """

    def __init__(
        self,
        llm: LanguageModel,
        attention_mask: torch.Tensor,
        length: int,
        xattn: CrossAttentionAdapter | None = None,
        memory: torch.Tensor | None = None,
    ) -> None:
        reason = supports(llm)
        if reason is not None:
            raise ValueError(f"lean decoding does not support {reason}")
        self.llm = llm
        base = llm.model.base_model
        self.family = "gpt2" if llm.model.config.model_type == "gpt2" else "llama"
        self.layers = find_decoder_layers(base)
        attn = self.layers[0].attn if self.family == "gpt2" else self.layers[0].self_attn
        config = llm.model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(attn, "head_dim", None) or config.hidden_size // self.heads
        self.scale = float(getattr(attn, "scaling", self.head_dim**-0.5))
        batch, prompt = attention_mask.shape
        device = attention_mask.device
        dtype = llm.model.get_input_embeddings().weight.dtype
        self.batch, self.prompt, self.length = batch, prompt, length
        # Zeros, not empty: masked columns get weight 0, and 0 x NaN garbage would still be NaN.
        self.cache = torch.zeros(
            len(self.layers), 2, batch, self.kv_heads, length, self.head_dim, device=device, dtype=dtype
        )
        self._spare: torch.Tensor | None = None  # beam search gathers into it, then swaps
        self.columns = torch.arange(length, device=device)
        self.valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        self.prompt_positions = torch.zeros(batch, prompt, dtype=torch.long, device=device)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        self.xattn = xattn
        self.memory_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset(attention_mask, memory)
        if self.family == "llama":
            positions = torch.arange(length, device=device).unsqueeze(0)
            probe = torch.zeros(1, device=device, dtype=dtype)
            cos, sin = base.rotary_emb(probe, positions)  # the model's own RoPE (scaling included)
            self.cos, self.sin = cos[0], sin[0]  # [S, head_dim]

    def reset(self, attention_mask: torch.Tensor, memory: torch.Tensor | None = None) -> None:
        """Takes a new batch of the same shapes, in place: a captured CUDA graph reads these very
        buffers (the cache itself needs no clearing: the prefill and each step write their columns
        before reading them, and later columns are masked)."""
        self.valid[:, : self.prompt] = attention_mask.bool()
        # Positions of the prompt columns (padding: 0, masked anyway); the first generated token's.
        self.prompt_positions.copy_((attention_mask.long().cumsum(1) - 1).clamp(min=0))
        self.next_position.copy_(attention_mask.long().sum(1))
        if self.xattn is None:
            return
        if memory is None:
            raise RuntimeError("cross-attention layers need the visual memory: decode inside bind_memory")
        if memory.shape[0] != self.batch:
            memory = memory.repeat_interleave(self.batch // memory.shape[0], dim=0)
        memory = memory.to(self.cache.dtype)  # as the hooks cast it to the hidden states' dtype
        for index in self.xattn.layer_indices:  # the memory's keys and values, once per batch
            keys, values = self.xattn.blocks[str(index)].memory_keys_values(memory)
            if index in self.memory_kv:
                self.memory_kv[index][0].copy_(keys)
                self.memory_kv[index][1].copy_(values)
            else:
                self.memory_kv[index] = (keys.contiguous(), values.contiguous())

    # -- the model ------------------------------------------------------------------------------

    def _embed_positions(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.family == "gpt2":
            return embeds + self.llm.model.base_model.wpe(positions)
        return embeds

    def _attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        columns: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Writes k, v ``[B, kv_heads, T, head_dim]`` at ``columns`` and attends q over the cache."""
        keys, values = self.cache[layer, 0], self.cache[layer, 1]
        # .to: no-ops, unless autocast made the projections bf16 (the cache keeps the weights' dtype)
        keys.index_copy_(2, columns, k.to(keys.dtype))
        values.index_copy_(2, columns, v.to(values.dtype))
        out = F.scaled_dot_product_attention(
            q.to(keys.dtype),
            keys,
            values,
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=self.kv_heads != self.heads,
        )
        return out.transpose(1, 2).flatten(2)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # [B, 1, T, Dh]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _block(
        self,
        index: int,
        block: nn.Module,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        columns: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        batch, steps, _ = hidden.shape
        if self.family == "gpt2":
            q, k, v = block.attn.c_attn(block.ln_1(hidden)).split(self.heads * self.head_dim, dim=2)
            q, k, v = (t.view(batch, steps, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
            hidden = hidden + block.attn.c_proj(self._attend(index, q, k, v, columns, mask))
            return hidden + block.mlp(block.ln_2(hidden))
        attn, normed = block.self_attn, block.input_layernorm(hidden)
        q = attn.q_proj(normed).view(batch, steps, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(normed).view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self._rope(q, positions), self._rope(k, positions)
        hidden = hidden + attn.o_proj(self._attend(index, q, k, v, columns, mask))
        return hidden + block.mlp(block.post_attention_layernorm(hidden))

    def _forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states after the final norm, ``[B, T, D]``; mask ``[B, 1, T, S]`` (True: attend)."""
        hidden = self._embed_positions(embeds, positions)
        for index, block in enumerate(self.layers):
            if index in self.memory_kv:
                hidden = self.xattn.blocks[str(index)].attend(hidden, self.memory_kv[index])
            hidden = self._block(index, block, hidden, positions, columns, mask)
        base = self.llm.model.base_model
        return base.ln_f(hidden) if self.family == "gpt2" else base.norm(hidden)

    # -- the steps ------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        """Runs the whole left-padded input; returns the last column's hidden state ``[B, D]``."""
        columns = self.columns[: self.prompt]
        causal = columns.unsqueeze(1) >= self.columns.unsqueeze(0)  # [T, S]
        mask = causal & self.valid.unsqueeze(1)
        # A padding query attends to itself, so no row is all-masked (SDPA would give it NaN).
        mask = mask | (columns.unsqueeze(1) == self.columns.unsqueeze(0))
        return self._forward(embeds, self.prompt_positions, columns, mask.unsqueeze(1))[:, -1]

    @torch.no_grad()
    def step(self, embeds: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """One new token per row at column ``prompt + generated`` (a 0-d long tensor: the shapes stay
        static, so the step can be compiled); returns its hidden state ``[B, D]``."""
        column = generated + self.prompt
        mask = (self.valid & (self.columns <= column)).view(self.batch, 1, 1, self.length)
        positions = (self.next_position + generated).unsqueeze(1)
        return self._forward(embeds.unsqueeze(1), positions, column.view(1), mask)[:, 0]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row i of the cache becomes old row ``rows[i]`` (gathered into a spare buffer)."""
        if self._spare is None:
            self._spare = torch.empty_like(self.cache)
        torch.index_select(self.cache, 2, rows, out=self._spare)
        self.cache, self._spare = self._spare, self.cache

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm.logits(hidden).float()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.llm.embed(tokens)


Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tokens [B], index 0-d) -> logits [B, V]
STEP_MODES = ("auto", "eager", "compile", "cuda-graph")


def make_step(lm: StaticLM, mode: str = "auto") -> Step:
    """The one-token step, embedding and output head included. ``auto``: a CUDA graph on CUDA
    (a step is then one launch, not hundreds), eager elsewhere; ``compile``: ``torch.compile``."""
    if mode not in STEP_MODES:
        raise ValueError(f"decoding step {mode!r}: choose one of {', '.join(STEP_MODES)}")
    device = lm.cache.device
    if mode == "auto":
        mode = "cuda-graph" if device.type == "cuda" else "eager"

    def eager(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return lm.logits(lm.step(lm.embed(tokens), index))

    if mode == "eager":
        return eager
    if mode == "compile":
        return torch.compile(eager, dynamic=False)
    if device.type != "cuda":
        raise ValueError(f"decoding step 'cuda-graph' needs a CUDA device, the model is on {device}")
    return _cuda_graph(lm, eager)


_CAPTURED: weakref.WeakKeyDictionary[LanguageModel, tuple[tuple[Any, ...], StaticLM, Step]] = (
    weakref.WeakKeyDictionary()
)


def engine(
    llm: LanguageModel,
    attention_mask: torch.Tensor,
    length: int,
    xattn: CrossAttentionAdapter | None = None,
    memory: torch.Tensor | None = None,
    step: str = "auto",
) -> tuple[StaticLM, Step]:
    """A static LM and its step for one batch. A CUDA graph is captured once per LLM and shape and
    replayed by later batches of the same shapes (validation, benchmarks, a stream of images):
    capturing costs more than a whole 20-token decode."""
    mode = "cuda-graph" if step == "auto" and attention_mask.device.type == "cuda" else step
    if mode != "cuda-graph":
        lm = StaticLM(llm, attention_mask, length, xattn, memory)
        return lm, make_step(lm, mode)
    # Parameters are read by address: the same storages (in-place updates are fine) or a new capture.
    head, embedding = llm.model.get_output_embeddings().weight, llm.model.get_input_embeddings().weight
    key = (
        tuple(attention_mask.shape),
        length,
        attention_mask.device,
        id(xattn),
        None if memory is None else tuple(memory.shape),
        head.data_ptr(),
        embedding.data_ptr(),
        embedding.dtype,
    )
    captured = _CAPTURED.get(llm)
    if captured is not None and captured[0] == key:
        captured[1].reset(attention_mask, memory)
        return captured[1], captured[2]
    _CAPTURED.pop(llm, None)  # one graph per LLM: its memory pool goes with it
    lm = StaticLM(llm, attention_mask, length, xattn, memory)
    replay = make_step(lm, "cuda-graph")
    _CAPTURED[llm] = (key, lm, replay)
    return lm, replay


def _cuda_graph(lm: StaticLM, eager: Step) -> Step:
    """Captures ``eager`` once with static input/output buffers; each call copies the inputs in
    and replays it. The cache tensors never move (this is why greedy/sampling never swap them)."""
    device = lm.cache.device
    tokens = torch.zeros(lm.batch, dtype=torch.long, device=device)
    index = torch.zeros((), dtype=torch.long, device=device)
    # Warm-up on a side stream (allocator, kernels' lazy init). It writes the first generated
    # column only (not the prompt's, so before or after the prefill alike), which the real first
    # step overwrites before anything reads it.
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            eager(tokens, index)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = eager(tokens, index)

    def replay(new_tokens: torch.Tensor, new_index: torch.Tensor) -> torch.Tensor:
        tokens.copy_(new_tokens)
        index.copy_(new_index)
        graph.replay()
        return logits  # the graph's output buffer: read it before the next call

    return replay
