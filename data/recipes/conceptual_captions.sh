#!/usr/bin/env bash
# Conceptual Captions (CC3M) with img2dataset. The URL/caption TSVs are behind a terms page:
# download "Training split" and "Validation split" from
# https://ai.google.com/research/ConceptualCaptions/download into ROOT first
# (Train_GCC-training.tsv, Validation_GCC-1.1.0-Validation.tsv). Many URLs are dead by now:
# img2dataset's *_stats.json count them, and `vgtrain shards` reports the totals in its manifest.
#   data/recipes/conceptual_captions.sh [ROOT]       (default ROOT: data/cc3m); pip install img2dataset
set -euo pipefail
root=${1:-data/cc3m}
for split in train val; do
  case $split in
    train) tsv="$root/Train_GCC-training.tsv" ;;
    val) tsv="$root/Validation_GCC-1.1.0-Validation.tsv" ;;
  esac
  [[ -f $tsv ]] || { echo "missing $tsv: download it from the page above" >&2; exit 1; }
  # The files have no header: name the columns (caption, url) in a copy.
  { printf 'caption\turl\n'; cat "$tsv"; } > "$root/$split.tsv"
  img2dataset --url_list "$root/$split.tsv" --input_format tsv --url_col url --caption_col caption \
    --output_format webdataset --output_folder "$root/raw-$split" --image_size 384 \
    --resize_mode keep_ratio --resize_only_if_bigger True \
    --processes_count 16 --thread_count 64 --enable_wandb False
  vgtrain shards "$root/raw-$split" --out "$root/wds-$split" --samples-per-shard 5000 --workers "$(nproc)"
done
# Train with data.train_urls=<pattern printed for wds-train> data.val_urls=<pattern printed for wds-val>
# (both files are written as train-*.tar: each is its own dataset).
