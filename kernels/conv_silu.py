"""Causal depthwise conv1d + SiLU of a Vim branch, reading time forward or reversed.

Each branch of Vim's mixer computes u = SiLU(conv1d(x)) with ``nn.Conv1d(E, E, W, groups=E, padding=W − 1)``
(W = d_conv = 4) and keeps the first L outputs, i.e. per channel e and step t

    u[t, e] = SiLU(bias[e] + Σ_j weight[e, 0, j] · x[t − (W − 1) + j, e]),   x before step 0 taken as 0,

on x = the first half of in_proj's output, a (batch, L, E) view with time stride 2E. PyTorch transposes it to
channel-first, convolves (writing L + W − 1 outputs), slices, applies SiLU (another pass) and transposes back; the
backward branch first materialises ``xz.flip(1)``. Here one pass reads x through its strides and writes u:
``reverse=True`` reads x in reversed time, giving the backward branch's u (in its own time order) from the
unflipped x.

Arithmetic in fp32 (inputs upcast, weight and bias converted), u in x's dtype. Kernel: one program per (sample,
BLOCK_T steps, BLOCK_E channels); the W taps are W shifted loads of the same tile, which overlap and so come
mostly from L1/L2; loads and stores are contiguous along E when E is x's contiguous dimension (the model's case).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.host import cdiv, next_power_of_2

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _conv_silu_kernel(x_ptr, weight_ptr, bias_ptr, y_ptr, length, channels,
                      stride_xb, stride_xt, stride_xc, stride_w_channel, stride_w_tap, stride_yb, stride_yt, stride_yc,
                      WIDTH: tl.constexpr, REVERSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    sample = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < channels
    t_ok = offs_t < length
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    acc += tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    x_ptr += sample * stride_xb + offs_e[None, :] * stride_xc
    for j in tl.static_range(WIDTH):
        lag = WIDTH - 1 - j  # tap j multiplies the input `lag` steps back in the branch's time order
        source = length - 1 - offs_t + lag if REVERSE else offs_t - lag
        ok = t_ok & (source >= 0) & (source < length)
        x = tl.load(x_ptr + source[:, None] * stride_xt, mask=ok[:, None] & e_ok[None, :], other=0.0)
        weight = tl.load(weight_ptr + offs_e * stride_w_channel + j * stride_w_tap, mask=e_ok, other=0.0)
        acc += weight.to(tl.float32)[None, :] * x.to(tl.float32)
    u = acc / (1.0 + tl.exp(-acc))
    tl.store(y_ptr + sample * stride_yb + offs_t[:, None] * stride_yt + offs_e[None, :] * stride_yc,
             u.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & e_ok[None, :])


def launch_config(channels: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, num_warps): 16 steps × up to 128 channels, 4 warps: in fp16 each thread moves 16 bytes
    along E per row, and a Vim-T batch-1 call (L = 197, E = 384) still makes 39 programs. Fixed, not tuned."""
    return 16, min(128, max(next_power_of_2(channels), 16)), 4


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    if x.dim() != 3 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a float (batch, L, E) tensor, got {tuple(x.shape)} {x.dtype}")
    channels = x.shape[2]
    if weight.dim() != 3 or weight.shape[:2] != (channels, 1) or bias.shape != (channels,):
        raise ValueError(f"weight must be (E, 1, W) and bias (E,) with E = {channels} (depthwise nn.Conv1d), got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    if weight.device != x.device or bias.device != x.device:
        raise ValueError(f"weight and bias must be on x's device {x.device}")


def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, reverse: bool = False,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton: SiLU(causal depthwise conv1d(x)), (batch, L, E) in x's dtype, into ``out`` (any strides) if given.

    x (batch, L, E) fp32/fp16/bf16, any strides; weight (E, 1, W) and bias (E,) as ``nn.Conv1d`` holds them.
    ``reverse``: the result for x.flip(1), in that flipped time order, without the flipped copy."""
    _check(x, weight, bias)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    if y.shape != x.shape or y.dtype != x.dtype or y.device != x.device:
        raise ValueError(f"out must be {x.dtype} {tuple(x.shape)} on {x.device}, got {y.dtype} {tuple(y.shape)} "
                         f"on {y.device}")
    batch, length, channels = x.shape
    block_t, block_e, warps = launch_config(channels)
    grid = (batch, cdiv(length, block_t), cdiv(channels, block_e))
    _conv_silu_kernel[grid](x, weight, bias, y, length, channels, *x.stride(), weight.stride(0), weight.stride(2),
                            *y.stride(), WIDTH=weight.shape[2], REVERSE=reverse, BLOCK_T=block_t, BLOCK_E=block_e,
                            num_warps=warps)
    return y


def conv_silu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        reverse: bool = False) -> torch.Tensor:
    """PyTorch in float64 (returns float64): the branch's ``F.silu(conv1d(x.transpose(1, 2))[..., :L])``, on
    x.flip(1) when ``reverse``."""
    _check(x, weight, bias)
    length, channels, width = x.shape[1], x.shape[2], weight.shape[2]
    x = (x.flip(1) if reverse else x).double().transpose(1, 2)
    y = F.conv1d(x, weight.double(), bias.double(), padding=width - 1, groups=channels)[..., :length]
    return F.silu(y).transpose(1, 2)
