#!/usr/bin/env bash
# Everything that still needs a GPU, most important first, in device calls of at most 10 minutes (the device
# tool's limit; ~15 minutes of device time per session, machine start included). Each stage has its own cap and
# the part a deadline (DEADLINE_S, seconds from its start): a stage that runs out keeps its log and the next
# stage still runs. Run `train` first, then 1 while the machine is warm, then 2 in a later session.
#
#   train   environment       GPU, driver, torch, triton                                              ≤   5 s
#           scan_grad_tests   the Triton scan's backward compiled: gradients at small and Vim-S shapes,
#                             a Vim training step against the fast scan                               ≤  90 s
#           candidates        the default model (issue 2): two candidates side by side, BUDGET_MIN
#                             minutes each (default 4.5), through the Triton scan + backward          ≤ 330 s
#           card_eval         FP32 test top-1 of both on the machine's CPU (selection is by validation) ≤ 90 s
#   1       environment, tests (every kernel test compiled, Vim-size shapes; one pytest per file, side by
#                             side: compiling is most of their time)                                  ≤ 180 s
#           e2e_vim_b         the target: Vim-B batch 1 and 64, FP16 (the model's forward and the fused
#                             float path) / W8A8O8 / W4A4O8 (detection launches tuned: ~1.5 s to compile
#                             each candidate, once) / W4A4O8 fixed launches, eager and graphs          ≤ 140 s
#           profile           where Vim-B batch 64's time goes: fp16, fp16 fused, W4A4O8              ≤  55 s
#           detect            bench_kernels: detection step by step, in rounds, at 1–8 warps          ≤  90 s
#           gemm              bench_kernels: mixed_gemm vs cuBLAS fp16 (dense and gathered outliers)  ≤ 100 s
#           packed_agreement  the packed model on CUDA with fp32 activations, W4A4/W4A8/W8A8, and W4A4
#                             with fp16 plus the simulation-on-fp16-inputs yardstick                  ≤ 140 s
#           e2e               Vim-T, Vim-S and the default model, every variant, batch 1/16/64/256   what is left
#   2       scan_fusion       bench_kernels: the scan, its training pair, the fused producers         ≤ 200 s
#           gen               OuroMamba-Gen seconds per iteration on CUDA (bench_gen)                 ≤  60 s
#           e2e_vim_b_256     Vim-B at batch 256                                                      ≤  50 s
# Measured by part 1 and 2 on 2026-11-27 (H100): kernels/README.md, "Measured on an H100". Not here (a session
# of its own): ITERATIONS=1000 scripts/gen_evidence.sh sets.
#
# Usage on the device machine (carry .data for the Fashion-MNIST files):  bash scripts/gpu_session.sh train|1|2
# Logs and results go to one archive, $OUT/gpu_part<N>.tgz (the device returns at most 8 files), rewritten after
# every stage so that a cut-off call still brings back what finished. Without OUT: results/gpu_part<N>/.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=. TRITON_INTERPRET=0 FASHION_MNIST_DIR=${FASHION_MNIST_DIR:-$PWD/.data/fashion-mnist}
part=${1:-1}
deadline=${DEADLINE_S:-540}
case "$part" in train|1|2) ;; *) echo "usage: bash scripts/gpu_session.sh train|1|2"; exit 2 ;; esac
case "$deadline" in ''|*[!0-9]*) echo "DEADLINE_S must be whole seconds, got '$deadline'"; exit 2 ;; esac
stage_dir=results/gpu_part$part
mkdir -p "$stage_dir"
touch "$stage_dir/.started"
start=$SECONDS
collect() {  # what the benchmarks wrote since this part started (never a committed older file), the logs: one archive
  local f
  for f in results/kernels_*.* results/e2e_*.* results/gen_cuda.* results/profile_*.md results/packed/agreement_cuda*; do
    [ "$f" -nt "$stage_dir/.started" ] && cp "$f" "$stage_dir/"
  done
  [ -n "${OUT:-}" ] && tar czf "$OUT/gpu_part$part.tgz" -C "$stage_dir" .
}
stage() {  # name, cap in seconds, command (a shell function of this file or a program)...
  local name=$1 cap=$2 left=$((deadline - (SECONDS - start))); shift 2
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 5 ]; then echo "== $name: skipped, the part's deadline is spent"; return; fi
  echo "== $name (cap ${cap} s, at $((SECONDS - start)) s)"
  timeout "$cap" bash -c '"$@"' _ "$@" > "$stage_dir/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$stage_dir/$name.log"
  echo "== $name: rc=$rc after $((SECONDS - start)) s"
  collect
}
environment() {
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,memory.used --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
    'available', torch.cuda.is_available(), 'triton', triton.__version__)"
}
kernel_tests() {  # one pytest per file, side by side: compiling is most of their time and the machine has 16 cores
  local failed=0 pid name
  declare -A files=([kernels]=tests/test_kernels.py [scan]=tests/test_kernel_scan.py
    [fusions]=tests/test_kernel_fusions.py [fake_quant]=tests/test_kernel_fake_quant.py
    [tuning]=tests/test_kernel_tuning.py [fused]=tests/test_fused.py
    [packed]="tests/test_packed.py::test_vim_tiny_packed_on_cuda_fused_and_unfused_agree
      tests/test_packed.py::test_packed_default_model_on_cuda_agrees_with_its_simulation
      tests/test_packed.py::test_the_gpu_path_fp16_activations_triton_kernels_and_scan_agrees_with_the_simulation
      tests/test_packed.py::test_the_scan_inputs_go_through_one_kernel_each_when_the_kernels_run
      tests/test_packed.py::test_detection_runs_in_rounds_where_the_set_seldom_grows_and_changes_no_logit
      tests/test_packed.py::test_an_empty_batch_gives_no_logits_as_the_float_model_does")
  declare -A pids
  for name in "${!files[@]}"; do
    # shellcheck disable=SC2086 - the packed entry is several test ids
    KERNELS_REAL_SHAPES=1 python3 -m pytest -q -p no:cacheprovider --durations=3 ${files[$name]} \
      > "$stage_dir/tests_$name.log" 2>&1 &
    pids[$name]=$!
  done
  for name in "${!pids[@]}"; do
    wait "${pids[$name]}" || failed=1
    echo "-- $name: $(tail -n 1 "$stage_dir/tests_$name.log")"
  done
  return $failed
}
tests_and_warm_up() {  # beside the tests, the timed stages' kernels compiled into Triton's cache while they run
  local rc pid  # (nothing timed or written; stopped when the tests end, keeping what compiled; the warm-ups first)
  python3 bench/bench_e2e.py --warm-only --models Vim-B --batches 1 64 \
    --variants "fp16 fused" W8A8O8 W4A4O8 "W4A4O8 fixed launches" > "$stage_dir/warm_e2e.log" 2>&1 &
  local warm_e2e=$!
  python3 bench/bench_kernels.py --warm-only --only detect gemm > "$stage_dir/warm_kernels.log" 2>&1 &
  local warm_kernels=$!
  kernel_tests
  rc=$?
  for pid in $warm_e2e $warm_kernels; do
    kill -0 "$pid" 2>/dev/null && echo "-- warm-up $pid still running: stopped" && kill "$pid"
  done
  wait
  echo "-- warm-up e2e: $(grep -c "warm-up only" "$stage_dir/warm_e2e.log") of 8 forwards;" \
    "kernels: $(tail -n 1 "$stage_dir/warm_kernels.log")"
  return $rc
}
scan_grad_tests() {
  KERNELS_REAL_SHAPES=1 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_scan.py -k "gradient or vim_mixer" \
    || touch "$stage_dir/scan_backward_failed"  # the candidates then train on the fast scan
}
candidates() {  # side by side (the small model leaves the GPU mostly idle); the cards record each command
  local data=${FASHION_MNIST_DIR} budget=${BUDGET_MIN:-4.5} impl=auto
  [ -e "$stage_dir/scan_backward_failed" ] && impl=fast
  python3 -m core.train --data "$data" --out "$stage_dir/d64x4" --epochs 100 --time-budget-min "$budget" \
    --seed 0 --embed-dim 64 --depth 4 --scan-impl $impl > "$stage_dir/d64x4.log" 2>&1 &
  python3 -m core.train --data "$data" --out "$stage_dir/d64x4_lr3e-3" --epochs 100 --time-budget-min "$budget" \
    --seed 0 --embed-dim 64 --depth 4 --lr 3e-3 --drop-path 0.1 --scan-impl $impl > "$stage_dir/d64x4_lr3e-3.log" 2>&1 &
  wait
  for f in "$stage_dir"/d64x4*.log; do echo "== $f"; tail -3 "$f"; done
}
card_eval() {  # test top-1 of each candidate, measured once; the choice between them is by validation
  for dir in "$stage_dir"/d64x4*/; do
    python3 -m core.cli card-eval "$dir" --data "$FASHION_MNIST_DIR"
    python3 -c "import json, sys; c = json.load(open(sys.argv[1])); print(sys.argv[1], 'epochs', c['epochs'],
      'val', c['val_top1'], 'test', c['test_top1'], 'train s', c['train_seconds'])" "$dir/card.json"
  done
}
export -f environment kernel_tests tests_and_warm_up scan_grad_tests candidates card_eval
export stage_dir
case "$part" in
  train) stage environment 5 environment
     stage scan_grad_tests 90 scan_grad_tests
     stage candidates 330 candidates
     stage card_eval 90 card_eval ;;
  1) stage environment 5 environment
     stage tests 180 tests_and_warm_up
     stage e2e_vim_b 140 python3 bench/bench_e2e.py --models Vim-B --batches 1 64 --budget-s 130 \
       --variants fp16 "fp16 fused" W8A8O8 W4A4O8 "W4A4O8 fixed launches" "W4A4O8 one stream"
     stage profile 55 python3 scripts/gpu_profile.py --model Vim-B --batch 64
     stage detect 90 python3 bench/bench_kernels.py --only detect --budget-s 75
     stage gemm 100 python3 bench/bench_kernels.py --only gemm --budget-s 80
     stage packed_agreement 100 python3 scripts/packed_agreement.py
     stage packed_agreement_fp16 40 python3 scripts/packed_agreement.py --settings W4A4 --half
     stage e2e 150 python3 bench/bench_e2e.py --models Vim-T Vim-S default --batches 1 16 64 256 --budget-s 130 ;;
  2) stage scan_fusion 200 python3 bench/bench_kernels.py --only scan train fusion --budget-s 180
     stage gen 60 python3 bench/bench_gen.py
     stage e2e_vim_b_256 50 python3 bench/bench_e2e.py --models Vim-B --batches 256 --budget-s 40 \
       --variants fp16 "fp16 fused" W8A8O8 W4A4O8 ;;
esac
echo "== total $((SECONDS - start)) s"
