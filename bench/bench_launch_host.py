"""Host (Python) cost of one launcher call with the Triton launch itself stubbed out: what an eager forward waits
on besides Triton's own launch path, per kernel call (a packed Vim-B forward makes ~600 such calls).

    python bench/bench_launch_host.py    # µs per call, best of 7 rounds of 300 calls; any machine, no GPU

Vim-B-sized arguments at batch 2 (the sizes do not matter: nothing runs). Writes results/launch_host_cpu.{csv,md}.
Compare two checkouts by running it in each, alternately, on an otherwise idle machine.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_parser, machine_header, regenerate_command, run, write_results  # noqa: E402
from kernels import conv_silu as conv_module  # noqa: E402
from kernels import detect_fake_quant as fake_quant_module  # noqa: E402
from kernels import detect_quant as detect_module  # noqa: E402
from kernels import merge_detect_quant as merge_module  # noqa: E402
from kernels import mixed_gemm as gemm_module  # noqa: E402
from kernels import norm_detect_quant as norm_module  # noqa: E402
from kernels import selective_scan as scan_module  # noqa: E402


class StubKernel:
    """Stands in for a JIT kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid: tuple) -> object:
        return lambda *args, **kwargs: None


KERNELS = ((detect_module, "_detect_quant_kernel"), (fake_quant_module, "_detect_fake_quant_kernel"),
           (gemm_module, "_mixed_gemm_kernel"), (gemm_module, "_compact_outliers_kernel"),
           (scan_module, "_selective_scan_kernel"), (conv_module, "_conv_silu_kernel"),
           (norm_module, "_norm_detect_quant_kernel"), (merge_module, "_merge_detect_quant_kernel"),
           (norm_module, "_add_rms_norm_kernel"), (merge_module, "_merge_directions_kernel"))


@contextmanager
def stubbed_kernels() -> Iterator[None]:
    """Every kernel the launchers below call replaced by a ``StubKernel``, and put back afterwards."""
    originals = [getattr(module, name) for module, name in KERNELS]
    try:
        for module, name in KERNELS:
            setattr(module, name, StubKernel())
        yield
    finally:
        for (module, name), kernel in zip(KERNELS, originals, strict=True):
            setattr(module, name, kernel)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = bench_parser("bench_launch_host.py", "host time per call of each kernel launcher, the launch stubbed")
    args = parser.parse_args(argv)
    with stubbed_kernels():
        rows = time_launchers()
    header = machine_header(torch.device("cpu"))
    header["note"] = ("calls without out= allocate their outputs with the CPU allocator here (~13 µs per buffer on "
                      "this machine); on CUDA the caching allocator's are cheaper, so those rows overstate the GPU "
                      "host's cost")
    write_results("launch_host_cpu", rows, header, regenerate_command("bench_launch_host.py", argv), args.out)
    return rows


def time_launchers() -> list[dict]:
    """µs per call of each launcher (best of 7 rounds of 300 calls), kernels stubbed by the caller."""
    x, scale = torch.randn(2, 197, 1536, dtype=torch.float16), torch.rand(197)
    hidden, residual = torch.randn(2, 197, 768, dtype=torch.float16), torch.randn(2, 197, 768)
    A, D, B = -torch.rand(1536, 16), torch.rand(1536), torch.randn(2, 197, 16, dtype=torch.float16)
    conv_weight, conv_bias = torch.randn(1536, 1, 4, dtype=torch.float16), torch.randn(1536, dtype=torch.float16)
    codes_out = detect_module.empty_output(x, 4, lean=True)
    codes, weight = torch.zeros(2 * 197, 1536, dtype=torch.int8), torch.zeros(768, 1536, dtype=torch.int8)
    row_scale, weight_scale = torch.rand(2 * 197), torch.rand(768)
    y = torch.empty(2 * 197, 768, dtype=torch.float16)
    calls = {
        "detect_quant (lean, out=)": lambda: detect_module.detect_quant(x, scale, 3.0, 10, 4, out=codes_out,
                                                                        lean=True),
        "detect_quant (lean, as the packed model calls it)": lambda: detect_module.detect_quant(
            x, scale, 3.0, 10, 4, lean=True, tune=True),
        "detect_fake_quant (rounds of 2)": lambda: fake_quant_module.detect_fake_quant(x, scale, scale, 3.0, 10, 15,
                                                                                       255, 2),
        "mixed_gemm (dense outliers, out=)": lambda: gemm_module.mixed_gemm(codes, row_scale, weight, weight_scale,
                                                                            codes, row_scale, out=y),
        "norm_detect_quant (lean)": lambda: norm_module.norm_detect_quant(
            hidden, residual, torch.ones(768, dtype=torch.float16), 1e-5, scale, 3.0, 10, 4, lean=True, tune=True),
        "merge_detect_quant (lean)": lambda: merge_module.merge_detect_quant(x, x, scale, 3.0, 10, 4, lean=True,
                                                                             tune=True),
        "add_rms_norm (the float model's block entry)": lambda: norm_module.add_rms_norm(
            hidden, residual, torch.ones(768, dtype=torch.float16), 1e-5),
        "merge_directions (the float model's merge)": lambda: merge_module.merge_directions(x, x),
        "conv_silu (reversed)": lambda: conv_module.conv_silu(x, conv_weight, conv_bias, reverse=True),
        "selective_scan (fp16, D, z reversed)": lambda: scan_module.selective_scan(x, x, A, B, B, D, x,
                                                                                   delta_softplus=True,
                                                                                   z_reversed=True),
    }
    rows = []
    for name, call in calls.items():
        best = float("inf")
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(300):
                call()
            best = min(best, (time.perf_counter() - start) / 300)
        rows.append({"launcher call": name, "host_us": round(best * 1e6, 1), "hardware": "CPU (host side only)"})
    return rows


if __name__ == "__main__":
    run(main)
