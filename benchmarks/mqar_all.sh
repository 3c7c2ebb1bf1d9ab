#!/usr/bin/env bash
# Issue #6's MQAR record: every mixer trained side by side on the GPU machine (one process each),
# logs and results merged under $OUT. Usage: bash benchmarks/mqar_all.sh SECONDS STEPS [MIXERS...]
# Training stops at SECONDS - 60 (each run then evaluates, marks itself stopped_early and writes its
# result); the hard timeout at SECONDS only catches a hang.
limit=${1:-270}; steps=${2:-4000}; shift 2 || true
train_limit=$((limit - 60))
mixers=${*:-gla metala mamba2 retnet linear_attention softmax}
work=/tmp/mqar; mkdir -p $work
for m in $mixers; do
  timeout "$limit" python3 -m benchmarks.mqar --mixer "$m" --device cuda --fp32 --steps "$steps" --eval-every 500 \
    --time-limit "$train_limit" \
    --out "$work" > "$work/log-$m.txt" 2>&1 &
done
wait
for m in $mixers; do echo "== $m"; cat "$work/log-$m.txt"; done > "$OUT/mqar.log"
python3 - "$work" "$OUT" <<'PY'
import glob, json, sys
work, out = sys.argv[1], sys.argv[2]
rows = [json.load(open(f)) for f in sorted(glob.glob(f"{work}/mqar_*.json"))]
json.dump(rows, open(f"{out}/mqar.json", "w"), indent=1)
for r in rows:
    seg = " ".join(f"{k}:{v:.3f}" for k, v in r.get("segment_accuracy", {}).items())
    print(f"{r['mixer']:18s} accuracy {r['accuracy']:.4f} best {r['best_accuracy']:.4f} steps {r['steps']}"
          f"{' (time limit)' if r.get('stopped_early') else ''} wall {r['wall_time_s']:.0f}s "
          f"first step {r['first_step_s']:.1f}s  segments {seg}")
PY
ls $work/*.png 2>/dev/null | head -${MQAR_PNGS:-2} | while read f; do cp "$f" "$OUT/"; done
