#!/usr/bin/env bash
# Startup: `--help` and `--cfg job` (no torch import), medians of 5 runs; and the time from
# launch to the first training step of the quickstart (first_step_seconds in metrics.json).
#   bash bench/startup.sh [--smoke]      (PYTHON=/path/to/python picks the interpreter;
#                                        default: python3 from PATH)
set -euo pipefail
py=${PYTHON:-python3}
runs=5; [[ "${1:-}" == "--smoke" ]] && runs=1
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
t() { local s e; s=$EPOCHREALTIME; "$@" >/dev/null 2>&1; e=$EPOCHREALTIME; awk "BEGIN {printf \"%.2f\\n\", $e - $s}"; }
help=$(for i in $(seq $runs); do t "$py" -m finetune --help; done | median)
cfg=$(for i in $(seq $runs); do t "$py" -m finetune recipe=quickstart --cfg job; done | median)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$py" -m finetune recipe=quickstart weights.source=none trainer.max_epochs=1 \
  trainer.limit_train_batches=2 trainer.limit_val_batches=1 trainer.enable_progress_bar=false \
  hydra.run.dir="$dir" >/dev/null 2>&1
first=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['first_step_seconds'])" "$dir/metrics.json")
echo "| command | seconds (median of $runs) |"
echo "| --- | --- |"
echo "| python3 -m finetune --help | $help |"
echo "| python3 -m finetune recipe=quickstart --cfg job | $cfg |"
echo "| launch to first training step (quickstart, first_step_seconds) | $first |"
