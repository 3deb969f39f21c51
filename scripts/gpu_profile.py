"""Where the end-to-end time goes on a CUDA GPU: torch.profiler over one forward of FP16 (the model's own forward
and the fused float path) and of the packed W4A4O8 model (bench_e2e's variants), kernels ranked by GPU time, with
the launch count and the host wall time; then the kernel time by kind of work for each, and what that leaves
the integer kernels to win at most (``speedup_ceiling``).

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
# int8 : fp16 dense tensor-core peak on the H100 and H200 data sheets (1979 TOP/s : 989 TFLOP/s); measured at
# 8192³ it was 1.64× (../shared/docs/environment.md), so 2 is the generous end.
INT8_PEAK_RATIO = 2.0
# Kernel names by kind of work, first match wins: cuBLAS (nvjet / xmma / cutlass / gemm / gemv, split-K
# reductions) and ours (mixed_gemm, its outlier compaction); the quantizing producers count as detection
# (their float work is the small part); the float producers FusedVim shares with the packed path.
KINDS = (
    ("scan", ("selective_scan",)),
    ("detection + quantization", ("detect_quant", "detect_fake_quant")),
    ("GEMM", ("gemm", "gemv", "nvjet", "xmma", "cutlass", "splitk", "compact_outliers")),
    ("float producers", ("conv_silu", "add_rms_norm", "merge_directions")),
)
OTHER = "other (copies, elementwise, patch embedding, head)"


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, keys in KINDS if any(key in name for key in keys)), OTHER)


def time_by_kind(kernel_us: dict[str, float]) -> dict[str, float]:
    """GPU microseconds per kind of work (``KINDS``, then ``OTHER``) from microseconds per kernel name."""
    kinds = dict.fromkeys([*(kind for kind, _ in KINDS), OTHER], 0.0)
    for kernel, us in kernel_us.items():
        kinds[kind_of(kernel)] += us
    return kinds


def speedup_ceiling(baseline_us: float, fused_kinds: dict[str, float], gemm_speedup: float = INT8_PEAK_RATIO) -> float:
    """The most a quantized model built on the fused float path can gain over ``baseline_us``: everything of
    that path but its GEMMs stays (the scan, the float producers, the rest), the GEMMs run ``gemm_speedup`` times
    faster and detection costs nothing. Amdahl's law with generous assumptions, so no real model beats it."""
    total = sum(fused_kinds.values())
    return baseline_us / (total - fused_kinds["GEMM"] * (1 - 1 / gemm_speedup))


def kind_table(kinds_by_variant: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per kind of work, ms and share of the kernel time per variant."""
    labels = list(kinds_by_variant)
    lines = ["| kind | " + " | ".join(f"{label} ms | share" for label in labels) + " |",
             "|---|" + "---:|---:|" * len(labels)]
    for kind in next(iter(kinds_by_variant.values())):
        cells = []
        for kinds in kinds_by_variant.values():
            total = sum(kinds.values())
            cells += [f"{kinds[kind] / 1e3:.2f}", f"{kinds[kind] / total:.0%}"]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ceiling_lines(kinds_by_variant: dict[str, dict[str, float]]) -> list[str]:
    """The measured ratios of W4A4O8 against each FP16 forward, beside ``speedup_ceiling``'s."""
    fused, packed = kinds_by_variant["fp16 fused"], sum(kinds_by_variant["W4A4O8"].values())
    lines = []
    for label in ("fp16", "fp16 fused"):
        baseline = sum(kinds_by_variant[label].values())
        lines.append(f"- W4A4O8 against {label}: {baseline / packed:.2f}× in GPU kernel time; at most "
                     f"{speedup_ceiling(baseline, fused):.2f}× with free detection and GEMMs at the int8 peak "
                     f"({INT8_PEAK_RATIO:g}× cuBLAS fp16) on the fused float path")
    return lines


def profile_forward(model: torch.nn.Module, images: torch.Tensor) -> tuple[str, str, dict[str, float]]:
    """(one summary line, the top-kernel table, GPU microseconds per kernel name) for one forward after a
    warm-up."""
    with torch.inference_mode():
        model(images)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            model(images)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us: dict[str, float] = {}
    for event in kernels:
        kernel_us[event.name] = kernel_us.get(event.name, 0.0) + event.device_time
    line = (f"host wall {wall * 1e3:.1f} ms, GPU kernel time {sum(kernel_us.values()) / 1e3:.1f} ms, "
            f"{len(kernels)} kernel launches")
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=TOP, max_name_column_width=60)
    return line, table, kernel_us


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
    kinds_by_variant = {}
    for label in ("fp16", "fp16 fused", "W4A4O8"):
        variant = makers[label]()
        dtype = next(p.dtype for p in variant.parameters() if p.is_floating_point())
        cfg = model.cfg
        images = torch.randn(args.batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
        summary, table, kernel_us = profile_forward(variant, images)
        kinds_by_variant[label] = time_by_kind(kernel_us)
        print(f"== {label}: {summary}\n{table}", flush=True)
        lines += [f"## {label}", "", summary, "", "```", table, "```", ""]
        del variant
        torch.cuda.empty_cache()
    by_kind = ["## GPU kernel time by kind of work", "",
               "Kernel times summed: the fused forwards run each backward branch on a side stream, so their kernels "
               "overlap and the sum can exceed the forward's elapsed GPU time (bench_e2e.py's graph timings are "
               "elapsed). The sums say where the work is.", "", kind_table(kinds_by_variant), "",
               *ceiling_lines(kinds_by_variant), ""]
    print("\n".join(by_kind), flush=True)
    tag = torch.cuda.get_device_name(device).lower().replace(" ", "_")
    (RESULTS_DIR / f"profile_{tag}.md").write_text("\n".join(lines + by_kind))


if __name__ == "__main__":
    main()
