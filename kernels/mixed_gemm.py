"""Mixed-precision GEMM of OuroMamba-Quant: y = dequant(inlier codes + outlier codes) · dequant(W)ᵀ (+ bias).

The method splits an activation along its channels, i.e. along the GEMM's reduction dimension K: every row
(a token at time-step t) has inlier codes (4 or 8 bit, static scale S^I(t) per row) on some channels and
8-bit outlier codes (dynamic scale per row) on the others. With per-output-channel weight scales s_W:

    y[m, n] = s_W[n] · (s_I[m] · Σ_k A_I[m, k] W[n, k] + s_O[m] · Σ_k A_O[m, k] W[n, k]) + bias[n]

Both sums are int8 × int8 dots with int32 accumulation (exact) in the same K loop; the scales act only in the
epilogue. Unlike the released CUDA kernel, the outlier term is split along K (not along tokens), uses a
per-row (not per-tensor) inlier scale, and carries the weight scale too.

Layouts (row-major, last dimension K):
- inlier codes: int8 (M, K), or uint8 (M, K/2) packed two int4 per byte (``kernels.packing``);
- outlier codes: int8 (M, K), zero on inlier channels (dense: the cost does not depend on the outlier count);
- weight: int8 (N, K) (W8) or uint8 (N, K/2) packed int4 (W4), as ``torch.nn.Linear.weight``;
- scales: fp32 inlier (M,), outlier (M,), weight (N,); bias (N,) any float dtype; output fp16, bf16 or fp32 (M, N),
  rounded to nearest even from the fp32 epilogue (bf16 by ``round_to_dtype``: the interpreter's cast truncates).
When either operand is packed, the K loop runs over byte pairs and does one dot for the even and one for the
odd elements (no register interleaving); unpacked operands are then loaded contiguously and split into even
and odd halves in registers. Offsets are int32: M·K and M·N must stay below 2^31.

Gathered outliers (``outlier_weight_t`` given): the dense outlier dot costs as much as the inlier one whatever
the outlier count. Instead, ``compact_outliers`` lists, per block of BLOCK_M rows, the channels where any row has
a nonzero outlier code and packs those codes to the left; the GEMM then runs its outlier dot over that list
only, GATHER_K channels at a time, with the matching rows of the weight taken from its int8 transpose (K, N),
whose rows are contiguous. Same integers, same result bit for bit; the work falls from K to the block's
outlier count (a block whose list covers more than half of K runs the dense loop instead).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels import tuning
from kernels.detect_quant import round_to_dtype
from kernels.host import cdiv, next_power_of_2
from kernels.packing import pack_int4, unpack_int4, unpack_int4_halves

OUTPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _load_halves(ptr, offs_rows, stride_row, first_pair, stride_k, pairs, rows, ROWS: tl.constexpr,
                 BLOCK_K: tl.constexpr, PACKED: tl.constexpr, ROWS_FIRST: tl.constexpr):
    """(even-k, odd-k) int8 tiles for the BLOCK_K / 2 pairs from ``first_pair`` of an operand, shaped
    (ROWS, BLOCK_K / 2) or (BLOCK_K / 2, ROWS). Packed: byte j holds pair j. Unpacked: one contiguous load of
    the BLOCK_K elements, split in registers (keeps the load vectorized and pipelined)."""
    if PACKED:
        offs_k = first_pair + tl.arange(0, BLOCK_K // 2)
        limit = pairs
    else:
        offs_k = 2 * first_pair + tl.arange(0, BLOCK_K)
        limit = 2 * pairs
    if ROWS_FIRST:
        tile = tl.load(ptr + offs_rows[:, None] * stride_row + offs_k[None, :] * stride_k,
                       mask=(offs_rows[:, None] < rows) & (offs_k[None, :] < limit), other=0)
    else:
        tile = tl.load(ptr + offs_rows[None, :] * stride_row + offs_k[:, None] * stride_k,
                       mask=(offs_rows[None, :] < rows) & (offs_k[:, None] < limit), other=0)
    if PACKED:
        even, odd = unpack_int4_halves(tile)
    elif ROWS_FIRST:
        even, odd = tl.split(tl.reshape(tile, (ROWS, BLOCK_K // 2, 2)))
    else:
        even, odd = tl.split(tl.permute(tl.reshape(tile, (BLOCK_K // 2, 2, ROWS)), (0, 2, 1)))
    return even, odd


@triton.jit
def _gathered_outlier_dot(acc, o_ptr, stride_om, stride_ok, wt_ptr, channels_ptr, counts_ptr, compact_ptr, pid_m,
                          offs_m, offs_n, M, N, K, BLOCK_K: tl.constexpr, GATHER_K: tl.constexpr):
    """acc + Σ_k A_O[m, k] W[n, k] over the row block's listed outlier channels (``compact_outliers``), with W
    read from its transpose (K, N); over all K when the list covers more than half of it."""
    count = tl.load(counts_ptr + pid_m)
    m_ok, n_ok = offs_m < M, offs_n < N
    if count * 2 > K:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            o = tl.load(o_ptr + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok,
                        mask=m_ok[:, None] & k_ok[None, :], other=0)
            wt = tl.load(wt_ptr + offs_k[:, None] * N + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0)
            acc += tl.dot(o, wt, out_dtype=tl.int32)
    else:
        for j0 in range(0, count, GATHER_K):
            offs_j = j0 + tl.arange(0, GATHER_K)
            j_ok = offs_j < count
            channel = tl.load(channels_ptr + pid_m * K + offs_j, mask=j_ok, other=0)
            o = tl.load(compact_ptr + offs_m[:, None] * K + offs_j[None, :], mask=m_ok[:, None] & j_ok[None, :],
                        other=0)
            wt = tl.load(wt_ptr + channel[:, None] * N + offs_n[None, :], mask=j_ok[:, None] & n_ok[None, :],
                         other=0)
            acc += tl.dot(o, wt, out_dtype=tl.int32)
    return acc


@triton.jit
def _mixed_gemm_kernel(a_ptr, a_scale_ptr, o_ptr, o_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, y_ptr,
                       wt_ptr, channels_ptr, counts_ptr, compact_ptr,
                       M, N, K, stride_am, stride_ak, stride_om, stride_ok, stride_wn, stride_wk, stride_ym, stride_yn,
                       A_PACKED: tl.constexpr, W_PACKED: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
                       GATHERED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GATHER_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped launch order: GROUP_M row blocks share each column block of W while it sits in L2
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * blocks_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * blocks_n)) % group_size
    pid_n = (pid % (GROUP_M * blocks_n)) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    acc_inlier = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_outlier = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if A_PACKED or W_PACKED:
        pairs = K // 2
        for p0 in range(0, pairs, BLOCK_K // 2):
            w_even, w_odd = _load_halves(w_ptr, offs_n, stride_wn, p0, stride_wk, pairs, N, BLOCK_N, BLOCK_K,
                                         W_PACKED, False)
            a_even, a_odd = _load_halves(a_ptr, offs_m, stride_am, p0, stride_ak, pairs, M, BLOCK_M, BLOCK_K,
                                         A_PACKED, True)
            acc_inlier += tl.dot(a_even, w_even, out_dtype=tl.int32)
            acc_inlier += tl.dot(a_odd, w_odd, out_dtype=tl.int32)
            if HAS_OUTLIERS and not GATHERED:
                o_even, o_odd = _load_halves(o_ptr, offs_m, stride_om, p0, stride_ok, pairs, M, BLOCK_M, BLOCK_K,
                                             False, True)
                acc_outlier += tl.dot(o_even, w_even, out_dtype=tl.int32)
                acc_outlier += tl.dot(o_odd, w_odd, out_dtype=tl.int32)
    else:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                        mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0)
            a_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=a_mask, other=0)
            acc_inlier += tl.dot(a, w, out_dtype=tl.int32)
            if HAS_OUTLIERS and not GATHERED:
                o = tl.load(o_ptr + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok, mask=a_mask, other=0)
                acc_outlier += tl.dot(o, w, out_dtype=tl.int32)
    if GATHERED:
        acc_outlier = _gathered_outlier_dot(acc_outlier, o_ptr, stride_om, stride_ok, wt_ptr, channels_ptr,
                                            counts_ptr, compact_ptr, pid_m, offs_m, offs_n, M, N, K, BLOCK_K,
                                            GATHER_K)

    # epilogue: per-row activation scale(s), then the per-column weight scale, then the bias
    m_ok, n_ok = offs_m < M, offs_n < N
    y = acc_inlier.to(tl.float32) * tl.load(a_scale_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    if HAS_OUTLIERS:
        y += acc_outlier.to(tl.float32) * tl.load(o_scale_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    y = y * tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_type: tl.constexpr = y_ptr.dtype.element_ty
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             round_to_dtype(y, out_type).to(out_type), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _compact_outliers_kernel(o_ptr, stride_om, stride_ok, channels_ptr, counts_ptr, compact_ptr, M, K,
                             BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """One program per block of BLOCK_M rows: walks K in chunks, appends the channels with any nonzero code to
    the block's list and its codes, packed to the left, to ``compact`` (row stride K)."""
    block = tl.program_id(0)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    count = tl.full((), 0, tl.int32)
    for k0 in range(0, K, CHUNK):
        offs_k = k0 + tl.arange(0, CHUNK)
        codes = tl.load(o_ptr + rows[:, None] * stride_om + offs_k[None, :] * stride_ok,
                        mask=row_ok[:, None] & (offs_k[None, :] < K), other=0)
        used = tl.max((codes != 0).to(tl.int32), axis=0)
        slot = count + tl.cumsum(used, axis=0) - 1
        tl.store(channels_ptr + block * K + slot, offs_k, mask=used > 0)
        tl.store(compact_ptr + rows[:, None] * K + slot[None, :], codes, mask=row_ok[:, None] & (used[None, :] > 0))
        count += tl.sum(used, axis=0)
    tl.store(counts_ptr + block, count)


class CompactOutliers(NamedTuple):
    """Per block of ``block_m`` rows: ``channels`` (blocks, K) int32, the first ``counts[b]`` of row b the channels
    with any nonzero outlier code, ascending; ``codes`` (M, K) int8, row m's codes on its block's channels in that
    order, packed to the left. Entries past a block's count are unspecified (never read)."""

    channels: torch.Tensor
    counts: torch.Tensor
    codes: torch.Tensor
    block_m: int


def compact_chunk(k: int) -> int:
    """Channels per step of ``compact_outliers``: 64 (the sm_90 build at 128 rows × 128 channels spills: every
    scattered store needs its own address)."""
    return min(64, max(16, next_power_of_2(k)))


def compact_outliers(outlier_codes: torch.Tensor, block_m: int) -> CompactOutliers:
    """Triton: the gathered outlier path's operand (``CompactOutliers``) from dense (M, K) int8 outlier codes."""
    if outlier_codes.dtype != torch.int8 or outlier_codes.dim() != 2:
        raise ValueError(f"outlier codes must be int8 (M, K), got {outlier_codes.dtype} {tuple(outlier_codes.shape)}")
    m, k = outlier_codes.shape
    blocks = cdiv(m, block_m)
    out = CompactOutliers(torch.empty(blocks, k, dtype=torch.int32, device=outlier_codes.device),
                          torch.empty(blocks, dtype=torch.int32, device=outlier_codes.device),
                          torch.empty(m, k, dtype=torch.int8, device=outlier_codes.device), block_m)
    _compact_outliers_kernel[(blocks,)](outlier_codes, outlier_codes.stride(0), outlier_codes.stride(1),
                                        out.channels, out.counts, out.codes, m, k, BLOCK_M=block_m,
                                        CHUNK=compact_chunk(k), num_warps=8)
    return out


def compact_outliers_reference(outlier_codes: torch.Tensor, block_m: int) -> CompactOutliers:
    """PyTorch: the same lists and packed codes, with zeros past each block's count."""
    m, k = outlier_codes.shape
    blocks = -(-m // block_m)
    padded = torch.zeros(blocks * block_m, k, dtype=torch.int8)
    padded[:m] = outlier_codes.cpu()
    used = (padded.view(blocks, block_m, k) != 0).any(1)
    channels = torch.zeros(blocks, k, dtype=torch.int32)
    codes = torch.zeros(blocks * block_m, k, dtype=torch.int8)
    for b in range(blocks):
        listed = used[b].nonzero().flatten()
        channels[b, :listed.numel()] = listed.int()
        rows = slice(b * block_m, (b + 1) * block_m)
        codes[rows, :listed.numel()] = padded[rows][:, listed]
    return CompactOutliers(channels, used.sum(1).int(), codes[:m], block_m)


def _reduction_size(codes: torch.Tensor) -> int:
    """K of an operand: its last dimension, doubled when it holds packed int4 bytes."""
    if codes.dtype == torch.int8:
        return codes.shape[-1]
    if codes.dtype == torch.uint8:
        return 2 * codes.shape[-1]
    raise ValueError(f"codes must be int8 or packed int4 (uint8), got {codes.dtype}")


def _check(inlier_codes: torch.Tensor, inlier_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
           outlier_codes: torch.Tensor | None, outlier_scale: torch.Tensor | None,
           bias: torch.Tensor | None) -> tuple[int, int, int]:
    if inlier_codes.dim() != 2 or weight.dim() != 2:
        raise ValueError("inlier codes (M, K) and weight (N, K) must be 2-D")
    m, n, k = inlier_codes.shape[0], weight.shape[0], _reduction_size(inlier_codes)
    if _reduction_size(weight) != k:
        raise ValueError(f"activation K {k} and weight K {_reduction_size(weight)} differ")
    if inlier_scale.shape != (m,) or weight_scale.shape != (n,):
        raise ValueError(f"scales must be inlier (M,) = ({m},) and weight (N,) = ({n},)")
    if (outlier_codes is None) != (outlier_scale is None):
        raise ValueError("outlier codes and outlier scale come together")
    if outlier_codes is not None and (outlier_codes.dtype != torch.int8 or outlier_codes.shape != (m, k)
                                      or outlier_scale.shape != (m,)):
        raise ValueError(f"outlier codes must be int8 (M, K) = ({m}, {k}) with an (M,) scale")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be (N,) = ({n},)")
    return m, n, k


GATHER_K = 32  # outlier channels per gathered dot: the smallest K of an int8 wgmma
GATHER_MIN_K = 256  # below, the outlier dot is one or two K steps: nothing to save by gathering (callers' rule)


@functools.cache
def _blocks(m: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by size class, no autotuning (the interpreter takes
    one config, and compile time is scarce on the lent GPU). Few rows (batch 1): 64×64 tiles, for more
    programs. Every dot keeps M, N, K ≥ 32 (int8 wgmma). ``python -m kernels.sm90_build`` checks that none of
    these spills registers with two int32 accumulators."""
    if m <= 1024:
        return (64, 64, 64, 4, 4) if k <= 64 else (64, 64, 128, 4, 3)
    if k <= 64:  # dt_proj (K = R): one K step; 128-wide tiles of unaligned K spill with two accumulators
        return 128, 64, 64, 8, 4
    return 128, 64 if n <= 64 else 128, 128, 8, 3


@functools.cache
def gemm_launches(m: int, n: int, k: int) -> tuple[tuple[int, int, int, int, int], ...]:
    """Blocks ``mixed_gemm`` may launch an (M, N, K) problem with, ``_blocks``' rule first, then tiles of other
    shapes from the same size class (``kernels.tuning`` times them; the integers, so the outputs, are the same).
    Every one keeps M, N, K ≥ 32 per dot (int8 wgmma) and builds for sm_90 without spills at Vim's shapes
    (``python -m kernels.sm90_build``)."""
    rule = _blocks(m, n, k)
    if m <= 1024:  # few rows: narrower tiles for more programs
        others = [(64, 32, 128, 4, 3)] if k > 64 else [(64, 32, 64, 4, 4)] if k % 16 == 0 else []
    elif k <= 64:
        others = [(64, 64, 64, 4, 4), (128, 128, 64, 8, 3)] if k % 16 == 0 else [(64, 64, 64, 4, 4)]
    elif n <= 64:
        others = [(64, 64, 128, 4, 3), (128, 64, 64, 8, 4)]
    else:
        others = [(128, 128, 64, 8, 4), (64, 128, 128, 4, 3), (128, 64, 128, 8, 3)]
    return (rule, *(blocks for blocks in others if blocks != rule))


def mixed_gemm(inlier_codes: torch.Tensor, inlier_scale: torch.Tensor, weight: torch.Tensor,
               weight_scale: torch.Tensor, outlier_codes: torch.Tensor | None = None,
               outlier_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None,
               outlier_weight_t: torch.Tensor | None = None, tune: bool = False) -> torch.Tensor:
    """Triton: (M, N) = dequantized (inlier + outlier) activations × dequantized weightᵀ (+ bias), written to
    ``out`` (any strides) when given. ``outlier_weight_t``, the weight's codes as contiguous int8 (K, N), selects
    the gathered outlier path (same result). ``tune``: on CUDA the first call of each shape times
    ``gemm_launches`` and later ones run the fastest (``kernels.tuning``); never a value changed."""
    m, n, k = _check(inlier_codes, inlier_scale, weight, weight_scale, outlier_codes, outlier_scale, bias)
    gathered = outlier_codes is not None and outlier_weight_t is not None
    if outlier_weight_t is not None and (outlier_weight_t.dtype != torch.int8 or outlier_weight_t.shape != (k, n)
                                         or not outlier_weight_t.is_contiguous()):
        raise ValueError(f"outlier_weight_t must be contiguous int8 (K, N) = ({k}, {n})")
    if out_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"output must be fp16, bf16 or fp32, got {out_dtype}")
    a_packed, w_packed = inlier_codes.dtype == torch.uint8, weight.dtype == torch.uint8
    if (a_packed or w_packed) and k % 2:
        raise ValueError(f"a packed operand needs an even K, got {k}")
    y = torch.empty(m, n, dtype=out_dtype, device=inlier_codes.device) if out is None else out
    if y.shape != (m, n) or y.dtype != out_dtype:
        raise ValueError(f"out must be {out_dtype} ({m}, {n}), got {y.dtype} {tuple(y.shape)}")
    has_outliers, has_bias = outlier_codes is not None, bias is not None
    outlier_codes = outlier_codes if has_outliers else inlier_codes  # placeholders: never read when absent
    outlier_scale = outlier_scale.float().contiguous() if has_outliers else inlier_scale
    inlier_scale, weight_scale = inlier_scale.float().contiguous(), weight_scale.float().contiguous()
    bias = bias.contiguous() if has_bias else y

    def launch(blocks: tuple[int, int, int, int, int]) -> None:
        block_m, block_n, block_k, warps, stages = blocks
        # placeholders for the gathered path's operands: never read when it is off
        compact = compact_outliers(outlier_codes, block_m) if gathered else \
            CompactOutliers(inlier_scale, inlier_scale, inlier_codes, block_m)
        _mixed_gemm_kernel[(cdiv(m, block_m) * cdiv(n, block_n),)](
            inlier_codes, inlier_scale, outlier_codes, outlier_scale, weight, weight_scale, bias, y,
            outlier_weight_t if gathered else weight, compact.channels, compact.counts, compact.codes, m, n, k,
            inlier_codes.stride(0), inlier_codes.stride(1), outlier_codes.stride(0), outlier_codes.stride(1),
            weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
            A_PACKED=a_packed, W_PACKED=w_packed, HAS_OUTLIERS=has_outliers, GATHERED=gathered, HAS_BIAS=has_bias,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GATHER_K=GATHER_K, GROUP_M=8, num_warps=warps,
            num_stages=stages)

    key = (_mixed_gemm_kernel, m, n, k, a_packed, w_packed, has_outliers, gathered, has_bias, out_dtype,
           inlier_codes.stride(), y.stride())
    tuning.TUNER.launch(key, gemm_launches(m, n, k) if tune else (_blocks(m, n, k),), launch, inlier_codes.device)
    return y


def _dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    codes = unpack_int4(codes) if codes.dtype == torch.uint8 else codes
    return codes.double() * scale.double()[:, None]


def mixed_gemm_reference(inlier_codes: torch.Tensor, inlier_scale: torch.Tensor, weight: torch.Tensor,
                         weight_scale: torch.Tensor, outlier_codes: torch.Tensor | None = None,
                         outlier_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch: dequantize every operand and multiply in float64 (returns float64 (M, N))."""
    _check(inlier_codes, inlier_scale, weight, weight_scale, outlier_codes, outlier_scale, bias)
    x = _dequantize(inlier_codes, inlier_scale)
    if outlier_codes is not None:
        x = x + _dequantize(outlier_codes, outlier_scale)
    y = x @ _dequantize(weight, weight_scale).T
    return y if bias is None else y + bias.double()


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of a (N, K) weight with per-output-channel scales (N,): clamp(round(W / s), ±(2^(b−1) − 1)),
    int8 for 8 bits, packed int4 (uint8 (N, K/2)) for 4 bits."""
    if bits not in (4, 8):
        raise ValueError(f"weight bits must be 4 or 8, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    codes = torch.clamp(torch.round(weight.float() / scale.float()[:, None]), -qmax, qmax).to(torch.int8)
    return codes if bits == 8 else pack_int4(codes)
