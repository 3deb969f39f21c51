#!/usr/bin/env bash
# Train the default-model candidates side by side on the lent GPU (Fashion-MNIST carried in .data/).
# Usage on the device: bash scripts/gpu_train_candidates.sh  (writes $OUT/<candidate>/{model.safetensors,card.json})
set -u
export PYTHONUNBUFFERED=1
data=.data/fashion-mnist
budget=${BUDGET_MIN:-5.5}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
train() {  # name, extra args
  local name=$1; shift
  python3 -m core.train --data "$data" --out "$OUT/$name" --epochs 60 --time-budget-min "$budget" --seed 0 "$@" \
    > "$OUT/$name.log" 2>&1
}
train d64x4 --embed-dim 64 --depth 4 --batch-size 256 &
train d96x4 --embed-dim 96 --depth 4 --batch-size 256 &
wait
for f in "$OUT"/*.log; do echo "== $f"; tail -4 "$f"; done
