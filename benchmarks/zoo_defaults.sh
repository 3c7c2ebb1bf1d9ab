#!/usr/bin/env bash
# The shipped H100 defaults for the zoo (tuner/defaults/h100.json), in one bounded GPU call: a few
# make_defaults processes side by side, each tuning a group of mixers (compilation is CPU-bound and takes
# most of a tune; the timing phases are seconds and seldom overlap), merged with the committed file.
# Usage (source gpu_env.sh first): bash benchmarks/zoo_defaults.sh LIMIT PER_MIXER TRIALS "GROUP1" "GROUP2" ...
# where a group is comma-separated zoo names. Writes h100.json and make_defaults-*.log under $OUT.
limit=${1:-520}; per=${2:-150}; trials=${3:-6}; shift 3
export TRITON_INTERPRET=0
i=0
for group in "$@"; do
  i=$((i + 1))
  timeout $((limit + 60)) python3 -m mixforge.tuner.make_defaults --out /tmp/zoo-$i.json --mixers "$group" \
    --trials "$trials" --per-mixer-time "$per" --time-limit "$limit" > "$OUT/make_defaults-$i.log" 2>&1 &
done
wait
cp tuner/defaults/h100.json /tmp/h100.json
python3 -m mixforge.tuner.make_defaults --out /tmp/h100.json --merge /tmp/zoo-*.json > "$OUT/merge.log" 2>&1
cp /tmp/h100.json "$OUT/h100.json"
grep -h "bf16:" "$OUT"/make_defaults-*.log
