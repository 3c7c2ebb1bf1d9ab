#!/usr/bin/env bash
# One GPU command for issue #4's record and the compare's tuned configs (source gpu_env.sh first):
#   1. the grid against Optuna for gla and mamba2 (benchmarks/tune_grid.py), the shipped defaults from it;
#   2. a short tune of every benchmarks.compare case at K = V = 128, kept for the compare's timing run.
# Writes tune_grid.json/png/log, h100.json (defaults), compare_configs.json and tune_cases.log under $OUT.
grid_limit=${1:-360}; cases_limit=${2:-150}
export TRITON_INTERPRET=0
timeout $((grid_limit + 60)) python3 -m benchmarks.tune_grid --out /tmp/tg --time-limit "$grid_limit" \
  > "$OUT/tune_grid.log" 2>&1
echo "tune_grid exit $?" >> "$OUT/tune_grid.log"
cp /tmp/tg/tune_grid.json /tmp/tg/tune_grid.png "$OUT/" 2>/dev/null
python3 -m mixforge.tuner.make_defaults --out "$OUT/h100.json" --merge /tmp/tg/cache-*/tuner/configs.json \
  >> "$OUT/tune_grid.log" 2>&1
MIXFORGE_CACHE_DIR=/tmp/mfcache-cases timeout $((cases_limit + 60)) python3 -m benchmarks.compare \
  --shapes 16,2048,128,128 --tune-trials 8 --tune-only --tune-time-limit "$cases_limit" > "$OUT/tune_cases.log" 2>&1
echo "tune cases exit $?" >> "$OUT/tune_cases.log"
cp /tmp/mfcache-cases/tuner/configs.json "$OUT/compare_configs.json" 2>/dev/null
tail -12 "$OUT/tune_grid.log"; tail -4 "$OUT/tune_cases.log"
