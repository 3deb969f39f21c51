"""Per-time-step outlier detection + fake quantization of the scan's inputs Δ, B and C (OuroMamba-Quant, §3.2).

The projections consume integer codes (``kernels.detect_quant``); the selective scan consumes floating point.
Its inputs are still quantized as the method says, so that the integer model computes what the simulation
computed: per (sample, window of ``n_refresh`` steps) the outlier set grows exactly as in ``detect_quant``, then
each step's inliers are rounded on the calibrated static grid and its outliers on a dynamic per-(sample, step)
grid, and the dequantized values are written back in x's dtype. Δ (before softplus) uses unsigned grids with a
zero point (``ASYMMETRIC``): the trigger is then (max − min) over the inlier channels / levels; B and C use
symmetric grids. ``outlier_levels`` 0 keeps the outliers in floating point (the "O16" settings).

Without this kernel the same function runs as ~15 PyTorch operations per step of the window, ~150 launches per
tensor, six tensors per layer: the integer model was launch-bound (measured, results/e2e_*.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import tuning
from kernels.detect_quant import (
    MIN_SCALE,
    SHARED_DIVISOR_ELEMENTS,
    WIDE_REGISTER_CAP,
    _round_half_even,
    check_rows,
    detect_launches,
    detect_rows,
    divide,
    divide_by_constant,
    grow_set,
    launch_block,
    load_rows,
    register_cap,
    round_rows,
    window_outlier_masks,
    window_program,
)
from kernels.host import cdiv


@triton.jit
def _grid_round(v, scale, reciprocal, lowest, highest, BY_RECIPROCAL: tl.constexpr):
    """round(clamp(v / scale, lowest, highest)) · scale: fake quantization on a grid of integer codes
    ``lowest``…``highest``; the grid (``scale`` with its correctly rounded ``reciprocal``, the bounds) may differ
    per element (one call rounds inliers and outliers on their own grids). Clamping to integer bounds and
    rounding commute, so clamping first keeps |q| small enough for ``_round_half_even``."""
    q = tl.minimum(tl.maximum(divide(v, scale, reciprocal, BY_RECIPROCAL), lowest), highest)
    return _round_half_even(q) * scale


@triton.jit
def _detect_fake_quant_kernel(x_ptr, stride_xb, stride_xt, stride_xc, y_ptr, scale_ptr, zero_ptr,
                              length, channels, n_refresh, k,
                              LEVELS: tl.constexpr, OUTLIER_LEVELS: tl.constexpr, ASYMMETRIC: tl.constexpr,
                              BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    sample, start, steps, offs, valid, inliers = window_program(length, channels, n_refresh, BLOCK_C)
    BY_RECIPROCAL: tl.constexpr = ROWS * BLOCK_C >= SHARED_DIVISOR_ELEMENTS
    row = x_ptr + sample * stride_xb + offs * stride_xc
    x_next = load_rows(row, stride_xt, start, 0, steps, valid, ROWS)
    i = 0
    while i < steps:
        live, t, tile = round_rows(i, start, steps, valid, ROWS)
        x = x_next.to(tl.float32)
        x_next = load_rows(row, stride_xt, start, i + ROWS, steps, valid, ROWS)  # before the reductions wait
        static_scale = tl.load(scale_ptr + t, mask=live, other=float("inf"))
        after, outlier_high, outlier_low, last = detect_rows(x, inliers, valid, live, static_scale, k, LEVELS,
                                                             ASYMMETRIC, ROWS)
        flagged = after == 0.0

        inlier_scale = tl.where(live, tl.maximum(static_scale, 1e-8), 1.0)[:, None]  # past the window: not stored
        inlier_reciprocal = tl.math.div_rn(1.0, inlier_scale)
        levels = LEVELS * 1.0
        if ASYMMETRIC:
            zero = tl.load(zero_ptr + t, mask=live, other=0.0)[:, None]
        if OUTLIER_LEVELS > 0:  # one division and rounding an element, inliers and outliers each on their grid
            if ASYMMETRIC:
                outlier_scale = tl.maximum(divide_by_constant(outlier_high - outlier_low, OUTLIER_LEVELS), 1e-8)
                outlier_zero = _round_half_even(tl.math.div_rn(-outlier_low, outlier_scale))[:, None]
                zero = tl.where(flagged, outlier_zero, zero)
            else:
                outlier_peak = tl.maximum(outlier_high, -outlier_low)
                outlier_scale = tl.maximum(divide_by_constant(outlier_peak, OUTLIER_LEVELS), 1e-8)
            levels = tl.where(flagged, OUTLIER_LEVELS * 1.0, levels)
            scale = tl.where(flagged, outlier_scale[:, None], inlier_scale)
            reciprocal = tl.where(flagged, tl.math.div_rn(1.0, outlier_scale)[:, None], inlier_reciprocal)
        else:  # outliers stay in floating point
            scale, reciprocal = inlier_scale, inlier_reciprocal
        # unsigned 0…levels with zero point z: clamp(round(q) + z, 0, levels) − z = round(clamp(q, −z, levels − z))
        if ASYMMETRIC:
            y = _grid_round(x, scale, reciprocal, -zero, levels - zero, BY_RECIPROCAL)
        else:
            y = _grid_round(x, scale, reciprocal, -levels, levels, BY_RECIPROCAL)
        if OUTLIER_LEVELS == 0:
            y = tl.where(flagged, x, y)
        tl.store(y_ptr + (sample * length + t).to(tl.int64)[:, None] * channels + offs[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=tile & (tl.arange(0, ROWS) <= last)[:, None])
        inliers, advance = grow_set(after, last, ROWS)
        if advance < ROWS:  # the set grew before the round's last row: the next round starts after it
            x_next = load_rows(row, stride_xt, start, i + advance, steps, valid, ROWS)
        i += advance


def _check(x: torch.Tensor, static_scale: torch.Tensor, zero_point: torch.Tensor | None, n_refresh: int) -> None:
    if x.dim() != 3 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be a float (batch, L, C) tensor, got {tuple(x.shape)} {x.dtype}")
    for name, value in (("static_scale", static_scale), ("zero_point", zero_point)):
        if value is not None and value.shape != (x.shape[1],):
            raise ValueError(f"{name} must be (L,) = ({x.shape[1]},), got {tuple(value.shape)}")
    if n_refresh < 1:
        raise ValueError(f"n_refresh must be ≥ 1, got {n_refresh}")


def detect_fake_quant(x: torch.Tensor, static_scale: torch.Tensor, zero_point: torch.Tensor | None, k: float,
                      n_refresh: int, levels: int, outlier_levels: int, rows_per_round: int = 1,
                      tune: bool = False) -> torch.Tensor:
    """Triton: x (batch, L, C) detected and fake-quantized, same shape and dtype, contiguous. ``zero_point``
    (L,) selects the unsigned grid (``levels`` = 2^bits − 1) and None the symmetric one (``levels`` = qmax).
    ``rows_per_round``: steps of a window detected at once (``kernels.detect_quant.window_rows``), not a value;
    ``tune``: on CUDA, the fastest of ``detect_launches`` per shape (``kernels.tuning``), not a value either."""
    _check(x, static_scale, zero_point, n_refresh)
    check_rows(rows_per_round)
    batch, length, channels = x.shape
    y = torch.empty((batch, length, channels), dtype=x.dtype, device=x.device)
    scale = static_scale.to(device=x.device, dtype=torch.float32).contiguous()
    asymmetric = zero_point is not None
    zero = zero_point.to(device=x.device, dtype=torch.float32).contiguous() if asymmetric else scale
    block, warps = launch_block(channels)

    def launch(option: tuple[int, int]) -> None:
        _detect_fake_quant_kernel[(batch, cdiv(length, n_refresh))](
            x, *x.stride(), y, scale, zero, length, channels, n_refresh, float(k), LEVELS=levels,
            OUTLIER_LEVELS=outlier_levels, ASYMMETRIC=asymmetric, BLOCK_C=block, ROWS=option[1],
            num_warps=option[0], **register_cap(*option, WIDE_REGISTER_CAP),
            enable_fp_fusion=False)  # no FMA: as PyTorch rounds

    key = (_detect_fake_quant_kernel, x.shape, x.stride(), x.dtype, n_refresh, levels, outlier_levels, asymmetric,
           rows_per_round)
    candidates = detect_launches(channels, n_refresh, rows_per_round) if tune else ((warps, rows_per_round),)
    tuning.TUNER.launch(key, candidates, launch, x.device)
    return y


def _fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, levels: int) -> torch.Tensor:
    if zero is None:
        return torch.clamp(torch.round(x / scale), -levels, levels) * scale
    return (torch.clamp(torch.round(x / scale) + zero, 0, levels) - zero) * scale


def detect_fake_quant_reference(x: torch.Tensor, static_scale: torch.Tensor, zero_point: torch.Tensor | None,
                                k: float, n_refresh: int, levels: int, outlier_levels: int) -> torch.Tensor:
    """PyTorch: the same function in fp32, all windows in parallel, step by step inside them."""
    _check(x, static_scale, zero_point, n_refresh)
    dtype, x = x.dtype, x.float()
    asymmetric = zero_point is not None

    def trigger_scale(row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not asymmetric:
            return row.abs().masked_fill(mask, 0).amax(-1) / levels
        spread = row.masked_fill(mask, float("-inf")).amax(-1) - row.masked_fill(mask, float("inf")).amin(-1)
        return torch.nan_to_num(spread / levels, nan=0.0, posinf=0.0, neginf=0.0)

    mask = window_outlier_masks(x, static_scale.float(), k, n_refresh, trigger_scale)
    static = static_scale.to(x.device).float().clamp(min=MIN_SCALE)[:, None]
    zero = None if zero_point is None else zero_point.to(x.device).float()[:, None]
    y = _fake_quant(x.masked_fill(mask, 0), static, zero, levels)
    if outlier_levels == 0:
        return torch.where(mask, x, y).to(dtype)
    if asymmetric:
        high = x.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True).nan_to_num(neginf=0.0).clamp(min=0)
        low = x.masked_fill(~mask, float("inf")).amin(-1, keepdim=True).nan_to_num(posinf=0.0).clamp(max=0)
        scale = ((high - low) / outlier_levels).clamp(min=MIN_SCALE)
        outliers = _fake_quant(x, scale, torch.round(-low / scale), outlier_levels)
    else:
        scale = ((x.abs() * mask).amax(-1, keepdim=True) / outlier_levels).clamp(min=MIN_SCALE)
        outliers = _fake_quant(x, scale, None, outlier_levels)
    return torch.where(mask, outliers, y).to(dtype)
