"""Decoding section: tokens/s and images/s for greedy, beam 5, top-p and MAGIC, with the KV cache
(vgtrain's strategies end to end; their static-cache loops alone; transformers' ``generate``;
vgtrain's own MAGIC loop) and without it (loops that recompute the whole sequence at every step),
batched, on the same model and prefix. The KV-cache speed-up compares the static-cache loop (or
MAGIC's own loop) with recomputation: both are bare loops, without the strategies' scoring pass.

Every row generates exactly ``tokens`` new tokens per image (min = max new tokens) from the same
precomputed visual features, so rows differ only in how they decode. Times are the best of
``repeats`` interleaved runs after one warm-up. transformers' ``generate`` forces ``use_cache=True``
whenever it is given ``inputs_embeds``, hence the hand-written no-cache loops. The no-cache MAGIC
row is the paper-direct reference (one image and one candidate at a time): MAGIC has no batched
no-cache form in vgtrain.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from vgtrain.data.synthetic import COLORS, SHAPES, render, sample_scene
from vgtrain.decode import Decoding, VisualDecoder
from vgtrain.decode.lm import lm_forward, position_ids, upcast
from vgtrain.decode.magic import magic_search
from vgtrain.decode.reference import magic_reference
from vgtrain.decode.strategies import get_strategy
from vgtrain.models import VisualPrefixLM

MAGIC = {"alpha": 0.1, "beta": 2.0}
STATIC = "static KV cache loop"
OWN_LOOP = "own loop, KV cache"
TOP_P = 0.9
BEAMS = 5


def top_p_pick(logits: torch.Tensor, top_p: float = TOP_P) -> torch.Tensor:
    """Nucleus sampling: one token per row from the smallest set of tokens holding ``top_p``."""
    probs, order = logits.softmax(-1).sort(-1, descending=True)
    outside = probs.cumsum(-1) - probs > top_p
    choice = torch.multinomial(probs.masked_fill(outside, 0.0), 1)
    return order.gather(-1, choice)


@torch.no_grad()
def recompute(job: Decoding, tokens: int, pick: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Batched greedy / sampling without a KV cache: the full sequence goes through the LM per token."""
    llm, embeds, mask = job.llm, job.inputs.embeds, job.inputs.attention_mask
    with job.bind_memory(1):
        for _ in range(tokens):
            hidden, _ = lm_forward(llm, embeds, mask, position_ids(mask))
            token = pick(upcast(llm.logits(hidden[:, -1])))
            embeds = torch.cat([embeds, llm.embed(token).to(embeds.dtype)], 1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return tokens * embeds.shape[0]


@torch.no_grad()
def beam_recompute(job: Decoding, tokens: int, beams: int = BEAMS) -> int:
    """Batched beam search without a KV cache (fixed length, so no finished hypotheses to keep)."""
    llm, images = job.llm, job.inputs.embeds.shape[0]
    embeds = job.inputs.embeds.repeat_interleave(beams, 0)
    mask = job.inputs.attention_mask.repeat_interleave(beams, 0)
    scores = torch.full((images, beams), float("-inf"), device=embeds.device)
    scores[:, 0] = 0.0  # all beams start as one hypothesis
    first_row = torch.arange(images, device=embeds.device).unsqueeze(1) * beams
    with job.bind_memory(beams):
        for _ in range(tokens):
            hidden, _ = lm_forward(llm, embeds, mask, position_ids(mask))
            log_probs = upcast(llm.logits(hidden[:, -1])).log_softmax(-1)
            vocab = log_probs.shape[-1]
            total = (scores.view(-1, 1) + log_probs).view(images, beams * vocab)
            scores, index = total.topk(beams, dim=-1)
            rows = (first_row + index // vocab).view(-1)
            token = (index % vocab).view(-1, 1)
            embeds = torch.cat([embeds[rows], llm.embed(token).to(embeds.dtype)], 1)
            mask = torch.cat([mask[rows], mask.new_ones(mask.shape[0], 1)], 1)
    return tokens * images


@torch.no_grad()
def generate(job: Decoding, tokens: int, **options: Any) -> int:
    """transformers' ``generate`` on the same prefix embeddings (KV cache)."""
    llm = job.llm
    with job.bind_memory(options.get("num_beams", 1)):
        out = llm.model.generate(
            inputs_embeds=job.inputs.embeds,
            attention_mask=job.inputs.attention_mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            eos_token_id=llm.eos_token_id,
            pad_token_id=llm.tokenizer.pad_token_id,
            **options,
        )
    return out.shape[0] * tokens


def static_loop(job: Decoding, tokens: int, strategy: str, **options: Any) -> int:
    """vgtrain's static-KV-cache loop alone (vgtrain.decode.search): no scoring, no text."""
    chosen = get_strategy(strategy)
    resolved = chosen.resolve({"max_new_tokens": tokens, "min_new_tokens": tokens, **options})
    rows = chosen.run_static(job, resolved).shape[0]
    return rows * tokens


def vgtrain_decode(
    decoder: VisualDecoder, features: Any, prompts: list[str], strategy: str, tokens: int, **options: Any
) -> int:
    """vgtrain's strategy API (``VisualDecoder.decode``): decoding plus its scoring of the results."""
    groups = decoder.decode(
        features, prompts, strategy, max_new_tokens=tokens, min_new_tokens=tokens, **options
    )
    return sum(len(group[0].tokens) for group in groups)


def magic_cached(job: Decoding, tokens: int, top_k: int) -> int:
    rows = magic_search(job, top_k=top_k, max_new_tokens=tokens, min_new_tokens=tokens, **MAGIC)
    return sum(len(t) for t, _ in rows)


def magic_no_cache(job: Decoding, tokens: int, top_k: int) -> int:
    rows = magic_reference(job, top_k=top_k, max_new_tokens=tokens, **MAGIC)
    return sum(len(t) + int(ended) for t, ended in rows)


def best_times(runs: list[Callable[[], int]], repeats: int) -> list[tuple[float, int]]:
    """Best wall time and token count per run, runs interleaved within each repeat so that load
    from other processes on a shared machine falls on all rows alike."""
    for run in runs:
        run()  # warm-up: allocator, CLIP text tower, tokenizer caches
    best = [(float("inf"), 0)] * len(runs)
    for _ in range(repeats):
        for index, run in enumerate(runs):
            start = time.perf_counter()
            count = run()
            best[index] = (min(best[index][0], time.perf_counter() - start), count)
    return best


def setup(
    model: VisualPrefixLM, vision_config: dict[str, Any], images: int, device: torch.device, seed: int = 0
) -> tuple[VisualDecoder, Any, list[str], Decoding]:
    """A decoder, features of ``images`` rendered shapes scenes and the prepared decoding job."""
    decoder = VisualDecoder(model, vision_config=vision_config, device=device)
    rng = random.Random(seed)
    pairs = {(c, s) for c in COLORS for s in SHAPES}
    size = model.vision.image_size
    pictures = [render(sample_scene(rng, size, pairs), size) for _ in range(images)]
    with torch.no_grad():
        features = model.vision.encode(torch.stack([model.vision.transform(p) for p in pictures]).to(device))
    prompts = decoder.prompts(images)
    job = Decoding(
        model.llm,
        decoder.prepare_inputs(features, prompts),
        lambda: decoder.clip,
        partial(decoder.bind_memory, features),
        model.xattn,
    )
    return decoder, features, prompts, job


def run_decode(
    model: VisualPrefixLM,
    vision_config: dict[str, Any],
    *,
    images: int,
    tokens: int,
    repeats: int,
    magic_k: int,
    device: torch.device,
    strategies: tuple[str, ...] = ("greedy", "beam", "top-p", "magic"),
) -> dict[str, Any]:
    decoder, features, prompts, job = setup(model, vision_config, images, device)
    ours = partial(vgtrain_decode, decoder, features, prompts)
    t = tokens
    table: dict[str, list[tuple[str, Callable[[], int]]]] = {
        "greedy": [
            ("vgtrain, KV cache", partial(ours, "greedy", t)),
            (STATIC, partial(static_loop, job, t, "greedy")),
            ("generate, KV cache", partial(generate, job, t, do_sample=False)),
            (
                "no cache (full recompute)",
                partial(recompute, job, t, lambda logits: logits.argmax(-1, keepdim=True)),
            ),
        ],
        f"beam {BEAMS}": [
            ("vgtrain, KV cache", partial(ours, "beam", t, num_beams=BEAMS)),
            (STATIC, partial(static_loop, job, t, "beam", num_beams=BEAMS)),
            ("generate, KV cache", partial(generate, job, t, do_sample=False, num_beams=BEAMS)),
            ("no cache (full recompute)", partial(beam_recompute, job, t)),
        ],
        f"top-p {TOP_P}": [
            ("vgtrain, KV cache", partial(ours, "sample", t, top_p=TOP_P, top_k=0, seed=0)),
            (STATIC, partial(static_loop, job, t, "sample", top_p=TOP_P, top_k=0)),
            ("generate, KV cache", partial(generate, job, t, do_sample=True, top_p=TOP_P, top_k=0)),
            ("no cache (full recompute)", partial(recompute, job, t, top_p_pick)),
        ],
        f"magic k={magic_k}": [
            ("vgtrain, KV cache", partial(ours, "magic", t, top_k=magic_k, **MAGIC)),
            (OWN_LOOP, partial(magic_cached, job, t, magic_k)),
            ("no cache (reference, per image)", partial(magic_no_cache, job, t, magic_k)),
        ],
    }
    wanted = {name: rows for name, rows in table.items() if name.split(" ")[0] in strategies}
    flat = [(strategy, how, run) for strategy, rows in wanted.items() for how, run in rows]
    timed = best_times([run for _, _, run in flat], repeats)
    rows = [
        {
            "strategy": strategy,
            "decoding": how,
            "seconds": seconds,
            "tokens": count,
            "tokens_per_s": count / seconds,
            "images_per_s": images / seconds,
        }
        for (strategy, how, _), (seconds, count) in zip(flat, timed, strict=True)
    ]

    def rate(strategy: str, how: str) -> float | None:
        found = [
            r["tokens_per_s"] for r in rows if r["strategy"] == strategy and r["decoding"].startswith(how)
        ]
        return found[0] if found else None

    speedups, over_generate = {}, {}
    for strategy in wanted:
        cached = rate(strategy, STATIC) or rate(strategy, OWN_LOOP)
        speedups[strategy] = cached / rate(strategy, "no cache")
        if rate(strategy, "generate"):
            over_generate[strategy] = cached / rate(strategy, "generate")
    return {
        "images": images,
        "new_tokens": tokens,
        "rows": rows,
        "kv_cache_speedup_by_strategy": speedups,
        "static_vs_generate_by_strategy": over_generate,
        "greedy_tokens_per_s": rate("greedy", STATIC),  # None when greedy is not measured
    }
