#!/usr/bin/env bash
# The kernels' GPU session in one call: the kernel tests compiled on CUDA (small shapes and Vim-size shapes),
# then the benchmark (correctness at real shapes, then timings). Budget: at most 8 minutes (tests capped at
# 270 s, the benchmark at what is left of 470 s); expected ~6 (mostly Triton compiles, ~1-2 s each; the scan's
# ~15 configurations add ~1 min over tests and benchmark; the fused producers' ~25 configurations and their
# section, run last, ~1 more, unmeasured: if the cap cuts the benchmark, its log keeps one line per shape).
# Usage on the device machine, from the repository root:  bash scripts/gpu_check.sh
# Writes gpu_check_tests.log, bench_kernels.log and kernels_<gpu>.{csv,md} to $OUT (results/ when OUT is unset).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=. TRITON_INTERPRET=0 KERNELS_REAL_SHAPES=1
out=${OUT:-results}
mkdir -p "$out"
start=$SECONDS
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,memory.used --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      'available', torch.cuda.is_available(), 'triton', triton.__version__)"
python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || {
  echo "gpu_check: no CUDA device here; on the CPU run the interpreted tests (tests/test_kernels.py,"\
       "tests/test_kernel_scan.py, tests/test_kernel_fusions.py)"; exit 1; }

timeout 270 python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_kernels.py tests/test_kernel_scan.py \
  tests/test_kernel_fusions.py "tests/test_packed.py::test_vim_tiny_packed_on_cuda_fused_and_unfused_agree" \
  "tests/test_packed.py::test_the_gpu_path_fp16_activations_triton_kernels_and_scan_agrees_with_the_simulation" \
  > "$out/gpu_check_tests.log" 2>&1
tests_rc=$?
tail -n 25 "$out/gpu_check_tests.log"
echo "== tests: rc=$tests_rc after $((SECONDS - start)) s"

# a benchmark cut short by the timeout still leaves one progress line per shape in its log
timeout $((470 - (SECONDS - start))) python3 bench/bench_kernels.py > "$out/bench_kernels.log" 2>&1
bench_rc=$?
if [ "$out" != results ]; then cp results/kernels_*.csv results/kernels_*.md "$out/" 2>/dev/null; fi
tail -n 20 "$out/bench_kernels.log"
echo "== bench: rc=$bench_rc; total $((SECONDS - start)) s"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
