"""The merge of Vim's two scan directions fused into out_proj's outlier detection + quantization.

Vim's mixer feeds out_proj with (y_forward + flip(y_backward)) / 2, where y_backward is the backward branch's
output in its own (reversed) time order. In PyTorch that is three passes over (batch, L, E) — the flip copy, the
add, the halving — and detect_quant reads the result once more: ~16 bytes per element in fp16 before the codes
are written. Here one kernel reads each input once (4 bytes per element in fp16), y_backward at time L − 1 − t, so
neither the flipped copy nor the merged activation exists (out_proj is the merge's only consumer).

The merged value rounds as PyTorch's does in the inputs' dtype: the sum is computed in fp32 and rounded to the
dtype, then halved (exact in fp32) and rounded again, so the codes equal ``detect_quant`` on the merged tensor bit
for bit. Kernel: ``kernels.detect_quant``'s, one program per (sample, window) in rounds; each round builds its
merged rows in registers and hands them to ``detect_quant_rows``.

``merge_directions`` is the same producer (``merged_rows``) for a float model: it writes the merge instead of
quantizing it.
"""

from __future__ import annotations

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
from kernels.host import cdiv


@triton.jit
def merged_rows(forward_rows, backward_rows, stride_fc, stride_bc, offs, tile):
    """(y_forward + y_backward) / 2 rounded as PyTorch rounds it in the inputs' dtype, for a tile of rows given
    pointers to each row's start (the backward row already the one of the mirrored time-step)."""
    forward = tl.load(forward_rows[:, None] + offs[None, :] * stride_fc, mask=tile, other=0.0)
    backward = tl.load(backward_rows[:, None] + offs[None, :] * stride_bc, mask=tile, other=0.0)
    dtype = forward_rows.dtype.element_ty
    return round_to_dtype(round_to_dtype(forward.to(tl.float32) + backward.to(tl.float32), dtype) * 0.5, dtype)


@triton.jit
def _merge_detect_quant_kernel(forward_ptr, backward_ptr, stride_fb, stride_ft, stride_fc, stride_bb, stride_bt,
                               stride_bc,
                               static_scale_ptr, inlier_ptr, packed_ptr, mask_ptr, outlier_ptr, outlier_scale_ptr,
                               inlier_scale_ptr,
                               length, channels, n_refresh, k,
                               INLIER_QMAX: tl.constexpr, PACK: tl.constexpr, BLOCK_C: tl.constexpr,
                               STORE_MASK: tl.constexpr, ROWS: tl.constexpr):
    sample, start, steps, offs, valid, inliers = window_program(length, channels, n_refresh, BLOCK_C)
    i = 0
    while i < steps:
        live, t, tile = round_rows(i, start, steps, valid, ROWS)
        x = merged_rows(forward_ptr + sample * stride_fb + t * stride_ft,
                        backward_ptr + sample * stride_bb + (length - 1 - t) * stride_bt, stride_fc, stride_bc, offs,
                        tile)
        inliers, advance = detect_quant_rows(x, inliers, live, sample, t, length, channels, k, static_scale_ptr,
                                             inlier_ptr, packed_ptr, mask_ptr, outlier_ptr, outlier_scale_ptr,
                                             inlier_scale_ptr, INLIER_QMAX, PACK, BLOCK_C, STORE_MASK, ROWS)
        i += advance


def _check(y_forward: torch.Tensor, y_backward: torch.Tensor) -> None:
    if y_backward.shape != y_forward.shape or y_backward.dtype != y_forward.dtype \
            or y_backward.device != y_forward.device:
        raise ValueError(f"y_forward and y_backward must agree in shape, dtype and device, got "
                         f"{y_forward.dtype} {tuple(y_forward.shape)} on {y_forward.device} and "
                         f"{y_backward.dtype} {tuple(y_backward.shape)} on {y_backward.device}")


def merge_detect_quant(y_forward: torch.Tensor, y_backward: torch.Tensor, static_scale: torch.Tensor, k: float,
                       n_refresh: int, inlier_bits: int, out: DetectQuantOutput | None = None,
                       lean: bool = False, rows_per_round: int = 1, tune: bool = False) -> DetectQuantOutput:
    """Triton: ``detect_quant((y_forward + y_backward.flip(1)) / 2, …)`` without materialising either operand.

    y_forward (batch, L, E) and y_backward (batch, L, E) in the backward branch's time order, same float dtype,
    any strides. ``out``, ``lean``, ``rows_per_round`` and ``tune`` as for ``detect_quant``."""
    _check(y_forward, y_backward)
    return launch_detect_quant(_merge_detect_quant_kernel, (y_forward, y_backward, *y_forward.stride(),
                                                            *y_backward.stride()),
                               y_forward, static_scale, k, n_refresh, inlier_bits, out, lean,
                               rows_per_round=rows_per_round, tune=tune)


@triton.jit
def _merge_directions_kernel(forward_ptr, backward_ptr, out_ptr, stride_fb, stride_ft, stride_fc,
                             stride_bb, stride_bt, stride_bc, stride_ob, stride_ot, stride_oc, rows, length, channels,
                             BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    sample, t = row // length, row % length
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tile = (row < rows)[:, None] & (offs < channels)[None, :]
    x = merged_rows(forward_ptr + sample * stride_fb + t * stride_ft,
                    backward_ptr + sample * stride_bb + (length - 1 - t) * stride_bt, stride_fc, stride_bc, offs, tile)
    tl.store(out_ptr + (sample * stride_ob + t * stride_ot)[:, None] + offs[None, :] * stride_oc,
             x.to(out_ptr.dtype.element_ty), mask=tile)


MERGE_BLOCK = (16, 256)  # rows × channels a program of merge_directions: element-wise, any tile streams


def merge_directions(y_forward: torch.Tensor, y_backward: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton: ``(y_forward + y_backward.flip(1)) / 2`` in one pass, without the flipped copy (a float Vim's merge,
    ``core.models.fused``), bit for bit PyTorch's; the producer ``merge_detect_quant`` quantizes. Inputs as for
    ``merge_detect_quant``; ``out`` (their shape and dtype, any strides) receives the merge."""
    _check(y_forward, y_backward)
    if out is not None and (out.shape != y_forward.shape or out.dtype != y_forward.dtype
                            or out.device != y_forward.device):
        raise ValueError(f"out must be {y_forward.dtype} {tuple(y_forward.shape)} on {y_forward.device}")
    out = torch.empty_like(y_forward) if out is None else out
    batch, length, channels = y_forward.shape
    rows, block = MERGE_BLOCK
    _merge_directions_kernel[(cdiv(batch * length, rows), cdiv(channels, block))](
        y_forward, y_backward, out, *y_forward.stride(), *y_backward.stride(), *out.stride(), batch * length, length,
        channels, BLOCK_C=block, ROWS=rows, num_warps=4)
    return out


def merge_detect_quant_reference(y_forward: torch.Tensor, y_backward: torch.Tensor, static_scale: torch.Tensor,
                                 k: float, n_refresh: int, inlier_bits: int) -> DetectQuantOutput:
    """PyTorch: the merge as core.models.vim writes it, then ``detect_quant_reference``."""
    _check(y_forward, y_backward)
    return detect_quant_reference((y_forward + y_backward.flip(1)) / 2, static_scale, k, n_refresh, inlier_bits)
