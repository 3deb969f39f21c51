"""Should block reconstruction train the scales of grids finer than 4 bits? The release's lr against keeping them.

Reconstruction trains every scale with AdamW at one lr (the release's 5e-4), and AdamW moves a parameter by
about lr a step whatever its size: right for 4-bit scales, ~18x too much for an 8-bit scale of the same tensor.
This script quantizes the default model (128 training images, seed 0, 10 reconstruction epochs) in
configurations with grids above 4 bits, once with every scale learned (``max_learned_bits=None``, the release
and our default) and once with the finer grids' scales kept (``max_learned_bits=4``), and reports the top-1 on
the 5,000 held-out validation images (never the test set) and the SQNR of the finer grids' quantizers on the
first 32 of them. Real calibration for OuroMamba; noise for the static outlier list, whose grids calibrated on
noise clip the real images' values (the case where learning the finer scales matters).

    PYTHONPATH=. python scripts/fine_grid_reconstruction.py      # ~15 minutes on the 2-core CPU
"""

from __future__ import annotations

import sys

import torch

from bench.common import machine_header, write_results
from core.data import calibration_images, load_validation
from core.default_model import load_default_model
from core.eval import evaluate
from core.observe import error_report
from core.quant import QuantConfig, ReconstructionConfig, quantize

CASES = [  # (calibration source, configuration name, QuantConfig fields)
    ("real", "ouromamba W4A4O8, x_proj weights at 8 bits",
     {"w_bits": 4, "a_bits": 4, "overrides": {"*.x_proj.weight": {"w_bits": 8}}}),
    ("real", "ouromamba W4A8O8", {"w_bits": 4, "a_bits": 8}),
    ("real", "ouromamba W6A6O8", {"w_bits": 6, "a_bits": 6}),
    ("real", "ouromamba W8A8O8", {"w_bits": 8, "a_bits": 8}),
    ("noise", "static_outliers W6A6O8", {"method": "static_outliers", "w_bits": 6, "a_bits": 6}),
    ("noise", "static_outliers W8A8O8", {"method": "static_outliers", "w_bits": 8, "a_bits": 8}),
]
WAYS = ((None, "every scale learns (release, default)"), (4, "finer grids kept"))


def main() -> None:
    model = load_default_model()[0]
    validation = load_validation()
    table = []
    for source, name, fields in CASES:
        calib = calibration_images(source, 128, 0)
        for limit, label in WAYS:
            qmodel = quantize(model, QuantConfig(**fields, reconstruction=ReconstructionConfig(max_learned_bits=limit)),
                              calib)
            report = error_report(model, qmodel, validation.normalized(0, 32))
            finer = report[report["bits"] > 4]["sqnr_db"]
            row = {"calibration": source, "configuration": name, "reconstruction": label,
                   "validation top-1 (%)": round(evaluate(qmodel, validation).top1, 2),
                   "finer-grid quantizers": len(finer), "their SQNR min (dB)": round(float(finer.min()), 1),
                   "median (dB)": round(float(finer.median()), 1)}
            table.append(row)
            print(row, flush=True)
    header = {**machine_header(torch.device("cpu")), "model": "assets/default_model (current)",
              "calibration": "128 training images (real) or N(0, 1) images (noise), seed 0, 10 reconstruction epochs",
              "scored on": "the 5,000 validation images (train[55000:]); SQNR on the first 32 of them",
              "FP32 validation top-1": "91.40 %"}
    write_results("quant/fine_grid_reconstruction", table, header,
                  "PYTHONPATH=. python scripts/fine_grid_reconstruction.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
