"""Fake-quant cost on the CPU: W4A4 evaluation of the default model vs FP, and calibration time.

    python bench/bench_quant.py [--method ouromamba ...] [--limit N]

Writes results/quant_cpu.{csv,md}. The quantized model here is a simulation (fake quantization in fp32):
its timings say what the CPU path costs, not what quantized kernels would gain.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_parser, machine_header, regenerate_command, run, write_results  # noqa: E402
from core.arguments import Distinct, whole  # noqa: E402
from core.data import calibration_images, load_fashion_mnist  # noqa: E402
from core.default_model import DEFAULT_MODEL_DIR, load_default_model  # noqa: E402
from core.eval import evaluate  # noqa: E402
from core.quant import METHODS, QuantConfig, ReconstructionConfig, quantize  # noqa: E402

EPOCHS = (0, 10)  # calibration alone, and with the release's reconstruction (the evaluated one)


def main() -> None:
    parser = bench_parser("bench_quant.py", "fake-quant W4A4 evaluation and calibration time on the CPU")
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR),
                        help="a model folder with model.safetensors and card.json (default: the embedded model)")
    parser.add_argument("--limit", type=whole(1),
                        help="only the first N test images (default: all 10,000; fewer write quant_cpu_quick)")
    parser.add_argument("--method", nargs="+", action=Distinct, default=["ouromamba"], choices=list(METHODS),
                        help="methods to time")
    args = parser.parse_args()
    configs = [QuantConfig(method=method, w_bits=4, a_bits=4, reconstruction=ReconstructionConfig(epochs=epochs))
               for method in args.method for epochs in EPOCHS]
    model, _ = load_default_model(args.model_dir)
    test = load_fashion_mnist("test")
    if args.limit:
        test = test.subset(args.limit)
    calib = calibration_images("real", 128, seed=0)
    fp = evaluate(model, test)
    rows = [{"what": "FP32 eval", "method": "fp32", "images": fp.total, "seconds": round(fp.seconds, 2),
             "vs_fp": "1.00x", "top1": f"{fp.top1:.2f}", "hardware": fp.device}]
    for config in configs:
        epochs = config.reconstruction.epochs
        start = time.perf_counter()
        qmodel = quantize(model, config, calib)
        calibration = time.perf_counter() - start
        rows.append({"what": f"calibration, 128 images, {epochs} reconstruction epochs", "method": config.label,
                     "images": 128, "seconds": round(calibration, 2), "vs_fp": "", "top1": "", "hardware": fp.device})
        if epochs == EPOCHS[-1]:
            result = evaluate(qmodel, test)
            rows.append({"what": "W4A4 fake-quant eval", "method": config.label, "images": result.total,
                         "seconds": round(result.seconds, 2), "vs_fp": f"{result.seconds / fp.seconds:.2f}x",
                         "top1": f"{result.top1:.2f}", "hardware": result.device})
    write_results("quant_cpu", rows, machine_header(torch.device("cpu")), regenerate_command("bench_quant.py"),
                  args.out, quick=args.limit is not None)


if __name__ == "__main__":
    run(main)
