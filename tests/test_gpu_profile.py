"""scripts/gpu_profile.py's accounting, which needs no GPU: kernel names sorted into kinds of work, and the
Amdahl ceiling on what the integer kernels can win over an FP16 forward that shares the scan."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import kernels
from scripts.gpu_profile import OTHER, ceiling_lines, kind_of, kind_table, speedup_ceiling, time_by_kind


def test_every_triton_kernel_of_ours_has_a_kind():
    """A kernel added without a kind would fall into OTHER and skew the breakdown silently."""
    names = [name for info in pkgutil.iter_modules(kernels.__path__)
             for name in vars(importlib.import_module(f"kernels.{info.name}"))
             if name.startswith("_") and name.endswith("_kernel")]
    assert len(names) >= 10
    assert {name: kind_of(name) for name in names if kind_of(name) == OTHER} == {}


@pytest.mark.parametrize(("kernel", "kind"), [
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "GEMM"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "GEMM"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_f16_s161616gemm_f16_16x16_128x2_tn_align8>", "GEMM"),
    ("void splitKreduce_kernel<32, 16, int, float, __half>", "GEMM"),
    ("_merge_detect_quant_kernel", "detection + quantization"),
    ("_selective_scan_backward_kernel", "scan"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy>>",
     OTHER),
])
def test_library_kernels_sort_by_name(kernel: str, kind: str):
    assert kind_of(kernel) == kind


def test_time_by_kind_sums_each_kind_and_keeps_every_microsecond():
    kinds = time_by_kind({"_mixed_gemm_kernel": 100.0, "nvjet_tst": 50.0, "_conv_silu_kernel": 7.0, "memcpy": 3.0})
    assert kinds["GEMM"] == 150.0 and kinds["float producers"] == 7.0 and kinds[OTHER] == 3.0
    assert sum(kinds.values()) == 160.0


def test_the_ceiling_is_amdahls_law_on_the_fused_forwards_gemms():
    """With the H100 profile's numbers (results/profile_nvidia_h100_80gb_hbm3.md: cuBLAS linears 11.18 ms, the scan
    9.55 ms, conv + SiLU 1.52 ms at Vim-B batch 64) the best case is (11.18 + 11.07) / (5.59 + 11.07)."""
    fused = time_by_kind({"nvjet": 11180.0, "_selective_scan_kernel": 9550.0, "_conv_silu_kernel": 1520.0})
    assert speedup_ceiling(sum(fused.values()), fused) == pytest.approx(22250 / 16660, rel=1e-6)
    assert speedup_ceiling(sum(fused.values()), fused, gemm_speedup=1.0) == pytest.approx(1.0)
    # against a slower baseline the same floor gives more, and no GEMM speed-up lifts it past total / rest
    assert speedup_ceiling(51800.0, fused) == pytest.approx(51800 / 16660, rel=1e-6)
    assert speedup_ceiling(sum(fused.values()), fused, gemm_speedup=1e9) < 22250 / 11070 + 1e-6


def test_the_report_shows_each_kinds_share_and_both_ceilings():
    by_variant = {"fp16": time_by_kind({"nvjet": 30.0, "elementwise": 70.0}),
                  "fp16 fused": time_by_kind({"nvjet": 30.0, "_selective_scan_kernel": 30.0}),
                  "W4A4O8": time_by_kind({"_mixed_gemm_kernel": 20.0, "_selective_scan_kernel": 30.0,
                                          "_detect_quant_kernel": 30.0})}
    table = kind_table(by_variant).splitlines()
    assert table[0].count("ms | share") == 3 and len(table) == 2 + len(by_variant["fp16"])
    assert "| GEMM | 0.03 | 30% | 0.03 | 50% | 0.02 | 25% |" in table
    fp16_line, fused_line = ceiling_lines(by_variant)
    assert "against fp16: 1.25× in GPU kernel time; at most 2.22×" in fp16_line  # 100 / 80, 100 / 45
    assert "against fp16 fused: 0.75× in GPU kernel time; at most 1.33×" in fused_line  # 60 / 80, 60 / 45
