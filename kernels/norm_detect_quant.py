"""Residual add + RMSNorm + per-time-step outlier detection + quantization in one kernel (a Vim block's entry).

A Vim block computes ``residual ← residual + hidden`` (fp32), ``x = RMSNorm(residual)`` cast to hidden's dtype,
and feeds x to in_proj, whose packed form quantizes it with ``kernels.detect_quant``. Here the whole chain is one
pass: per token the kernel reads residual and hidden once, writes the new residual (the next block needs it) and
detect_quant's outputs for x; x itself never reaches memory (in_proj is its only consumer).

RMSNorm is core.models.vim's: x32 · rsqrt(mean(x32²) + eps) · w, eps inside the root, then cast to hidden's
dtype (fp32/fp16/bf16) before quantization, as the model quantizes the cast value. Every step is a correctly
rounded fp32 operation with one order fixed: mean = sum / C, the reciprocal root as 1 / sqrt, (x · 1/rms) · w,
no FMA contraction. PyTorch's own fp32 sqrt and rsqrt are not correctly rounded (on the CPU through MKL, ~17 %
of sqrt results an ulp off on the development machine; on CUDA rsqrtf is approximate), so the model's RMSNorm
differs from this one, and from itself across devices, by an ulp of the root; the reference here takes the root
in float64 and rounds it, which is portable. The sum of squares is the one reduction whose order differs from
PyTorch's: the outputs equal the reference bit for bit whenever that sum is exact (the tests' data are chosen so)
and otherwise differ only where an ulp of the normalized value moves a rounding or a detection decision.

Kernel: ``kernels.detect_quant``'s, one program per (sample, window) walking the window's steps in rounds; each
round builds its normalized rows in registers and hands them to ``detect_quant_rows``. A row's residual is
written when its round commits it (a later round reads the uncommitted rows again, and ``residual_out`` may be
``residual``).

``add_rms_norm`` is the same producer (``add_norm_rows``) for a float model: it writes the normalized value
instead of quantizing it, one program per block of whole rows.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.detect_quant import (
    DetectQuantOutput,
    detect_quant_reference,
    detect_quant_rows,
    launch_detect_quant,
    round_rows,
    round_to_dtype,
    window_program,
)
from kernels.host import cdiv, next_power_of_2


@triton.jit
def add_norm_rows(hidden_rows, residual_rows, stride_hc, stride_rc, offs, tile, weight, eps, channels,
                  HAS_RESIDUAL: tl.constexpr):
    """(residual + hidden in fp32, RMSNorm of it rounded to hidden's dtype) for a tile of rows, given pointers to
    each row's start in hidden and residual: the producer ``norm_detect_quant`` quantizes and ``add_rms_norm``
    writes."""
    residual = tl.load(hidden_rows[:, None] + offs[None, :] * stride_hc, mask=tile, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual += tl.load(residual_rows[:, None] + offs[None, :] * stride_rc, mask=tile, other=0.0)
    mean_square = tl.math.div_rn(tl.sum(residual * residual, axis=1), channels * 1.0)
    inv_rms = tl.math.div_rn(1.0, tl.sqrt_rn(mean_square + eps))
    dtype = hidden_rows.dtype.element_ty
    return residual, round_to_dtype((residual * inv_rms[:, None]) * weight[None, :], dtype)


@triton.jit
def _norm_detect_quant_kernel(hidden_ptr, residual_ptr, weight_ptr, residual_out_ptr, eps,
                              stride_hb, stride_ht, stride_hc, stride_rb, stride_rt, stride_rc,
                              stride_ob, stride_ot, stride_oc,
                              static_scale_ptr, inlier_ptr, packed_ptr, mask_ptr, outlier_ptr, outlier_scale_ptr,
                              inlier_scale_ptr,
                              length, channels, n_refresh, k,
                              INLIER_QMAX: tl.constexpr, PACK: tl.constexpr, BLOCK_C: tl.constexpr,
                              STORE_MASK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr):
    sample, start, steps, offs, valid, inliers = window_program(length, channels, n_refresh, BLOCK_C)
    weight = tl.load(weight_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    i = 0
    while i < steps:
        live, t, tile = round_rows(i, start, steps, valid, ROWS)
        # the model quantizes the normalized value cast to hidden's dtype
        residual, x = add_norm_rows(hidden_ptr + sample * stride_hb + t * stride_ht,
                                    residual_ptr + sample * stride_rb + t * stride_rt, stride_hc, stride_rc, offs,
                                    tile, weight, eps, channels, HAS_RESIDUAL)
        residual_out = residual_out_ptr + sample * stride_ob + t[:, None] * stride_ot + offs[None, :] * stride_oc
        if ROWS == 1:  # the step is committed: store before the reductions (the row need not stay live)
            tl.store(residual_out, residual, mask=tile)
        inliers, advance = detect_quant_rows(x, inliers, live, sample, t, length, channels, k, static_scale_ptr,
                                             inlier_ptr, packed_ptr, mask_ptr, outlier_ptr, outlier_scale_ptr,
                                             inlier_scale_ptr, INLIER_QMAX, PACK, BLOCK_C, STORE_MASK, ROWS)
        if ROWS > 1:  # only the committed rows: a later round reads the others again (residual_out may be residual)
            tl.store(residual_out, residual, mask=tile & (tl.arange(0, ROWS) < advance)[:, None])
        i += advance


def _check(hidden: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
           residual_out: torch.Tensor | None) -> None:
    if hidden.dim() != 3 or norm_weight.shape != (hidden.shape[-1],) or norm_weight.device != hidden.device:
        raise ValueError(f"norm_weight must be (C,) on hidden's device, hidden (batch, L, C); got "
                         f"{tuple(norm_weight.shape)} and {tuple(hidden.shape)}")
    if residual is not None and (residual.shape != hidden.shape or residual.dtype != torch.float32
                                 or residual.device != hidden.device):
        raise ValueError(f"residual must be fp32 {tuple(hidden.shape)} on {hidden.device} like hidden, got "
                         f"{residual.dtype} {tuple(residual.shape)} on {residual.device}")
    if residual_out is not None and (residual_out.shape != hidden.shape or residual_out.dtype != torch.float32
                                     or residual_out.device != hidden.device):
        raise ValueError(f"residual_out must be fp32 {tuple(hidden.shape)} on {hidden.device}")


def norm_detect_quant(hidden: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                      static_scale: torch.Tensor, k: float, n_refresh: int, inlier_bits: int,
                      out: DetectQuantOutput | None = None, residual_out: torch.Tensor | None = None,
                      lean: bool = False, rows_per_round: int = 1,
                      tune: bool = False) -> tuple[DetectQuantOutput, torch.Tensor]:
    """Triton: (detect_quant(RMSNorm(residual + hidden) cast to hidden's dtype), residual + hidden in fp32).

    hidden (batch, L, C) fp32/fp16/bf16 and residual (batch, L, C) fp32 (None: the first block, whose residual
    is hidden itself), any strides; norm_weight (C,). ``out`` and ``lean`` as for ``detect_quant``;
    ``residual_out`` (fp32, any strides) may be ``residual`` itself: each element is read before it is
    overwritten, by the same thread, and rows are written only when their round commits them.
    ``rows_per_round`` and ``tune`` as for ``detect_quant``; ``tune`` only where the call allocates the new
    residual (a residual updated in place cannot be timed by running it again)."""
    _check(hidden, residual, norm_weight, residual_out)
    tune = tune and residual_out is None
    residual_out = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if residual_out is None \
        else residual_out
    inputs = (hidden, hidden if residual is None else residual, norm_weight, residual_out, float(eps),
              *hidden.stride(), *(hidden if residual is None else residual).stride(), *residual_out.stride())
    out = launch_detect_quant(_norm_detect_quant_kernel, inputs, hidden, static_scale, k, n_refresh, inlier_bits, out,
                              lean, rows_per_round=rows_per_round, tune=tune, HAS_RESIDUAL=residual is not None)
    return out, residual_out


@triton.jit
def _add_rms_norm_kernel(hidden_ptr, residual_ptr, weight_ptr, residual_out_ptr, out_ptr, eps,
                         stride_hb, stride_ht, stride_hc, stride_rb, stride_rt, stride_rc,
                         stride_ob, stride_ot, stride_oc, stride_xb, stride_xt, stride_xc,
                         rows, length, channels,
                         BLOCK_C: tl.constexpr, ROWS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    sample, t = row // length, row % length
    offs = tl.arange(0, BLOCK_C)
    valid = offs < channels
    tile = (row < rows)[:, None] & valid[None, :]
    weight = tl.load(weight_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    residual, x = add_norm_rows(hidden_ptr + sample * stride_hb + t * stride_ht,
                                residual_ptr + sample * stride_rb + t * stride_rt, stride_hc, stride_rc, offs, tile,
                                weight, eps, channels, HAS_RESIDUAL)
    tl.store(residual_out_ptr + (sample * stride_ob + t * stride_ot)[:, None] + offs[None, :] * stride_oc, residual,
             mask=tile)
    tl.store(out_ptr + (sample * stride_xb + t * stride_xt)[:, None] + offs[None, :] * stride_xc,
             x.to(out_ptr.dtype.element_ty), mask=tile)


NORM_ELEMENTS = 4096  # per program of add_rms_norm: whole rows, as many as fit


@functools.cache
def _norm_launch(channels: int) -> tuple[int, int, int]:
    """(BLOCK_C, rows a program, num_warps) of ``add_rms_norm``."""
    block = max(next_power_of_2(channels), 2)
    rows = max(1, NORM_ELEMENTS // block)
    return block, rows, max(1, min(8, rows * block // 512))


def add_rms_norm(hidden: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None,
                 residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: (RMSNorm(residual + hidden) cast to hidden's dtype, residual + hidden in fp32): the producer of
    ``norm_detect_quant`` writing the normalized value instead of quantizing it (a float Vim's block entry,
    ``core.models.fused``), in one pass. Arguments as for ``norm_detect_quant``; ``out`` (hidden's shape and
    dtype, any strides) receives the normalized value. The values are ``norm_detect_quant``'s rows bit for bit."""
    _check(hidden, residual, norm_weight, residual_out)
    if out is not None and (out.shape != hidden.shape or out.dtype != hidden.dtype or out.device != hidden.device):
        raise ValueError(f"out must be {hidden.dtype} {tuple(hidden.shape)} on {hidden.device}")
    residual_out = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if residual_out is None \
        else residual_out
    out = torch.empty_like(hidden) if out is None else out
    batch, length, channels = hidden.shape
    block, rows, warps = _norm_launch(channels)
    source = hidden if residual is None else residual
    _add_rms_norm_kernel[(cdiv(batch * length, rows),)](
        hidden, source, norm_weight, residual_out, out, float(eps), *hidden.stride(), *source.stride(),
        *residual_out.stride(), *out.stride(), batch * length, length, channels,
        BLOCK_C=block, ROWS=rows, HAS_RESIDUAL=residual is not None, num_warps=warps,
        enable_fp_fusion=False)  # no FMA: the rounding of norm_detect_quant's rows
    return out, residual_out


def rms_norm_reference(residual: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """core.models.vim.RMSNorm on an fp32 input, its rsqrt written 1 / sqrt with both operations correctly rounded
    (the root taken in float64 and rounded to fp32; see the module docstring)."""
    root = torch.sqrt((residual.pow(2).mean(-1, keepdim=True) + eps).double()).float()
    return residual * (1 / root) * norm_weight.float()


def norm_detect_quant_reference(hidden: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                                eps: float, static_scale: torch.Tensor, k: float, n_refresh: int,
                                inlier_bits: int) -> tuple[DetectQuantOutput, torch.Tensor]:
    """PyTorch: the Block's add and norm as core.models.vim writes them, then ``detect_quant_reference``."""
    _check(hidden, residual, norm_weight, None)
    residual = hidden.float() if residual is None else residual + hidden.float()
    x = rms_norm_reference(residual, norm_weight, eps).to(hidden.dtype)
    return detect_quant_reference(x, static_scale, k, n_refresh, inlier_bits), residual
