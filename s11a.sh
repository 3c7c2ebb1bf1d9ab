source benchmarks/gpu_env.sh; export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
mkdir -p /tmp/mfcache/tuner && cp .tcache/mf-configs.json /tmp/mfcache/tuner/configs.json
R=/tmp/res; mkdir -p $R /tmp/warm /tmp/cc; L=$OUT/log.txt; : > $L
S1=1,32768,16,128,128
KB="python3 -m benchmarks.keyblock_bench"
pids=""
python3 -m benchmarks.config_check --walk factors --mixer retnet --dtype bf16 --configs 64,64,4,1,t 32,64,4,2,t --out /tmp/cc/retnet-bf16.json > /tmp/cc/retnet-bf16.log 2>&1 & pids="$pids $!"
python3 -m benchmarks.config_check --walk factors --mixer retnet --dtype fp32 --configs 64,64,4,1,t --out /tmp/cc/retnet-fp32.json > /tmp/cc/retnet-fp32.log 2>&1 & pids="$pids $!"
python3 -m benchmarks.config_check --walk factors --mixer mamba2 --dtype bf16 --configs 64,64,4,1,t --out /tmp/cc/mamba2-bf16.json > /tmp/cc/mamba2-bf16.log 2>&1 & pids="$pids $!"
for nf in "" "--no-factors"; do
  $KB --out /tmp/warm --compile-only $nf --kernel chunk_fwd --cases scalar_decay --shape $S1 --configs 64,64,4,1,0,t > /dev/null 2>&1 & pids="$pids $!"
done
python3 -m benchmarks.compare --only scalar_decay --shapes "1,32768,128,128" --warmup-jobs 2 --warmup-only --out /tmp/warm > /dev/null 2>&1 & pids="$pids $!"
wait $pids
cat /tmp/cc/*.log > $OUT/config_check.log; tar czf $OUT/config_check.tgz -C /tmp cc
echo "phase 1 done at $SECONDS s" >> $L
for nf in "" "--no-factors" "" "--no-factors"; do
  echo "== B1 fwd $nf" >> $L; $KB --out $R $nf --kernel chunk_fwd --cases scalar_decay --shape $S1 --configs 64,64,4,1,0,t >> $L 2>&1
done
python3 -m benchmarks.compare --only scalar_decay --shapes "1,32768,128,128" --no-sdpa --profile --out $R > $OUT/compare.log 2>&1
tar czf $OUT/results.tgz -C /tmp res
