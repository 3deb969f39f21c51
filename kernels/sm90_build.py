"""Build the kernels for Hopper (sm_90) on any machine, no GPU needed, and report what the compiler did.

    python -m kernels.sm90_build          # every configuration the launchers pick at Vim's shapes (minutes)
    python -m kernels.sm90_build --quick  # the heaviest ones (what tests/test_kernels.py runs)

The interpreter runs the kernels' arithmetic but not their lowering: a layout the GPU compiler rejects, a
register spill or a loop that lost its software pipelining only shows on a real build. Triton compiles to a
cubin here (ptxas ships with the triton wheel); ``cuobjdump`` reads registers and stack from it. Must run with
TRITON_INTERPRET unset (the kernels must be JIT functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import conv_silu as cs
from kernels import detect_fake_quant as dfq
from kernels import detect_quant as dq
from kernels import merge_detect_quant as md
from kernels import mixed_gemm as mg
from kernels import norm_detect_quant as nd
from kernels import selective_scan as ss

HOPPER = GPUTarget("cuda", 90, 32)
VARIANTS = {"W8A8": (False, False, False), "W8A8O8": (False, False, True), "W4A4": (True, True, False),
            "W4A4O8": (True, True, True), "W4A8O8": (False, True, True)}


class BuildReport(NamedTuple):
    registers: int
    stack_bytes: int  # > 0: spills to local memory
    shared_bytes: int
    async_copies: int  # cp.async groups in the pipelined loop (0: loads are not pipelined)
    wgmma: bool
    barriers: int  # bar.sync in the PTX: the synchronisation points a reduction costs (detection, scan backward)
    loop_instructions: int  # SASS instructions in the longest loop (a backward branch's span): one iteration's issue


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def build(kernel: triton.JITFunction, types: dict[str, str], constants: dict[str, object], divisible: set[str],
          num_warps: int, num_stages: int = 3, **options: object) -> BuildReport:
    """Compile ``kernel`` for sm_90. ``types``: Triton types of the pointer/float arguments (others are i32);
    ``divisible``: integer arguments the JIT would see as multiples of 16 (pointers always are)."""
    if not isinstance(kernel, triton.JITFunction):
        raise RuntimeError("kernels are interpreted (TRITON_INTERPRET=1): run this module without it")
    signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if types.get(name, "").startswith("*") or name in divisible}
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=HOPPER,
                              options={"num_warps": num_warps, "num_stages": num_stages, **options})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    registers, stack = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    ttgir = compiled.asm["ttgir"]
    return BuildReport(registers, stack, compiled.metadata.shared, ttgir.count("async_copy_global_to_local"),
                       "warp_group_dot" in ttgir, compiled.asm["ptx"].count("bar.sync"), _longest_loop(sass))


def _longest_loop(sass: str) -> int:
    """Instructions between a backward branch and its target, the longest such span (0 without a loop)."""
    addresses = [int(a, 16) for a in re.findall(r"/\*([0-9a-f]{4,})\*/\s+[@A-Z]", sass)]
    spans = [(int(a, 16), int(t, 16)) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+"
                                                             r"(?:!?U?P\w+,\s*)?0x([0-9a-f]+)", sass)]
    return max((sum(target <= a <= branch for a in addresses) for branch, target in spans if target < branch),
               default=0)


def build_gemm(variant: str, m: int, n: int, k: int, gathered: bool = False,
               blocks: tuple[int, int, int, int, int] | None = None) -> BuildReport:
    """The mixed GEMM as ``mixed_gemm`` launches it for an (M, K) × (N, K)ᵀ problem, fp16 output; ``gathered``:
    the outlier dot over ``compact_outliers``' lists; ``blocks`` in place of ``_blocks``' rule (a tuner
    candidate)."""
    a_packed, w_packed, outliers = VARIANTS[variant]
    block_m, block_n, block_k, warps, stages = blocks or mg._blocks(m, n, k)
    types = {"a_ptr": "*u8" if a_packed else "*i8", "w_ptr": "*u8" if w_packed else "*i8", "o_ptr": "*i8",
             "a_scale_ptr": "*fp32", "o_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "bias_ptr": "*fp32",
             "y_ptr": "*fp16", "wt_ptr": "*i8", "channels_ptr": "*i32", "counts_ptr": "*i32", "compact_ptr": "*i8"}
    constants = {"A_PACKED": a_packed, "W_PACKED": w_packed, "HAS_OUTLIERS": outliers, "GATHERED": gathered,
                 "HAS_BIAS": False, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                 "GATHER_K": mg.GATHER_K, "GROUP_M": 8,
                 "stride_ak": 1, "stride_ok": 1, "stride_wk": 1, "stride_yn": 1}  # unit strides: the JIT's view
    row_strides = {"stride_am": k // 2 if a_packed else k, "stride_om": k, "stride_wn": k // 2 if w_packed else k,
                   "stride_ym": n, "M": m, "N": n, "K": k}
    divisible = {name for name, value in row_strides.items() if value % 16 == 0}
    return build(mg._mixed_gemm_kernel, types, constants, divisible, warps, stages)


def build_compact_outliers(k: int, block_m: int) -> BuildReport:
    """compact_outliers for contiguous (M, K) int8 outlier codes."""
    types = {"o_ptr": "*i8", "channels_ptr": "*i32", "counts_ptr": "*i32", "compact_ptr": "*i8"}
    constants = {"BLOCK_M": block_m, "CHUNK": mg.compact_chunk(k), "stride_ok": 1}
    divisible = {"stride_om", "K"} if k % 16 == 0 else set()
    return build(mg._compact_outliers_kernel, types, constants, divisible, 8)


DETECT_OUTPUTS = {"static_scale_ptr": "*fp32", "inlier_ptr": "*i8", "packed_ptr": "*u8", "mask_ptr": "*u8",
                  "outlier_ptr": "*i8", "outlier_scale_ptr": "*fp32", "inlier_scale_ptr": "*fp32", "k": "fp32"}


def _build_detect_family(kernel: triton.JITFunction, channels: int, bits: int, types: dict[str, str],
                         constants: dict[str, object], divisible: set[str], lean: bool = True,
                         warps: int | None = None, rows: int = 1) -> BuildReport:
    """A kernel built on ``detect_quant_rows`` as ``launch_detect_quant`` launches it for C channels; ``lean``
    (the packed model's calls) by default, at ``launch_block``'s warps unless ``warps`` is given, ``rows`` steps
    a round."""
    block, default_warps = dq.launch_block(channels)
    warps = warps or default_warps
    constants = {"INLIER_QMAX": dq.inlier_qmax(bits), "PACK": bits == 4 and not lean, "BLOCK_C": block,
                 "STORE_MASK": not lean, "ROWS": rows, **constants}
    divisible = divisible | ({"channels"} if channels % 16 == 0 else set())
    return build(kernel, {**DETECT_OUTPUTS, **types}, constants, divisible, warps, enable_fp_fusion=False,
                 **dq.register_cap(warps, rows, dq.REGISTER_CAP if lean else dq.WIDE_REGISTER_CAP))


def build_detect(channels: int, bits: int, lean: bool = True, warps: int | None = None,
                 rows: int = 1) -> BuildReport:
    """detect_quant for contiguous fp16 input with C channels."""
    divisible = {"stride_xb", "stride_xt"} if channels % 16 == 0 else set()
    return _build_detect_family(dq._detect_quant_kernel, channels, bits, {"x_ptr": "*fp16"}, {"stride_xc": 1},
                                divisible, lean, warps, rows)


def build_norm_detect(channels: int, bits: int, dtype: str, residual: bool = True, rows: int = 1,
                      warps: int | None = None) -> BuildReport:
    """norm_detect_quant at a block's entry (C = embed dim): ``dtype`` hidden and norm weight (as ``model.half()``
    holds it), fp32 residual in and out, all contiguous."""
    types = {"hidden_ptr": f"*{dtype}", "residual_ptr": "*fp32", "weight_ptr": f"*{dtype}",
             "residual_out_ptr": "*fp32", "eps": "fp32"}
    constants = {"HAS_RESIDUAL": residual, "stride_hc": 1, "stride_rc": 1, "stride_oc": 1}
    divisible = {"stride_hb", "stride_ht", "stride_rb", "stride_rt", "stride_ob", "stride_ot"} \
        if channels % 16 == 0 else set()
    return _build_detect_family(nd._norm_detect_quant_kernel, channels, bits, types, constants, divisible,
                                warps=warps, rows=rows)


def build_merge_detect(channels: int, bits: int, dtype: str, rows: int = 1, warps: int | None = None) -> BuildReport:
    """merge_detect_quant at out_proj's input (C = E) on two contiguous ``dtype`` branch outputs."""
    types = {"forward_ptr": f"*{dtype}", "backward_ptr": f"*{dtype}"}
    divisible = {"stride_fb", "stride_ft", "stride_bb", "stride_bt"} if channels % 16 == 0 else set()
    return _build_detect_family(md._merge_detect_quant_kernel, channels, bits, types,
                                {"stride_fc": 1, "stride_bc": 1}, divisible, warps=warps, rows=rows)


def build_add_rms_norm(channels: int, dtype: str) -> BuildReport:
    """add_rms_norm (a float Vim's block entry) on contiguous ``dtype`` hidden, fp32 residual in and out."""
    block, rows, warps = nd._norm_launch(channels)
    types = {"hidden_ptr": f"*{dtype}", "residual_ptr": "*fp32", "weight_ptr": f"*{dtype}",
             "residual_out_ptr": "*fp32", "out_ptr": f"*{dtype}", "eps": "fp32"}
    constants = {"HAS_RESIDUAL": True, "BLOCK_C": block, "ROWS": rows, "stride_hc": 1, "stride_rc": 1,
                 "stride_oc": 1, "stride_xc": 1}
    divisible = {"channels", "stride_hb", "stride_ht", "stride_rb", "stride_rt", "stride_ob", "stride_ot",
                 "stride_xb", "stride_xt"} if channels % 16 == 0 else set()
    return build(nd._add_rms_norm_kernel, types, constants, divisible, warps, enable_fp_fusion=False)


def build_merge_directions(channels: int, dtype: str) -> BuildReport:
    """merge_directions (a float Vim's merge) on two contiguous ``dtype`` branch outputs."""
    rows, block = md.MERGE_BLOCK
    types = {"forward_ptr": f"*{dtype}", "backward_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
    constants = {"BLOCK_C": block, "ROWS": rows, "stride_fc": 1, "stride_bc": 1, "stride_oc": 1}
    divisible = {"channels", "stride_fb", "stride_ft", "stride_bb", "stride_bt", "stride_ob", "stride_ot"} \
        if channels % 16 == 0 else set()
    return build(md._merge_directions_kernel, types, constants, divisible, 4)


def build_conv_silu(channels: int, dtype: str, reverse: bool) -> BuildReport:
    """conv_silu on the model's x (half of in_proj's output, time stride 2E), weight (E, 1, 4) and bias in x's
    dtype (as ``model.half()`` holds them), contiguous output."""
    block_t, block_e, warps = cs.launch_config(channels)
    types = {"x_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "y_ptr": f"*{dtype}"}
    constants = {"WIDTH": 4, "REVERSE": reverse, "BLOCK_T": block_t, "BLOCK_E": block_e, "stride_xc": 1,
                 "stride_w_tap": 1, "stride_yc": 1}
    divisible = {"channels", "stride_xb", "stride_xt", "stride_yb", "stride_yt"} if channels % 16 == 0 else set()
    return build(cs._conv_silu_kernel, types, constants, divisible, warps)


def build_scan(dtype: str, warps: int, int8_inputs: bool = False, channel_first_u: bool = False,
               delta_bias: bool = False, store_states: bool = False) -> BuildReport:
    """The selective scan as Vim calls it (D, gate z, softplus; N = 16) with ``dtype`` inputs and output, at
    ``warps`` warps (BLOCK_E = 32 · warps); optionally u, B, C as int8 codes with scales, u as the channel-first
    view of the model's conv output (stride 1 along time), a delta bias, every h_t stored (training). B and C
    strides are not taken as multiples of 16 (Vim-T/S's projection rows are not)."""
    io = f"*{dtype}"
    codes = "*i8" if int8_inputs else io
    types = {"u_ptr": codes, "delta_ptr": io, "A_ptr": "*fp32", "B_ptr": codes, "C_ptr": codes, "D_ptr": "*fp32",
             "z_ptr": io, "delta_bias_ptr": "*fp32", "u_scale_ptr": "*fp32", "B_scale_ptr": "*fp32",
             "C_scale_ptr": "*fp32", "y_ptr": io, "states_ptr": "*fp32"}
    constants = {"HAS_D": True, "HAS_Z": True, "HAS_DELTA_BIAS": delta_bias, "DELTA_SOFTPLUS": True,
                 "U_SCALED": int8_inputs, "B_SCALED": int8_inputs, "C_SCALED": int8_inputs,
                 "STORE_STATES": store_states, "N_STATE": 16,
                 "BLOCK_E": 32 * warps, "BLOCK_N": 16, "stride_delta_channel": 1, "stride_z_channel": 1,
                 "stride_y_channel": 1, "stride_B_state": 1, "stride_C_state": 1,
                 **({"stride_u_time": 1} if channel_first_u else {"stride_u_channel": 1})}
    divisible = {"channels", "stride_delta_batch", "stride_delta_time", "stride_z_batch", "stride_z_time",
                 "stride_y_batch", "stride_y_time", "stride_u_batch",
                 "stride_u_channel" if channel_first_u else "stride_u_time"}
    return build(ss._selective_scan_kernel, types, constants, divisible, warps)


def build_scan_backward(dtype: str, warps: int, grad_states: bool = False) -> BuildReport:
    """The scan's backward as training calls it (D, gate z, softplus, N = 16, ``dtype`` inputs, u as the
    channel-first conv output); optionally a gradient on the returned states (OuroMamba-Gen)."""
    io = f"*{dtype}"
    types = {name: io for name in ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "grad_y_ptr")}
    types |= {name: "*fp32" for name in ("A_ptr", "D_ptr", "delta_bias_ptr", "states_ptr", "grad_states_ptr",
                                         "grad_u_ptr", "grad_delta_ptr", "grad_z_ptr", "grad_B_ptr", "grad_C_ptr",
                                         "grad_A_ptr", "grad_D_ptr", "grad_delta_bias_ptr")}
    constants = {"HAS_D": True, "HAS_Z": True, "HAS_DELTA_BIAS": False, "DELTA_SOFTPLUS": True,
                 "HAS_GRAD_STATES": grad_states, "N_STATE": 16, "BLOCK_E": 32 * warps, "BLOCK_N": 16,
                 "stride_u_time": 1, "stride_delta_channel": 1, "stride_z_channel": 1, "stride_gy_channel": 1,
                 "stride_B_state": 1, "stride_C_state": 1}
    divisible = {"channels", "stride_delta_batch", "stride_delta_time", "stride_z_batch", "stride_z_time",
                 "stride_gy_batch", "stride_gy_time", "stride_u_batch", "stride_u_channel"}
    return build(ss._selective_scan_backward_kernel, types, constants, divisible, warps)


def vim_gemm_shapes(d_models: tuple[int, ...] = (192, 384, 768),
                    batches: tuple[int, ...] = (1, 16, 64)) -> list[tuple[int, int, int]]:
    """(M, N, K) of in_proj, x_proj, dt_proj, out_proj of Vim (D = 192/384/768 for T/S/B), 197 tokens."""
    shapes = []
    for d_model in d_models:
        inner, rank = 2 * d_model, math.ceil(d_model / 16)
        for batch in batches:
            m = 197 * batch
            shapes += [(m, 2 * inner, d_model), (m, rank + 32, inner), (m, inner, rank), (m, d_model, inner)]
    return shapes


def build_detect_fake_quant(channels: int, asymmetric: bool, dtype: str, rows: int | None = None,
                            warps: int | None = None) -> BuildReport:
    """detect_fake_quant as the packed model launches it: Δ (C = E, asymmetric 4-bit, 8-bit outliers) or B/C
    (C = 16, symmetric) as strided ``dtype`` views, in rounds of ``window_rows`` steps (n_refresh 10) unless
    ``rows`` is given, at ``launch_block``'s warps unless ``warps`` is."""
    block, default_warps = dq.launch_block(channels)
    warps = warps or default_warps
    types = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "scale_ptr": "*fp32", "zero_ptr": "*fp32", "k": "fp32"}
    rows = rows or dq.window_rows(channels, 10)
    constants = {"LEVELS": 15 if asymmetric else 7, "OUTLIER_LEVELS": 255 if asymmetric else 127,
                 "ASYMMETRIC": asymmetric, "BLOCK_C": block, "stride_xc": 1, "ROWS": rows}
    divisible = {"channels"} if channels % 16 == 0 else set()
    return build(dfq._detect_fake_quant_kernel, types, constants, divisible, warps, enable_fp_fusion=False,
                 **dq.register_cap(warps, rows, dq.WIDE_REGISTER_CAP))


def tuned_launch_builds(quick: bool) -> list[tuple[tuple, BuildReport]]:
    """Every launch ``kernels.tuning`` may time in the packed model (``detect_launches`` of each detection call,
    with the rows the model asks for: ``core.quant.packed.detection_rows``) beyond the fixed rules built above,
    at Vim-T/S/B's shapes; ``quick``: Vim-B's, each call's last candidate only (fewest warps: most registers)."""
    builds = []
    for d_model in (768,) if quick else (192, 384, 768):
        inner, rank = 2 * d_model, math.ceil(d_model / 16)
        calls = [("detect", inner, 1), ("detect", rank, dq.window_rows(rank, 10)),
                 ("fake", inner, dq.window_rows(inner, 10)), ("fake", 16, dq.window_rows(16, 10)),
                 ("norm", d_model, 1), ("merge", inner, 1)]
        for name, channels, rows in calls:
            rule = dq.detect_launches(channels, 10, rows)[0]
            for warps, candidate_rows in dq.detect_launches(channels, 10, rows)[-1 if quick else 1:]:
                if name == "detect":
                    report = build_detect(channels, 4, warps=warps, rows=candidate_rows)
                elif name == "fake":
                    report = build_detect_fake_quant(channels, channels > 16, "fp16", candidate_rows, warps)
                elif name == "norm":
                    report = build_norm_detect(channels, 4, "fp16", rows=candidate_rows, warps=warps)
                else:
                    report = build_merge_detect(channels, 4, "fp16", candidate_rows, warps)
                builds.append(((name, channels, f"(rule {rule})", warps, candidate_rows), report))
    return builds


def main() -> int:
    """One line per distinct build; exit status 1 if any spills, a GEMM misses wgmma or the scan uses shared
    memory."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true",
                        help="only the outlier variants, Vim-T/B at batch 1, 64; the heaviest of each other kernel")
    args = parser.parse_args()
    variants = ("W8A8O8", "W4A4O8") if args.quick else tuple(VARIANTS)
    shapes = vim_gemm_shapes((192, 768), (1, 64)) if args.quick else vim_gemm_shapes()
    seen: dict[tuple, BuildReport] = {}
    for variant in variants:
        for m, n, k in shapes:
            blocks = mg._blocks(m, n, k)
            key = ("gemm", variant, blocks, m % 16 == 0, n % 16 == 0, k % 16 == 0, k % 32 == 0)
            if key not in seen:
                seen[key] = build_gemm(variant, m, n, k)
                print(f"mixed_gemm {variant:<7} e.g. M={m} N={n} K={k} blocks {blocks}: {seen[key]}", flush=True)
    # the packed model's GEMM (int8 operands) with gathered outliers, and the compaction in front of it
    for m, n, k in (shape for shape in shapes if shape[2] >= mg.GATHER_MIN_K):
        blocks = mg._blocks(m, n, k)
        key = ("gemm", "W8A8O8 gathered", blocks, m % 16 == 0, n % 16 == 0, k % 16 == 0, k % 32 == 0)
        if key not in seen:
            seen[key] = build_gemm("W8A8O8", m, n, k, gathered=True)
            print(f"mixed_gemm W8A8O8 gathered outliers e.g. M={m} N={n} K={k} blocks {blocks}: {seen[key]}",
                  flush=True)
        key = ("compact", blocks[0], k % 16 == 0, mg.compact_chunk(k))
        if key not in seen:
            seen[key] = build_compact_outliers(k, blocks[0])
            print(f"compact_outliers K={k} BLOCK_M={blocks[0]}: {seen[key]}", flush=True)
    for channels in (1536,) if args.quick else (12, 24, 48, 192, 384, 768, 1536):
        for bits in (4, 8):
            seen[("detect", channels, bits)] = report = build_detect(channels, bits)
            print(f"detect_quant C={channels} {bits}-bit (lean, the packed model's): {report}", flush=True)
    for channels in (48,) if args.quick else (12, 24, 48):  # dt_proj's input: the packed model's rounds (window_rows)
        rows = dq.window_rows(channels, 10)
        seen[("detect", channels, 4, "rows", rows)] = report = build_detect(channels, 4, rows=rows)
        print(f"detect_quant C={channels} 4-bit lean in rounds of {rows} steps: {report}", flush=True)
    for rows in (2,) if args.quick else (2, 4):  # what bench_kernels compares with step by step at C = E
        seen[("detect", 1536, 4, "rows", rows)] = report = build_detect(1536, 4, rows=rows)
        print(f"detect_quant C=1536 4-bit lean in rounds of {rows} steps: {report}", flush=True)
    seen[("detect", 1536, 4, "full")] = report = build_detect(1536, 4, lean=False)
    print(f"detect_quant C=1536 4-bit, every output: {report}", flush=True)
    for warps in () if args.quick else (2, 4):  # what bench_kernels compares with launch_block's 8 (1 spills)
        seen[("detect", 1536, 4, warps)] = report = build_detect(1536, 4, warps=warps)
        print(f"detect_quant C=1536 4-bit lean at {warps} warps: {report}", flush=True)
    # (input dtype, warps, int8 u/B/C, channel-first u, delta bias): every launch_config choice for Vim's
    # calls, the int8 variant, the model's u layout, and everything on at once (the most registers)
    scans = [("fp16", 4, True, False, False), ("fp32", 1, True, True, True)] if args.quick else \
        [(dtype, warps, False, False, False) for dtype in ("fp32", "fp16", "bf16") for warps in (1, 2, 4)] \
        + [("fp16", warps, True, False, False) for warps in (1, 2, 4)] \
        + [("fp32", 4, False, True, False), ("fp32", 1, True, True, True)]
    for dtype, warps, int8_inputs, channel_first_u, delta_bias in scans:
        key = ("scan", dtype, warps, int8_inputs, channel_first_u, delta_bias)
        seen[key] = report = build_scan(dtype, warps, int8_inputs, channel_first_u, delta_bias)
        print(f"selective_scan {dtype} {warps} warps{' int8 u/B/C' if int8_inputs else ''}"
              f"{' channel-first u' if channel_first_u else ''}{' delta bias' if delta_bias else ''}: {report}",
              flush=True)
    # training: the forward keeping every h_t, and the backward (with a loss on the states: OuroMamba-Gen)
    for dtype, warps, grad_states in [("fp32", 4, True)] if args.quick else \
            [(dtype, warps, grad_states) for dtype in ("fp32", "bf16") for warps in (1, 4)
             for grad_states in (False, True)]:
        seen[("scan", dtype, warps, "states")] = report = build_scan(dtype, warps, channel_first_u=True,
                                                                     store_states=True)
        print(f"selective_scan {dtype} {warps} warps storing states: {report}", flush=True)
        seen[("scan_backward", dtype, warps, grad_states)] = report = build_scan_backward(dtype, warps, grad_states)
        print(f"selective_scan backward {dtype} {warps} warps{' grad states' if grad_states else ''}: {report}",
              flush=True)
    # the fused producers at Vim's shapes: the block entry at C = D, the merge at C = E, conv at E (one block
    # shape for every E ≥ 128, so the dtypes and directions are what differ)
    fused = [("norm", 768, 4, "fp16", True), ("merge", 1536, 4, "fp16"), ("conv", 1536, "fp16", True)] \
        if args.quick else \
        [("norm", channels, bits, dtype, True) for channels in (192, 384, 768) for bits in (4, 8)
         for dtype in ("fp16", "fp32")] + [("norm", 768, 4, "fp16", False), ("norm", 768, 4, "bf16", True)] \
        + [("merge", channels, bits, "fp16") for channels in (384, 768, 1536) for bits in (4, 8)] \
        + [("merge", 1536, 4, "fp32"), ("merge", 1536, 4, "bf16")] \
        + [("conv", 1536, dtype, reverse) for dtype in ("fp32", "fp16", "bf16") for reverse in (False, True)]
    fused += [("fake", 1536, True, "fp16"), ("fake", 16, False, "fp16"), ("norm", 768, 4, "fp16", True, 2),
              ("merge", 1536, 4, "fp16", 2)] if args.quick else \
        [("fake", channels, True, dtype) for channels in (384, 768, 1536) for dtype in ("fp16", "fp32", "bf16")] \
        + [("fake", 16, False, dtype) for dtype in ("fp16", "fp32", "bf16")] + [("fake", 1536, True, "fp16", 1)] \
        + [("norm", 768, 4, "fp16", True, rows) for rows in (2, 4)] + [("merge", 1536, 4, "fp16", rows)
                                                                       for rows in (2, 4)]
    # the float model's block entry and merge (core.models.fused), fp16 as FusedVim runs on the GPU
    fused += [("add_rms_norm", channels, "fp16") for channels in ((768,) if args.quick else (192, 384, 768))] \
        + [("merge_directions", 1536, "fp16")]
    builders = {"norm": build_norm_detect, "merge": build_merge_detect, "conv": build_conv_silu,
                "fake": build_detect_fake_quant, "add_rms_norm": build_add_rms_norm,
                "merge_directions": build_merge_directions}
    for key in fused:
        seen[key] = report = builders[key[0]](*key[1:])
        print(f"{key[0]} {' '.join(map(str, key[1:]))}: {report}", flush=True)
    # the tuner's other GEMM tiles, as the packed model multiplies (int8 operands, outliers gathered from K = 256);
    # quick: at the target shapes only (Vim-B, batch 64)
    for m, n, k in vim_gemm_shapes((768,), (64,)) if args.quick else shapes:
        for blocks in mg.gemm_launches(m, n, k)[1:]:
            gathered = k >= mg.GATHER_MIN_K
            key = ("gemm", "W8A8O8 tuner candidate", blocks, gathered, m % 16 == 0, n % 16 == 0, k % 16 == 0,
                   k % 32 == 0)
            if key not in seen:
                seen[key] = build_gemm("W8A8O8", m, n, k, gathered, blocks)
                print(f"mixed_gemm W8A8O8{' gathered' if gathered else ''} tuner candidate e.g. M={m} N={n} K={k} "
                      f"blocks {blocks}: {seen[key]}", flush=True)
    for key, report in tuned_launch_builds(args.quick):
        seen[key] = report
        print(f"{key[0]} {' '.join(map(str, key[1:-2]))} tuner candidate {key[-2]} warps, {key[-1]} rows: {report}",
              flush=True)
    # the scan needs no shared memory: any there is a layout conversion inside its loop (see kernels/README.md)
    bad = [key for key, report in seen.items() if report.stack_bytes
           or (key[0] == "scan" and report.shared_bytes) or (key[0] == "gemm" and not report.wgmma)]
    print(f"{len(seen)} builds, {len(bad)} with spills, without wgmma (GEMMs) or with shared memory (scan)"
          + "".join(f"\n  {key}" for key in bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
