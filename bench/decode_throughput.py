"""Decoding throughput on the demo-sized model, with and without a KV cache, in one run.

    .venv/bin/python bench/decode_throughput.py [--images 16] [--tokens 24] [--export DIR]

Model: tiny ViT (64 px, width 192, 2 layers, 2x2 concat pooling -> 16 tokens), transformer mapper
(8 prefix tokens, width 192, 2 layers), tiny GPT-2 (width 192, 3 layers); random init unless
``--export`` names a trained export. Every row generates exactly ``--tokens`` tokens per image
(min = max new tokens), from the same precomputed visual features, so rows differ only in how
they decode. Times are the best of ``--repeats`` interleaved runs after one warm-up. Prints a table and
writes JSON (``--json``).

Note: transformers' ``generate`` forces ``use_cache=True`` whenever it is given ``inputs_embeds``,
so ``use_cache=False`` there still caches (the row shows it); the no-cache rows are a loop that
recomputes the whole sequence at every step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from vgtrain.data.synthetic import COLORS, SHAPES, render, sample_scene
from vgtrain.decode import Decoding, VisualDecoder
from vgtrain.decode.lm import lm_forward, position_ids
from vgtrain.decode.magic import magic_search
from vgtrain.models import build_model

DEMO_VISION = {
    "name": "tiny",
    "pool_tokens": 2,
    "token_pooling": "concat",
    "arch": {"image_size": 64, "patch_size": 8, "width": 192, "layers": 2, "embed_dim": 128},
}
DEMO_LLM = {"name": "tiny", "arch": {"width": 192, "layers": 3, "heads": 4}}
DEMO_MAPPER = {"name": "transformer", "prefix_length": 8, "width": 192, "num_layers": 2, "num_heads": 4}


@torch.no_grad()
def greedy_without_cache(job: Decoding, tokens: int) -> int:
    """Batched greedy decoding that recomputes the full sequence at every step (no KV cache)."""
    llm, embeds, mask = job.llm, job.inputs.embeds, job.inputs.attention_mask
    for _ in range(tokens):
        hidden, _ = lm_forward(llm, embeds, mask, position_ids(mask))
        token = llm.logits(hidden[:, -1]).argmax(-1, keepdim=True)
        embeds = torch.cat([embeds, llm.embed(token).to(embeds.dtype)], 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return tokens * embeds.shape[0]


@torch.no_grad()
def generate(job: Decoding, tokens: int, **options) -> int:
    llm = job.llm
    out = llm.model.generate(
        inputs_embeds=job.inputs.embeds,
        attention_mask=job.inputs.attention_mask,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        eos_token_id=llm.eos_token_id,
        pad_token_id=llm.tokenizer.pad_token_id,
        **options,
    )
    return out.shape[0] * tokens // options.get("num_return_sequences", 1)


def magic(job: Decoding, tokens: int, top_k: int) -> int:
    rows = magic_search(job, top_k=top_k, alpha=0.1, beta=2.0, max_new_tokens=tokens, min_new_tokens=tokens)
    return sum(len(t) for t, _ in rows)


def best_times(runs: list[Callable[[], int]], repeats: int) -> list[tuple[float, int]]:
    """Best wall time and token count per run. Runs are interleaved within each repeat, so that
    load from other processes on a shared machine falls on all rows alike."""
    for run in runs:
        run()  # warm-up: allocator, CLIP text tower, tokenizer caches
    best = [(float("inf"), 0)] * len(runs)
    for _ in range(repeats):
        for index, run in enumerate(runs):
            start = time.perf_counter()
            count = run()
            best[index] = (min(best[index][0], time.perf_counter() - start), count)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--magic-k", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--export", help="a trained export of the demo model (default: random init)")
    parser.add_argument("--json", default="outputs/bench/decode_throughput.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.export:
        decoder = VisualDecoder.from_export(args.export)
    else:
        decoder = VisualDecoder(build_model(DEMO_VISION, DEMO_LLM, DEMO_MAPPER), vision_config=DEMO_VISION)
    rng = random.Random(0)
    pairs = {(c, s) for c in COLORS for s in SHAPES}
    size = decoder.model.vision.image_size
    images = [render(sample_scene(rng, size, pairs), size) for _ in range(args.images)]
    with torch.no_grad():
        features = decoder.model.vision.encode(
            torch.stack([decoder.model.vision.transform(i) for i in images])
        )
    prompts = decoder.prompts(args.images)
    job = Decoding(
        decoder.model.llm,
        decoder.prepare_inputs(features, prompts),
        lambda: decoder.clip,
        partial(decoder.bind_memory, features),
    )
    t = args.tokens
    rows: list[tuple[str, str, Callable[[], int]]] = [
        ("greedy", "generate, KV cache", partial(generate, job, t, do_sample=False)),
        ("greedy", "generate, use_cache=False*", partial(generate, job, t, do_sample=False, use_cache=False)),
        ("greedy", "no cache (full recompute)", partial(greedy_without_cache, job, t)),
        ("beam 4", "generate, KV cache", partial(generate, job, t, do_sample=False, num_beams=4)),
        ("sample", "generate, KV cache", partial(generate, job, t, do_sample=True, top_p=0.9)),
        (f"magic k={args.magic_k}", "own loop, KV cache", partial(magic, job, t, args.magic_k)),
        (
            "greedy",
            "VisualDecoder.decode (+rescoring)",
            lambda: sum(
                len(g[0].tokens)
                for g in decoder.decode(features, prompts, "greedy", max_new_tokens=t, min_new_tokens=t)
            ),
        ),
    ]
    results = []
    print(
        f"demo-sized model, {args.images} images x {t} new tokens, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'strategy':<12} {'decoding':<36} {'seconds':>8} {'tokens/s':>10} {'images/s':>9}")
    for (strategy, how, _), (seconds, count) in zip(
        rows, best_times([r for _, _, r in rows], args.repeats), strict=True
    ):
        results.append(
            {
                "strategy": strategy,
                "decoding": how,
                "seconds": seconds,
                "tokens": count,
                "tokens_per_s": count / seconds,
                "images_per_s": args.images / seconds,
            }
        )
        print(
            f"{strategy:<12} {how:<36} {seconds:>8.3f} {count / seconds:>10.1f} {args.images / seconds:>9.2f}"
        )
    print("* transformers forces the cache on with inputs_embeds: this row still caches")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"images": args.images, "tokens": t, "rows": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
