"""`vgtrain bench`: runs the suite, prints the tables, writes bench.json (and bench.md beside it);
the last line printed is the path of bench.json."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from vgtrain.bench.cache import run_cache
from vgtrain.bench.data import run_data, step_waits_on_data
from vgtrain.bench.decode import run_decode
from vgtrain.bench.machine import describe_machine, dtype_supported, matmul_peak
from vgtrain.bench.report import render_markdown, render_text
from vgtrain.bench.sizes import SIZES, Size
from vgtrain.bench.steps import quiet_lightning
from vgtrain.bench.train import TrainBench
from vgtrain.models import build_model

SECTIONS = ("train", "data", "decode", "cache")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vgtrain bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        help="default on CPU, gpu on CUDA (batch 256-4,096 ClipCap-scale steps); smoke: seconds, for tests",
    )
    parser.add_argument("--out", default="outputs/bench/bench.json", help="where bench.json goes")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--workdir", help="where the benchmark shards go (default: beside --out)")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(
            f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}"
        )
    return args


def decode_section(size: Size, train: TrainBench | None, device: torch.device, log: Any) -> dict[str, Any]:
    """The demo-sized model's full strategy matrix; greedy on the GPT-2-small-sized LM too."""
    scale = size.tiny
    tiny = build_model(dict(scale.vision), dict(scale.llm), dict(scale.prefix))
    options = {
        "images": size.decode_images,
        "tokens": size.decode_tokens,
        "repeats": size.decode_repeats,
        "device": device,
    }
    models = {scale.name: run_decode(tiny, dict(scale.vision), magic_k=size.magic_k, **options)}
    log(f"  {scale.name}: done")
    if size.decode_clipcap:
        big = size.clipcap
        if train is not None and train.headline is not None:
            model = train.headline.module.model  # the one the train section built: same weights
        else:
            model = build_model(dict(big.vision), dict(big.llm), dict(big.prefix))
        models[big.name] = run_decode(
            model, dict(big.vision), magic_k=size.magic_k, strategies=("greedy",), **options
        )
        log(f"  {big.name}: done")
    speedups = {name: m["kv_cache_speedup_by_strategy"]["greedy"] for name, m in models.items()}
    # The headline is ClipCap's setting, GPT-2-small recomputing its whole sequence per token; the
    # tiny demo LM (3 layers, width 192) is bound by per-step overhead, where a cache saves little.
    headline = (
        speedups.get(size.clipcap.name, speedups[scale.name]) if size.decode_clipcap else speedups[scale.name]
    )
    greedy = {
        name: m["greedy_tokens_per_s"] for name, m in models.items()
    }  # static-cache loop, batch size.decode_images
    return {
        "kv_cache_speedup": headline,
        "kv_cache_speedup_by_model": speedups,
        "greedy_tokens_per_s": greedy.get(size.clipcap.name, greedy[scale.name]),
        "greedy_tokens_per_s_by_model": greedy,
        "models": models,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(list(argv or []))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_lightning()
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, argv or [])
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (a test) keeps its setting


def run(args: argparse.Namespace, argv: list[str]) -> int:
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    size = SIZES[args.size or ("gpu" if device.type == "cuda" else "default")]
    wanted = args.only.split(",")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir) if args.workdir else out.parent / "data"
    started = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {line}", flush=True)

    result: dict[str, Any] = {
        "size": size.name,
        "command": " ".join(["vgtrain bench", *argv]),
        "machine": describe_machine(device),
    }
    peaks = {d: matmul_peak(d, device, size.peak_matmul_n) for d in size.dtypes if dtype_supported(d, device)}
    result["peak_matmul_flops"] = peaks
    log("matmul peak: " + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()))
    train = None
    if "train" in wanted:
        train = TrainBench(size, device, workdir, peaks, log)
        result["train"] = train.run()
    if "data" in wanted:
        log("data pipeline")
        result["data"] = run_data(size, workdir, log)
        if "train" in result:
            result["data"]["step_waits_on_data"] = step_waits_on_data(result["data"], result["train"]["rows"])
    if "decode" in wanted:
        log("decoding")
        result["decode"] = decode_section(size, train, device, log)
    if "cache" in wanted:
        log("feature caching")
        result["cache"] = run_cache(size, workdir, device, log)
    result["wall_s"] = time.perf_counter() - started
    result["machine"]["load_average_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(render_markdown(result))
    print("\n" + render_text(result) + "\n")
    print(out)
    return 0
