"""Does the integer model compute what the simulation computed? Evidence for results/packed/README.md.

For each setting: calibrate OuroMamba on the default model (128 real training images, seed 0, 10 block
reconstruction epochs: the configuration of results/quant/), pack it, and run both on all 10,000 test images:
top-1 of each, top-1 agreement, logit error. On the CPU the packed model runs the kernels' PyTorch references
(the same integer codes and scales, multiplied in float64); on CUDA it runs the Triton kernels.

    PYTHONPATH=. python scripts/packed_agreement.py [--settings W4A4 W4A8 W8A8] [--limit N] [--half]

With ``--half`` (fp16 activations in the packed model's float parts) each setting gets a second row: the
simulation itself run on the test images rounded to fp16, against the simulation. It measures how far the
quantized model moves under a perturbation of fp16's size, the yardstick for the packed model's fp16 row.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.common import RESULTS_DIR, machine_header, write_results
from core.data import calibration_images, load_fashion_mnist
from core.default_model import DEFAULT_MODEL_DIR, load_default_model
from core.eval import hardware_label
from core.quant import SETTINGS, QuantConfig, quantize
from core.quant.packed import agreement, pack, save_packed

OUT = RESULTS_DIR / "packed"


class FP16RoundedInputs(torch.nn.Module):
    """A model evaluated on its inputs rounded to fp16 and back (nothing else changes)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.half().to(images.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR),
                        help="a model folder with model.safetensors and card.json (default: the embedded model)")
    parser.add_argument("--settings", nargs="+", default=["W4A4", "W4A8", "W8A8"], choices=list(SETTINGS))
    parser.add_argument("--limit", type=int, help="only the first N test images")
    parser.add_argument("--save", action="store_true", help="also write the packed models under results/packed/")
    parser.add_argument("--half", action="store_true", help="fp16 activations (the GPU speed path)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_default_model(args.model_dir)
    test = load_fashion_mnist("test")
    test = test.subset(args.limit) if args.limit else test
    images, labels = test.normalized().to(device), test.labels.to(device)
    calib = calibration_images("real", 128, 0, model.cfg.img_size, model.cfg.in_chans)
    rows = []
    for setting in args.settings:
        w_bits, a_bits = SETTINGS[setting]
        qmodel = quantize(model, QuantConfig(w_bits=w_bits, a_bits=a_bits), calib)
        packed = pack(qmodel).to(device)
        if args.half:
            packed.half_activations()
        qmodel.to(device)
        start = time.perf_counter()
        result = agreement(packed, qmodel, images, labels)
        seconds = time.perf_counter() - start
        sizes = packed.weight_bytes()
        measured = result.to_dict()
        measured["top1_packed"], measured["top1_simulation"] = measured.pop("top1"), measured.pop("top1_reference")
        rows.append({"setting": f"{setting}O8", "activations": "fp16" if args.half else "fp32", **measured,
                     "weight_bytes_packed": sizes["packed"], "weight_bytes_fp32": sizes["float32"],
                     "seconds_both_models": round(seconds, 1),
                     "backend": "triton" if device.type == "cuda" else "reference (float64)"})
        print(rows[-1], flush=True)
        if args.half:
            measured = agreement(FP16RoundedInputs(qmodel), qmodel, images, labels).to_dict()
            measured["top1_packed"], measured["top1_simulation"] = measured.pop("top1"), measured.pop("top1_reference")
            rows.append({"setting": f"{setting}O8", "activations": "simulation on fp16-rounded inputs", **measured,
                         "backend": "simulation"})
            print(rows[-1], flush=True)
        if args.save:
            save_packed(packed, OUT / f"default_{setting}.safetensors")
    OUT.mkdir(parents=True, exist_ok=True)
    header = {**machine_header(device), "hardware": hardware_label(device), "test images": str(len(images)),
              "calibration": "128 real training images, seed 0, 10 reconstruction epochs"}
    write_results(f"packed/agreement_{device.type}" + ("_fp16" if args.half else ""), rows, header,
                  "PYTHONPATH=. python scripts/packed_agreement.py " + " ".join(sys.argv[1:]))

if __name__ == "__main__":
    main()
