"""Where the end-to-end time goes on a CUDA GPU: torch.profiler over one forward of FP16 (the model's own forward
and the fused float path) and of the packed W4A4O8 model (bench_e2e's variants), kernels ranked by GPU time, with
the launch count and the host wall time.

    PYTHONPATH=. python scripts/gpu_profile.py [--model Vim-B] [--batch 64]

Writes results/profile_<gpu>.md (the tables printed here).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench_e2e import MODELS, build, variants
from bench.common import RESULTS_DIR, machine_header

TOP = 15


def profile_forward(model: torch.nn.Module, images: torch.Tensor) -> tuple[str, str]:
    """(one summary line, the top-kernel table) for one forward after a warm-up."""
    with torch.inference_mode():
        model(images)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            model(images)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels)
    line = f"host wall {wall * 1e3:.1f} ms, GPU kernel time {gpu_us / 1e3:.1f} ms, {len(kernels)} kernel launches"
    return line, prof.key_averages().table(sort_by="device_time_total", row_limit=TOP, max_name_column_width=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Vim-B", choices=[*MODELS, "default"])
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_profile.py: no CUDA device")
    device = torch.device("cuda")
    model = build(args.model)
    makers = variants(model, device)
    header = machine_header(device)
    lines = [f"# Profile: {args.model}, batch {args.batch}", "",
             *(f"- {key}: {value}" for key, value in header.items()), "",
             f"Regenerate: `PYTHONPATH=. python scripts/gpu_profile.py --model {args.model} --batch {args.batch}`", ""]
    for label in ("fp16", "fp16 fused", "W4A4O8"):
        variant = makers[label]()
        dtype = next(p.dtype for p in variant.parameters() if p.is_floating_point())
        cfg = model.cfg
        images = torch.randn(args.batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
        summary, table = profile_forward(variant, images)
        print(f"== {label}: {summary}\n{table}", flush=True)
        lines += [f"## {label}", "", summary, "", "```", table, "```", ""]
        del variant
        torch.cuda.empty_cache()
    tag = torch.cuda.get_device_name(device).lower().replace(" ", "_")
    (RESULTS_DIR / f"profile_{tag}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
