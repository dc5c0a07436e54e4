#!/usr/bin/env bash
# One command for a GPU machine: build omni_kernels._C in place, run the GPU tests, then `omni bench`,
# leaving JSON results and logs in $OUT (default ./gpu-results).
#
#   OUT=/tmp/results bash scripts/gpu_check.sh            # everything
#   SUITE=kernels TESTS="tests/kernels" bash scripts/gpu_check.sh
#
# Environment: OMNI_CUDA_ARCHS (default 90a here: the machine's own), SUITE (default all), TESTS (default
# tests), PYTEST_ARGS (extra pytest arguments), BENCH_ARGS (extra `omni bench` arguments, e.g. --only thinker).
# Wheels in ./.whl (e.g. transformers==4.57.6 for HF 4.x peers) are installed to /tmp/site first when present.
# Budget: on an H100 the build takes ~1 min, the GPU tests ~6 min and `--suite all` more than 10 min, so on a
# machine with a per-command limit run the benches in parts (SUITE=kernels, then SUITE=model, then SUITE=e2e).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

echo "== build (sm_${OMNI_CUDA_ARCHS:-90a})"
t0=$(date +%s)
if ! OMNI_BUILD_CUDA=1 OMNI_CUDA_ARCHS=${OMNI_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16} \
    $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
  tail -n 60 "$OUT/build.log"
  echo "build failed"
  exit 1
fi
echo "built in $(( $(date +%s) - t0 )) s"

$PY - <<'PY' > "$OUT/device.json"
import json
from omni_kernels.testing import describe_device, copy_bandwidth_gbps
from omni_kernels import registered
info = describe_device("cuda")
info["copy_gbps_measured"] = round(copy_bandwidth_gbps("cuda"), 1)
info["backends"] = registered()
print(json.dumps(info, indent=1))
PY
cat "$OUT/device.json"

echo "== demo on the GPU (engine, CUDA graphs, streaming)"
status=0
$PY -m omni_model.cli demo --device cuda --out "$OUT" 2>&1 | tee "$OUT/demo.log" || status=1

echo "== GPU tests"
# The tests marked gpu (every op on torch/triton/cuda at real shapes, graph capture); the CPU suite is CI's.
# shellcheck disable=SC2086
$PY -m pytest ${TESTS:-tests} -m gpu -q -rs --timeout 900 ${PYTEST_ARGS:-} > "$OUT/tests.log" 2>&1 || status=1
tail -n 30 "$OUT/tests.log"

echo "== omni bench --suite ${SUITE:-all}"
# shellcheck disable=SC2086
$PY -m omni_model.cli bench --suite "${SUITE:-all}" --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/bench.log" || status=1
exit $status
