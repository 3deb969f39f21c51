"""Foundation benchmarks: default-model FP32 evaluation, scan implementations, Vim-T/S forward, tap overhead.

    python bench/bench_foundation.py [--device cpu|cuda] [--quick]

Writes results/foundation_<device>.{csv,md}. Timings are medians; the device and versions are in the header.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    bench_parser,
    machine_header,
    regenerate_command,
    run,
    time_call,
    write_results,
)
from core.data import load_fashion_mnist  # noqa: E402
from core.default_model import load_default_model  # noqa: E402
from core.errors import StudioError  # noqa: E402
from core.eval import evaluate, hardware_label  # noqa: E402
from core.intercept import Interceptor, intercepting  # noqa: E402
from core.models import create_vim  # noqa: E402
from core.ssm import selective_scan_fast, selective_scan_ref  # noqa: E402

VIM_T = "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
VIM_S = "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"


def scan_inputs(batch: int, length: int, channels: int, n_state: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(batch, length, channels)] * 2 + [(channels, n_state), (batch, length, n_state),
                                                 (batch, length, n_state), (channels,), (batch, length, channels)]
    u, delta, A, B, C, D, z = (torch.randn(s, generator=g).to(device) for s in shapes)
    return u, delta, -A.abs(), B, C, D, z


def main() -> None:
    parser = bench_parser("bench_foundation.py", "the default model's evaluation, the scans, Vim-T/S, tap overhead")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and images (a smoke run: writes foundation_<device>_quick)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise StudioError("--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False)")
    device = torch.device(args.device)
    hw = hardware_label(device)
    repeats = 1 if args.quick else 3
    rows: list[dict] = []

    model, card = load_default_model()
    test = load_fashion_mnist("test")
    if args.quick:
        test = test.subset(1000)
    result = evaluate(model, test, batch_size=500, device=device)
    rows.append({"benchmark": "default model FP32 eval", "shape": f"{result.total} images, batch 500",
                 "impl": "fast scan", "seconds": round(result.seconds, 3),
                 "per_image_ms": round(1000 * result.seconds / result.total, 3), "hardware": hw,
                 "note": f"top-1 {result.top1:.2f}%"})

    cfg = model.cfg
    batch = 500 if device.type == "cpu" else 2048
    inputs = scan_inputs(batch, cfg.seq_len, cfg.d_inner, cfg.d_state, device)
    for name, fn in (("ref (step loop)", selective_scan_ref), ("fast", selective_scan_fast)):
        with torch.inference_mode():
            seconds = time_call(lambda fn=fn: fn(*inputs), device, repeats)
        rows.append({"benchmark": "scan, default model shape", "shape": f"B{batch} L{cfg.seq_len} E{cfg.d_inner} "
                     f"N{cfg.d_state}", "impl": name, "seconds": round(seconds, 4),
                     "per_image_ms": round(1000 * seconds / batch, 3), "hardware": hw})

    x = test.normalized(0, 500).to(device)
    model.to(device)
    with torch.inference_mode():
        plain = time_call(lambda: model(x), device, repeats)
        with intercepting(model, Interceptor()):
            tapped = time_call(lambda: model(x), device, repeats)
    cost = ("upper bound of an empty tap's cost" if tapped > plain
            else "no cost measurable: the difference is timing noise")
    rows.append({"benchmark": "tap overhead (pass-through interceptor vs none)", "shape": "default model, 500 images",
                 "impl": "pass-through interceptor", "seconds": round(tapped, 4),
                 "per_image_ms": round(1000 * tapped / 500, 3), "hardware": hw,
                 "note": f"{100 * (tapped - plain) / plain:+.1f}% against {plain:.4f} s without it ({cost})"})

    for name, short in ((VIM_T, "Vim-T"), (VIM_S, "Vim-S")):
        vim = create_vim(name).eval().to(device)
        for vim_batch in (1, 8) if device.type == "cpu" else (1, 64):
            images = torch.randn(vim_batch, 3, 224, 224, device=device)
            with torch.inference_mode():
                seconds = time_call(lambda vim=vim, images=images: vim(images), device, repeats)
            rows.append({"benchmark": f"{short} forward (random weights)", "shape": f"batch {vim_batch}, 224², "
                         "197 tokens", "impl": "fast scan, FP32", "seconds": round(seconds, 4),
                         "per_image_ms": round(1000 * seconds / vim_batch, 2), "hardware": hw})
        del vim

    write_results(f"foundation_{device.type}", rows, machine_header(device), regenerate_command("bench_foundation.py"),
                  args.out, quick=args.quick)


if __name__ == "__main__":
    run(main)
