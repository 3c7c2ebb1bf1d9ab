#!/usr/bin/env bash
# Issue #3's GPU check: every zoo mixer in every dtype, one process per mixer (compilation is
# CPU-bound; they share the GPU), merged into one JSON under $OUT. Usage (on the GPU machine):
#   source benchmarks/gpu_env.sh; bash benchmarks/gpu_check_all.sh [SECONDS] [MIXER:DTYPES ...]
# SECONDS bounds the whole run, not each job: a job gets what is left, none starts after it, and the merge
# below always runs (a device call's own time limit must leave it room; 2026-11-22: 32 jobs at 400 s each
# ran past a 420 s call limit, and the merge, the only output, never ran)
limit=${1:-480}; shift || true
deadline=$((SECONDS + limit))
jobs=${*:-gla:bf16 gla:fp32 gla:fp16 mamba2:bf16 mamba2:fp32 mamba2:fp16 rwkv6:bf16 rwkv6:fp32 rwkv6:fp16
  metala:bf16 metala:fp32 metala:fp16 hgrn2:bf16 hgrn2:fp32 retnet:bf16 retnet:fp32 linear_attention:bf16
  linear_attention:fp32 transnormer:bf16 transnormer:fp32 mamba:bf16 mamba:fp32 griffin:bf16 griffin:fp32
  rwkv4:bf16 rwkv4:fp32 performer:bf16 performer:fp32 rfa:bf16 rfa:fp32 cosformer:bf16 cosformer:fp32}
work=/tmp/gpu_check; mkdir -p $work
# at most MAXJOBS processes at once: 35 side by side ran the 80 GB GPU out of memory (the float64 references)
max=${MAXJOBS:-14}
for j in $jobs; do
  while [ "$(jobs -rp | wc -l)" -ge "$max" ]; do wait -n; done
  left=$((deadline - SECONDS))
  if [ "$left" -le 0 ]; then echo "gpu_check_all: out of time, not started: $j" >> "$work/log-zz-skipped.txt"; continue; fi
  m=${j%%:*}; d=${j#*:}
  timeout "$left" python3 -m benchmarks.gpu_check --mixers "$m" --dtypes "$d" --out "$work/$m-$d" \
    > "$work/log-$m-$d.txt" 2>&1 &
done
wait
cat $work/log-*.txt > "$OUT/gpu_check.log"
python3 - "$work" "$OUT" <<'PY'
import glob, json, sys
work, out = sys.argv[1], sys.argv[2]
runs = [json.load(open(f)) for f in sorted(glob.glob(f"{work}/*/gpu_check-*.json"))]
if not runs:
    sys.exit("no results")
merged = {k: v for k, v in runs[0].items() if k not in ("rows", "worst_rel_err")}
merged["rows"] = [r for run in runs for r in run["rows"]]
worst = {}
for r in merged["rows"]:
    for n, v in r.get("errors", {}).items():
        if n not in r.get("ill_conditioned", ()):   # those are listed apart, with what they were held to
            worst[r["dtype"]] = max(worst.get(r["dtype"], 0.0), v if v == v else float("inf"))
merged["worst_rel_err"] = worst
bad = [r for r in merged["rows"] if not r.get("ok")]
ill = [r for r in merged["rows"] if r.get("ok") and r.get("ill_conditioned")]
merged["summary"] = (f"{len(merged['rows']) - len(bad)}/{len(merged['rows'])} checks within tolerance, "
                     f"{len(ill)} of them ill-conditioned at their inputs (judged against the float32 formula)")
json.dump(merged, open(f"{out}/gpu_check.json", "w"), indent=1)
print(merged["summary"], "worst:", {k: f"{v:.1e}" for k, v in worst.items()})
for r in ill:
    print("ILL-CONDITIONED", r["mixer"], r["dtype"], r["check"], r["path"], r["ill_conditioned"],
          {n: f"{r['errors'][n]:.1e} (allowed {r['allowed'][n]:.1e})" for n in r["ill_conditioned"]})
for r in bad:
    print("BAD", r["mixer"], r["dtype"], r["check"], r["path"], r.get("worst"), (r.get("error") or "")[-300:])
PY
