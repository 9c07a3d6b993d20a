#!/usr/bin/env bash
# A GPU session's work in ONE device call (bench/gpu/README.md has the plan and budgets):
#
#   bash bench/gpu/session.sh all          # tests, headline, ablations, context, sanitizer: <= 9 min
#   DRY_RUN=1 bash bench/gpu/session.sh all   # (or --dry-run) the same steps on the CPU, toy sizes
#
# One-step modes (each also packages its results into $OUT):
#   tests | headline | ablations | context | sanitizer | sweep PATH DTYPE (e.g. "sweep logits bf16")
#
# Run from the repository root on the GPU machine with `.whl` carried (bench/gpu/fetch_peers.sh,
# bench/gpu/pack_activations.py).  Each step runs under its own `timeout` (SIGINT, then SIGKILL),
# cut further to what is left of SESSION_BUDGET_S; the results go to
# $STAGE/bench/results/<gpu>/ and, after every step, into at most 8 files in $OUT (the device
# tool brings back 8 files at most, none deeper than two folders):
#   SUMMARY.md session.json results.tar.gz session.log headline.md ablations.md ablations.png
#   kernel_profile.md
# Exit status: 0 when every step is ok (or skipped with a recorded reason), else 1.
set -uo pipefail
cd "$(dirname "$0")/../.."

DRY=${DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
[ "$DRY" = 0 ] || DRY=1
mode=${1:?usage: session.sh [--dry-run] all | tests | headline | ablations | context | sanitizer | sweep PATH DTYPE}
case "$mode" in
  all|tests|headline|ablations|context|sanitizer) ;;
  sweep) : "${2:?sweep PATH DTYPE}" "${3:?sweep PATH DTYPE}" ;;
  *) echo "unknown mode: $mode (all | tests | headline | ablations | context | sanitizer | sweep PATH DTYPE)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${SESSION_BUDGET_S:-540}   # the whole command; the device tool's limit is 600 s
RESERVE=15                        # kept for the last packaging
MIN_STEP=10                       # a step with less time left than this is "not run" (a failure)
OUT=${OUT:-/tmp/pyfused_session_out}
mkdir -p "$OUT"
rm -f "$OUT"/{SUMMARY.md,session.json,results.tar.gz,session.log,headline.md,ablations.md,ablations.png,kernel_profile.md}
export DRY_RUN=$DRY PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1

# --- set-up: peers from carried wheels, the kernels link, the device's folder name ----------
if [ "$DRY" = 0 ]; then
  unset TRITON_INTERPRET
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || echo "[session] pip install of .whl failed: peers will show as not installed" >&2
  fi
else
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""   # a CPU check, also on a machine with a GPU
fi
export PYTHONPATH=/tmp/site:$PWD/.whl/flash_attn_ce:$PWD${PYTHONPATH:+:$PYTHONPATH}
# A source checkout used in place: kernels/ installs as pyfused_po.kernels, so link it there.
[ -e pyfused_po/kernels ] || ln -s ../kernels pyfused_po/kernels
GPU=$("$PY" -c "import torch; from bench.env_info import device_name, slug
print(slug(device_name(torch.device('cuda' if torch.cuda.is_available() else 'cpu'))) if torch.cuda.is_available() else 'dry-run-cpu')" \
  2> "$OUT/session.log") || { echo "[session] python/torch/bench does not start (see session.log)" | tee "$OUT/SUMMARY.md" >&2
                              cat "$OUT/session.log" >&2; exit 1; }
if [ "$DRY" = 0 ] && [ "$GPU" = dry-run-cpu ]; then
  echo "[session] no CUDA device: run with DRY_RUN=1 for the CPU check" >&2; exit 1
fi
OWN_STAGE=0
[ -n "${STAGE:-}" ] || { STAGE=$(mktemp -d /tmp/pyfused_session.XXXXXX); OWN_STAGE=1; }
RES=$STAGE/bench/results/$GPU
LOGS=$RES/logs
mkdir -p "$LOGS"
# Merge with results already committed for this device (run.py merges into its --out).
if [ "$DRY" = 0 ] && [ -z "${FRESH:-}" ] && [ -d "bench/results/$GPU" ]; then cp -r "bench/results/$GPU/." "$RES/"; fi
rm -f "$RES/steps.jsonl"
ACTS=.whl/smollm2_activations.pt
echo "[session] mode=$mode dry_run=$DRY device=$GPU results=$RES out=$OUT budget=${BUDGET}s"

package() {  # summary + tarball + copies into $OUT (cheap: no torch import)
  "$PY" bench/gpu/summarize.py summary "$RES" "$OUT" > /dev/null 2>&1
  local rc=$?
  tar -czf "$OUT/results.tar.gz" -C "$STAGE" bench
  : > "$OUT/session.log"
  for f in "$LOGS"/*.log; do [ -f "$f" ] && { echo "===== $(basename "$f")"; tail -c 200000 "$f"; } >> "$OUT/session.log"; done
  return $rc
}

# run_step NAME BUDGET_S "EXPECTED FILES" CMD...: runs CMD under timeout, logs, records.
run_step() {
  local name=$1 budget=$2 expect=$3; shift 3
  local now left t log=$LOGS/$name.log
  now=$(date +%s); left=$(( START + BUDGET - RESERVE - now )); t=$budget
  (( left < t )) && t=$left
  if (( t < MIN_STEP )); then
    echo "no time left in the session budget (${left}s)" > "$log"
    "$PY" bench/gpu/summarize.py step "$RES" "$name" "not run: no time left" 0 0 "$budget" 0 "$log" "$now"
    package; return
  fi
  echo "[session] $name (timeout ${t}s): $*"
  local t0 t1 rc status
  t0=$(date +%s.%N)
  { echo "\$ $*"; timeout -s INT -k 15 "$t" "$@"; } > "$log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  case $rc in 0) status=ok ;; 124|137) status="timeout after ${t}s" ;; *) status="failed (rc $rc)" ;; esac
  tail -n 4 "$log" | sed "s/^/    /"
  # shellcheck disable=SC2086  # the expected files are a space-separated list
  "$PY" bench/gpu/summarize.py step "$RES" "$name" "$status" "$rc" "$(awk "BEGIN{print $t1 - $t0}")" "$budget" "$t" \
    "$log" "$t0" $expect
  package
}

# --- the steps ---------------------------------------------------------------------------------
step_env() {
  if [ "$DRY" = 0 ]; then nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
    --format=csv > "$RES/device.txt" 2>&1; else echo "CPU dry run: no GPU" > "$RES/device.txt"; fi
  run_step env 30 "$RES/session_env.json" "$PY" bench/gpu/summarize.py env "$RES"
}

step_tests() {
  if [ "$DRY" = 0 ]; then
    run_step tests 75 "$LOGS/gpu_tests.xml" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests bench \
      --durations=15 --junitxml="$LOGS/gpu_tests.xml"
  else  # the same selection, collected (the tests need CUDA); at least one must be selected
    run_step tests 60 "$LOGS/gpu_tests_collected.txt" bash -c "set -o pipefail; '$PY' -m pytest -q -p no:cacheprovider \
      -m gpu tests bench --collect-only | tee '$LOGS/gpu_tests_collected.txt' | tail -3 \
      && grep -Eq '^[1-9][0-9]*(/[0-9]+)? tests? (collected|selected)' '$LOGS/gpu_tests_collected.txt'"
  fi
}

# The headline in three runs that merge into one summary: fused-linear path, logits path,
# torch.compile.  The two path groups run the session's cases (bench/cases.py session_cases: the
# headline on random and realistic inputs, on the linear path also with a frozen head, a small
# batch of 1 pair x 2 x 512 tokens, V = 50,257 beside 128,256) and save after every method
# (run.py --session), so a timeout loses only the method in flight.  The linear group's headline
# methods are what users run: the module's default plan and apply(DPOTrainer)'s head, beside TRL
# with DPOTrainer's outputs (and without), the staged path, Liger, CCE and eager.
HEADLINE_GROUPS=("linear 120 pyfused_module_linear,pyfused_apply_dpo,trl_chunked_dpo,pyfused_linear,trl_chunked,liger,cce,pyfused_linear_fused,torch_eager_linear"
                 "logits 55 pyfused,pyfused_inplace,trl_selective,trl_kernel,flash_attn,torch_eager"
                 "compile 40 torch_compile,torch_compile_linear")
step_headline() {
  local g name budget methods cases
  for g in "${HEADLINE_GROUPS[@]}"; do
    read -r name budget methods <<< "$g"
    case $name in compile) cases=(--headline-only) ;; *) cases=(--session "$name") ;; esac
    if [ "$DRY" = 0 ]; then
      run_step "headline_$name" "$budget" "$RES/summary.json $RES/README.md" "$PY" bench/run.py "${cases[@]}" \
        --no-progress --methods "$methods" --out "$RES"
    else  # toy sizes (session_cases' CPU form), realistic inputs only (the random case is the same
          # code); the plots are drawn once, by the last group
      plots=(--no-plots); [ "$name" = compile ] && plots=()
      run_step "headline_$name" 90 "$RES/summary.json $RES/README.md" "$PY" bench/run.py "${cases[@]}" \
        --no-progress --methods "$methods" --out "$RES" --max-tokens-per-pair 64 --reps 1 --warmup 0 \
        --no-memory --kinds realistic "${plots[@]}"
    fi
  done
}

# torch.profiler: one step of the default plan, apply(DPOTrainer)'s head, the staged path and TRL
# with DPO's outputs, per kernel; cuBLAS alone at the same GEMM shapes (the roof for the GEMMs).
step_kernel_profile() {
  run_step kernel_profile 45 "$RES/kernel_profile/kernel_profile.json $RES/kernel_profile/kernel_profile.md" \
    "$PY" bench/gpu/kernel_profile.py --out "$RES/kernel_profile"
}

step_ablations() {
  local acts=()
  [ -f "$ACTS" ] && acts=(--activations "$ACTS")
  run_step ablations "$( [ "$DRY" = 1 ] && echo 70 || echo 55 )" "$RES/ablations/ablations.json $RES/ablations/ablations.md" \
    "$PY" bench/ablations.py --out "$RES/ablations" "${acts[@]}"
}

step_context() {  # one run per method: a slow search cannot cost the others their result
  local methods=(pyfused_module_linear trl_chunked liger cce) each=18 m
  [ "$DRY" = 0 ] || methods=(pyfused_module_linear)
  for m in "${methods[@]}"; do
    run_step "context_$m" "$each" "$RES/max-context-80GB/summary.json" "$PY" bench/gpu/memcap.py 80e9 \
      bench/run.py --only-max-context --methods "$m" --no-progress --out "$RES/max-context-80GB"
  done
}

step_sanitizer() {
  if [ "$DRY" = 1 ]; then  # the case itself (Triton interpreter); the sanitizer needs a GPU
    echo "compute-sanitizer on PATH: $(command -v compute-sanitizer || echo no)" > "$LOGS/sanitizer_binary.txt"
    run_step sanitizer 60 "$LOGS/sanitizer.log" "$PY" bench/gpu/small_case.py
  elif command -v compute-sanitizer > /dev/null; then
    run_step sanitizer 30 "$LOGS/sanitizer.log" compute-sanitizer --tool memcheck --error-exitcode 1 \
      "$PY" bench/gpu/small_case.py
  else
    echo "compute-sanitizer not on PATH: memcheck not run" > "$LOGS/sanitizer.log"
    "$PY" bench/gpu/summarize.py step "$RES" sanitizer "skipped: compute-sanitizer not on PATH" 0 0 40 0 \
      "$LOGS/sanitizer.log" "$(date +%s)"
    run_step small_case 25 "$LOGS/small_case.log" "$PY" bench/gpu/small_case.py
  fi
}

step_sweep() {
  run_step "sweep_$1_$2" 560 "$RES/summary.json" "$PY" bench/run.py --paths "$1" --dtypes "$2" --no-max-context \
    --no-progress --out "$RES"
}

step_env
case "$mode" in
  all) step_tests; step_headline; step_kernel_profile; step_ablations; step_context; step_sanitizer ;;
  tests) step_tests ;;
  headline) step_headline; step_kernel_profile ;;
  ablations) step_ablations ;;
  context) step_context ;;
  sanitizer) step_sanitizer ;;
  sweep) step_sweep "$2" "$3" ;;
esac

package
rc=$?
echo "[session] done in $(( $(date +%s) - START ))s; results in $OUT ($(ls "$OUT" | tr '\n' ' '))"
cat "$OUT/SUMMARY.md" | sed -n '/^## Steps/,/^total wall/p'
# The dry run's scratch folder goes (everything is in $OUT/results.tar.gz); KEEP_STAGE=1 keeps it.
if [ "$DRY" = 1 ] && [ "$OWN_STAGE" = 1 ] && [ -z "${KEEP_STAGE:-}" ]; then rm -rf "$STAGE"; fi
if [ $rc -ne 0 ]; then
  echo "[session] FAILED: a step did not finish ok (see the table above and $OUT/session.log)" >&2
fi
exit $rc
