#!/usr/bin/env bash
# One device session (a machine without network): compile check, the GPU suite at W=1 and at W=2/4/8 (ranks
# sharing GPUs when there are fewer), then benchmark runs. Logs go to $OUT (or /tmp/ep-out); a short summary
# is printed last.
# Usage: tools/gpu_session.sh [tests] [bench "ARGS"]... [base-bench "ARGS"]...
#   tests             jit compile check + make test-gpu
#   bench "ARGS"      python -m ep.bench ARGS at W=1 (repeatable)
#   base-bench "ARGS" the same in .base/ (an older checkout, e.g. git archive HEAD~n), for before/after figures
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/ep-out}; mkdir -p "$out"
export PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 EP_CACHE_DIR=${EP_CACHE_DIR:-/tmp/ep-cache}
PY=${PYTHON:-python3}
summary=()
n=0
while [[ $# -gt 0 ]]; do
  step=$1; shift
  n=$((n + 1))
  case $step in
    tests)
      $PY -m ep.compile_check --arch sm_90 > "$out/jit.log" 2>&1 && summary+=("jit: $(wc -l < "$out/jit.log") variants compiled") \
        || summary+=("jit compile FAILED (see jit.log)")
      timeout ${TEST_TIMEOUT:-300} make test-gpu PYTHON=$PY > "$out/test-gpu.log" 2>&1
      rc=$?
      summary+=("make test-gpu rc=$rc:")
      while IFS= read -r line; do summary+=("  $line"); done < <(grep -E "^[0-9]+ (passed|failed)|[0-9]+ passed|[0-9]+ failed|error" "$out/test-gpu.log" | grep -E "passed|failed" | tail -8)
      ;;
    bench|base-bench)
      args=$1; shift
      dir=.; [[ $step == base-bench ]] && dir=.base
      log="$out/${step}-$n.log"
      (cd $dir && PYTHONPATH=$PWD timeout ${BENCH_TIMEOUT:-90} $PY -m ep.bench $args) > "$log" 2>&1
      summary+=("$step [$args] rc=$?")
      while IFS= read -r line; do summary+=("  $line"); done < <(grep -E "^(HT|LL)  T=|^\s*ep (dispatch|combine|cached|graph|dispatch\+combine)|Error|error" "$log" | head -24)
      ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
printf '%s\n' "${summary[@]}"
