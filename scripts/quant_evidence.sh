#!/usr/bin/env bash
# Regenerate results/quant: every method x setting on the default model, for the given calibration sources.
#   scripts/quant_evidence.sh real noise      (about 10 minutes per column on the 2-core CPU)
# Columns already present are kept; delete a results/quant/<calib>128_<setting>.csv to rerun it.
set -euo pipefail
cd "$(dirname "$0")/.."
methods=(ouromamba static_outliers ptq4vm ptq4vm_smooth dynamic_per_token per_tensor)
calibs=("$@"); [ "${#calibs[@]}" -eq 0 ] && calibs=(real noise)
for calib in "${calibs[@]}"; do
  for setting in W8A8 W6A6 W4A8 W4A4; do
    name="${calib}128_${setting}"
    [ -f "results/quant/${name}.csv" ] && continue
    .venv/bin/python -m core quantize --method "${methods[@]}" --setting "$setting" --calib "$calib" \
      --n-calib 128 --out results/quant --name "$name" ${FASHION_MNIST_DIR:+--data "$FASHION_MNIST_DIR"} \
      2>&1 | tee "results/quant/${name}.log"
  done
done
