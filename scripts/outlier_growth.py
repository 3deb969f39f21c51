"""How often does the outlier set grow inside a window? Evidence for the detection kernels' rounds.

The detecting kernels walk a window of n_refresh steps in rounds: a round detects ``rows`` steps at once
against the set known so far and commits them up to the first step that grows the set
(kernels/detect_quant.py). A window then costs one round per growing step (plus one) instead of one per step,
so rounds pay where the set seldom grows. This script measures, per quantized activation site of the default
model calibrated as the packed model is (OuroMamba W4A4O8, 128 real training images, seed 0), how many steps
of each (sample, window) grow the set, and how many rounds a window takes at each ``rows``. The images are
training images (seed 1), never the test set.

With ``--bench-model Vim-T|Vim-S|Vim-B`` it measures instead the model ``bench/bench_e2e.py`` times on the GPU:
random weights, calibrated as that benchmark does (8 N(0, 1) images, no reconstruction), run on N(0, 1) images
(seed 1), so that its latencies can be read against how often its sets grow (~8 minutes for Vim-B on 2 cores).

    PYTHONPATH=. python scripts/outlier_growth.py [--images N] [--epochs E] [--model-dir DIR | --bench-model M]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

from bench.bench_e2e import MODELS as BENCH_MODELS
from bench.bench_e2e import build as bench_model
from bench.common import machine_header, write_results
from core.data import calibration_images
from core.default_model import DEFAULT_MODEL_DIR, load_default_model
from core.intercept import Site
from core.observe import detect_outliers, growing_steps, site_quantizers
from core.observe.probe import run_probe
from core.quant import QuantConfig, quantize
from core.quant.config import ReconstructionConfig
from core.quant.quantizers import OutlierAwareQuantizer

ROWS = (1, 2, 4, 8, 16)
ROOT = Path(__file__).resolve().parent.parent


def rounds(grows: list[bool], rows: int) -> int:
    """Rounds of ``rows`` steps one window takes: each commits up to its first growing step."""
    step = count = 0
    while step < len(grows):
        count += 1
        first = next((i for i in range(step, min(step + rows, len(grows))) if grows[i]), None)
        step = step + rows if first is None else first + 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--images", type=int, default=128, help="training images to run (seed 1)")
    parser.add_argument("--epochs", type=int, default=10, help="block reconstruction epochs of the calibration")
    parser.add_argument("--bench-model", choices=list(BENCH_MODELS), help="bench_e2e's random-weight model instead")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.bench_model:
        model, epochs = bench_model(args.bench_model), 0
        size = (model.cfg.in_chans, model.cfg.img_size, model.cfg.img_size)
        calib = torch.randn(8, *size, generator=torch.Generator().manual_seed(0))
        images = torch.randn(args.images, *size, generator=torch.Generator().manual_seed(1))
        described = {"model": f"{args.bench_model}, random weights (bench/bench_e2e.py)",
                     "calibration": "OuroMamba W4A4O8, 8 N(0, 1) images (seed 0), no reconstruction",
                     "images": f"{args.images} N(0, 1) images (seed 1)"}
    else:
        model, epochs = load_default_model(args.model_dir)[0], args.epochs
        calib, images = calibration_images("real", 128, 0), calibration_images("real", args.images, 1)
        model_dir = Path(args.model_dir).resolve()
        described = {"model": str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir),
                     "calibration": f"OuroMamba W4A4O8, 128 real training images (seed 0), {epochs} reconstruction "
                                    f"epochs", "images": f"{args.images} training images (seed 1)"}
    config = QuantConfig(w_bits=4, a_bits=4, reconstruction=ReconstructionConfig(epochs=epochs))
    qmodel = quantize(model, config, calib)
    growth: dict[str, list[int]] = defaultdict(list)
    rounds_at: dict[tuple[str, int], list[int]] = defaultdict(list)
    sources = {name: q for name, q in site_quantizers(qmodel).items()
               if isinstance(q, OutlierAwareQuantizer) and not q.static_channels}

    def record(site: Site, x: torch.Tensor, _: torch.Tensor) -> None:
        mask, n_refresh, _scale = detect_outliers(x, sources[site.name])
        tensor = site.tensor  # both directions and every layer together
        for sample in growing_steps(mask, n_refresh).tolist():
            for start in range(0, len(sample), n_refresh):
                window = sample[start:start + n_refresh]
                growth[tensor].append(sum(window))
                for rows in ROWS:
                    rounds_at[tensor, rows].append(rounds(window, rows))

    run_probe(qmodel, images, set(sources), record, batch_size=16)

    table = []
    for site, counts in growth.items():
        n = len(counts)
        row = {"tensor": site, "windows": n, "mean growing steps": round(sum(counts) / n, 2)}
        row |= {f"share {label}": round(sum(1 for c in counts if test(c)) / n, 3)
                for label, test in (("0", lambda c: c == 0), ("1", lambda c: c == 1), ("2-3", lambda c: 2 <= c <= 3),
                                    ("4+", lambda c: c >= 4))}
        row |= {f"rounds at {rows} rows": round(sum(rounds_at[site, rows]) / n, 2) for rows in ROWS}
        table.append(row)
        print(row, flush=True)
    header = {**machine_header(torch.device("cpu")), **described, "n_refresh": str(config.n_refresh)}
    name = f"quant/outlier_growth_{args.bench_model}" if args.bench_model else "quant/outlier_growth"
    write_results(name, table, header, "PYTHONPATH=. python scripts/outlier_growth.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
