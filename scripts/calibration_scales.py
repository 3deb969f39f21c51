"""Why a calibration source works or not: the static per-time-step inlier scales S^I(t) it calibrates, against
the ones real training images give, and the activations of real test images they will have to represent.

    python scripts/calibration_scales.py results/gen/sets/ouromamba noise real --out results/gen/scales.csv

For each source: OuroMamba W4A4 calibration without reconstruction (the scales only), then per quantized
activation site the ratio S^I_source(t) / S^I_real(t) over time-steps (median, and at the patch-grid border vs
its interior), and the share of real test-image inlier values that the source's scale clips at 4 bits
(symmetric sites only: Δ's asymmetric range has no ±qmax·scale bound).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.data import calibration_images, load_fashion_mnist  # noqa: E402
from core.default_model import DEFAULT_MODEL_DIR, load_default_model  # noqa: E402
from core.observe import capture_quantizer_inputs, detect_outliers, site_quantizers  # noqa: E402
from core.quant import QuantConfig, ReconstructionConfig, quantize  # noqa: E402
from core.quant.quantizers import OutlierAwareQuantizer  # noqa: E402


def inlier_scales(model, source: str, seed: int) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    images = calibration_images(source, 128, seed, cfg.img_size, cfg.in_chans)
    config = QuantConfig(method="ouromamba", w_bits=4, a_bits=4, reconstruction=ReconstructionConfig(epochs=0))
    qmodel = quantize(model, config, images)
    return qmodel, {name: q.scale.detach().clone() for name, q in site_quantizers(qmodel).items()
                    if isinstance(q, OutlierAwareQuantizer)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR),
                        help="a model folder with model.safetensors and card.json (default: the embedded model)")
    parser.add_argument("sources", nargs="+", help="calibration sources: real, noise or folders")
    parser.add_argument("--test-images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/gen/scales.csv")
    args = parser.parse_args()
    model, _ = load_default_model(args.model_dir)
    cfg = model.cfg
    grid = torch.arange(cfg.num_patches)
    rows_, cols_ = grid // cfg.grid_size, grid % cfg.grid_size
    border = (rows_ == 0) | (cols_ == 0) | (rows_ == cfg.grid_size - 1) | (cols_ == cfg.grid_size - 1)
    token_border = torch.cat([border[: cfg.cls_position], torch.tensor([False]), border[cfg.cls_position:]])
    real_qmodel, real = inlier_scales(model, "real", args.seed)
    test = load_fashion_mnist("test").normalized(0, args.test_images)
    inputs = capture_quantizer_inputs(real_qmodel, test, list(real))
    rows = []
    for source in args.sources:
        _, scales = (real_qmodel, real) if source == "real" else inlier_scales(model, source, args.seed)
        for name, scale in scales.items():
            ratio = scale / real[name]
            x = inputs[name]
            mask, _, _ = detect_outliers(x, site_quantizers(real_qmodel)[name])  # the outliers real scales leave
            token_border_steps = token_border.flip(0) if ".bwd." in name else token_border
            quantizer = site_quantizers(real_qmodel)[name]
            clipped = ((x.abs() > quantizer.qmax * scale.view(1, -1, 1)) & ~mask).float().sum() / (~mask).sum()
            if quantizer.asymmetric:  # Δ: a zero point and a range, not ±qmax·scale; the clip test does not apply
                clipped = torch.tensor(float("nan"))
            rows.append({"source": Path(source).name, "site": name,
                         "median_scale_ratio_vs_real": float(ratio.median()),
                         "border_ratio": float(ratio[token_border_steps].median()),
                         "interior_ratio": float(ratio[~token_border_steps].median()),
                         "real_inliers_clipped_pct": 100 * float(clipped)})
    frame = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    summary = frame.groupby("source")[["median_scale_ratio_vs_real", "border_ratio", "interior_ratio",
                                        "real_inliers_clipped_pct"]].median()
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"per site: {args.out}")


if __name__ == "__main__":
    main()
