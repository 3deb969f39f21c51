#!/usr/bin/env bash
# Regenerate results/quant: every method x setting on the default model, for the given calibration sources.
#   scripts/quant_evidence.sh real noise      (about 10 minutes per column on the 2-core CPU)
#   scripts/quant_evidence.sh table           the markdown tables of results/quant/README.md
# Columns already present are kept; delete a results/quant/<calib>128_<setting>.csv to rerun it.
# MODEL_DIR=<folder> works on another model folder (default: assets/default_model; the committed tables were
# measured on assets/default_model/stage1).
set -euo pipefail
cd "$(dirname "$0")/.."
methods=(ouromamba static_outliers ptq4vm ptq4vm_smooth dynamic_per_token per_tensor)
if [ "${1:-}" = table ]; then
  .venv/bin/python - <<'PY'
import json
from pathlib import Path
from core.experiments import RunRecord, accuracy_table
for calib in ("real", "noise"):
    records = [RunRecord.from_dict(r) for setting in ("W8A8", "W6A6", "W4A8", "W4A4")
               if Path(f"results/quant/{calib}128_{setting}.json").is_file()
               for r in json.loads(Path(f"results/quant/{calib}128_{setting}.json").read_text())]
    print(f"\n{calib} calibration (128 images):\n\n" + accuracy_table(records))
PY
  exit 0
fi
calibs=("$@"); [ "${#calibs[@]}" -eq 0 ] && calibs=(real noise)
for calib in "${calibs[@]}"; do
  for setting in W8A8 W6A6 W4A8 W4A4; do
    name="${calib}128_${setting}"
    [ -f "results/quant/${name}.csv" ] && continue
    .venv/bin/python -m core quantize "${MODEL_DIR:-assets/default_model}/model.safetensors" --method "${methods[@]}" --setting "$setting" --calib "$calib" \
      --n-calib 128 --out results/quant --name "$name" ${FASHION_MNIST_DIR:+--data "$FASHION_MNIST_DIR"} \
      2>&1 | tee "results/quant/${name}.log"
  done
done
