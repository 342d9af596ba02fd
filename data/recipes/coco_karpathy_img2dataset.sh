#!/usr/bin/env bash
# COCO Karpathy split downloaded image by image with img2dataset (no 19 GB zips; resized while
# downloading), then validated and re-sharded by vgtrain. Network access; pip install img2dataset pandas.
#   data/recipes/coco_karpathy_img2dataset.sh [ROOT]      (default ROOT: data/coco-i2d)
set -euo pipefail
root=${1:-data/coco-i2d}
mkdir -p "$root"
[[ -f "$root/dataset_coco.json" ]] || { wget -c -P "$root" https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip \
  && unzip -q -o "$root/caption_datasets.zip" dataset_coco.json -d "$root"; }

# One row per image: its URL, first caption, all captions (a JSON list in one column) and split.
python - "$root" <<'PY'
import csv, json, sys
root = sys.argv[1]
images = json.load(open(f"{root}/dataset_coco.json"))["images"]
with open(f"{root}/coco_karpathy.tsv", "w", newline="") as out:
    rows = csv.writer(out, delimiter="\t")
    rows.writerow(["url", "caption", "captions", "split"])
    for im in images:
        captions = [s["raw"].strip() for s in im["sentences"]]
        url = f"http://images.cocodataset.org/{im['filepath']}/{im['filename']}"
        rows.writerow([url, captions[0], json.dumps(captions), im["split"]])
PY

img2dataset --url_list "$root/coco_karpathy.tsv" --input_format tsv --url_col url --caption_col caption \
  --save_additional_columns '["captions","split"]' --output_format webdataset --output_folder "$root/raw" \
  --image_size 384 --resize_mode keep_ratio --resize_only_if_bigger True \
  --processes_count 8 --thread_count 32 --enable_wandb False

# Validates every sample (unreadable images, missing captions, duplicate keys are counted in the
# manifest), keeps all five captions per image and the Karpathy split (restval -> train).
vgtrain shards "$root/raw" --out "$root/wds" --split-column split --samples-per-shard 2000 --workers "$(nproc)"
