#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one command (one H100 / H200):
#   bash bench/gpu.sh [RESULTS.md] [all | speed | earlier]
# speed (about 8 minutes): resnet50 and ViT-B/16 at 224 px, bf16-mixed + channels_last,
#   batch 64 and auto, eager and compiled: the framework (uint8 batches, MFU, input wait)
#   against a hand-written loop and a loop over one synthetic batch on the device (timm's
#   benchmark.py way); then real JPEGs, loader-normalized against uint8 batches.
# earlier (a few minutes): the overhead at batch 64, the frozen prefix, the fast paths and the
#   image-folder pipeline on this machine's cores.
set -uo pipefail   # one failing figure does not stop the others
cd "$(dirname "$0")/.."
out=${1:-gpu_results.md}
part=${2:-all}
python3 -c "import finetune.training" || exit 1
echo "## $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)" | tee -a "$out"

speed() {
  for model in resnet50 vit_b_16; do
    for batch in 64 auto; do
      for compiled in "" "--compile"; do
        # shellcheck disable=SC2086  # $compiled is a flag or nothing
        python3 bench/overhead.py --device cuda --model "$model" --size 224 --batch "$batch" \
          --batches 12 --precision bf16-mixed --channels-last --device-loop --repeats 1 \
          $compiled --out "$out"
      done
    done
  done
  python3 bench/uint8.py --device cuda --model resnet50 --size 224 --batch 256 \
    --precision bf16-mixed --epochs 5 --per-class 180 --repeats 1 --out "$out"
}

earlier() {
  python3 bench/overhead.py --device cuda --model resnet50 --size 224 --batch 64 --batches 30 \
    --precision bf16-mixed --channels-last --repeats 3 --out "$out"
  python3 bench/frozen.py --device cuda --model resnet18 --size 224 --batch 64 --out "$out"
  python3 bench/fastpaths.py --device cuda --model resnet50 --size 224 --batch 64 --batches 20 \
    --repeats 1 --out "$out"
  python3 bench/data.py --images 512 --repeats 1 --out "$out"
}

case "$part" in
  speed) speed ;;
  earlier) earlier ;;
  all) speed; earlier ;;
  *) echo "bench/gpu.sh: part '$part': use all, speed or earlier" >&2; exit 2 ;;
esac
