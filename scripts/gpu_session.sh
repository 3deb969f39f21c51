#!/usr/bin/env bash
# Everything that still needs a GPU, in priority order, in one device call of at most ~9.5 minutes
# (the device tool allows 10 minutes per command and ~15 minutes per session, machine start included).
# Each stage has its own cap; a stage that runs out leaves its log and the next stage still runs.
#
#   1. kernels: compiled tests at small and Vim-size shapes + bench_kernels (scripts/gpu_check.sh)   ≤ 300 s
#   2. the packed model on CUDA: Triton-path agreement with the simulation on the 10k test set (W4A4)  ≤  60 s
#   3. end to end: FP32 eager / FP16 / packed W8A8, W4A8, W4A4O8 on Vim-T, Vim-B, the default model    ≤ 120 s
#   4. OuroMamba-Gen cost on CUDA (bench_gen)                                                           ≤  60 s
# Not here (a second call, or a session of its own): retraining the default model (scripts/gpu_train_candidates.sh)
# and ITERATIONS=1000 scripts/gen_evidence.sh sets.
#
# Usage on the device machine (carry .data for the Fashion-MNIST files):  bash scripts/gpu_session.sh
# Everything lands in $OUT (results/ when OUT is unset).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=. TRITON_INTERPRET=0 FASHION_MNIST_DIR=${FASHION_MNIST_DIR:-$PWD/.data/fashion-mnist}
out=${OUT:-results}
mkdir -p "$out"
start=$SECONDS
stage() {  # name, cap in seconds, command...
  local name=$1 cap=$2; shift 2
  echo "== $name (cap ${cap} s, at $((SECONDS - start)) s)"
  timeout "$cap" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$out/$name.log"
  echo "== $name: rc=$rc"
}
stage kernels 300 bash scripts/gpu_check.sh
stage packed_agreement 60 python3 scripts/packed_agreement.py --settings W4A4
stage e2e 120 python3 bench/bench_e2e.py --models Vim-T Vim-B default --batches 1 16 64 256 --budget-s 100
stage gen 60 python3 bench/bench_gen.py
cp results/packed/agreement_cuda.* results/e2e_*.* results/gen_cuda.* "$out/" 2>/dev/null
echo "== total $((SECONDS - start)) s"
