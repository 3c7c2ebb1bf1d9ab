# Source this at the start of every command on the GPU machine:
#   source benchmarks/gpu_env.sh
# It installs the carried wheels (.whl/: optuna and its needs, platformdirs, fla-core),
# makes mixforge importable from the working tree, and keeps Triton's compile and
# autotune cache in a tarball that travels between calls (.tcache/), because the
# peers autotune for minutes at their first call on a fresh machine.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || echo "gpu_env: wheel install failed"
# mixforge itself travels as a wheel built here (`pip wheel --no-deps -w .whl .`), since
# pyproject maps spec/, codegen/, ... into one package. PYTHONSAFEPATH keeps the checkout's
# own mixforge/ folder (only the front door) from shadowing the installed package.
mkdir -p /tmp/benchpath && ln -sfn "$PWD/benchmarks" /tmp/benchpath/benchmarks
export PYTHONPATH=/tmp/site:/tmp/benchpath PYTHONSAFEPATH=1
export TRITON_CACHE_DIR=/tmp/tcache TRITON_CACHE_AUTOTUNING=1 MIXFORGE_CACHE_DIR=/tmp/mfcache
mkdir -p $TRITON_CACHE_DIR
# the tarball comes back in parts under the 16 MiB per-file limit; join them with cat
ls .tcache/tcache.tgz.part* >/dev/null 2>&1 && cat .tcache/tcache.tgz.part* | tar xz -C / && echo "gpu_env: restored triton cache"
save_triton_cache() { tar cz -C / tmp/tcache 2>/dev/null | split -b 15m - "$OUT/tcache.tgz.part"; ls -la "$OUT"/tcache.tgz.part*; }
# Triton's autotuning results alone (FLA's and SSD's *.autotune.json, a few KB): a later call on a fresh
# machine compiles only the configs they picked instead of timing every candidate again
ls .tcache/autotune.tgz >/dev/null 2>&1 && tar xzf .tcache/autotune.tgz -C / && echo "gpu_env: restored autotune results"
save_autotune_cache() { (cd / && find tmp/tcache -name '*.autotune.json' | tar czf "$OUT/autotune.tgz" -T -); ls -la "$OUT/autotune.tgz"; }
