#!/usr/bin/env bash
# Your own photos -> shards -> (optional) feature cache -> fine-tune from an export.
#   data/recipes/custom_folder.sh PHOTOS_DIR OUT_DIR [EXPORT_DIR [OVERRIDES...]]
# PHOTOS_DIR holds images with same-named .txt captions (one caption per line; any depth), or a
# captions.csv/.tsv/.jsonl naming the files (see data/README.md for the column options).
# EXPORT_DIR (optional, "" for none): a `vgtrain export` folder to start from. OVERRIDES go to both
# `vgtrain cache` and `vgtrain train`; with an export they must name its backbones and adapter
# (see its vgtrain.json), e.g. model/vision=clip_vit_b32 model/llm=gpt2 model/mapper=mlp trainer=gpu.
set -euo pipefail
photos=${1:?usage: custom_folder.sh PHOTOS_DIR OUT_DIR [EXPORT_DIR]}
out=${2:?usage: custom_folder.sh PHOTOS_DIR OUT_DIR [EXPORT_DIR]}
export_dir=${3:-}

# 5% of the images (chosen by a hash of their name) become the validation split; images larger
# than 512 px are resized and re-encoded; bad items are counted in $out/manifest.json.
vgtrain shards "$photos" --out "$out" --val-fraction 0.05 --max-side 512 --samples-per-shard 1000

train_urls=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['patterns']['train'])" "$out/manifest.json")
val_urls=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['patterns'].get('val') or 'null')" "$out/manifest.json")
overrides=(experiment=custom "data.train_urls=$train_urls" "data.val_urls=$val_urls")
if [[ -n "$export_dir" ]]; then
  # The export's backbones and adapter settings (vgtrain.json records them); adjust if yours differ.
  overrides+=("init_from=$export_dir")
fi
overrides+=("${@:4}")

# Features of the frozen vision tower, once (resumable); training then skips image decoding and
# the vision forward pass. Add trainer=gpu / --device cuda where there is a GPU.
vgtrain cache "${overrides[@]}" --batch-size 64
vgtrain train "${overrides[@]}" data.use_cached_features=true
