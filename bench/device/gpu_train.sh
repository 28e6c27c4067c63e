#!/usr/bin/env bash
# The GPU measurement of issue 23 in one call of the device tool (docs/explanation/gpu-matrix.md says how it is sent).
# Expects: this folder's checkout copy (bench/, include/) as the current directory; the xgboost 3.2.0 wheel
# in parts under $WHL (default /tmp/whl: part.00 part.01 part.02 and its sha256), and any other wheels there
# (pandas 2.3.3, pytz, tzdata: the project's pandas, not the image's 3.x); $OUT for the results.
# Runs bench/gpu_train.py per $PLAN (rows:devices; default 1M and 10M, cuda then cpu with 16 threads), with
# the train step before issue 23 (--old) too. If the device-array path breaks (CuPy vs XGBoost), it runs the cuda
# figures again with CuPy hidden, so the host path is measured at least.
set -u
WHL=${WHL:-/tmp/whl}
PY=${PY:-python3}
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1
log="$OUT/log.txt"
{
  date -u
  cat "$WHL"/part.* > "$WHL/xgboost-3.2.0-py3-none-manylinux_2_28_x86_64.whl"
  (cd "$WHL" && sha256sum -c sha) || exit 3
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHL"/*.whl || exit 4
  export PYTHONPATH=/tmp/site
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  echo "cpus: $(nproc); $(grep -m1 'model name' /proc/cpuinfo)"
  "$PY" - <<'PYEOF'
import sys, numpy, pandas, xgboost
print("python", sys.version.split()[0], "numpy", numpy.__version__, "pandas", pandas.__version__,
      "xgboost", xgboost.__version__, "USE_CUDA", xgboost.build_info().get("USE_CUDA"))
try:
    import cupy
    print("cupy", cupy.__version__, "devices", cupy.cuda.runtime.getDeviceCount())
except Exception as exc:
    print("cupy unusable:", exc)
PYEOF
} >>"$log" 2>&1
cat "$log"
J="$OUT/gpu_train.jsonl"
status=0
for item in ${PLAN:-1000000:both 10000000:both}; do
  rows=${item%%:*} devices=${item##*:}
  echo "== $rows rows, device $devices (cpu: ${CPU_THREADS:-16} threads) ==" | tee -a "$log"
  timeout "${LIMIT:-400}" "$PY" bench/gpu_train.py --rows "$rows" --device "$devices" \
    --cpu-threads "${CPU_THREADS:-16}" --repeat "${REPEAT:-1}" --old --json "$J" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then
    status=$rc
    echo "== rc $rc: cuda again with CuPy hidden ==" | tee -a "$log"
    mkdir -p /tmp/nocupy/cupy && echo 'raise ImportError("hidden by gpu_train.sh")' > /tmp/nocupy/cupy/__init__.py
    PYTHONPATH=/tmp/nocupy:/tmp/site timeout 200 "$PY" bench/gpu_train.py --rows "$rows" --device cuda --old \
      --json "$OUT/gpu_train_nocupy.jsonl" 2>&1 | tee -a "$log"
  fi
done
exit $status
