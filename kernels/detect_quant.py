"""Fused per-time-step outlier detection + quantization (OuroMamba-Quant, method doc §3.2 and §7.1–7.3).

For an activation x (batch, L, C) with time along L and calibrated static inlier scales S^I (L,), per sample
and per window of ``n_refresh`` steps aligned to step 0, the outlier set starts empty and only grows. At step t:

1. S^D(t) = max |x_t| over the current inlier channels / qmax_I;
2. if S^D(t) > S^I(t): with a = |x_t| over the current inlier channels, channels with
   a > mean(a) + k·std(a) (std unbiased, as the PyTorch quantizer) join the set;
3. inliers (set channels zeroed) → codes clamp(round(x / S^I(t)), ±qmax_I) with qmax_I 7 or 127;
   outliers → codes clamp(round(x / s_O), ±127) with s_O = max(max |x_outliers| / 127, 1e-8) per (sample, t).

Rounding is half-to-even (torch.round). This is the per-sample rule of ``core.quant.outliers.outlier_masks``
(not its ``release_compatible`` batch-wide trigger); inputs are upcast to fp32 before any arithmetic.

Kernel: one program per (sample, window), walking the window's steps in order so that the outlier set stays
in registers; the C channels form one block (next power of two, masked), so C up to a few thousand. The walk
goes in rounds of ``rows_per_round`` steps: a round detects all its steps at once against the set known so far
and commits them up to the first step that grows the set (``detect_rows``), so where the set seldom grows a
window takes a few rounds instead of n_refresh dependent steps; 1 is the plain step-by-step walk. A
round's detection + quantization is the JIT function ``detect_quant_rows``, shared with the fused producers
(``kernels.norm_detect_quant``, ``kernels.merge_detect_quant``) through ``launch_detect_quant``: they differ only
in how a round's input rows are made.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels import tuning
from kernels.host import cdiv, next_power_of_2
from kernels.packing import pack_int4

OUTLIER_QMAX = 127
MIN_SCALE = 1e-8  # the floor the PyTorch fake quantizer puts on every scale


def inlier_qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"inlier bits must be 4 or 8, got {bits}")
    return 2 ** (bits - 1) - 1


class DetectQuantOutput(NamedTuple):
    """Codes and scales for a (batch, L, C) activation; dequantized x ≈ inlier_codes · inlier_scale[..., None]
    + outlier_codes · outlier_scale[..., None] (the supports are disjoint). A *lean* output is what the int8
    GEMM reads and nothing else: no mask, and 4-bit codes in int8 only (no packed copy)."""

    inlier_codes: torch.Tensor  # int8 (batch, L, C), outlier channels 0
    inlier_packed: torch.Tensor | None  # uint8 (batch, L, C/2), two int4 per byte (kernels.packing); 4-bit, not lean
    outlier_mask: torch.Tensor | None  # bool (batch, L, C); None when lean
    outlier_codes: torch.Tensor  # int8 (batch, L, C), inlier channels 0
    inlier_scale: torch.Tensor  # fp32 (batch, L): max(S^I(t), 1e-8), repeated per sample
    outlier_scale: torch.Tensor  # fp32 (batch, L)


ROUNDING_SHIFT = tl.constexpr(1.5 * 2.0**23)  # fp32 numbers in [2^23, 2^24) are integers: adding it rounds
ROUNDING_SHIFT_BITS = tl.constexpr(0x4B400000)  # its bit pattern: 1.5 · 2^23 + n has the pattern's value + n


@triton.jit
def _round_half_even(v):
    """torch.round in fp32 for |v| < 2^22 (callers clamp first): v + 1.5·2^23 lands where the fp32 spacing is 1,
    so the addition itself rounds v to the nearest integer, ties to even, and the subtraction is exact. Two
    adds, in the interpreter as on the GPU (libdevice's rint does not run interpreted); floor(v + 0.5) would
    round 0.49999997 up."""
    return (v + ROUNDING_SHIFT) - ROUNDING_SHIFT


# Under TRITON_INTERPRET=1 triton.jit makes interpreted functions, not JIT ones. The interpreter's tl.fma rounds
# the product before the sum, so there ``fused_multiply_add`` takes it in fp64.
INTERPRETED = tl.constexpr(not isinstance(_round_half_even, triton.JITFunction))


@triton.jit
def fused_multiply_add(a, b, c):
    """a · b + c rounded once, as the GPU's FFMA. Interpreted: the product exactly in fp64, the sum rounded to
    fp64 and then to fp32, which is the single rounding wherever that sum is exact in fp64 (the remainder
    below always is) and can differ otherwise only where it falls exactly on an fp32 rounding tie."""
    if INTERPRETED:
        return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
    else:
        return tl.fma(a, b, c)


SHARED_DIVISOR_ELEMENTS = tl.constexpr(256)  # per round; below, the rows' reciprocals cost more than they save


@triton.jit
def divide(v, scale, reciprocal, BY_RECIPROCAL: tl.constexpr):
    """v / scale, correctly rounded. With ``BY_RECIPROCAL``, for a divisor shared by many elements whose
    correctly rounded ``reciprocal`` (div_rn(1, scale)) is known: q = v · reciprocal, then one Markstein
    correction with the exact remainder, q + (v − q · scale) · reciprocal. Three instructions an element where
    div_rn issues a reciprocal, four FMAs, a range check and a slow-path branch (~14 in the sm_90 build); unused,
    the reciprocal is not computed. Equal to div_rn's result except where |v| < 2^-100 (the remainder
    underflows; |v / scale| < 2^-73 for every scale ≥ 1e-8, which quantizes to 0 all the same) and where
    v · reciprocal overflows (tests/test_kernels.py, with FMA emulated exactly)."""
    if BY_RECIPROCAL:
        q = v * reciprocal
        return fused_multiply_add(fused_multiply_add(-q, scale, v), reciprocal, q)
    else:
        return tl.math.div_rn(v, scale)


@triton.jit
def divide_by_constant(v, DIVISOR: tl.constexpr):
    """v / DIVISOR correctly rounded, for a compile-time divisor (a grid's level count, 2^b − 1): ``divide``
    with the reciprocal rounded at compile time, three instructions where div_rn takes ~10 with its range check
    and slow-path branch. 1 / DIVISOR is rounded from float64 to fp32, which gives its correctly rounded fp32
    value for these divisors: 1 / (2^b − 1) repeats with period b in binary, so it never lies on an fp32 tie."""
    return divide(v, tl.full((), DIVISOR, tl.float32), tl.full((), 1.0 / DIVISOR, tl.float32), True)


@triton.jit
def _quantize(v, scale, reciprocal, qmax, BY_RECIPROCAL: tl.constexpr):
    """clamp(round(v / scale), ±qmax) as int32 codes; clamping before rounding gives the same integers (qmax is
    one). ``scale`` (with its ``reciprocal``: see ``divide``) and ``qmax`` may differ per element (one call
    quantizes inliers and outliers on their grids). The rounding add of ``_round_half_even`` leaves the integer
    in the sum's mantissa, so the code is the sum's bit pattern minus the shift's: an integer subtraction where
    a second add and a float → int conversion (a quarter-rate instruction on the GPU) would follow."""
    q = tl.minimum(tl.maximum(divide(v, scale, reciprocal, BY_RECIPROCAL), -qmax), qmax)
    return (q + ROUNDING_SHIFT).to(tl.int32, bitcast=True) - ROUNDING_SHIFT_BITS


@triton.jit
def round_to_dtype(x, dtype: tl.constexpr):
    """x (fp32) rounded to ``dtype`` (fp32, fp16 or bf16) to nearest even, as PyTorch casts, returned as fp32: a
    fused producer must quantize the value the model would have stored. bf16 by integer arithmetic, because the
    interpreter's fp32 → bf16 cast truncates (triton 3.8) where the GPU's rounds; this is the GPU's rounding
    (finite inputs), written once for both."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def detect_rows(x, inliers, valid, live, static_scale, k, LEVELS: tl.constexpr, SIGNED: tl.constexpr,
                ROWS: tl.constexpr):
    """One step of the rule on each row of x (fp32, (ROWS, BLOCK_C)): consecutive steps of a window, all against
    the same outlier set (given as ``inliers``, (BLOCK_C,): 1.0 on each channel outside it), the set before each
    of them up to the first step that grows it. ``live`` (ROWS,) marks the rows inside the window,
    ``static_scale`` (ROWS,) their S^I(t). The trigger S^D(t) is max |x| over the current inliers / LEVELS, or
    for SIGNED (asymmetric) grids (max − min of x) / LEVELS; when it exceeds S^I(t), the channels with |x| > θ =
    mean + k·std (unbiased) of |x| over the current inliers join the set. Returns (after, grown_high, grown_low,
    last): per row the inliers after its step and max(x, 0), min(x, 0) over the set after it (the outlier grid's
    range), and the last row the round commits: the first live
    row whose step adds channels, or the round's last row if none does. Rows up to ``last`` are exact; the
    caller commits those and starts its next round after ``last``, so a window costs one round per step that
    grows the set (plus one) instead of one per step.

    Shared by every detecting kernel, so all of them flag alike. A round is latency-bound on its reductions over
    the channels (shuffles, and above one warp shared-memory barriers), so it makes three, each over several
    statistics side by side (``tl.join``; minima as maxima of −x): the extremes over the current inliers and over
    the set before the step, then the inlier count with Σ|x|, then the squared deviations. The channels that join
    are inliers with |x| > θ, so the extremes after the step need no fourth pass: if the inliers' largest x
    exceeds θ it joined and is the largest x that joined; if not, every x that joined is ≤ 0 (a positive one
    would be ≤ that largest x ≤ θ < |x|) and drops out of max(x, 0). Likewise for the smallest. Exact, not an
    approximation; and a row grows the set exactly when its largest inlier |x| exceeds θ.

    The set travels as its complement, fp32 1.0 on the inlier channels and 0.0 on the outliers and past C
    (``after`` too), and the inlier statistics multiply by it instead of selecting, as ``window_outlier_masks``
    and core's rule do: the same values for finite x. Boolean tensors of a thread's channels live as bits of one
    register, and every use extracted or inserted a predicate (the sm_90 build at C = 1536: 607 instructions a
    step, 154 of them bit and predicate moves; with 0/1 floats alone 494; kernels/README.md has the counts)."""
    magnitude = tl.abs(x)
    keep = inliers[None, :]
    inlier_magnitude = magnitude * keep  # products with 0/1, not selects: see the docstring
    if SIGNED:
        inlier, kept = keep > 0.0, valid[None, :] & (keep == 0.0)
        extremes = tl.max(tl.join(tl.join(tl.where(inlier, x, -float("inf")), tl.where(inlier, -x, -float("inf"))),
                                  tl.join(tl.where(kept, x, -float("inf")), tl.where(kept, -x, -float("inf")))),
                          axis=1)
        inlier_extremes, kept_extremes = tl.split(extremes)
        high, negated_low = tl.split(inlier_extremes)
        kept_high, negated_kept_low = tl.split(kept_extremes)
        low, kept_low = -negated_low, -negated_kept_low
        dynamic_scale = tl.where(high > -float("inf"), divide_by_constant(high - low, LEVELS), 0.0)
        inlier_peak = tl.maximum(high, negated_low)
    else:  # the largest |x| stands for both signs
        high, kept_high = tl.split(tl.max(tl.join(inlier_magnitude, magnitude - inlier_magnitude), axis=1))
        low, kept_low = -high, -kept_high
        dynamic_scale = divide_by_constant(high, LEVELS)
        inlier_peak = high
    count, total = tl.split(tl.sum(tl.join(tl.broadcast_to(keep, x.shape), inlier_magnitude), axis=1))
    mean = tl.math.div_rn(total, tl.maximum(count, 1.0))
    deviation = magnitude - mean[:, None]
    var = tl.math.div_rn(tl.sum(deviation * deviation * keep, axis=1), tl.maximum(count - 1.0, 1.0))
    theta = tl.where(dynamic_scale > static_scale, mean + k * tl.sqrt_rn(var), float("inf"))  # no trigger: none
    after = tl.where(magnitude > theta[:, None], 0.0, keep)
    grown_high = tl.maximum(tl.maximum(kept_high, tl.where(high > theta, high, -float("inf"))), 0.0)
    grown_low = tl.minimum(tl.minimum(kept_low, tl.where(-low > theta, low, float("inf"))), 0.0)
    # one row: a compile-time 0 (searching a one-row round still cost ~20 registers in the sm_90 build)
    last = 0 if ROWS == 1 else tl.min(tl.where(live & (inlier_peak > theta), tl.arange(0, ROWS), ROWS - 1), axis=0)
    return after, grown_high, grown_low, last


@triton.jit
def grow_set(after, last, ROWS: tl.constexpr):
    """The inliers after a round, ``after``'s row ``last`` (the rows before it grew the set by nothing), and the
    number of steps the round committed."""
    if ROWS == 1:
        return tl.min(after, axis=0), 1
    else:
        return tl.min(tl.where((tl.arange(0, ROWS) == last)[:, None], after, 1.0), axis=0), last + 1


@triton.jit
def detect_quant_rows(x, inliers, live, sample, t, length, channels, k, static_scale_ptr, inlier_ptr, packed_ptr,
                      mask_ptr, outlier_ptr, outlier_scale_ptr, inlier_scale_ptr, INLIER_QMAX: tl.constexpr,
                      PACK: tl.constexpr, BLOCK_C: tl.constexpr, STORE_MASK: tl.constexpr, ROWS: tl.constexpr):
    """One round of a sample's window: detection on the rows x (fp32, (ROWS, BLOCK_C), 0 past C) of steps t
    ((ROWS,), ``live`` inside the window) given the inliers before the first, then the quantization and every
    store of the rows up to the first that grows the set (``detect_rows``). Returns (the set after the last
    committed row, the number of rows committed). Every kernel that produces ``DetectQuantOutput`` (this
    module's, ``kernels.norm_detect_quant``'s, ``kernels.merge_detect_quant``'s) runs this same code on its own
    input rows, so all of them quantize bit for bit alike."""
    offs = tl.arange(0, BLOCK_C)
    valid = offs < channels
    static_scale = tl.load(static_scale_ptr + t, mask=live, other=float("inf"))
    after, outlier_high, outlier_low, last = detect_rows(x, inliers, valid, live, static_scale, k, INLIER_QMAX,
                                                         False, ROWS)
    committed = live & (tl.arange(0, ROWS) <= last)
    row = (sample * length + t).to(tl.int64)
    out = row[:, None] * channels + offs[None, :]
    stored = committed[:, None] & valid[None, :]
    flagged = after == 0.0
    if STORE_MASK:
        tl.store(mask_ptr + out, flagged.to(tl.uint8), mask=stored)

    inlier_scale = tl.where(live, tl.maximum(static_scale, 1e-8), 1.0)  # rows past the window: never stored
    outlier_scale = tl.maximum(divide_by_constant(tl.maximum(outlier_high, -outlier_low), 127), 1e-8)
    # one division and rounding an element, each on its own grid: an element is an inlier or an outlier
    codes = _quantize(x, tl.where(flagged, outlier_scale[:, None], inlier_scale[:, None]),
                      tl.where(flagged, tl.math.div_rn(1.0, outlier_scale)[:, None],
                               tl.math.div_rn(1.0, inlier_scale)[:, None]),
                      tl.where(flagged, 127.0, INLIER_QMAX * 1.0),
                      ROWS * BLOCK_C >= SHARED_DIVISOR_ELEMENTS)
    inlier_codes = tl.where(flagged, 0, codes)
    tl.store(inlier_ptr + out, inlier_codes.to(tl.int8), mask=stored)
    if PACK:
        low, high = tl.split(tl.reshape(inlier_codes, (ROWS, BLOCK_C // 2, 2)))
        pair = tl.arange(0, BLOCK_C // 2)
        tl.store(packed_ptr + row[:, None] * (channels // 2) + pair[None, :],
                 ((low & 15) | ((high & 15) << 4)).to(tl.uint8),
                 mask=committed[:, None] & (pair < channels // 2)[None, :])

    tl.store(outlier_ptr + out, tl.where(flagged, codes, 0).to(tl.int8), mask=stored)
    tl.store(outlier_scale_ptr + row, outlier_scale, mask=committed)
    tl.store(inlier_scale_ptr + row, inlier_scale, mask=committed)  # the GEMM's per-row inlier scale
    return grow_set(after, last, ROWS)


@triton.jit
def window_program(length, channels, n_refresh, BLOCK_C: tl.constexpr):
    """What a detecting program starts from: its sample, its window's first step and step count, the channel
    offsets with their mask, and the refresh (an empty outlier set: every channel an inlier, 1.0)."""
    offs = tl.arange(0, BLOCK_C)
    start = tl.program_id(1) * n_refresh
    return (tl.program_id(0), start, tl.minimum(n_refresh, length - start), offs, offs < channels,
            (offs < channels).to(tl.float32))


@triton.jit
def round_rows(i, start, steps, valid, ROWS: tl.constexpr):
    """A round from the window's step i: which rows are inside the window, their steps t, the (rows, C) mask."""
    live = i + tl.arange(0, ROWS) < steps
    return live, start + i + tl.arange(0, ROWS), live[:, None] & valid[None, :]


@triton.jit
def load_rows(row_ptr, stride_t, start, i, steps, valid, ROWS: tl.constexpr):
    """The (ROWS, BLOCK_C) tile of the window's steps i, i + 1, … from the channel pointers ``row_ptr`` of the
    window's sample, zero past the window."""
    rows = i + tl.arange(0, ROWS)
    return tl.load(row_ptr[None, :] + (start + rows)[:, None] * stride_t, mask=(rows < steps)[:, None] & valid[None, :],
                   other=0.0)


@triton.jit
def _detect_quant_kernel(x_ptr, stride_xb, stride_xt, stride_xc,
                         static_scale_ptr, inlier_ptr, packed_ptr, mask_ptr, outlier_ptr, outlier_scale_ptr,
                         inlier_scale_ptr,
                         length, channels, n_refresh, k,
                         INLIER_QMAX: tl.constexpr, PACK: tl.constexpr, BLOCK_C: tl.constexpr,
                         STORE_MASK: tl.constexpr, ROWS: tl.constexpr):
    sample, start, steps, offs, valid, inliers = window_program(length, channels, n_refresh, BLOCK_C)
    row = x_ptr + sample * stride_xb + offs * stride_xc
    x_next = load_rows(row, stride_xt, start, 0, steps, valid, ROWS)
    i = 0
    while i < steps:
        live, t, _ = round_rows(i, start, steps, valid, ROWS)
        x = x_next.to(tl.float32)
        x_next = load_rows(row, stride_xt, start, i + ROWS, steps, valid, ROWS)  # before the reductions wait
        inliers, advance = detect_quant_rows(x, inliers, live, sample, t, length, channels, k,
                                             static_scale_ptr, inlier_ptr, packed_ptr, mask_ptr, outlier_ptr,
                                             outlier_scale_ptr, inlier_scale_ptr, INLIER_QMAX, PACK, BLOCK_C,
                                             STORE_MASK, ROWS)
        if advance < ROWS:  # the set grew before the round's last row: the next round starts after it
            x_next = load_rows(row, stride_xt, start, i + advance, steps, valid, ROWS)
        i += advance


def _check(x: torch.Tensor, static_scale: torch.Tensor, n_refresh: int, bits: int) -> None:
    if x.dim() != 3 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be a float (batch, L, C) tensor, got {tuple(x.shape)} {x.dtype}")
    if static_scale.shape != (x.shape[1],):
        raise ValueError(f"static_scale must be (L,) = ({x.shape[1]},), got {tuple(static_scale.shape)}")
    if n_refresh < 1:
        raise ValueError(f"n_refresh must be ≥ 1, got {n_refresh}")
    if bits == 4 and x.shape[2] % 2:
        raise ValueError(f"4-bit packing needs an even channel count, got {x.shape[2]}")
    inlier_qmax(bits)


def _output_layout(x: torch.Tensor, inlier_bits: int,
                   lean: bool = False) -> list[tuple[tuple[int, ...], torch.dtype] | None]:
    """(shape, dtype) of each DetectQuantOutput field for x (None: not produced)."""
    batch, length, channels = x.shape
    packed = ((batch, length, channels // 2), torch.uint8) if inlier_bits == 4 and not lean else None
    return [(x.shape, torch.int8), packed, None if lean else (x.shape, torch.bool), (x.shape, torch.int8),
            ((batch, length), torch.float32), ((batch, length), torch.float32)]


def _check_out(out: DetectQuantOutput, x: torch.Tensor, inlier_bits: int, lean: bool) -> None:
    """A caller's output buffers: each the contiguous (shape, dtype) ``_output_layout`` asks for, on x's device,
    and None where the call produces nothing."""
    for name, buffer, spec in zip(out._fields, out, _output_layout(x, inlier_bits, lean), strict=True):
        if spec is None and buffer is None:
            continue
        if spec is None:
            raise ValueError(f"out.{name} must be None: this call does not produce it "
                             f"({'lean' if lean else f'{inlier_bits}-bit'} output)")
        if buffer is None or (buffer.shape, buffer.dtype) != spec or not buffer.is_contiguous() \
                or buffer.device != x.device:
            raise ValueError(f"out.{name} must be a contiguous buffer {spec} on {x.device}")


def empty_output(x: torch.Tensor, inlier_bits: int, lean: bool = False) -> DetectQuantOutput:
    """Uninitialized output buffers for ``detect_quant(x, …, inlier_bits, out=…, lean=lean)``."""
    return DetectQuantOutput(*(None if spec is None else torch.empty(spec[0], dtype=spec[1], device=x.device)
                               for spec in _output_layout(x, inlier_bits, lean)))


@functools.cache
def launch_block(channels: int) -> tuple[int, int]:
    """(BLOCK_C, num_warps): all C channels in one block (next power of two, masked), 1–8 warps by size."""
    block = max(next_power_of_2(channels), 2)
    return block, max(1, min(8, block // 256))


MAX_ROUND_ROWS = 64
ROUND_VALUES_PER_THREAD = 16  # fp32 values of a round's tile each thread holds at most (``window_rows``)
WINDOW_MAX_ROWS = 8  # every thread holds each per-row statistic: 16 rows spilled at C = 24 in the sm_90 build


@functools.cache
def window_rows(channels: int, n_refresh: int, num_warps: int | None = None) -> int:
    """Rows per round for sites whose outlier set seldom grows inside a window: the whole window (next power of
    two of n_refresh) in one round, but at most ``WINDOW_MAX_ROWS`` and fewer where the tile would pass
    ``ROUND_VALUES_PER_THREAD`` values a thread (C = 1536 at 8 warps: 2 rows). The budget is the sm_90 builds':
    Δ's ``detect_fake_quant`` at C = 1536 takes 63 registers step by step (four programs an SM), 80 at 2 rows
    (three), 165 at 4 (one). A round that grows the set commits only up to that step, so at sites where the set
    grows at most steps this does more work for no fewer rounds: those keep 1 (step by step)."""
    block, warps = launch_block(channels)
    per_round = ROUND_VALUES_PER_THREAD * 32 * (num_warps or warps) // block
    return max(1, min(next_power_of_2(n_refresh), per_round, WINDOW_MAX_ROWS))


@functools.cache
def detect_launches(channels: int, n_refresh: int, rows_per_round: int) -> tuple[tuple[int, int], ...]:
    """(num_warps, rows_per_round) a detecting launch may take, the fixed rule first (``launch_block``'s warps,
    the rows asked for), then fewer warps down to 32 channels a thread (64 spill in the sm_90 build), each in
    rounds of up to the rows asked for where ``window_rows``' register budget allows, and step by step. The
    same values whichever runs (tested); ``kernels.tuning`` times them."""
    block, warps = launch_block(channels)
    options = [(warps, rows_per_round)]
    while warps >= 1 and block <= 32 * 32 * warps:
        for rows in (min(rows_per_round, window_rows(channels, n_refresh, warps)), 1):
            if (warps, rows) not in options:
                options.append((warps, rows))
        warps //= 2
    return tuple(options)


REGISTER_CAP = 64  # 65,536 registers an SM / (8 warps · 32 threads · 64) = four programs an SM
WIDE_REGISTER_CAP = 72  # three programs an SM


def register_cap(num_warps: int, rows: int, registers: int = REGISTER_CAP) -> dict[str, int]:
    """Launch options holding a step-by-step launch of eight warps (C ≥ 1536) to ``registers``. Triton 3.6,
    the GPU machine's, builds the lean C = 1536 detection at 78 registers by itself (three programs an SM) and
    at 64 with ``REGISTER_CAP``, without spilling (``python -m kernels.sm90_build``). Steps that hold more per
    element spill 16 bytes under that cap with 3.6 and get ``WIDE_REGISTER_CAP``: every output of
    ``detect_quant`` (75 registers uncapped), Δ's ``detect_fake_quant`` (91). Rounds of several rows need more
    and keep what the compiler picks."""
    return {"maxnreg": registers} if num_warps == 8 and rows == 1 else {}


def check_rows(rows_per_round: int) -> int:
    """``rows_per_round`` itself, or a ValueError that says what it may be."""
    if rows_per_round & (rows_per_round - 1) or not 1 <= rows_per_round <= MAX_ROUND_ROWS:
        raise ValueError(f"rows_per_round must be a power of two from 1 to {MAX_ROUND_ROWS}, got {rows_per_round}")
    return rows_per_round


def launch_detect_quant(kernel: triton.JITFunction, inputs: tuple, x: torch.Tensor, static_scale: torch.Tensor,
                        k: float, n_refresh: int, inlier_bits: int, out: DetectQuantOutput | None,
                        lean: bool = False, num_warps: int | None = None, rows_per_round: int = 1,
                        tune: bool = False, **constants: object) -> DetectQuantOutput:
    """Check, allocate and launch a kernel built on ``detect_quant_rows``: its own arguments (``inputs``) come
    first, then the ones every such kernel shares, in ``_detect_quant_kernel``'s order. ``x`` stands for the
    activation being quantized (its shape, dtype and device); one program per (sample, window). ``lean``: only
    what ``mixed_gemm``'s int8 path reads, the inlier codes as int8 whatever the bits (no mask, no packed copy):
    2 bytes written per element instead of 3.5 at 4 bits, 3 at 8. ``num_warps`` replaces ``launch_block``'s
    choice (the benchmark compares them: fewer warps, fewer barriers per reduction, more work per thread).
    ``rows_per_round``: how many of a window's steps a round detects at once (``detect_rows``; ``window_rows``).
    ``tune`` (without ``num_warps``): on CUDA the first call of each shape times ``detect_launches`` (rows up to
    ``rows_per_round``) and every later one runs the fastest (``kernels.tuning.TUNER``); the launch must then be
    repeatable (no output aliasing an input)."""
    _check(x, static_scale, n_refresh, inlier_bits)
    check_rows(rows_per_round)
    if out is None:
        out = empty_output(x, inlier_bits, lean)
    else:
        _check_out(out, x, inlier_bits, lean)
    batch, length, channels = x.shape
    static_scale = static_scale.to(device=x.device, dtype=torch.float32).contiguous()
    block, warps = launch_block(channels)
    if num_warps is not None and (num_warps & (num_warps - 1) or not 1 <= num_warps <= 32):
        raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps}")
    placeholder = out.outlier_codes  # for the buffers a lean output lacks: never written (constexpr flags off)
    pack = out.inlier_packed is not None

    def launch(option: tuple[int, int]) -> None:
        kernel[(batch, cdiv(length, n_refresh))](
            *inputs, static_scale, out.inlier_codes, out.inlier_packed if pack else placeholder,
            placeholder if out.outlier_mask is None else out.outlier_mask.view(torch.uint8), out.outlier_codes,
            out.outlier_scale, out.inlier_scale, length, channels, n_refresh, float(k),
            INLIER_QMAX=inlier_qmax(inlier_bits), PACK=pack, BLOCK_C=block, STORE_MASK=out.outlier_mask is not None,
            ROWS=option[1], **constants, num_warps=option[0],
            **register_cap(*option, REGISTER_CAP if lean else WIDE_REGISTER_CAP),
            enable_fp_fusion=False)  # no FMA: mean + k·std as PyTorch rounds it

    candidates = detect_launches(channels, n_refresh, rows_per_round) if tune and num_warps is None \
        else ((num_warps or warps, rows_per_round),)
    key = (kernel, x.shape, x.stride(), x.dtype, n_refresh, inlier_bits, pack, lean, rows_per_round,
           tuple(sorted(constants.items())))
    tuning.TUNER.launch(key, candidates, launch, x.device)
    return out


def detect_quant(x: torch.Tensor, static_scale: torch.Tensor, k: float, n_refresh: int, inlier_bits: int,
                 out: DetectQuantOutput | None = None, lean: bool = False,
                 num_warps: int | None = None, rows_per_round: int = 1, tune: bool = False) -> DetectQuantOutput:
    """Triton: outlier masks, inlier/outlier codes and scales of x (batch, L, C), fp32/fp16/bf16, any strides.
    ``out`` (from ``empty_output``) is written in place, so repeated calls allocate nothing; ``lean`` skips what
    the GEMM does not read, ``num_warps``, ``rows_per_round`` and ``tune`` set the launch (see
    ``launch_detect_quant``); none of them changes a value."""
    return launch_detect_quant(_detect_quant_kernel, (x, *x.stride()), x, static_scale, k, n_refresh, inlier_bits,
                               out, lean, num_warps, rows_per_round, tune)


def window_outlier_masks(x: torch.Tensor, static_scale: torch.Tensor, k: float, n_refresh: int,
                         trigger_scale: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The outlier mask (batch, L, C) of fp32 x: per window of n_refresh steps the set grows at every step whose
    ``trigger_scale(row, mask)`` (batch, windows) exceeds the static scale by the channels above mean + k·std
    of |x| over the current inliers. All windows in parallel, step by step inside them."""
    batch, length, channels = x.shape
    n_refresh = min(n_refresh, length)  # a longer window is the whole scan: the same masks, no padding to it
    windows = -(-length // n_refresh)
    pad = windows * n_refresh - length
    xw = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(batch, windows, n_refresh, channels)
    static = static_scale.to(device=x.device, dtype=torch.float32)
    static_w = torch.nn.functional.pad(static, (0, pad), value=float("inf")).view(windows, n_refresh)
    mask = torch.zeros(batch, windows, channels, dtype=torch.bool, device=x.device)
    masks = []
    for i in range(n_refresh):
        magnitude = xw[:, :, i].abs()
        keep = (~mask).float()
        trigger = trigger_scale(xw[:, :, i], mask) > static_w[:, i]
        count = keep.sum(-1)
        mean = (magnitude * keep).sum(-1) / count.clamp(min=1)
        var = (((magnitude - mean[..., None]) ** 2) * keep).sum(-1) / (count - 1).clamp(min=1)
        theta = mean + k * var.sqrt()
        mask = mask | ((magnitude > theta[..., None]) & trigger[..., None])
        masks.append(mask)
    return torch.stack(masks, dim=2).view(batch, windows * n_refresh, channels)[:, :length]


def detect_quant_reference(x: torch.Tensor, static_scale: torch.Tensor, k: float, n_refresh: int,
                           inlier_bits: int) -> DetectQuantOutput:
    """PyTorch: the same function, step by step over the windows (all windows in parallel), in fp32."""
    _check(x, static_scale, n_refresh, inlier_bits)
    qmax = inlier_qmax(inlier_bits)
    x = x.float()
    batch, length, _ = x.shape
    mask = window_outlier_masks(x, static_scale, k, n_refresh,
                                lambda row, mask: row.abs().masked_fill(mask, 0).amax(-1) / qmax)
    static = static_scale.to(device=x.device, dtype=torch.float32)

    inlier_scale = static.clamp(min=MIN_SCALE)
    inlier = torch.clamp(torch.round(x.masked_fill(mask, 0) / inlier_scale[:, None]), -qmax, qmax).to(torch.int8)
    outlier_scale = ((x.abs() * mask).amax(-1) / OUTLIER_QMAX).clamp(min=MIN_SCALE)
    outlier = torch.clamp(torch.round(x / outlier_scale[..., None]), -OUTLIER_QMAX, OUTLIER_QMAX)
    outlier = outlier.masked_fill(~mask, 0).to(torch.int8)
    packed = pack_int4(inlier) if inlier_bits == 4 else None
    return DetectQuantOutput(inlier, packed, mask, outlier, inlier_scale.expand(batch, length).contiguous(),
                             outlier_scale)
