"""Kernel benchmark on a CUDA GPU: the mixed-precision GEMM, outlier detection and the selective scan at Vim's
layer shapes.

    python bench/bench_kernels.py [--quick] [--only gemm detect scan train fusion]

Per layer GEMM (in_proj D→2E, x_proj E→R+2N, dt_proj R→E, out_proj E→D; D = 192/384/768, E = 2D, N = 16,
R = ceil(D/16)) at tokens = batch × 197 for batch 1, 16, 64: cuBLAS fp16 (``F.linear``) against our W8A8,
W4A4 (no outlier path) and W4A4O8 with 1 %, 5 %, 10 % outlier channels, all with fp16 output; as the packed
model runs it (4-bit values in int8) with outliers on fixed channels, the dense outlier dot against the gathered
one (``mixed_gemm(outlier_weight_t=…)``, compaction included), and gathered with outliers anywhere; W4A4O8 also
with ``detect_quant`` in front (fp16 activations in, ~5 % planted outliers); and ``detect_quant`` alone on
every layer input (batch, 197, C), step by step against rounds over the window (``rows_per_round``), on outliers
that move (the set grows every step) and on fixed channels (it grows once a window), with Δ's
``detect_fake_quant`` at C = E the same way. The selective scan (E = 2D, L = 197, N = 16, with D and the gate z) in fp16
and fp32: our Triton kernel at each (BLOCK_E, warps) configuration (``launch_config``'s choice marked), on u as
the model's channel-first view, and with int8 u/B/C codes (fp16 rows), against PyTorch's fast scan
(``core.ssm.scan.selective_scan_fast``, the path the model takes without a kernel) and mamba-ssm's CUDA scan
when it imports (timed on its own channel-first contiguous layout); ``Gexp/s`` counts the exp(Δ·A) per second
(batch · L · E · N of them; the H100's MUFU does ~3.7 T/s). The scan under training (``train``): forward +
backward in fp32 and bf16, with and without a loss on the returned states (OuroMamba-Gen), our Triton pair against
the fast scan's hand-written backward and mamba-ssm's. The fused producers against the PyTorch they replace
(fp16 activations, 4-bit inliers): a block's entry, residual add + RMSNorm (the model's expression) then
``detect_quant``, against ``norm_detect_quant``; conv1d + SiLU (``F.conv1d`` as the model calls it, on the flipped
copy for the backward branch) against ``conv_silu``; out_proj's input (y_f + flip(y_b)) / 2 then ``detect_quant``
against ``merge_detect_quant``. Every kernel is checked against its reference at
the real shape before it is timed (the ``check`` column). Times are medians of ``triton.testing.do_bench``
(CUDA events, L2 flushed between calls; the method of the anchor table in docs/environment.md), in
microseconds. ``floor_us`` is the time to move the operation's fewest bytes at the copy bandwidth measured at
start.

Writes results/kernels_<gpu>[_<sections>][_quick].{csv,md}, the summary under the table, and prints it last.
"""

from __future__ import annotations

import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import bench_parser, machine_header, regenerate_command, write_results  # noqa: E402
from core.arguments import Distinct, positive  # noqa: E402
from core.ssm.scan import _mamba_ssm_scan, selective_scan_fast  # noqa: E402
from kernels import tuning  # noqa: E402
from kernels.conv_silu import conv_silu, conv_silu_reference  # noqa: E402
from kernels.detect_fake_quant import detect_fake_quant  # noqa: E402
from kernels.detect_quant import (  # noqa: E402
    DetectQuantOutput,
    detect_quant,
    detect_quant_reference,
    empty_output,
    inlier_qmax,
    launch_block,
    window_rows,
)
from kernels.merge_detect_quant import (  # noqa: E402
    merge_detect_quant,
    merge_detect_quant_reference,
    merge_directions,
)
from kernels.mixed_gemm import GATHER_MIN_K, gemm_launches, mixed_gemm, mixed_gemm_reference  # noqa: E402
from kernels.norm_detect_quant import (  # noqa: E402
    add_rms_norm,
    norm_detect_quant,
    norm_detect_quant_reference,
    rms_norm_reference,
)
from kernels.packing import pack_int4, unpack_int4  # noqa: E402
from kernels.selective_scan import launch_config, selective_scan, selective_scan_reference  # noqa: E402

MODELS = {"Vim-T": 192, "Vim-S": 384, "Vim-B": 768}
BATCHES = (1, 16, 64)
TOKENS = 197
D_STATE = 16
OUTLIER_PCTS = (1, 5, 10)
GEMM_TOLERANCE = 2e-3  # fp16 output: ‖y − y_ref‖/‖y_ref‖ of rounding alone is ~3e-4
SCAN_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}  # by output dtype, against float64
SCAN_CONFIGS = ((32, 1), (64, 2), (128, 4))  # (BLOCK_E, num_warps): every choice launch_config can make
DETECT_WARPS = (1, 2, 4, 8)  # detect_quant launches compared with launch_block's choice
NORM_EPS = 1e-5
CONV_WIDTH = 4


def layer_shapes(d_model: int) -> list[tuple[str, int, int]]:
    """(layer, K, N) of the four quantized linears of a Vim block."""
    inner, rank = 2 * d_model, math.ceil(d_model / 16)
    return [("in_proj", d_model, 2 * inner), ("x_proj", inner, rank + 2 * D_STATE), ("dt_proj", rank, inner),
            ("out_proj", inner, d_model)]


WARM_ONLY = False  # ``--warm-only``: every launch once, nothing timed (Triton's compile cache filled)


def median_us(fn: Callable[[], object]) -> float:
    if WARM_ONLY:
        fn()
        return math.nan
    return 1000 * do_bench(fn, warmup=10, rep=40, return_mode="median")


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (median_us(lambda: dst.copy_(src)) * 1e-6)


def gemm_operands(m: int, n: int, k: int, inlier_bits: int, weight_bits: int, outlier_pct: float,
                  device: torch.device, g: torch.Generator, packed: bool = True, fixed_channels: bool = False,
                  gathered: bool = False) -> dict:
    """Random codes (outlier channels zeroed in the inlier codes) and scales that dequantize to about ±1.
    Outliers on ``outlier_pct`` % of the entries, anywhere, or with ``fixed_channels`` on that share of the
    channels in every row (a model's persistent outlier channels). 4-bit codes packed, or with ``packed=False``
    as int8 (the packed model's operands); ``gathered`` adds the weight's int8 transpose (gathered outliers)."""
    qi, qw = inlier_qmax(inlier_bits), inlier_qmax(weight_bits)
    inlier = torch.randint(-qi, qi + 1, (m, k), generator=g, dtype=torch.int8, device=device)
    weight = torch.randint(-qw, qw + 1, (n, k), generator=g, dtype=torch.int8, device=device)
    ops = {"inlier_scale": (torch.rand(m, generator=g, device=device) + 0.05) / qi,
           "weight_scale": (torch.rand(n, generator=g, device=device) + 0.05) / qw}
    if outlier_pct:
        if fixed_channels:
            chosen = torch.zeros(m, k, dtype=torch.bool, device=device)
            picked = torch.randperm(k, generator=g, device=device)[:max(1, round(k * outlier_pct / 100))]
            chosen[:, picked] = True
        else:
            chosen = torch.rand(m, k, generator=g, device=device) < outlier_pct / 100
        codes = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8, device=device)
        inlier.masked_fill_(chosen, 0)
        ops["outlier_codes"] = codes.masked_fill(~chosen, 0)
        ops["outlier_scale"] = (torch.rand(m, generator=g, device=device) * 20 + 1) / 127
    ops["inlier_codes"] = pack_int4(inlier) if inlier_bits == 4 and packed else inlier
    ops["weight"] = pack_int4(weight) if weight_bits == 4 and packed else weight
    if gathered:
        ops["outlier_weight_t"] = weight.t().contiguous()
    return ops


def activations(batch: int, channels: int, outlier_pct: float, device: torch.device, g: torch.Generator,
                moving: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (batch, 197, C): U(−1, 1) inliers and ``outlier_pct`` % of the channels per token at ±30 … 40, moving
    every step (the outlier set grows at every step: rounds' worst case) or on fixed channels (it grows once a
    window, as Δ's, B's and C's seldom-growing sets do); and static scales that make every token with outliers
    trigger. Values sit far from every detection threshold, so the kernel and the reference (different summation
    orders) must agree exactly."""
    x = torch.rand(batch, TOKENS, channels, generator=g, device=device) * 2 - 1
    per_step = max(1, round(channels * outlier_pct / 100))
    steps = torch.arange(TOKENS, device=device)
    for j in range(per_step):
        start = torch.randint(0, channels, (batch, 1), generator=g, device=device)
        channel = (start + (3 if moving else 0) * steps + j * (channels // per_step)) % channels
        value = 30 + 10 * torch.rand(batch, TOKENS, generator=g, device=device)
        sign = torch.randint(0, 2, (batch, TOKENS), generator=g, device=device) * 2 - 1
        x.scatter_(2, channel[..., None], (value * sign)[..., None])
    return x.half(), torch.full((TOKENS,), 2.0 / inlier_qmax(4), device=device)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def check_gemm(ops: dict) -> str:
    y = mixed_gemm(**ops, out=torch.full((ops["inlier_scale"].numel(), ops["weight_scale"].numel()), float("nan"),
                                         dtype=torch.float16, device=ops["weight"].device))
    error = rel_error(y, mixed_gemm_reference(**{name: t for name, t in ops.items() if name != "outlier_weight_t"}))
    return f"ok {error:.1e}" if error < GEMM_TOLERANCE else f"FAIL {error:.1e}"


def poisoned_codes(x: torch.Tensor) -> tuple:
    """4-bit detect_quant outputs for x filled with values the kernel never writes."""
    out = empty_output(x, 4)
    for codes in (out.inlier_codes, out.outlier_codes):
        codes.fill_(-128)
    out.inlier_packed.fill_(0x88)
    out.outlier_mask.view(torch.uint8).fill_(0xFF)
    for scale in (out.inlier_scale, out.outlier_scale):
        scale.fill_(float("nan"))
    return out


def exact_check(got: tuple, want: tuple) -> str:
    """Every field equal, the mask byte for byte (an unwritten one holds 0xFF). References run on the CPU: CUDA
    PyTorch divides by a scalar as a multiplication by its reciprocal, which can move a scale by an ulp; the
    kernels divide correctly rounded, as the CPU does."""
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.cpu().view(torch.uint8) if t.dtype == torch.bool else t.cpu()

    bad = [name for name, a, b in zip(got._fields, got, want, strict=True) if not torch.equal(raw(a), raw(b))]
    if not bad:
        return "ok exact"
    rows = torch.zeros(want.outlier_mask.shape[:2], dtype=torch.bool)  # (batch, L): which steps differ anywhere
    for a, b in zip(got, want, strict=True):
        if a is not None:
            differs = raw(a) != raw(b)
            rows |= differs if differs.dim() == 2 else differs.flatten(2).any(-1)
    # a single detection flipped at a near-tie differs in one row and the rest of its window, nothing else
    return f"FAIL {'/'.join(bad)} in {int(rows.sum())} of {rows.numel()} rows"


def check_detect(x: torch.Tensor, scale: torch.Tensor) -> str:
    got = detect_quant(x, scale, 3.0, 10, 4, out=poisoned_codes(x))
    return exact_check(got, detect_quant_reference(x.cpu(), scale.cpu(), 3.0, 10, 4))


def gemm_bytes(m: int, n: int, k: int, variant: str) -> float:
    """Fewest bytes a variant must move: its operands once, the fp16 output once, the scales."""
    if variant == "fp16 cuBLAS":
        return 2 * (m * k + n * k + m * n)
    nibbles = "int8" not in variant
    inlier = m * k / 2 if variant.startswith("W4A4") and nibbles else m * k
    weight = n * k / 2 if variant.startswith("W4") and nibbles else n * k
    outlier = m * k if "O8" in variant else 0
    activation = 2 * m * k if "detect" in variant else 0  # the fp16 input of detect_quant
    return inlier + weight + outlier + activation + 2 * m * n + 4 * (2 * m + n)


def bench_gemms(device: torch.device, bandwidth: float, models: dict[str, int], batches: tuple[int, ...],
                g: torch.Generator) -> list[dict]:
    rows = []
    for model, d_model in models.items():
        for layer, k, n in layer_shapes(d_model):
            for batch in batches:
                if out_of_time(f"gemm {model} {layer} batch {batch}"):
                    continue
                m = batch * TOKENS
                shape = {"kind": "gemm", "model": model, "layer": layer, "batch": batch, "M": m, "K": k, "N": n}
                variants = {"W8A8": gemm_operands(m, n, k, 8, 8, 0, device, g),
                            "W4A4": gemm_operands(m, n, k, 4, 4, 0, device, g)}
                for pct in OUTLIER_PCTS:
                    variants[f"W4A4O8 {pct}%"] = gemm_operands(m, n, k, 4, 4, pct, device, g)
                    # the packed model's operands (int8), outliers on fixed channels: dense vs gathered dot
                    for gathered in (False, True):
                        variants[f"W4A4O8 {pct}% fixed ch, int8 {'gathered' if gathered else 'dense'}"] = \
                            gemm_operands(m, n, k, 4, 4, pct, device, g, packed=False, fixed_channels=True,
                                          gathered=gathered)
                # anywhere: the row blocks' lists cover most channels, the gathered path falls back to dense
                variants["W4A4O8 5% int8 gathered"] = gemm_operands(m, n, k, 4, 4, 5, device, g, packed=False,
                                                                    gathered=True)
                x16 = torch.randn(m, k, generator=g, device=device).half()
                w16 = (torch.randn(n, k, generator=g, device=device) / math.sqrt(k)).half()
                fp16_us = median_us(lambda x16=x16, w16=w16: F.linear(x16, w16))
                rows.append({**shape, "variant": "fp16 cuBLAS", "us": round(fp16_us, 2), "vs_fp16": 1.0,
                             "TOP/s": round(2 * m * n * k / fp16_us / 1e6, 1),
                             "floor_us": round(gemm_bytes(m, n, k, "fp16 cuBLAS") / bandwidth * 1e6, 2),
                             "check": "baseline"})
                for variant, ops in variants.items():
                    check = check_gemm(ops)
                    out = torch.empty(m, n, dtype=torch.float16, device=device)
                    us = median_us(lambda ops=ops, out=out: mixed_gemm(**ops, out=out))
                    rows.append({**shape, "variant": variant, "us": round(us, 2), "vs_fp16": round(fp16_us / us, 3),
                                 "TOP/s": round(2 * m * n * k / us / 1e6, 1),
                                 "floor_us": round(gemm_bytes(m, n, k, variant) / bandwidth * 1e6, 2),
                                 "check": check})
                    if variant in TUNED_GEMMS:  # the tile the tuner picks for this shape (the packed model's choice)
                        rows.append(bench_tuned_gemm(shape, variant, ops, out, fp16_us, bandwidth))
                rows += bench_detect_then_gemm(shape, fp16_us, bandwidth, device, g)
                print(f"{model} {layer} batch {batch}: " + ", ".join(  # progress, in case the run is cut short
                    f"{r['variant']} {r['us']} us {r['check']}" for r in rows if r.get("M") == m and
                    r["model"] == model and r["layer"] == layer), flush=True)
    return rows


DEADLINE = math.inf  # time.perf_counter() after which the sections add no more shapes (``--budget-s``)
SKIPPED: list[str] = []  # what the budget left unmeasured, for the results' header


def out_of_time(what: str) -> bool:
    """True, noting ``what`` as not measured, once ``--budget-s`` is spent (the rows so far are still written)."""
    if time.perf_counter() < DEADLINE:
        return False
    SKIPPED.append(what)
    return True


TUNED_GEMMS = ("W8A8", "W4A4O8 5% fixed ch, int8 gathered")  # the plain int8 GEMM and the packed model's operands


def bench_tuned_gemm(shape: dict, variant: str, ops: dict, rule_out: torch.Tensor, fp16_us: float,
                     bandwidth: float) -> dict:
    """``variant`` again with ``tune=True``: the fastest of ``gemm_launches`` for the shape (timed on the first
    call), which must write the rule's output bit for bit; the row names the tiles picked (``rule only`` where
    the shape has no other candidate, so nothing was timed)."""
    m, n, k = shape["M"], shape["N"], shape["K"]
    out = torch.empty_like(rule_out)
    tuning.TUNER.forget()  # so that the one choice below is this call's
    mixed_gemm(**ops, out=out, tune=True)
    check = "ok same as the rule" if torch.equal(out, rule_out) else "FAIL differs from the rule"
    us = median_us(lambda: mixed_gemm(**ops, out=out, tune=True))
    timed = list(tuning.TUNER.choices().values())
    picked = min(timed[0], key=lambda timing: timing[1])[0] if timed else gemm_launches(m, n, k)[0]
    how = "tuned" if timed else "rule only"
    return {**shape, "variant": f"{variant}, {how} {'×'.join(map(str, picked[:3]))}/{picked[3]}w/{picked[4]}st",
            "us": round(us, 2), "vs_fp16": round(fp16_us / us, 3), "TOP/s": round(2 * m * n * k / us / 1e6, 1),
            "floor_us": round(gemm_bytes(m, n, k, variant) / bandwidth * 1e6, 2), "check": check}


def bench_detect_then_gemm(shape: dict, fp16_us: float, bandwidth: float, device: torch.device,
                           g: torch.Generator) -> list[dict]:
    """W4A4O8 from fp16 activations (5 % planted outliers): detect_quant then the GEMM, timed together, as packed
    nibbles (the kernels' 4-bit path) and as the packed model runs it (lean detection writing int8 codes, the
    int8 copy of the 4-bit weight). Both against the reference on the packed operands: the same integers."""
    m, k, n = shape["M"], shape["K"], shape["N"]
    x, scale = activations(shape["batch"], k, 5, device, g)
    weights = gemm_operands(16, n, k, 4, 4, 0, device, g)
    weight, weight_scale = weights["weight"], weights["weight_scale"]
    int8_weight = unpack_int4(weight)
    weight_t = int8_weight.t().contiguous() if k >= GATHER_MIN_K else None  # as PackedLinear keeps
    codes, lean_codes = empty_output(x, 4), empty_output(x, 4, lean=True)
    out = torch.empty(m, n, dtype=torch.float16, device=device)

    def packed() -> torch.Tensor:
        q = detect_quant(x, scale, 3.0, 10, 4, out=codes)
        return mixed_gemm(q.inlier_packed.view(m, -1), q.inlier_scale.view(-1), weight, weight_scale,
                          q.outlier_codes.view(m, k), q.outlier_scale.view(-1), out=out)

    def model_path() -> torch.Tensor:
        q = detect_quant(x, scale, 3.0, 10, 4, out=lean_codes, lean=True)
        return mixed_gemm(q.inlier_codes.view(m, k), q.inlier_scale.view(-1), int8_weight, weight_scale,
                          q.outlier_codes.view(m, k), q.outlier_scale.view(-1), out=out, outlier_weight_t=weight_t)

    packed()
    ref = mixed_gemm_reference(codes.inlier_packed.view(m, -1), codes.inlier_scale.view(-1), weight, weight_scale,
                               codes.outlier_codes.view(m, k), codes.outlier_scale.view(-1))
    flagged = 100 * float(codes.outlier_mask.float().mean())
    rows = []
    for variant, run in (("W4A4O8 incl. detect", packed), ("W4A4O8 incl. lean detect, int8 (model)", model_path)):
        error = rel_error(run(), ref)
        us = median_us(run)
        rows.append({**shape, "variant": variant, "outlier_pct": round(flagged, 2), "us": round(us, 2),
                     "vs_fp16": round(fp16_us / us, 3), "TOP/s": round(2 * m * n * k / us / 1e6, 1),
                     "floor_us": round(gemm_bytes(m, n, k, "W4A4O8 detect") / bandwidth * 1e6, 2),
                     "check": f"ok {error:.1e}" if error < GEMM_TOLERANCE else f"FAIL {error:.1e}"})
    return rows


def same_codes(got: DetectQuantOutput, want: DetectQuantOutput) -> str:
    """'ok' when a lean or re-launched output holds the full output's codes and scales exactly."""
    fields = ("inlier_codes", "outlier_codes", "inlier_scale", "outlier_scale")
    return "ok" if all(torch.equal(getattr(got, f), getattr(want, f)) for f in fields) else "FAIL differs"


def bench_detect(device: torch.device, bandwidth: float, models: dict[str, int], batches: tuple[int, ...],
                 g: torch.Generator) -> list[dict]:
    rows = []
    for model, d_model in models.items():
        inputs = {"in_proj": d_model, "x_proj/out_proj": 2 * d_model, "dt_proj": math.ceil(d_model / 16)}
        for layer, channels in inputs.items():
            for batch in batches:
                if out_of_time(f"detect {model} {layer} batch {batch}"):
                    continue
                x, scale = activations(batch, channels, 5, device, g)
                check = check_detect(x, scale)
                out, lean = empty_output(x, 4), empty_output(x, 4, lean=True)
                us = median_us(lambda x=x, scale=scale, out=out: detect_quant(x, scale, 3.0, 10, 4, out=out))
                lean_us = median_us(lambda x=x, scale=scale, lean=lean:
                                    detect_quant(x, scale, 3.0, 10, 4, out=lean, lean=True))
                lean_check = same_codes(lean, out)
                timed = [("detect_quant", us, 3.5, check), ("detect_quant lean", lean_us, 2.0, lean_check)]
                block, default_warps = launch_block(channels)
                for warps in DETECT_WARPS:  # fewer warps: fewer barriers per reduction, more work per thread
                    # at most 32 channels a thread: 64 (C = 1536 on one warp) spill in the sm_90 build
                    if warps != default_warps and 32 * warps <= block <= 32 * 32 * warps:
                        other = empty_output(x, 4, lean=True)
                        warps_us = median_us(lambda x=x, scale=scale, other=other, warps=warps: detect_quant(
                            x, scale, 3.0, 10, 4, out=other, lean=True, num_warps=warps))
                        timed.append((f"detect_quant lean {warps}w", warps_us, 2.0, same_codes(other, out)))
                elements = x.numel()
                # fp16 in; codes, packed, mask, outlier codes out (lean: codes and outlier codes); two scales a row
                for variant, time_us, written, row_check in timed:
                    moved = elements * (2 + written) + batch * TOKENS * 8
                    rows.append({"kind": "detect_quant 4-bit", "model": model, "layer": layer, "batch": batch,
                                 "M": batch * TOKENS, "K": channels, "variant": variant,
                                 "outlier_pct": round(100 * float(out.outlier_mask.float().mean()), 2),
                                 "us": round(time_us, 2), "GB/s": round(moved / time_us / 1e3, 1),
                                 "floor_us": round(moved / bandwidth * 1e6, 2), "check": row_check})
                print(f"detect_quant {model} {layer} batch {batch} (default {default_warps} warps): " + ", ".join(
                    f"{variant} {time_us:.1f} us {row_check}" for variant, time_us, _, row_check in timed), flush=True)
                rows += bench_rounds(model, layer, batch, channels, bandwidth, device, g)
    return rows


def bench_rounds(model: str, layer: str, batch: int, channels: int, bandwidth: float, device: torch.device,
                 g: torch.Generator) -> list[dict]:
    """Detection in rounds (``rows_per_round`` = ``window_rows``) against step by step, on outliers that move
    (the set grows every step) and on fixed channels (it grows once a window): the lean ``detect_quant`` and, at
    C = E, Δ's ``detect_fake_quant`` (asymmetric 4-bit, 8-bit outliers). Rounds must give the same bits."""
    rounds = window_rows(channels, 10)
    rows, report = [], []
    for moving in (True, False):
        x, scale = activations(batch, channels, 5, device, g, moving=moving)
        zero = torch.full_like(scale, 8.0)
        calls = {"detect_quant lean": lambda r, x=x, scale=scale: detect_quant(x, scale, 3.0, 10, 4, lean=True,
                                                                                rows_per_round=r)}
        if layer == "x_proj/out_proj":
            calls["detect_fake_quant Δ"] = lambda r, x=x, scale=scale, zero=zero: detect_fake_quant(
                x, scale, zero, 4.0, 10, 15, 255, rows_per_round=r)
        for kernel, call in calls.items():
            step_by_step, in_rounds = call(1), call(rounds)
            same = torch.equal(in_rounds, step_by_step) if isinstance(in_rounds, torch.Tensor) \
                else same_codes(in_rounds, step_by_step) == "ok"
            check = "ok exact" if same else "FAIL differs"
            moved = x.numel() * 4 + batch * TOKENS * 8  # fp16 in, 2 bytes out an element (two int8 codes / fp16)
            for r in (1, rounds) if rounds > 1 else (1,):
                time_us = median_us(lambda call=call, r=r: call(r))
                rows.append({"kind": f"{kernel} rounds", "model": model, "layer": layer, "batch": batch,
                             "M": batch * TOKENS, "K": channels, "variant": f"{'moving' if moving else 'fixed'} "
                             f"outliers, {r} row{'s' if r > 1 else ''} a round", "us": round(time_us, 2),
                             "GB/s": round(moved / time_us / 1e3, 1), "floor_us": round(moved / bandwidth * 1e6, 2),
                             "check": check if r > 1 else "reference"})
                report.append(f"{kernel} {'moving' if moving else 'fixed'} {r} rows {time_us:.1f} us")
    print(f"rounds {model} {layer} batch {batch}: {rounds} rows: " + ", ".join(report), flush=True)
    return rows


def scan_inputs(batch: int, channels: int, dtype: torch.dtype, device: torch.device,
                g: torch.Generator) -> dict[str, torch.Tensor]:
    """Vim-like scan inputs (batch, 197, E): softplus(delta) mostly between 0.005 and 0.1 (Vim's dt range),
    A = −(1 … 16) · U(0.5, 1.5) per channel (around its −exp(A_log) initialisation), D near 1."""
    shape = (batch, TOKENS, channels)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g, device=device)

    x = {"u": randn(*shape), "delta": randn(*shape) * 0.7 - 4, "z": randn(*shape),
         "B": randn(batch, TOKENS, D_STATE), "C": randn(batch, TOKENS, D_STATE)}
    x = {name: t.to(dtype) for name, t in x.items()}
    x["A"] = -torch.arange(1, D_STATE + 1, device=device) * (0.5 + torch.rand(channels, D_STATE, generator=g,
                                                                               device=device))
    x["D"] = 1 + 0.1 * randn(channels)
    return x


def scan_check(y: torch.Tensor, ref: torch.Tensor) -> str:
    error = rel_error(y, ref)
    return f"ok {error:.1e}" if error < SCAN_TOLERANCE[y.dtype] else f"FAIL {error:.1e}"


def quantized_scan_inputs(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """u, B, C as int8 codes with a per-(sample, step) scale (absmax / 127), as the quantized model hands them."""
    quantized = {}
    for name in ("u", "B", "C"):
        scale = (x[name].float().abs().amax(-1) / 127).clamp(min=1e-8)
        quantized[name] = torch.round(x[name].float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
        quantized[f"{name}_scale"] = scale
    return quantized


def bench_scan(device: torch.device, bandwidth: float, models: dict[str, int], batches: tuple[int, ...],
               g: torch.Generator) -> list[dict]:
    mamba = _mamba_ssm_scan()
    rows = []
    for model, d_model in models.items():
        channels = 2 * d_model
        for batch in batches:
            if out_of_time(f"scan {model} batch {batch}"):
                continue
            for dtype in (torch.float16, torch.float32):
                x = scan_inputs(batch, channels, dtype, device, g)
                args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"])
                ref = selective_scan_reference(*args)
                out = torch.empty_like(x["u"])
                fast_us = median_us(lambda args=args: selective_scan_fast(*args))
                timed = {"torch fast scan": (fast_us, scan_check(selective_scan_fast(*args), ref))}
                default = launch_config(batch, channels)
                for config in SCAN_CONFIGS:
                    name = f"triton {config[0]}ch {config[1]}w" + (" (default)" if config == default else "")
                    check = scan_check(selective_scan(*args, out=out.fill_(float("nan")), config=config), ref)
                    timed[name] = (median_us(lambda args=args, out=out, config=config:
                                             selective_scan(*args, out=out, config=config)), check)
                u_channel_first = x["u"].transpose(1, 2).contiguous().transpose(1, 2)  # the model's conv output
                model_args = (u_channel_first, *args[1:])
                check = scan_check(selective_scan(*model_args, out=out.fill_(float("nan"))), ref)
                timed["triton, u channel-first"] = (
                    median_us(lambda model_args=model_args, out=out: selective_scan(*model_args, out=out)), check)
                if dtype == torch.float16:
                    q = quantized_scan_inputs(x)
                    q_args = (q["u"], x["delta"], x["A"], q["B"], q["C"], x["D"], x["z"])
                    scales = {name: q[name] for name in ("u_scale", "B_scale", "C_scale")}
                    check = scan_check(selective_scan(*q_args, **scales, out=out.fill_(float("nan"))),
                                       selective_scan_reference(*q_args, **scales))
                    timed["triton int8 u/B/C"] = (
                        median_us(lambda q_args=q_args, scales=scales, out=out:
                                  selective_scan(*q_args, **scales, out=out)), check)
                if mamba is not None:
                    cf = [t.transpose(1, 2).contiguous() for t in (x["u"], x["delta"], x["B"], x["C"], x["z"])]

                    def run_mamba(cf=cf, x=x) -> torch.Tensor:
                        return mamba(cf[0], cf[1], x["A"], cf[2], cf[3], x["D"], cf[4], delta_softplus=True)

                    timed["mamba-ssm CUDA"] = (median_us(run_mamba), scan_check(run_mamba().transpose(1, 2), ref))
                elements, io = batch * TOKENS * channels, x["u"].element_size()
                shape = {"kind": "scan", "model": model, "layer": "scan", "batch": batch, "M": batch * TOKENS,
                         "K": channels, "N": D_STATE, "dtype": str(dtype).removeprefix("torch.")}
                for variant, (us, check) in timed.items():
                    int8 = "int8" in variant
                    moved = elements * ((1 + 3 * io) if int8 else 4 * io) \
                        + 2 * batch * TOKENS * D_STATE * (1 if int8 else io) + (12 * batch * TOKENS if int8 else 0)
                    rows.append({**shape, "variant": variant, "us": round(us, 2), "vs_fast": round(fast_us / us, 2),
                                 "GB/s": round(moved / us / 1e3, 1), "Gexp/s": round(elements * D_STATE / us / 1e3, 1),
                                 "floor_us": round(moved / bandwidth * 1e6, 2), "check": check})
                print(f"scan {model} batch {batch} {shape['dtype']}: " + ", ".join(
                    f"{variant} {us:.1f} us {check}" for variant, (us, check) in timed.items()), flush=True)
    return rows


def scan_gradients(scan: Callable, x: dict[str, torch.Tensor], grad_y: torch.Tensor,
                   states_weight: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Forward + backward of one scan call: the gradients of u, delta, A, B, C, D, z (for Σ grad_y·y, plus
    Σ states_weight·states when given: OuroMamba-Gen's loss on the states)."""
    leaves = [x[name].detach().requires_grad_() for name in ("u", "delta", "A", "B", "C", "D", "z")]
    if states_weight is None:
        torch.autograd.backward(scan(*leaves), grad_y)
    else:
        y, states = scan(*leaves, return_states=True)
        torch.autograd.backward([y, states], [grad_y, states_weight])
    return [leaf.grad for leaf in leaves]


def gradient_check(got: list[torch.Tensor], want: list[torch.Tensor], tolerance: float) -> str:
    error = max(rel_error(g, w) for g, w in zip(got, want, strict=True))
    return f"ok {error:.1e}" if error < tolerance else f"FAIL {error:.1e}"


def bench_scan_training(device: torch.device, bandwidth: float, models: dict[str, int], batches: tuple[int, ...],
                        g: torch.Generator) -> list[dict]:
    """The scan under training (and OuroMamba-Gen, with the states returned and a loss on them): forward +
    backward, our Triton pair against PyTorch's fast scan with its hand-written backward (the path training
    took on the GPU before) and mamba-ssm when it imports. Checked against the fast scan's gradients (tested
    against float64 autograd on the CPU), the largest relative error over the seven inputs."""
    mamba = _mamba_ssm_scan()
    rows = []
    for model, d_model in models.items():
        channels = 2 * d_model
        for batch in batches:
            if out_of_time(f"scan training {model} batch {batch}"):
                continue
            for dtype in (torch.float32, torch.bfloat16):
                x = scan_inputs(batch, channels, dtype, device, g)
                grad_y = torch.randn(batch, TOKENS, channels, generator=g, device=device).to(dtype)
                states_weight = torch.randn(batch, TOKENS, channels, D_STATE, generator=g, device=device) * 1e-2
                tolerance = 1e-4 if dtype == torch.float32 else 2e-2
                variants = {"torch fast scan": (selective_scan_fast, None),
                            "triton": (selective_scan, None),
                            "torch fast scan + states": (selective_scan_fast, states_weight),
                            "triton + states": (selective_scan, states_weight)}
                if mamba is not None:
                    def mamba_scan(u, delta, A, B, C, D, z, mamba=mamba) -> torch.Tensor:
                        cf = [t.transpose(1, 2) for t in (u, delta, B, C, z)]
                        return mamba(cf[0], cf[1], A, cf[2], cf[3], D, cf[4], delta_softplus=True).transpose(1, 2)
                    variants["mamba-ssm CUDA"] = (mamba_scan, None)
                timed, want = {}, {}
                for variant, (scan, weight) in variants.items():
                    grads = scan_gradients(scan, x, grad_y, weight)
                    if scan is selective_scan_fast:
                        want[weight is None] = grads
                        check = "reference"
                    else:
                        check = gradient_check(grads, want[weight is None], tolerance)
                    us = median_us(lambda scan=scan, weight=weight, x=x, grad_y=grad_y:
                                   scan_gradients(scan, x, grad_y, weight))
                    timed[variant] = (us, check)
                shape = {"kind": "scan_train", "model": model, "layer": "scan fwd+bwd", "batch": batch,
                         "M": batch * TOKENS, "K": channels, "N": D_STATE, "dtype": str(dtype).removeprefix("torch.")}
                for variant, (us, check) in timed.items():
                    base = timed["torch fast scan + states" if "states" in variant else "torch fast scan"][0]
                    rows.append({**shape, "variant": variant, "us": round(us, 2), "vs_fast": round(base / us, 2),
                                 "check": check})
                print(f"scan training {model} batch {batch} {shape['dtype']}: " + ", ".join(
                    f"{variant} {us:.1f} us {check}" for variant, (us, check) in timed.items()), flush=True)
    return rows


def torch_add_rms_norm(hidden: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A Vim block's entry in PyTorch, as core.models.vim computes it: fp32 residual add, RMSNorm, cast back."""
    total = residual + hidden.float()
    return (total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + NORM_EPS) * weight.float()).to(hidden.dtype)


def block_entry(batch: int, d_model: int, device: torch.device,
                g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (fp16), residual (fp32), RMSNorm weight and static scales. residual + hidden sits on a 1/8 grid with
    per-token sums of squares below 2^24 grid units (exact in any order), so the kernel's normalized values are
    the reference's bit for bit and its check must be exact."""
    total = torch.round(activations(batch, d_model, 5, device, g)[0].float() * 8) / 8
    hidden = (torch.randint(-8, 9, total.shape, generator=g, device=device) / 8).half()
    weight = 0.5 + torch.rand(d_model, generator=g, device=device)
    normalized = torch_add_rms_norm(hidden, total - hidden.float(), weight).float()
    return hidden, total - hidden.float(), weight, normalized.abs().amax(dim=(0, 2)) * 0.05


def bench_fusions(device: torch.device, bandwidth: float, models: dict[str, int], batches: tuple[int, ...],
                  g: torch.Generator) -> list[dict]:
    """Each fused producer against the PyTorch (+ detect_quant) it replaces; ``speedup`` = unfused / fused."""
    rows = []
    for model, d_model in models.items():
        inner = 2 * d_model
        for batch in batches:
            if out_of_time(f"fusion {model} batch {batch}"):
                continue
            shape = {"kind": "fusion", "model": model, "batch": batch, "M": batch * TOKENS}
            elements = {"norm": batch * TOKENS * d_model, "inner": batch * TOKENS * inner}
            timed: dict[str, tuple[float, float, str, float]] = {}  # layer → (unfused, fused, check, bytes)

            hidden, residual, weight, scale = block_entry(batch, d_model, device, g)
            codes, residual_out = poisoned_codes(hidden), torch.empty_like(residual)
            got, _ = norm_detect_quant(hidden, residual, weight, NORM_EPS, scale, 3.0, 10, 4, out=codes,
                                       residual_out=residual_out)
            want, want_residual = norm_detect_quant_reference(hidden.cpu(), residual.cpu(), weight.cpu(), NORM_EPS,
                                                              scale.cpu(), 3.0, 10, 4)
            check = exact_check(got, want)
            if not torch.equal(residual_out.cpu(), want_residual):
                check = "FAIL residual"
            timed["add+rmsnorm+detect"] = (
                median_us(lambda h=hidden, r=residual, w=weight, s=scale, o=codes:
                          detect_quant(torch_add_rms_norm(h, r, w), s, 3.0, 10, 4, out=o)),
                median_us(lambda h=hidden, r=residual, w=weight, s=scale, o=codes, ro=residual_out:
                          norm_detect_quant(h, r, w, NORM_EPS, s, 3.0, 10, 4, out=o, residual_out=ro)),
                check, elements["norm"] * (2 + 4 + 4 + 3.5))
            normalized, residual_out = torch.empty_like(hidden), torch.empty_like(residual)
            add_rms_norm(hidden, residual, weight, NORM_EPS, out=normalized.fill_(float("nan")),
                         residual_out=residual_out)
            want = rms_norm_reference(residual + hidden.float(), weight, NORM_EPS).half()
            timed["add+rmsnorm (float)"] = (  # FusedVim's block entry
                median_us(lambda h=hidden, r=residual, w=weight: torch_add_rms_norm(h, r, w)),
                median_us(lambda h=hidden, r=residual, w=weight, o=normalized, ro=residual_out:
                          add_rms_norm(h, r, w, NORM_EPS, out=o, residual_out=ro)),
                "ok exact" if torch.equal(normalized, want) and torch.equal(residual_out, residual + hidden.float())
                else "FAIL", elements["norm"] * (2 + 4 + 4 + 2))

            xz = torch.randn(batch, TOKENS, 2 * inner, generator=g, device=device).half()
            x = xz[..., :inner]
            conv_weight = (torch.randn(inner, 1, CONV_WIDTH, generator=g, device=device) / 2).half()
            conv_bias = (torch.randn(inner, generator=g, device=device) / 2).half()
            u = torch.empty_like(x)
            for reverse in (False, True):
                ref = conv_silu_reference(x, conv_weight, conv_bias, reverse)
                error = rel_error(conv_silu(x, conv_weight, conv_bias, reverse, out=u.fill_(float("nan"))), ref)

                def unfused(x=x, w=conv_weight, b=conv_bias, reverse=reverse) -> torch.Tensor:
                    source = x.flip(1) if reverse else x  # the model's branch input (xz.flip(1) for the backward)
                    return F.silu(F.conv1d(source.transpose(1, 2), w, b, padding=CONV_WIDTH - 1,
                                           groups=x.shape[2])[..., :TOKENS].transpose(1, 2))

                timed["conv+silu " + ("bwd" if reverse else "fwd")] = (
                    median_us(unfused),
                    median_us(lambda x=x, w=conv_weight, b=conv_bias, reverse=reverse, u=u:
                              conv_silu(x, w, b, reverse, out=u)),
                    f"ok {error:.1e}" if error < 2e-3 else f"FAIL {error:.1e}", elements["inner"] * 4)

            y_forward, scale = activations(batch, inner, 5, device, g)
            y_backward = activations(batch, inner, 5, device, g)[0]
            codes = poisoned_codes(y_forward)
            got = merge_detect_quant(y_forward, y_backward, scale, 3.0, 10, 4, out=codes)
            check = exact_check(got, merge_detect_quant_reference(y_forward.cpu(), y_backward.cpu(), scale.cpu(),
                                                                  3.0, 10, 4))
            timed["merge+detect"] = (
                median_us(lambda f=y_forward, b=y_backward, s=scale, o=codes:
                          detect_quant((f + b.flip(1)) / 2, s, 3.0, 10, 4, out=o)),
                median_us(lambda f=y_forward, b=y_backward, s=scale, o=codes:
                          merge_detect_quant(f, b, s, 3.0, 10, 4, out=o)),
                check, elements["inner"] * (2 + 2 + 3.5))
            merged = torch.full_like(y_forward, float("nan"))
            merge_directions(y_forward, y_backward, out=merged)
            timed["merge (float)"] = (  # FusedVim's merge
                median_us(lambda f=y_forward, b=y_backward: (f + b.flip(1)) / 2),
                median_us(lambda f=y_forward, b=y_backward, o=merged: merge_directions(f, b, out=o)),
                "ok exact" if torch.equal(merged, (y_forward + y_backward.flip(1)) / 2) else "FAIL",
                elements["inner"] * (2 + 2 + 2))

            for layer, (unfused_us, fused_us, check, moved) in timed.items():
                channels = d_model if layer.startswith("add") else inner
                rows.append({**shape, "layer": layer, "K": channels, "variant": "torch + unfused",
                             "us": round(unfused_us, 2), "check": "baseline"})
                rows.append({**shape, "layer": layer, "K": channels, "variant": "fused", "us": round(fused_us, 2),
                             "speedup": round(unfused_us / fused_us, 2), "GB/s": round(moved / fused_us / 1e3, 1),
                             "floor_us": round(moved / bandwidth * 1e6, 2), "check": check})
            print(f"fusions {model} batch {batch}: " + ", ".join(
                f"{layer} {unfused_us:.1f} → {fused_us:.1f} us {check}"
                for layer, (unfused_us, fused_us, check, _) in timed.items()), flush=True)
    return rows


def geomean_lines(rows: list[dict], name_of: Callable[[dict], str], column_of: Callable[[dict], tuple],
                  ratio: str) -> list[str]:
    """One line per name: the geometric mean of ``ratio`` per column (a batch, or a dtype and a batch)."""
    lines = []
    for name in dict.fromkeys(name_of(r) for r in rows):
        cells = []
        for column in sorted({column_of(r) for r in rows}):
            ratios = [r[ratio] for r in rows if name_of(r) == name and column_of(r) == column]
            if ratios:
                label = " ".join(str(part) for part in column[:-1]) + f" batch {column[-1]}"
                cells.append(f"{label.strip()}: {statistics.geometric_mean(ratios):.2f}x")
        lines.append(f"  {name:<24} " + ", ".join(cells))
    return lines


def summary(rows: list[dict], bandwidth: float) -> str:
    """Geometric-mean speed-ups per variant and batch (GEMMs over cuBLAS fp16, the scan over PyTorch's fast
    scan); failed checks."""
    lines = [f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", ""]
    gemm = [r for r in rows if r["kind"] == "gemm" and r["variant"] != "fp16 cuBLAS"]
    if gemm:
        lines.append("geomean speed-up vs cuBLAS fp16 over the Vim layers:")
        lines += geomean_lines(gemm, lambda r: re.sub(r", (tuned|rule only) .*", ", tuned tiles", r["variant"]),
                               lambda r: (r["batch"],), "vs_fp16")
    rounds = [r for r in rows if r["kind"].endswith(" rounds")]
    if rounds:
        lines.append("detection in rounds (window_rows), speed-up over step by step (geomean over the shapes):")
        step = {(r["kind"], r["model"], r["layer"], r["batch"], r["variant"].split(",")[0]): r["us"] for r in rounds
                if r["variant"].endswith("1 row a round")}
        speedups: dict[str, list[float]] = {}
        for r in rounds:
            key = (r["kind"], r["model"], r["layer"], r["batch"], r["variant"].split(",")[0])
            if not r["variant"].endswith("1 row a round"):
                speedups.setdefault(f"{r['kind'].removesuffix(' rounds')}, {key[-1]}", []).append(step[key] / r["us"])
        lines += [f"  {name}: {statistics.geometric_mean(values):.2f}×" for name, values in speedups.items()]
    detect = [r for r in rows if r["kind"] == "detect_quant 4-bit"]
    if detect:
        best = max(detect, key=lambda r: r["GB/s"])
        lines.append(f"detect_quant: {min(r['us'] for r in detect):.1f} … {max(r['us'] for r in detect):.1f} us, "
                     f"best {best['GB/s']} GB/s ({best['model']} {best['layer']} batch {best['batch']})")
    scan = [r for r in rows if r["kind"] == "scan"]
    if scan:
        lines.append("selective scan, speed-up over PyTorch's fast scan (geomean over the models):")
        lines += geomean_lines(scan, lambda r: r["variant"].removesuffix(" (default)"),
                               lambda r: (r["dtype"], r["batch"]), "vs_fast")
        groups = {(r["model"], r["batch"], r["dtype"]) for r in scan}
        best = [min((r for r in scan if (r["model"], r["batch"], r["dtype"]) == key and
                     r["variant"].startswith("triton") and "ch " in r["variant"]), key=lambda r: r["us"])
                for key in groups]
        lines.append(f"  launch_config's choice was the fastest configuration in "
                     f"{sum(r['variant'].endswith('(default)') for r in best)} of {len(best)} shapes")
    training = [r for r in rows if r["kind"] == "scan_train" and not r["variant"].startswith("torch")]
    if training:
        lines.append("scan forward + backward, speed-up over PyTorch's fast scan (geomean over the models):")
        lines += geomean_lines(training, lambda r: r["variant"], lambda r: (r["dtype"], r["batch"]), "vs_fast")
    fusion = [r for r in rows if r["kind"] == "fusion" and r["variant"] == "fused"]
    if fusion:
        lines.append("fused producers, speed-up over PyTorch + unfused kernels (geomean over the models):")
        lines += geomean_lines(fusion, lambda r: r["layer"], lambda r: (r["batch"],), "speedup")
    failed = [f"{r['model']} {r['layer']} b{r['batch']} {r['variant']}: {r['check']}" for r in rows
              if str(r["check"]).startswith("FAIL")]
    lines.append(f"checks: {len(failed)} failed" + "".join(f"\n  {f}" for f in failed))
    return "\n".join(lines)


def gpu_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device)
    found = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", name)
    return (found.group(1) if found else re.sub(r"[^A-Za-z0-9]+", "_", name)).lower()


def main() -> None:
    parser = bench_parser("bench_kernels.py", "the Triton kernels against cuBLAS and PyTorch at Vim's shapes")
    parser.add_argument("--quick", action="store_true",
                        help="Vim-T and Vim-B at batch 1 and 64 only (writes kernels_<gpu>…_quick)")
    parser.add_argument("--only", nargs="+", action=Distinct, choices=("gemm", "detect", "scan", "train", "fusion"),
                        help="these kernels' sections only (written to kernels_<gpu>_<sections>)")
    parser.add_argument("--budget-s", type=positive, default=math.inf,
                        help="add no more shapes after this many seconds; what ran is still written")
    parser.add_argument("--warm-only", action="store_true",
                        help="run every launch once and time nothing, writing nothing: compiles the kernels into "
                             "Triton's cache (tuner candidates included) so that a later timed run spends its budget "
                             "timing; scripts/gpu_session.sh runs it beside the tests")
    args = parser.parse_args()
    global DEADLINE, WARM_ONLY
    DEADLINE, WARM_ONLY = time.perf_counter() + args.budget_s, args.warm_only
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py: no CUDA device (torch.cuda.is_available() is False); "
                 "the CPU checks of the kernels are tests/test_kernels.py")
    device = torch.device("cuda")
    models = {k: v for k, v in MODELS.items() if not args.quick or k != "Vim-S"}
    batches = (1, 64) if args.quick else BATCHES
    g = torch.Generator(device=device).manual_seed(0)
    bandwidth = copy_bandwidth(device)
    sections = {"gemm": bench_gemms, "detect": bench_detect, "scan": bench_scan, "train": bench_scan_training,
                "fusion": bench_fusions}
    chosen = args.only or list(sections)
    rows = [row for name, section in sections.items() if name in chosen
            for row in section(device, bandwidth, models, batches, g)]
    torch.cuda.synchronize(device)
    if WARM_ONLY:
        print(f"warm-only: {len(rows)} configurations launched, nothing timed or written")
        return
    suffix = "_" + "_".join(args.only) if args.only else ""
    header = machine_header(device)
    if SKIPPED:
        header["not measured (budget spent)"] = ", ".join(SKIPPED)
    write_results(f"kernels_{gpu_slug(device)}{suffix}", rows, header, regenerate_command("bench_kernels.py"),
                  args.out, quick=args.quick, footer=summary(rows, bandwidth))


if __name__ == "__main__":
    common.run(main)
