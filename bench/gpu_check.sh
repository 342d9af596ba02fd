#!/usr/bin/env bash
# The GPU figures of issue 13 in one short run, for a machine with one CUDA GPU (an H200 when the
# issue's thresholds apply) whose Python has torch, lightning and transformers but not the
# pure-Python packages below, and no network.
#
#   bench/gpu_check.sh prepare   # here, with PyPI: wheels of the missing packages -> bench/wheels/
#   bench/gpu_check.sh           # there (repository root, bench/wheels/ carried along): install
#                                # them offline, run `vgtrain bench --size gpu` and the demo on
#                                # trainer=gpu, print the issue's figures
#
# Results go to $OUT (the device tool's output folder) or outputs/gpu_check/. Environment:
# PYTHON (default python3), GPU_CHECK_SKIP_DEMO=1 to leave the demo out.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/wheels
PACKAGES=(open_clip_torch==3.3.0 webdataset==1.0.2 hydra-core==1.3.8 omegaconf==2.3.1
          antlr4-python3-runtime==4.9.3 braceexpand==0.1.7 ftfy==6.3.1 wcwidth==0.9.4)
PYTHON=${PYTHON:-python3}

if [[ "${1:-run}" == "prepare" ]]; then
    mkdir -p "$WHEELS"
    # antlr4-python3-runtime 4.9.3 is published as a source archive only: `pip wheel` builds it.
    "$PYTHON" -m pip wheel --no-deps -q -w "$WHEELS" "${PACKAGES[@]}"
    ls -1 "$WHEELS"
    exit 0
fi

OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
"$PYTHON" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"

"$PYTHON" -m vgtrain.cli bench --size gpu --out "$OUT/bench.json" --workdir "$OUT/benchdata" 2>&1 | tee "$OUT/bench.log"
if [[ -z "${GPU_CHECK_SKIP_DEMO:-}" ]]; then
    "$PYTHON" -m vgtrain.cli train experiment=demo trainer=gpu logger=csv \
        hydra.run.dir="$OUT/demo" paths.data_dir="$OUT/data" 2>&1 | tee "$OUT/demo.log" | tail -25
fi

"$PYTHON" - "$OUT" <<'PY'
"""The issue's GPU figures (and its thresholds) from bench.json and the demo's metrics.json."""
import csv
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
bench = json.loads((out / "bench.json").read_text())
train = bench.get("train", {})
rows = []
for batch, entry in (train.get("gpu_by_batch") or {}).items():
    rows.append((f"prefix step bf16, batch {batch}, samples/s (loop {entry['loop_samples_per_s']:.0f})",
                 entry["prefix_samples_per_s"], ">= 12000" if batch == "256" else ""))
    rows.append((f"xattn step bf16, batch {batch}, samples/s", entry["xattn_samples_per_s"], ""))
rows.append(("train.vgtrain_vs_loop", train.get("vgtrain_vs_loop"), ""))
rows.append(("train.wait_fraction", train.get("wait_fraction"), "<= 0.05"))
rows.append(("train.best_mfu", train.get("best_mfu"), ">= 0.30"))
decode = bench.get("decode", {})
for model, speedup in (decode.get("kv_cache_speedup_by_model") or {}).items():
    rows.append((f"decode.kv_cache_speedup ({model})", speedup, ">= 2"))
for model, section in (decode.get("models") or {}).items():
    for row in section.get("rows", []):
        if row.get("strategy") == "greedy":
            rows.append((f"greedy tokens/s ({model}, {row.get('decoding')})", row.get("tokens_per_s"),
                         ">= 5000 (GPT-2-small, cache)" if model == "clipcap" else ""))
cache = bench.get("cache", {})
if cache:
    rows.append(("cache.images_per_s", cache.get("images_per_s"), ">= 5000"))
metrics_file = out / "demo" / "metrics.json"
if metrics_file.exists():
    metrics = json.loads(metrics_file.read_text())
    rows.append(("demo wall_seconds (all: data, caching, 1,800 steps, evaluation)", metrics.get("wall_seconds"), ""))
    rows.append(("demo val exact match", metrics.get("val/exact_match"), ""))
    rates = []
    for log in (out / "demo").rglob("metrics.csv"):
        with log.open() as f:
            rates += [float(r["train/samples_per_s"]) for r in csv.DictReader(f) if r.get("train/samples_per_s")]
    if rates:
        rate = sorted(rates)[len(rates) // 2]
        import yaml  # PyYAML, omegaconf's dependency

        config = yaml.safe_load((out / "demo" / ".hydra" / "config.yaml").read_text())
        samples = metrics.get("global_step", 0) * config["data"]["batch_size"]
        rows.append(("demo training steps, seconds (steps x batch / median samples/s)", samples / rate, "<= 20"))
print(f"\n{'figure':<75} {'value':>12}  target")
for name, value, target in rows:
    shown = f"{value:12.3f}" if isinstance(value, float) else f"{value!s:>12}"
    print(f"{name:<75} {shown}  {target}")
PY
