#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one command (a few minutes on one H100 / H200):
#   bash bench/gpu.sh [RESULTS.md]
# Overhead against a hand-written loop (resnet50, 224 px, bf16-mixed + channels_last), the
# fast paths, the frozen prefix, and the image-folder pipeline on this machine's cores.
set -uo pipefail   # one failing figure does not stop the others
cd "$(dirname "$0")/.."
out=${1:-gpu_results.md}
python3 -c "import finetune.training" || exit 1
echo "## $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)" | tee -a "$out"
python3 bench/overhead.py --device cuda --model resnet50 --size 224 --batch 64 --batches 30 \
  --precision bf16-mixed --channels-last --repeats 3 --out "$out"
python3 bench/frozen.py --device cuda --model resnet18 --size 224 --batch 64 --out "$out"
python3 bench/fastpaths.py --device cuda --model resnet50 --size 224 --batch 64 --batches 20 \
  --repeats 1 --out "$out"
python3 bench/data.py --images 512 --repeats 1 --out "$out"
