#!/usr/bin/env bash
# COCO captions, Karpathy split (113,287 train incl. restval / 5,000 val / 5,000 test images,
# ~5 captions each), from the official COCO 2014 files. Needs ~20 GB of downloads, network access.
#   data/recipes/coco_karpathy.sh [ROOT]        (default ROOT: data/coco)
set -euo pipefail
root=${1:-data/coco}
mkdir -p "$root" && cd "$root"

for zip in train2014 val2014; do
  [[ -d $zip ]] || { wget -c "http://images.cocodataset.org/zips/$zip.zip" && unzip -q "$zip.zip" && rm "$zip.zip"; }
done
[[ -d annotations ]] || { wget -c http://images.cocodataset.org/annotations/annotations_trainval2014.zip \
  && unzip -q annotations_trainval2014.zip && rm annotations_trainval2014.zip; }
# Karpathy's split file (dataset_coco.json; also holds Flickr8k/30k splits).
[[ -f dataset_coco.json ]] || { wget -c https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip \
  && unzip -q -o caption_datasets.zip dataset_coco.json && rm caption_datasets.zip; }
cd - >/dev/null

# The COCO captions of both 2014 files, split by Karpathy's file (restval joins train; test is
# written as test-*.tar). Images are resized to at most 384 px (CLIP needs 224/336) to save disk.
vgtrain shards "$root/annotations/captions_train2014.json" "$root/annotations/captions_val2014.json" \
  --image-root "$root/train2014" --image-root "$root/val2014" --karpathy "$root/dataset_coco.json" \
  --out "$root/wds" --max-side 384 --samples-per-shard 2000 --workers "$(nproc)"
# Equivalent, from Karpathy's file alone (its own copy of the captions):
#   vgtrain shards "$root/dataset_coco.json" --image-root "$root" --out "$root/wds" --max-side 384

# Then, with the patterns printed above (or read from $root/wds/manifest.json):
#   vgtrain cache experiment=clipcap_mlp_gpt2 data.train_urls='...' data.val_urls='...' --device cuda
#   vgtrain train experiment=clipcap_mlp_gpt2 data.train_urls='...' data.val_urls='...' data.use_cached_features=true
