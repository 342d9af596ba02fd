"""`vgtrain bench` at its smallest size, through the CLI: bench.json holds every required figure,
finite and positive. No timing is asserted (the numbers depend on the machine and its load)."""

import json
import math

from vgtrain.cli import main

REQUIRED = [
    ("train", "vgtrain_vs_loop"),
    ("train", "cached_vs_images"),
    ("train", "mfu"),
    ("decode", "kv_cache_speedup"),
    ("decode", "greedy_tokens_per_s"),
    ("data", "images_per_s"),
    ("cache", "images_per_s"),
]


def test_bench_smoke_writes_required_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--size", "smoke", "--out", str(out), "--threads", "1"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)  # make bench relies on it

    result = json.loads(out.read_text())
    for section, key in REQUIRED:
        value = result[section][key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (section, key, value)
    for key in ("cpu", "cores", "torch", "torch_threads"):
        assert result["machine"][key], key
    rows = result["train"]["rows"]
    assert {(r["route"], r["source"]) for r in rows} >= {
        ("prefix", "cached"),
        ("prefix", "images"),
        ("xattn", "cached"),
        ("both", "cached"),
    }
    assert {r["runner"] for r in rows} == {"vgtrain", "loop"}
    for row in rows:
        assert row["samples_per_s"] > 0 and row["peak_memory_mib"] > 0 and row["flops_per_sample"] > 0
        assert math.isfinite(row["added_memory_mib"]) and math.isfinite(row["mfu"])
    strategies = {row["strategy"].split(" ")[0] for row in result["decode"]["models"]["tiny-smoke"]["rows"]}
    assert strategies == {"greedy", "beam", "top-p", "magic"}
    assert out.with_suffix(".md").read_text().startswith("Measured on")
