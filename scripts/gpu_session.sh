#!/usr/bin/env bash
# Everything that still needs a GPU, in priority order, as two device calls of at most ~9 minutes each
# (the device tool allows 10 minutes per command and ~15 minutes per session, machine start included).
# Each stage has its own cap; a stage that runs out leaves its log and the next stage still runs.
#
#   part 1: kernels: compiled tests at small and Vim-size shapes + bench_kernels (scripts/gpu_check.sh)  ≤ 470 s
#           the packed model on CUDA: Triton-path agreement with the simulation, 10k test images (W4A4),
#           fp32 and fp16 activations                                                                  ≤  90 s
#   part 2: end to end: FP32 eager / FP16 / packed W8A8, W4A8, W4A4O8 (fused, unfused) on Vim-T, Vim-B and
#           the default model (bench_e2e)                                                                 ≤ 180 s
#           OuroMamba-Gen cost on CUDA (bench_gen)                                                       ≤  60 s
# Not here (a session of their own): retraining the default model (scripts/gpu_train_candidates.sh) and
# ITERATIONS=1000 scripts/gen_evidence.sh sets.
#
# Usage on the device machine (carry .data for the Fashion-MNIST files):  bash scripts/gpu_session.sh 1|2
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
case "${1:-1}" in
  1) stage kernels 480 bash scripts/gpu_check.sh
     stage packed_agreement 45 python3 scripts/packed_agreement.py --settings W4A4
     stage packed_agreement_fp16 45 python3 scripts/packed_agreement.py --settings W4A4 --half ;;
  2) stage e2e 180 python3 bench/bench_e2e.py --models Vim-T Vim-B default --batches 1 16 64 256 --budget-s 160
     stage gen 60 python3 bench/bench_gen.py ;;
  *) echo "usage: bash scripts/gpu_session.sh 1|2"; exit 2 ;;
esac
cp results/kernels_*.* results/packed/agreement_cuda* results/e2e_*.* results/gen_cuda.* "$out/" 2>/dev/null
echo "== total $((SECONDS - start)) s"
