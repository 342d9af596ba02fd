"""`vgtrain caption --export DIR IMG...`: caption images (or answer a question about them).

One line per image on stdout (``path<TAB>caption``, or a JSON object with ``--json``); an image
that cannot be read is reported on stderr in one line naming the file and the rest are still
captioned. Exit status 1 only if nothing could be captioned.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vgtrain.decode.static_lm import STEP_MODES
from vgtrain.decode.strategies import STRATEGIES, get_strategy

# Command-line flag -> strategy option; unset flags are left out, so a strategy's defaults apply
# and a flag the chosen strategy does not take is an error rather than silently ignored.
# Strategy options, each flag spelt as the option it sets (`--num-beams` sets num_beams), the same
# names as `decode.options.*` in `vgtrain eval` and the keyword arguments of VisualDecoder.caption.
OPTIONS = (
    "num_beams",
    "num_return_sequences",
    "rerank",
    "length_penalty",
    "early_stopping",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "alpha",
    "beta",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "min_new_tokens",
    "max_new_tokens",
    "stop_strings",
    "step",
)
CHUNK = 256  # images read and decoded per round, so a large folder is not held in memory at once


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vgtrain caption", description="Caption images with an exported adapter."
    )
    p.add_argument(
        "images", nargs="+", help="image files, folders of images, or .txt files listing image paths"
    )
    p.add_argument(
        "--export", required=True, metavar="DIR", help="an export directory written by `vgtrain export`"
    )
    p.add_argument(
        "--strategy",
        choices=sorted(STRATEGIES),
        help="decoding strategy (default: beam if --num-beams is given, else greedy)",
    )
    p.add_argument("--question", help="ask this question about every image (visual question answering)")
    p.add_argument("--question-template", help="overrides the export's template, e.g. 'Q: {q} A:'")
    p.add_argument(
        "--prompt", help="text after the visual prefix when captioning (default: the export's prompt)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per image, with scores and tokens")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g = p.add_argument_group("strategy options (each strategy takes its own)")
    g.add_argument("--num-beams", type=int, help="beam: number of beams")
    g.add_argument("--num-return-sequences", type=int, help="beam/sample: sequences per image (best first)")
    g.add_argument(
        "--rerank", choices=["clip"], help="beam/sample: order the returned sequences by CLIP similarity"
    )
    g.add_argument("--length-penalty", type=float)
    g.add_argument("--early-stopping", action="store_true", default=None)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int, help="sample: top-k filter; magic: candidates per step")
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, help="sample: seed for reproducible samples")
    g.add_argument("--alpha", type=float, help="magic: degeneration penalty weight")
    g.add_argument("--beta", type=float, help="magic: CLIP guidance weight")
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--no-repeat-ngram-size", type=int)
    g.add_argument("--min-new-tokens", type=int)
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument(
        "--stop-strings", action="append", help="stop string (repeatable); the caption ends before it"
    )
    g.add_argument(
        "--step",
        choices=STEP_MODES,
        help="greedy/sample: how a token step runs (auto: a CUDA graph on CUDA, eager elsewhere)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vgtrain.decode.decoder import VisualDecoder
    from vgtrain.decode.images import expand_image_arguments
    from vgtrain.export.artifact import ArtifactError
    from vgtrain.models.backbones import BackboneError

    strategy = args.strategy or ("beam" if args.num_beams else "greedy")
    options: dict[str, Any] = {
        option: getattr(args, option) for option in OPTIONS if getattr(args, option) is not None
    }
    try:
        get_strategy(strategy).resolve(options)
        decoder = VisualDecoder.from_export(
            args.export, device=args.device, question_template=args.question_template
        )
    except (ArtifactError, BackboneError, OSError, ValueError) as error:
        print(f"vgtrain caption: error: {error}", file=sys.stderr)
        return 1
    images = expand_image_arguments(args.images)
    captioned = 0
    for start in range(0, len(images), CHUNK):
        results = decoder.caption(
            images[start : start + CHUNK],
            strategy,
            question=args.question,
            prompt=args.prompt,
            batch_size=args.batch_size,
            **options,
        )
        for result in results:
            if not result.ok:
                print(f"vgtrain caption: error: {result.error}", file=sys.stderr)
            captioned += result.ok
            if args.json:
                print(json.dumps(result.to_dict()), flush=True)
            elif result.ok:
                print(f"{result.image}\t{result.text}", flush=True)
    if captioned == 0:
        print(f"vgtrain caption: error: no image could be captioned (of {len(images)})", file=sys.stderr)
        return 1
    return 0
