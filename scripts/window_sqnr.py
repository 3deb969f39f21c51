"""What does a refresh window cost? OuroMamba's quantizers' SQNR by position inside their window.

OuroMamba empties each site's outlier set at the start of every n_refresh window; inside a window the set only
grows, so later steps keep more channels at 8 bits. This script measures, per quantized activation tensor of
the default model (OuroMamba W4A4O8, 128 real training images, seed 0, 10 reconstruction epochs unless told),
the quantizer's SQNR at each position of the window (step mod n_refresh), averaged over layers, directions and
windows (``core.observe.error_report``'s per-step SQNR, pooled over the images). The images are training images
(seed 1), never the test set. For each n_refresh asked for, one row per tensor.

    PYTHONPATH=. python scripts/window_sqnr.py [--n-refresh 5 10 25] [--images N] [--epochs E] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from bench.common import machine_header, write_results
from core.data import calibration_images
from core.default_model import DEFAULT_MODEL_DIR, load_default_model
from core.observe import error_report, parse_site
from core.quant import QuantConfig, quantize
from core.quant.config import ReconstructionConfig

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--n-refresh", type=int, nargs="+", default=[10])
    parser.add_argument("--images", type=int, default=64, help="training images to run (seed 1)")
    parser.add_argument("--epochs", type=int, default=10, help="block reconstruction epochs of the calibration")
    args = parser.parse_args()
    model = load_default_model(args.model_dir)[0]
    calib, images = calibration_images("real", 128, 0), calibration_images("real", args.images, 1)
    table = []
    for n_refresh in args.n_refresh:
        torch.manual_seed(0)
        config = QuantConfig(w_bits=4, a_bits=4, n_refresh=n_refresh,
                             reconstruction=ReconstructionConfig(epochs=args.epochs))
        report = error_report(model, quantize(model, config, calib), images)
        by_position: dict[str, list[list[float]]] = {}
        for site, steps in report.attrs["step_sqnr_db"].items():
            positions = by_position.setdefault(parse_site(site).tensor, [[] for _ in range(n_refresh)])
            for step, value in enumerate(steps):
                if np.isfinite(value):
                    positions[step % n_refresh].append(float(value))
        for tensor, positions in by_position.items():
            means = [float(np.mean(values)) for values in positions]
            row = {"n_refresh": n_refresh, "tensor": tensor, "window start": round(means[0], 2),
                   "window end": round(means[-1], 2), "end − start": round(means[-1] - means[0], 2),
                   "mean": round(float(np.mean([v for values in positions for v in values])), 2)}
            row |= {f"step {i}": round(m, 2) for i, m in enumerate(means)} if n_refresh <= 10 else {}
            table.append(row)
            print(row, flush=True)
    model_dir = Path(args.model_dir).resolve()
    header = {**machine_header(torch.device("cpu")),
              "model": str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir),
              "calibration": f"OuroMamba W4A4O8, 128 real training images (seed 0), {args.epochs} reconstruction "
                             "epochs", "images": f"{args.images} training images (seed 1)",
              "cells": "SQNR (dB) of the quantizer alone at each position of its refresh window, mean over layers, "
                       "directions and windows"}
    write_results("quant/window_sqnr", table, header, "PYTHONPATH=. python scripts/window_sqnr.py "
                  + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
