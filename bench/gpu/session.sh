#!/usr/bin/env bash
# A GPU session's work, run ON the GPU machine from the repository root (the device tool's
# `run`, with `.whl` carried — see bench/gpu/fetch_peers.sh).  One step per device call,
# each well inside the 10-minute limit; results are copied to $OUT so they come back.
#
#   bash bench/gpu/session.sh tests       # every gpu-marked test (all paths, dtypes)
#   bash bench/gpu/session.sh headline    # 16k tokens x 128k vocab bf16, both paths, every peer
#   bash bench/gpu/session.sh sweep PATH DTYPE   # e.g. "sweep logits bf16"
#   bash bench/gpu/session.sh context     # max-context search
#   bash bench/gpu/session.sh sanitizer   # compute-sanitizer memcheck on the kernels, mid size
set -uo pipefail
step=${1:?step: tests | headline | sweep PATH DTYPE | context | sanitizer}
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/.whl/flash_attn_ce:$PWD${PYTHONPATH:+:$PYTHONPATH}
# A source checkout used in place: kernels/ installs as pyfused_po.kernels, so link it there.
[ -e pyfused_po/kernels ] || ln -s ../kernels pyfused_po/kernels
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"

copy_results() {  # the device tool brings back files at most two folders below $OUT
  for d in bench/results/*/; do
    [ -d "$d" ] || continue
    mkdir -p "$OUT/$(basename "$d")"
    cp "$d"* "$OUT/$(basename "$d")/" 2>/dev/null
  done
}

case "$step" in
  tests)
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests bench 2>&1 | tee "$OUT/gpu_tests.log" ;;
  headline)
    "$PY" bench/run.py --headline-only --no-progress 2>&1 | tee "$OUT/headline.log"; copy_results ;;
  sweep)
    "$PY" bench/run.py --paths "${2:?path}" --dtypes "${3:?dtype}" --no-max-context --no-progress 2>&1 \
      | tee "$OUT/sweep_$2_$3.log"; copy_results ;;
  context)
    "$PY" bench/run.py --only-max-context --no-progress 2>&1 | tee "$OUT/context.log"; copy_results ;;
  sanitizer)
    compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m pytest -q -p no:cacheprovider -m gpu \
      tests/test_token_logprobs.py tests/test_dpo.py -k "realistic or dpo_step" 2>&1 | tail -40 \
      | tee "$OUT/sanitizer.log" ;;
  *)
    echo "unknown step: $step" >&2; exit 2 ;;
esac
