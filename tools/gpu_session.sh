#!/usr/bin/env bash
# One GPU session on a machine without network: GPU tests at W=2 and W=all, then benchmark runs.
# Usage: tools/gpu_session.sh [tests|bench|all] [extra bench args...]; logs go to $OUT (or /tmp/ep-out).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}; shift || true
out=${OUT:-/tmp/ep-out}; mkdir -p "$out"
export PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 EP_CACHE_DIR=${EP_CACHE_DIR:-/tmp/ep-cache}
PY=${PYTHON:-python3}
N=$($PY -c 'import cupy; print(cupy.cuda.runtime.getDeviceCount())')
RUN="mpirun --allow-run-as-root -x PYTHONPATH -x NCCL_NVLS_ENABLE -x PYTHONUNBUFFERED -x EP_CACHE_DIR"
summary=()
if [[ $what == tests || $what == all ]]; then
  $PY -m ep.jit --arch sm_90 > "$out/jit.log" 2>&1 || summary+=("jit compile FAILED")
  $PY -m pytest tests/gpu -q -m "not mpi" -p no:cacheprovider > "$out/gpu_w1.log" 2>&1
  summary+=("W=1: $(tail -1 "$out/gpu_w1.log")")
  for w in 2 $N; do
    timeout 300 $RUN -np $w $PY -m pytest tests/gpu -q -m mpi -p no:cacheprovider > "$out/gpu_w$w.log" 2>&1
    summary+=("W=$w: $(grep -E 'passed|failed|error' "$out/gpu_w$w.log" | tail -1)")
  done
  # The non-default HT copy paths, bit-exact like the defaults: TMA senders and receivers in dispatch with the
  # pull combine's warp-load gather, then the pull combine's TMA gather (with the graph tests).
  EP_NCCLEP_TMA=1 EP_DISPATCH_RECV_TMA=1 EP_COMBINE_PUSH=0 EP_CMB_TMA=0 timeout 300 $RUN -x EP_NCCLEP_TMA \
    -x EP_DISPATCH_RECV_TMA -x EP_COMBINE_PUSH -x EP_CMB_TMA -np $N $PY -m pytest tests/gpu/test_ht.py -q -m mpi \
    -p no:cacheprovider > "$out/gpu_w${N}_alt.log" 2>&1
  summary+=("W=$N HT, TMA dispatch + pull combine (warp loads): $(grep -E 'passed|failed|error' "$out/gpu_w${N}_alt.log" | tail -1)")
  EP_COMBINE_PUSH=0 timeout 300 $RUN -x EP_COMBINE_PUSH -np $N $PY -m pytest tests/gpu/test_ht.py tests/gpu/test_ht_graph.py \
    -q -m mpi -p no:cacheprovider > "$out/gpu_w${N}_pull.log" 2>&1
  summary+=("W=$N HT, pull combine (TMA gather): $(grep -E 'passed|failed|error' "$out/gpu_w${N}_pull.log" | tail -1)")
fi
if [[ $what == bench || $what == all ]]; then
  timeout 400 $RUN -np $N $PY -m ep.bench "$@" --json "$out/bench.json" > "$out/bench.log" 2>&1
  summary+=("bench rc=$?")
fi
printf '%s\n' "${summary[@]}"
