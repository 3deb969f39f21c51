#!/usr/bin/env bash
# Regenerate results/gen: calibration sets from every source, then OuroMamba-Quant W4A4 / W4A8 calibrated on each.
#   scripts/gen_evidence.sh sets     the optimised sets (about 10 minutes each on one CPU core at 100 iterations)
#   scripts/gen_evidence.sh quant    calibrate + evaluate on the full test set per source (about 5 minutes each)
#   scripts/gen_evidence.sh table    the markdown table of results/gen/README.md
# Finished outputs are kept; delete one to redo it. ITERATIONS=1000 gives the paper's schedule (GPU advised).
# MODEL_DIR=<folder> works on another model folder (default: assets/default_model).
set -euo pipefail
cd "$(dirname "$0")/.."
iterations=${ITERATIONS:-100}
weights=${MODEL_DIR:-assets/default_model}/model.safetensors
data=${FASHION_MNIST_DIR:+--data "$FASHION_MNIST_DIR"}
declare -A sets=(
  [ouromamba]="--source ouromamba"
  [contrastive_only]="--source ouromamba --output-weight 0"
  [output_only]="--source output_only"
  [psaq]="--source psaq"
)
case "${1:-}" in
  sets)
    for name in ouromamba contrastive_only output_only psaq; do
      [ -f "results/gen/sets/$name/manifest.json" ] && continue
      # shellcheck disable=SC2086
      .venv/bin/python -m core generate "$weights" ${sets[$name]} --count 128 --iterations "$iterations" --lr 0.2 --seed 0 \
        --out "results/gen/sets/$name" 2>&1 | tr '\r' '\n' | grep -v '^batch' || true
    done ;;
  quant)
    for name in noise real ouromamba contrastive_only output_only psaq; do
      [ -f "results/gen/quant_$name.csv" ] && continue
      calib="results/gen/sets/$name"; [ "$name" = noise ] || [ "$name" = real ] && calib=$name
      # shellcheck disable=SC2086
      .venv/bin/python -m core quantize "$weights" --method ouromamba --setting W4A4 W4A8 --calib "$calib" --n-calib 128 \
        --out results/gen --name "quant_$name" $data 2>&1 | tr '\r' '\n' | grep -v 'images$' | tee "results/gen/quant_$name.log"
    done ;;
  table)
    .venv/bin/python - <<'PY'
import json
from pathlib import Path
from core.experiments import RunRecord, accuracy_table
records = [RunRecord.from_dict(r) for name in ("ouromamba", "contrastive_only", "output_only", "psaq", "noise", "real")
           if Path(f"results/gen/quant_{name}.json").is_file()
           for r in json.loads(Path(f"results/gen/quant_{name}.json").read_text())]
print(accuracy_table(records, row=lambda r: Path(r.calibration["source"]).name, label="calibration source"))
PY
    ;;
  *) echo "usage: scripts/gen_evidence.sh sets|quant|table" >&2; exit 2 ;;
esac
