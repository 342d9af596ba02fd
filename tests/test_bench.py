"""`vgtrain bench` at its smallest size, through the CLI: bench.json holds every required figure with
its type, and every derived figure equals what its rows say (a ratio is the ratio of the rows it
names, an MFU is flops x samples/s / peak). No timing is asserted (the numbers depend on the machine
and its load); only the arithmetic between the numbers written in one file.

A new derived figure gets a line in ``ratio_table`` (or ``test_rows_are_self_consistent``); figures
this file does not know are left alone, so a branch that adds one does not break this test."""

from __future__ import annotations

import contextlib
import io
import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from vgtrain.bench.decode import OWN_LOOP, STATIC
from vgtrain.cli import main

# Path -> type of each figure a reader of bench.json (README, `make bench`, dashboards) relies on.
REQUIRED_TYPES: dict[str, type | tuple[type, ...]] = {
    "size": str,
    "command": str,
    "wall_s": float,
    "machine.cpu": str,
    "machine.cores": int,
    "machine.torch": str,
    "machine.torch_threads": int,
    "machine.device": str,
    "peak_matmul_flops.fp32": float,
    "train.vgtrain_vs_loop": float,
    "train.vgtrain_vs_loop_cpu_time": float,
    "train.vgtrain_vs_loop_fastest_step": float,
    "train.cached_vs_images": float,
    "train.mfu": float,
    "train.headline.scale": str,
    "train.headline.route": str,
    "train.headline.dtype": str,
    "train.headline.batch_size": int,
    "train.clipcap": dict,
    "train.tiny_cached_vs_images": dict,
    "train.rows": list,
    "data.images_per_s": float,
    "data.by_scale": dict,
    "data.step_waits_on_data": dict,
    "decode.kv_cache_speedup": float,
    "decode.greedy_tokens_per_s": float,
    "decode.kv_cache_speedup_by_model": dict,
    "decode.models": dict,
    "cache.images_per_s": float,
    "cache.by_scale": dict,
}
TRAIN_ROW_TYPES: dict[str, type | tuple[type, ...]] = {
    "scale": str,
    "route": str,
    "dtype": str,
    "source": str,
    "runner": str,
    "batch_size": int,
    "samples_per_s": float,
    "step_s": float,
    "cpu_step_s": float,
    "data_wait_fraction": float,
    "peak_memory_mib": float,
    "added_memory_mib": float,
    "memory_kind": str,
    "flops_per_sample": float,
    "mfu": float,
}
DECODE_ROW_TYPES: dict[str, type | tuple[type, ...]] = {
    "strategy": str,
    "decoding": str,
    "seconds": float,
    "tokens": int,
    "tokens_per_s": float,
    "images_per_s": float,
}

# A path is a tuple of dict keys and row selectors; a selector (a dict) picks the one list element
# whose fields equal it.
JsonPath = tuple[str | dict[str, Any], ...]


def lookup(result: dict[str, Any], path: JsonPath | str) -> Any:
    node: Any = result
    for step in path.split(".") if isinstance(path, str) else path:
        if isinstance(step, dict):
            matches = [item for item in node if all(item.get(k) == v for k, v in step.items())]
            assert len(matches) == 1, f"{len(matches)} rows match {step}"
            node = matches[0]
        else:
            assert step in node, f"bench.json lacks {step!r} (path {path})"
            node = node[step]
    return node


def decode_row(entry: dict[str, Any], model: str, strategy: str, how: str) -> JsonPath:
    """The tokens/s of ``model``'s decode row for ``strategy`` whose decoding starts with ``how``."""
    decoding = next(
        r["decoding"] for r in entry["rows"] if r["strategy"] == strategy and r["decoding"].startswith(how)
    )
    return ("decode", "models", model, "rows", {"strategy": strategy, "decoding": decoding}, "tokens_per_s")


def ratio_table(result: dict[str, Any]) -> dict[JsonPath, tuple[JsonPath, JsonPath]]:
    """Every derived ratio in bench.json today -> (numerator, denominator) it is computed from."""
    train, decode = result["train"], result["decode"]
    head = {k: train["headline"][k] for k in ("scale", "route", "dtype")}
    rows = ("train", "rows")
    table: dict[JsonPath, tuple[JsonPath, JsonPath]] = {}
    for dtype in train["clipcap"]:  # ClipCap-sized model: ours vs the hand-written loop, cached vs images
        ours = (*rows, {**head, "dtype": dtype, "source": "cached", "runner": "vgtrain"})
        loop = (*rows, {**head, "dtype": dtype, "source": "cached", "runner": "loop"})
        images = (*rows, {**head, "dtype": dtype, "source": "images", "runner": "vgtrain"})
        by_dtype = ("train", "clipcap", dtype)
        table[(*by_dtype, "vgtrain_vs_loop")] = ((*ours, "samples_per_s"), (*loop, "samples_per_s"))
        table[(*by_dtype, "cached_vs_images")] = ((*ours, "samples_per_s"), (*images, "samples_per_s"))
        table[(*by_dtype, "cached_vs_images_flop_ratio")] = (
            (*images, "flops_per_sample"),
            (*ours, "flops_per_sample"),
        )
    for key in train["tiny_cached_vs_images"]:
        route, dtype = key.split("/")
        tiny = {"route": route, "dtype": dtype, "runner": "vgtrain"}
        scale = next(r["scale"] for r in train["rows"] if r["scale"] != head["scale"])
        table[("train", "tiny_cached_vs_images", key)] = (
            (*rows, {**tiny, "scale": scale, "source": "cached"}, "samples_per_s"),
            (*rows, {**tiny, "scale": scale, "source": "images"}, "samples_per_s"),
        )
    for model, entry in decode["models"].items():
        row = partial(decode_row, entry, model)
        for strategy in entry["kv_cache_speedup_by_strategy"]:
            # vgtrain's cache loop alone (MAGIC: its own loop) against recomputing the sequence
            ours = (
                STATIC
                if any(r["decoding"] == STATIC for r in entry["rows"] if r["strategy"] == strategy)
                else OWN_LOOP
            )
            table[("decode", "models", model, "kv_cache_speedup_by_strategy", strategy)] = (
                row(strategy, ours),
                row(strategy, "no cache"),
            )
            if strategy in entry.get("static_vs_generate_by_strategy", {}):
                table[("decode", "models", model, "static_vs_generate_by_strategy", strategy)] = (
                    row(strategy, ours),
                    row(strategy, "generate"),
                )
    return table


# Headline figures that copy another figure of the same file (path -> its source).
def copy_table(result: dict[str, Any]) -> dict[JsonPath, JsonPath]:
    train, decode = result["train"], result["decode"]
    head = train["headline"]
    first = ("train", "clipcap", head["dtype"])
    ours = (
        "train",
        "rows",
        {k: head[k] for k in ("scale", "route", "dtype")} | {"source": "cached", "runner": "vgtrain"},
    )
    table: dict[JsonPath, JsonPath] = {
        ("train", key): (*first, key)
        for key in (
            "vgtrain_vs_loop",
            "vgtrain_vs_loop_cpu_time",
            "vgtrain_vs_loop_fastest_step",
            "cached_vs_images",
        )
    }
    table[("train", "mfu")] = (*ours, "mfu")
    table[(*first, "mfu")] = (*ours, "mfu")
    for model in decode["models"]:
        table[("decode", "kv_cache_speedup_by_model", model)] = (
            "decode",
            "models",
            model,
            "kv_cache_speedup_by_strategy",
            "greedy",
        )
        table[("decode", "greedy_tokens_per_s_by_model", model)] = (
            "decode",
            "models",
            model,
            "greedy_tokens_per_s",
        )
        table[("decode", "models", model, "greedy_tokens_per_s")] = (
            "decode",
            "models",
            model,
            "rows",
            {"strategy": "greedy", "decoding": STATIC},
            "tokens_per_s",
        )
    # The headline is the ClipCap-sized model's when it was decoded, else the demo-sized one's.
    headline_model = head["scale"] if head["scale"] in decode["models"] else next(iter(decode["models"]))
    table[("decode", "kv_cache_speedup")] = ("decode", "kv_cache_speedup_by_model", headline_model)
    table[("decode", "greedy_tokens_per_s")] = ("decode", "greedy_tokens_per_s_by_model", headline_model)
    return table


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["bench", "--size", "smoke", "--out", str(out), "--threads", "1"]) == 0
    return out, json.loads(out.read_text()), stdout.getvalue()


def check_types(where: str, node: dict[str, Any], types: dict[str, type | tuple[type, ...]]) -> None:
    for key, kind in types.items():
        value = lookup(node, key)
        if kind is float:  # JSON writes a whole float as 1.0; an int would mean a count slipped in
            assert isinstance(value, float) and math.isfinite(value), (where, key, value)
        else:
            assert isinstance(value, kind) and not isinstance(value, bool), (where, key, type(value))


def test_bench_smoke_cli_contract(bench_result):
    out, result, stdout = bench_result
    assert stdout.strip().splitlines()[-1] == str(out)  # make bench relies on it
    assert out.with_suffix(".md").read_text().startswith("Measured on")
    assert result["size"] == "smoke" and result["command"].startswith("vgtrain bench --size smoke")


def test_bench_has_required_figures_with_types(bench_result):
    _, result, _ = bench_result
    check_types("bench.json", result, REQUIRED_TYPES)
    assert result["machine"]["torch_threads"] == 1  # --threads 1 was applied
    for row in result["train"]["rows"]:
        check_types(f"train row {row.get('scale')}/{row.get('route')}", row, TRAIN_ROW_TYPES)
        assert row["samples_per_s"] > 0 and row["peak_memory_mib"] > 0 and row["flops_per_sample"] > 0
        assert 0 <= row["data_wait_fraction"] < 1 and row["runner"] in ("vgtrain", "loop")
        assert row["source"] in ("cached", "images") and row["route"] in ("prefix", "xattn", "both")
    rows = result["train"]["rows"]
    assert {(r["route"], r["source"]) for r in rows} >= {
        ("prefix", "cached"),
        ("prefix", "images"),
        ("xattn", "cached"),
        ("both", "cached"),
    }
    assert {r["runner"] for r in rows} == {"vgtrain", "loop"}
    for model in result["decode"]["models"].values():
        assert model["images"] > 0 and model["new_tokens"] > 0
        for row in model["rows"]:
            check_types(f"decode row {row.get('strategy')}", row, DECODE_ROW_TYPES)
    strategies = {row["strategy"].split(" ")[0] for row in result["decode"]["models"]["tiny-smoke"]["rows"]}
    assert strategies == {"greedy", "beam", "top-p", "magic"}


def test_bench_ratios_equal_the_ratio_of_their_rows(bench_result):
    _, result, _ = bench_result
    table = ratio_table(result)
    assert len(table) >= 8  # the table was built from the file, not from an empty section
    for ratio, (numerator, denominator) in table.items():
        expected = lookup(result, numerator) / lookup(result, denominator)
        assert lookup(result, ratio) == pytest.approx(expected, rel=1e-9), ratio
    for headline, source in copy_table(result).items():
        assert lookup(result, headline) == lookup(result, source), headline


def test_rows_are_self_consistent(bench_result):
    """Within each row: MFU from its flops, its rate and the measured peak; rates from their times."""
    _, result, _ = bench_result
    peaks = result["peak_matmul_flops"]
    for row in result["train"]["rows"]:
        where = f"{row['scale']}/{row['route']}/{row['source']}/{row['runner']}"
        assert row["mfu"] == pytest.approx(
            row["flops_per_sample"] * row["samples_per_s"] / peaks[row["dtype"]]
        ), where
        assert row["samples_per_s"] == pytest.approx(row["batch_size"] / row["step_s"]), where
    for model in result["decode"]["models"].values():
        for row in model["rows"]:
            assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"])
            assert row["images_per_s"] == pytest.approx(model["images"] / row["seconds"])
            assert 0 < row["tokens"] <= model["images"] * model["new_tokens"]
    data = result["data"]
    headline_scale = result["train"]["headline"]["scale"]
    assert data["images_per_s"] == max(data["by_scale"][headline_scale]["images_per_s_by_workers"].values())
    cache = result["cache"]
    assert cache["images_per_s"] == max(cache["by_scale"][headline_scale]["images_per_s_by_workers"].values())
    for key, verdict in data["step_waits_on_data"].items():
        scale, route, dtype = key.split("/")
        row = lookup(
            result,
            (
                "train",
                "rows",
                {"scale": scale, "route": route, "dtype": dtype, "source": "images", "runner": "vgtrain"},
            ),
        )
        assert verdict["inline_data_fraction_of_step"] == row["data_wait_fraction"]
        demand = row["samples_per_s"] / (1.0 - row["data_wait_fraction"])
        assert verdict["step_images_per_s_without_data"] == pytest.approx(demand)
        assert verdict["waits"] == (verdict["pipeline_images_per_s_1_worker"] < demand)
