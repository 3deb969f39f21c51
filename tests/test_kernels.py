"""Triton kernels against their PyTorch references, and against the fake-quant path of core.quant.

On the CPU the kernels run under TRITON_INTERPRET=1 at small, awkward shapes. On a CUDA machine with
TRITON_INTERPRET=0 the same tests run compiled on the GPU, and KERNELS_REAL_SHAPES=1 adds Vim-size cases
(scripts/gpu_session.sh). Integer outputs must match exactly; outputs are poisoned before every kernel run, with
values the kernel never writes, so an unwritten element fails the comparison.

Detection compares mean + k·std thresholds computed with a different summation order (Triton vs torch);
``threshold_margin`` guards the test data against values within rounding distance of a threshold.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from kernels.detect_quant import (
    DetectQuantOutput,
    _quantize,
    _round_half_even,
    detect_quant,
    detect_quant_reference,
    divide,
    divide_by_constant,
    empty_output,
    inlier_qmax,
    window_rows,
)
from kernels.mixed_gemm import (
    compact_outliers,
    compact_outliers_reference,
    mixed_gemm,
    mixed_gemm_reference,
    quantize_weight,
)
from kernels.packing import pack_int4, unpack_int4

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in {"1", "true", "on", "yes"}
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu")
real_shapes = pytest.mark.skipif(
    DEVICE.type != "cuda" or os.environ.get("KERNELS_REAL_SHAPES") != "1",
    reason="Vim-size case for the GPU: set KERNELS_REAL_SHAPES=1 and TRITON_INTERPRET=0 on a CUDA machine "
           "(scripts/gpu_session.sh); the interpreter would take minutes")

def core_quant():
    """core.quant (imported by the few tests that compare with it) pulls in the model stack; on a machine
    without timm/torchvision only those tests skip, the kernel tests still run."""
    return pytest.importorskip("core.quant.outliers"), pytest.importorskip("core.quant.quantizers")


NEVER_INT8 = -128  # codes stay in ±127
NEVER_PACKED = 0x88  # two −8 nibbles: codes stay in ±7
NEVER_MASK = 0xFF  # the mask is written as 0 or 1


def moving_outliers(batch: int, length: int, channels: int, seed: int, gaussian: bool = True, per_step: int = 3,
                    magnitudes: tuple[float, ...] = (4.0, 6.0, 10.0, 20.0, 40.0),
                    speeds: tuple[int, int] = (1, 5)) -> torch.Tensor:
    """Activations (batch, L, C) with ``per_step`` outlier channels per token that move at a per-sample speed
    drawn from [speeds[0], speeds[1]) channels a step (0: fixed channels). Inliers are N(0, 1) or U(−1, 1). With
    the default magnitudes moderate outliers can hide behind large ones; U(−1, 1) inliers with only large
    outliers keep every value far from every threshold."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, channels, generator=g) if gaussian else \
        torch.rand(batch, length, channels, generator=g) * 2 - 1
    steps = torch.arange(length)
    magnitudes = torch.tensor(magnitudes)
    for j in range(per_step):
        start = torch.randint(0, channels, (batch, 1), generator=g)
        speed = torch.randint(*speeds, (batch, 1), generator=g)
        channel = (start + speed * steps + j * (channels // per_step)) % channels
        value = magnitudes[torch.randint(0, len(magnitudes), (batch, length), generator=g)]
        sign = torch.randint(0, 2, (batch, length), generator=g) * 2 - 1
        x.scatter_(2, channel[..., None], (value * sign)[..., None])
    return x


def static_scales(x: torch.Tensor, qmax: int, seed: int) -> torch.Tensor:
    """S^I(t) between the inliers' and the outliers' range, so that some (sample, step) trigger and some don't."""
    g = torch.Generator().manual_seed(seed)
    peak = x.abs().amax(dim=(0, 2))
    return peak * (0.02 + 0.6 * torch.rand(x.shape[1], generator=g)) / qmax


def threshold_margin(x: torch.Tensor, mask: torch.Tensor, static_scale: torch.Tensor, k: float, n_refresh: int,
                     qmax: int) -> float:
    """Smallest |‖x‖ − θ| / θ over the inlier channels of every triggered step, θ recomputed in float64 from
    the set before that step: how far the data sits from a rounding-order-dependent decision."""
    x, mask = x.double(), mask.clone()
    before = torch.roll(mask, 1, dims=1)
    before[:, ::n_refresh] = False  # window starts begin empty
    magnitude, keep = x.abs(), ~before
    count = keep.sum(-1)
    mean = (magnitude * keep).sum(-1) / count.clamp(min=1)
    std = (((magnitude - mean[..., None]) ** 2 * keep).sum(-1) / (count - 1).clamp(min=1)).sqrt()
    theta = mean + k * std
    triggered = magnitude.masked_fill(before, 0).amax(-1) / qmax > static_scale.double()
    gap = ((magnitude - theta[..., None]).abs() / theta[..., None]).masked_fill(before | ~triggered[..., None], 1.0)
    return float(gap.min())


def poisoned_output(x: torch.Tensor, bits: int) -> DetectQuantOutput:
    out = empty_output(x, bits)
    for codes in (out.inlier_codes, out.outlier_codes):
        codes.fill_(NEVER_INT8)
    if out.inlier_packed is not None:
        out.inlier_packed.fill_(NEVER_PACKED)
    out.outlier_mask.view(torch.uint8).fill_(NEVER_MASK)
    out.inlier_scale.fill_(float("nan"))
    out.outlier_scale.fill_(float("nan"))
    return out


def assert_same_detection(got: DetectQuantOutput, want: DetectQuantOutput) -> None:
    for name, a, b in zip(got._fields, got, want, strict=True):
        if b is None:
            assert a is None, name
            continue
        a = a.cpu()
        if name == "outlier_mask":
            assert set(a.view(torch.uint8).unique().tolist()) <= {0, 1}, "unwritten mask elements"
        assert a.dtype == b.dtype and torch.equal(a, b), name


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert not y.isnan().any(), "unwritten or NaN outputs"
    return float((y.double() - ref).norm() / ref.norm())


# ---- int4 packing ----


def test_pack_int4_nibble_order_by_hand():
    packed = pack_int4(torch.tensor([[1, -2, 7, -8]], dtype=torch.int8))
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0xE1, 0x87]]  # even element in the low nibble
    assert unpack_int4(packed).tolist() == [[1, -2, 7, -8]]


def test_pack_unpack_round_trip_and_errors():
    codes = torch.randint(-8, 8, (3, 5, 12), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    with pytest.raises(ValueError, match="even"):
        pack_int4(codes[..., :5])
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([9, 0], dtype=torch.int8))


# ---- detection + quantization ----


@triton.jit
def _round_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, _round_half_even(tl.load(x_ptr + offs)))


def test_rounding_is_torch_round_ties_to_even():
    """The kernels' rounding (two adds around 1.5·2^23) against torch.round over the range it is used in
    (|v| < 2^22): ties both ways, the floats just below and above them, and random values."""
    ties = torch.tensor([0.5, 1.5, 2.5, 3.5, 126.5, 127.5, 2.0**21 + 0.5, 2.0**22 - 0.5])
    special = torch.cat([ties, torch.nextafter(ties, torch.zeros(1)), torch.nextafter(ties, torch.full((1,), 1e9)),
                         torch.tensor([0.0, 0.49999997, 1e-30, 2.0**22 - 1])])
    g = torch.Generator().manual_seed(0)
    x = torch.cat([special, -special, torch.randn(4096 - 2 * len(special), generator=g) * 300])
    y = torch.full_like(x, float("nan")).to(DEVICE)
    _round_kernel[(1,)](x.to(DEVICE), y, N=len(x))
    assert torch.equal(y.cpu(), torch.round(x))


@triton.jit
def _quantize_kernel(x_ptr, y_ptr, scale, qmax, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, _quantize(tl.load(x_ptr + offs), scale, 1.0 / scale, qmax, False))


@pytest.mark.parametrize("qmax", [7, 127])
def test_quantized_codes_are_torch_round_and_clamp(qmax: int):
    """The codes read from the rounding sum's bit pattern: ties both ways, the grid's ends (±qmax ± ½), values
    far past them, and random values, against PyTorch's clamp(round(x / s), ±qmax)."""
    scale = 0.5
    ties = torch.tensor([0.5, 1.5, 2.5, qmax - 0.5, qmax + 0.5, qmax + 1.5, 1e6]) * scale
    special = torch.cat([ties, torch.nextafter(ties, torch.zeros(1)), torch.tensor([0.0, 1e-30])])
    g = torch.Generator().manual_seed(0)
    x = torch.cat([special, -special, torch.randn(2048 - 2 * len(special), generator=g) * qmax * scale])
    y = torch.full(x.shape, -999, dtype=torch.int32, device=DEVICE)
    _quantize_kernel[(1,)](x.to(DEVICE), y, scale, float(qmax), N=len(x))
    assert torch.equal(y.cpu(), torch.clamp(torch.round(x / scale), -qmax, qmax).to(torch.int32))


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a · b + c rounded once to fp32, as the GPU's FFMA: the product is exact in fp64, the sum exact as fp64
    hi + lo (TwoSum), and hi's rounding to fp32 only goes wrong at an exact fp32 tie, which lo then breaks."""
    product, c = a.astype(np.float64) * b.astype(np.float64), c.astype(np.float64)
    hi = product + c
    bv = hi - product
    lo = (product - (hi - bv)) + (c - bv)
    rounded = hi.astype(np.float32)
    beyond = np.nextafter(rounded, np.where(hi > rounded, np.inf, -np.inf).astype(np.float32))
    tie = (hi != rounded) & (hi == (rounded.astype(np.float64) + beyond.astype(np.float64)) / 2)
    return np.where(tie & (lo != 0) & ((beyond.astype(np.float64) - hi) * lo > 0), beyond, rounded)


def test_division_by_the_rows_reciprocal_is_division_on_the_gpu():
    """The sequence ``divide`` compiles to (q = v · RN(1/s), then q + fma(−q, s, v) · RN(1/s) by FMA), with the
    GPU's single-rounding FMA emulated exactly, gives torch's v / s on 4 M random bit patterns and quantizer-like
    values, except where the remainder underflows (|v| < 2^-100, so |v / s| < 2^-73 for the kernels' s ≥ 1e-8):
    there the codes, round(clamp(v / s)), are still the same."""
    g = np.random.default_rng(0)
    size = 1_000_000
    bits = g.integers(0, 0x7F000000, size, dtype=np.uint32).view(np.float32)
    scales = np.exp(g.uniform(np.log(1e-8), np.log(10), 3 * size)).astype(np.float32)
    v = np.concatenate([bits * np.where(g.random(size) < 0.5, -1, 1).astype(np.float32),
                        (scales[:size] * g.uniform(-200, 200, size)).astype(np.float32),  # codes near ±127
                        (scales[size:2 * size] * (g.integers(-130, 130, size) + 0.5)).astype(np.float32),  # ties
                        (scales[2 * size:] * g.integers(-130, 130, size)).astype(np.float32)])
    s = np.concatenate([g.integers(np.float32(1e-8).view(np.uint32), 0x7E000000, size, dtype=np.uint32)
                        .view(np.float32), scales])
    with np.errstate(over="ignore", invalid="ignore"):
        reciprocal = np.float32(1) / s
        q = v * reciprocal
        q = _fma32(_fma32(-q, s, v), reciprocal, q)
        exact = v / s
        kept = np.isfinite(exact) & (np.abs(exact) < 2.0**100) & np.isfinite(v * reciprocal)
    normal = kept & (np.abs(v) >= 2.0**-100)
    assert normal.sum() > 3_000_000 and np.array_equal(q[normal], exact[normal])
    for qmax in (7, 127, 255):
        assert np.array_equal(np.round(np.clip(q[kept], -qmax, qmax)), np.round(np.clip(exact[kept], -qmax, qmax)))


@triton.jit
def _divide_kernel(v_ptr, s_ptr, q_ptr, N: tl.constexpr, BY_RECIPROCAL: tl.constexpr):
    offs = tl.arange(0, N)
    scale = tl.load(s_ptr + offs)
    tl.store(q_ptr + offs, divide(tl.load(v_ptr + offs), scale, tl.math.div_rn(1.0, scale), BY_RECIPROCAL))


@pytest.mark.parametrize("by_reciprocal", [True, False])
def test_the_kernels_division_is_torchs(by_reciprocal: bool):
    """``divide`` itself, both ways (interpreted on the CPU: FMA taken in fp64), on values around the
    quantizers' rounding ties."""
    g = torch.Generator().manual_seed(0)
    s = torch.exp(torch.empty(1 << 14).uniform_(-18, 2, generator=g))
    v = s * (torch.randint(-130, 130, s.shape, generator=g) + 0.5)
    v = torch.cat([v, torch.nextafter(v, torch.zeros(1)), torch.randn(1 << 15, generator=g) * 50])
    s = torch.cat([s, s, torch.exp(torch.empty(1 << 15).uniform_(-18, 2, generator=g))])
    q = torch.full_like(v, float("nan")).to(DEVICE)
    _divide_kernel[(1,)](v.to(DEVICE), s.to(DEVICE), q, N=len(v), BY_RECIPROCAL=by_reciprocal)
    assert torch.equal(q.cpu(), v / s)


@pytest.mark.parametrize("divisor", [1, 3, 7, 15, 31, 63, 127, 255])
def test_division_by_a_level_count_is_division_on_the_gpu(divisor: int):
    """``divide_by_constant``'s sequence with the reciprocal rounded from float64 (as the kernel's constant is),
    the GPU's FMA emulated exactly, gives torch's v / d on 1 M random bit patterns and on the statistics the
    kernels divide (maxima, ranges, peaks: values near multiples of d), except where the remainder underflows."""
    g = np.random.default_rng(divisor)
    size = 500_000
    bits = g.integers(0x0D000000, 0x7F000000, size, dtype=np.uint32).view(np.float32)  # |v| ≥ 2^-101
    v = np.concatenate([bits * np.where(g.random(size) < 0.5, -1, 1).astype(np.float32),
                        (divisor * np.exp(g.uniform(-20, 10, size)) * g.integers(1, 300, size)).astype(np.float32)])
    d, reciprocal = np.float32(divisor), np.float32(1.0 / divisor)
    assert reciprocal == np.float32(1) / d  # the float64 → fp32 rounding is the correctly rounded reciprocal
    with np.errstate(over="ignore"):
        q = v * reciprocal
        q = _fma32(_fma32(-q, np.full_like(v, d), v), np.full_like(v, reciprocal), q)
        exact = v / d
    assert np.array_equal(q, exact)


@triton.jit
def _divide_by_constant_kernel(v_ptr, q_ptr, N: tl.constexpr, DIVISOR: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(q_ptr + offs, divide_by_constant(tl.load(v_ptr + offs), DIVISOR))


@pytest.mark.parametrize("divisor", [7, 127, 255])
def test_the_kernels_division_by_a_level_count_is_torchs(divisor: int):
    g = torch.Generator().manual_seed(divisor)
    v = torch.cat([divisor * torch.randint(0, 300, (1 << 13,), generator=g) * torch.exp(
        torch.empty(1 << 13).uniform_(-20, 5, generator=g)), torch.randn(1 << 13, generator=g) * 1e3])
    q = torch.full_like(v, float("nan")).to(DEVICE)
    _divide_by_constant_kernel[(1,)](v.to(DEVICE), q, N=len(v), DIVISOR=divisor)
    assert torch.equal(q.cpu(), v / divisor)


@pytest.mark.parametrize(("k", "n_refresh", "bits", "length"), [(3.0, 10, 4, 37), (2.5, 4, 8, 23), (3.0, 1, 4, 9),
                                                                  (3.0, 50, 8, 30)])
def test_reference_mask_is_outlier_masks(k, n_refresh, bits, length):
    """The reference's detection is core.quant.outliers.outlier_masks (per-sample rule), bit for bit."""
    outliers, _ = core_quant()
    x = moving_outliers(3, length, 48, seed=length)
    qmax = inlier_qmax(bits)
    scale = static_scales(x, qmax, seed=1)
    ref = detect_quant_reference(x, scale, k, n_refresh, bits)
    masks = outliers.outlier_masks(x, scale, outliers.max_abs_scale(qmax), k, n_refresh)
    assert torch.equal(ref.outlier_mask, masks)
    assert 0 < masks.float().mean() < 0.5  # some detections, not everything


@pytest.mark.parametrize(("dtype", "bits", "channels", "n_refresh", "gaussian"), [
    (torch.float32, 4, 64, 10, True),
    (torch.float16, 4, 96, 7, False),
    (torch.float32, 8, 45, 10, False),  # odd C: masked block, no packing
    (torch.float16, 8, 128, 3, True),
    (torch.float16, 4, 384, 10, False),  # Vim-S's width: divisions by the rows' reciprocals (kernel's ``divide``)
])
def test_detect_quant_matches_reference(dtype, bits, channels, n_refresh, gaussian):
    x = moving_outliers(2, 41, channels, seed=channels, gaussian=gaussian).to(dtype)
    qmax = inlier_qmax(bits)
    scale = static_scales(x.float(), qmax, seed=2)
    want = detect_quant_reference(x, scale, 3.0, n_refresh, bits)
    assert threshold_margin(x.float(), want.outlier_mask, scale, 3.0, n_refresh, qmax) > 1e-5
    xd = x.to(DEVICE)
    got = detect_quant(xd, scale.to(DEVICE), 3.0, n_refresh, bits, out=poisoned_output(xd, bits))
    assert_same_detection(got, want)
    assert want.outlier_mask.any() and (want.inlier_codes.abs() == qmax).any()  # detections and clipping happen
    if bits == 4:
        assert torch.equal(unpack_int4(got.inlier_packed.cpu()), want.inlier_codes)


def test_detect_quant_reads_strided_input():
    """Vim keeps activations as (batch, E, L); the kernel takes the transposed view without a copy."""
    x = moving_outliers(2, 30, 64, seed=5, gaussian=False)
    scale = static_scales(x, 7, seed=3)
    channels_first = x.transpose(1, 2).contiguous().to(DEVICE)
    got = detect_quant(channels_first.transpose(1, 2), scale.to(DEVICE), 3.0, 10, 4)
    assert_same_detection(got, detect_quant_reference(x, scale, 3.0, 10, 4))


def test_detect_quant_at_other_warp_counts_gives_the_same_codes():
    """``num_warps`` (what the benchmark sweeps) changes the launch, not the result; bad counts are refused."""
    x = moving_outliers(1, 20, 256, seed=9, gaussian=False)
    scale = static_scales(x, 7, seed=9)
    want = detect_quant_reference(x, scale, 3.0, 10, 4)
    xd, sd = x.to(DEVICE), scale.to(DEVICE)
    for warps in (2, 4):
        assert_same_detection(detect_quant(xd, sd, 3.0, 10, 4, out=poisoned_output(xd, 4), num_warps=warps), want)
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        detect_quant(xd, sd, 3.0, 10, 4, num_warps=3)


def every_growth(length: int, channels: int, seed: int, **kwargs: object) -> torch.Tensor:
    """Three samples (3, L, C) whose outlier sets, per window, grow at most steps (moving outliers), once (fixed
    channels) and never (no outliers: U(−1, 1) stays under mean + 3·std)."""
    moving = moving_outliers(1, length, channels, seed, gaussian=False, magnitudes=(20.0, 40.0), **kwargs)
    fixed = moving_outliers(1, length, channels, seed + 1, gaussian=False, magnitudes=(40.0,), speeds=(0, 1), **kwargs)
    plain = torch.rand(1, length, channels, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.cat([moving, fixed, plain])


def growth_counts(mask: torch.Tensor, n_refresh: int) -> list[int]:
    """For each (sample, window) of an outlier mask (batch, L, C): at how many steps the set grew."""
    before = torch.roll(mask, 1, dims=1)
    before[:, ::n_refresh] = False
    grows = (mask & ~before).any(-1)
    return [int(window.sum()) for sample in grows for window in sample.split(n_refresh)]


@pytest.mark.parametrize(("rows", "bits", "channels", "n_refresh"), [(2, 4, 64, 10), (4, 8, 45, 7),
                                                                     (16, 4, 32, 10), (8, 4, 64, 3)])
def test_rounds_give_the_step_walk_bit_for_bit(rows, bits, channels, n_refresh):
    """``rows_per_round`` detects several steps at once against the set known so far and commits them up to the
    first that grows it: windows whose set never grows, grows once and grows at most steps, rounds longer than
    the window, and the last window cut short all give the reference's outputs."""
    x = every_growth(41, channels, seed=channels + rows)
    qmax = inlier_qmax(bits)
    scale = static_scales(x, qmax, seed=rows)
    want = detect_quant_reference(x, scale, 3.0, n_refresh, bits)
    assert threshold_margin(x, want.outlier_mask, scale, 3.0, n_refresh, qmax) > 1e-5
    counts = growth_counts(want.outlier_mask, n_refresh)
    assert 0 in counts and 1 in counts and max(counts) >= 3
    got = detect_quant(x.to(DEVICE), scale.to(DEVICE), 3.0, n_refresh, bits, out=poisoned_output(x.to(DEVICE), bits),
                       rows_per_round=rows)
    assert_same_detection(got, want)


def test_window_rows_fill_the_window_within_the_register_budget():
    assert window_rows(1536, 10) == 2  # 2048-channel block, 8 warps: 16 values a thread
    assert window_rows(16, 10) == 8 and window_rows(48, 10) == 8  # B and C, dt_proj's input: 8 rows at most
    assert window_rows(16, 3) == 4 and window_rows(16, 1) == 1  # the whole window (next power of two)
    assert window_rows(1536, 10, num_warps=4) == 1
    x, scale = torch.zeros(1, 4, 16), torch.ones(4)
    for bad in (0, 3, 128):
        with pytest.raises(ValueError, match="rows_per_round must be a power of two"):
            detect_quant(x, scale, 3.0, 2, 4, rows_per_round=bad)


def test_dequantized_codes_are_the_fake_quantizer_output():
    """Codes × scales reproduce OutlierAwareQuantizer.forward exactly (same fp32 products)."""
    _, quantizers = core_quant()
    x = moving_outliers(2, 30, 64, seed=7)
    quantizer = quantizers.OutlierAwareQuantizer(bits=4, outlier_bits=8, k=3.0, n_refresh=10)
    quantizer.calibrate(x)
    with torch.no_grad():
        fake = quantizer(x)
        scale = quantizer.scale.detach()
    assert threshold_margin(x, quantizer.masks(x), scale, 3.0, 10, 7) > 1e-5
    got = detect_quant(x.to(DEVICE), scale.to(DEVICE), 3.0, 10, 4)
    got = DetectQuantOutput(*(None if t is None else t.cpu() for t in got))
    assert torch.equal(got.outlier_mask, quantizer.masks(x))
    dequantized = torch.where(got.outlier_mask, got.outlier_codes.float() * got.outlier_scale[..., None],
                              got.inlier_codes.float() * got.inlier_scale[..., None])
    assert torch.equal(dequantized, fake)


# ---- mixed-precision GEMM ----


def gemm_operands(m: int, n: int, k: int, inlier_bits: int, weight_bits: int, outliers: bool, seed: int,
                  unit_scales: bool = False) -> dict:
    """Random codes (outlier channels zeroed in the inlier codes and vice versa) and positive scales that put
    dequantized values near ±1, as calibrated scales do (so that fp16 outputs stay in range)."""
    g = torch.Generator().manual_seed(seed)
    qi, qw = inlier_qmax(inlier_bits), inlier_qmax(weight_bits)
    inlier = torch.randint(-qi, qi + 1, (m, k), generator=g, dtype=torch.int8)
    weight = torch.randint(-qw, qw + 1, (n, k), generator=g, dtype=torch.int8)
    ops = {"inlier_codes": pack_int4(inlier) if inlier_bits == 4 else inlier,
           "inlier_scale": torch.ones(m) if unit_scales else (torch.rand(m, generator=g) + 0.05) / qi,
           "weight": pack_int4(weight) if weight_bits == 4 else weight,
           "weight_scale": torch.ones(n) if unit_scales else (torch.rand(n, generator=g) + 0.05) / qw}
    if outliers:
        chosen = torch.rand(m, k, generator=g) < 0.1
        codes = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).masked_fill(~chosen, 0)
        inlier.masked_fill_(chosen, 0)
        ops["inlier_codes"] = pack_int4(inlier) if inlier_bits == 4 else inlier
        ops["outlier_codes"] = codes
        ops["outlier_scale"] = torch.ones(m) if unit_scales else (torch.rand(m, generator=g) * 20 + 1) / 127
    return ops


VARIANTS = {"W8A8": (8, 8, False), "W8A8O8": (8, 8, True), "W4A4O8": (4, 4, True), "W4A8O8": (8, 4, True)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_mixed_gemm_int32_accumulation_is_exact(variant):
    """Unit scales and |y| < 2^24: the fp32 output must equal the integer product exactly."""
    inlier_bits, weight_bits, outliers = VARIANTS[variant]
    ops = gemm_operands(128, 64, 256, inlier_bits, weight_bits, outliers, seed=0, unit_scales=True)
    y = mixed_gemm(**{name: t.to(DEVICE) for name, t in ops.items()}, out_dtype=torch.float32,
                   out=torch.full((128, 64), float("nan"), device=DEVICE))
    assert torch.equal(y.cpu().double(), mixed_gemm_reference(**ops))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("m", "n", "k", "bias"), [(77, 44, 12, False), (130, 200, 96, True), (256, 256, 256, True)])
def test_mixed_gemm_matches_float64_reference(variant, m, n, k, bias):
    inlier_bits, weight_bits, outliers = VARIANTS[variant]
    ops = gemm_operands(m, n, k, inlier_bits, weight_bits, outliers, seed=m + n + k)
    if bias:
        ops["bias"] = torch.randn(n, generator=torch.Generator().manual_seed(1))
    ref = mixed_gemm_reference(**ops)
    device_ops = {name: t.to(DEVICE) for name, t in ops.items()}
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 4e-3)):
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
        y = mixed_gemm(**device_ops, out_dtype=dtype, out=out)
        assert rel_error(y.cpu(), ref) < tolerance


def test_mixed_gemm_rounds_its_outputs_to_nearest_even():
    """fp16 and bf16 outputs are the fp32 result rounded as PyTorch casts (the interpreter's bf16 cast alone would
    truncate): with unit scales the fp32 result is an exact integer sum, so the rounding is all that differs."""
    ops = gemm_operands(128, 64, 256, 8, 8, True, seed=2, unit_scales=True)
    ops["weight_scale"] = torch.full((64,), 2.0**-8 * (1.0 + 2.0**-9))  # in fp16 range, between bf16 neighbours
    exact = mixed_gemm(**{name: t.to(DEVICE) for name, t in ops.items()}, out_dtype=torch.float32).cpu()
    for dtype in (torch.float16, torch.bfloat16):
        y = mixed_gemm(**{name: t.to(DEVICE) for name, t in ops.items()}, out_dtype=dtype).cpu()
        assert torch.equal(y, exact.to(dtype))


def test_outlier_path_carries_the_weight_scale():
    """The released kernel dequantized outliers without the weight scale; here halving it halves y."""
    ops = gemm_operands(64, 64, 64, 4, 4, outliers=True, seed=3)
    ops["inlier_codes"] = torch.zeros_like(ops["inlier_codes"])
    ops = {name: t.to(DEVICE) for name, t in ops.items()}
    y = mixed_gemm(**ops, out_dtype=torch.float32)
    halved = mixed_gemm(**{**ops, "weight_scale": ops["weight_scale"] / 2}, out_dtype=torch.float32)
    assert y.abs().max() > 0 and torch.allclose(halved, y / 2, rtol=1e-6, atol=0)


def outlier_pattern(m: int, k: int, kind: str, seed: int) -> torch.Tensor:
    """Where the outlier codes sit: ``scattered`` (10 % of the entries, anywhere), ``channels`` (a few fixed
    channels, the usual picture in a model: short lists), ``dense`` (half the channels: the dense fallback),
    ``none``."""
    g = torch.Generator().manual_seed(seed)
    if kind == "scattered":
        return torch.rand(m, k, generator=g) < 0.1
    if kind == "channels":
        chosen = torch.zeros(m, k, dtype=torch.bool)
        chosen[:, torch.randperm(k, generator=g)[:max(1, k // 20)]] = True
        return chosen & (torch.rand(m, k, generator=g) < 0.7)
    if kind == "dense":
        return torch.rand(m, k, generator=g) < 0.6
    return torch.zeros(m, k, dtype=torch.bool)


@pytest.mark.parametrize("kind", ["scattered", "channels", "dense", "none"])
@pytest.mark.parametrize(("m", "k", "block_m"), [(130, 96, 64), (64, 300, 128), (7, 12, 64)])
def test_compact_outliers_matches_reference(kind, m, k, block_m):
    codes = torch.randint(-127, 128, (m, k), generator=torch.Generator().manual_seed(m), dtype=torch.int8)
    codes = codes.masked_fill(~outlier_pattern(m, k, kind, seed=k), 0)
    want = compact_outliers_reference(codes, block_m)
    got = compact_outliers(codes.to(DEVICE), block_m)
    assert torch.equal(got.counts.cpu(), want.counts)
    rows_block = torch.arange(m) // block_m
    for b, count in enumerate(want.counts.tolist()):  # past a block's count the buffers are unspecified
        assert torch.equal(got.channels[b, :count].cpu(), want.channels[b, :count])
        assert torch.equal(got.codes[rows_block == b, :count].cpu(), want.codes[rows_block == b, :count])


@pytest.mark.parametrize("variant", ["W8A8O8", "W4A4O8"])
@pytest.mark.parametrize("kind", ["scattered", "channels", "dense", "none"])
@pytest.mark.parametrize(("m", "n", "k"), [(130, 200, 96), (77, 44, 300)])
def test_gathered_outliers_give_the_dense_result_bit_for_bit(variant, kind, m, n, k):
    """The gathered outlier path adds the same integers: the output equals the dense path's exactly (fp32 output
    for the int8 operands, fp16 for the packed ones: the epilogue is shared)."""
    inlier_bits, weight_bits, _ = VARIANTS[variant]
    if (inlier_bits == 4 or weight_bits == 4) and k % 2:
        k += 1
    ops = gemm_operands(m, n, k, inlier_bits, weight_bits, True, seed=m + k)
    chosen = outlier_pattern(m, k, kind, seed=n)
    ops["outlier_codes"] = torch.randint(-127, 128, (m, k), generator=torch.Generator().manual_seed(n),
                                         dtype=torch.int8).masked_fill(~chosen, 0)
    weight = unpack_int4(ops["weight"]) if weight_bits == 4 else ops["weight"]
    device_ops = {name: t.to(DEVICE) for name, t in ops.items()}
    weight_t = weight.t().contiguous().to(DEVICE)
    dtype = torch.float16 if weight_bits == 4 else torch.float32
    dense = mixed_gemm(**device_ops, out_dtype=dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    gathered = mixed_gemm(**device_ops, out_dtype=dtype, out=out, outlier_weight_t=weight_t)
    assert torch.equal(gathered, dense)
    assert rel_error(gathered.cpu().double(), mixed_gemm_reference(**ops)) < 1e-3


def test_mixed_gemm_rejects_mismatched_operands():
    ops = gemm_operands(64, 64, 64, 4, 4, outliers=True, seed=0)
    with pytest.raises(ValueError, match="K"):
        mixed_gemm(**{**ops, "weight": ops["weight"][:, :16]})
    with pytest.raises(ValueError, match="together"):
        mixed_gemm(**{**ops, "outlier_scale": None})
    with pytest.raises(ValueError, match="outlier_weight_t"):
        mixed_gemm(**ops, outlier_weight_t=unpack_int4(ops["weight"]).t())  # a strided view, not a copy


# ---- end to end: detect_quant → mixed_gemm vs the fake-quant PyTorch path ----


@pytest.mark.parametrize(("bits", "tolerance"), [(4, 1e-5), (8, 1e-5)])
def test_end_to_end_matches_fake_quant_linear(bits, tolerance):
    """y = Q(x) · Q(W)ᵀ + b through the kernels vs core.quant's fake quantizers and an fp32 matmul.

    Both compute with the same dequantized values; only the fp32 matmul's rounding differs from the exact
    int32 accumulation (relative error ~1e-7), hence the tolerance 1e-5 on ‖y − y_fake‖ / ‖y_fake‖."""
    _, quantizers = core_quant()
    x = moving_outliers(2, 40, 64, seed=11)
    g = torch.Generator().manual_seed(12)
    weight, bias = torch.randn(96, 64, generator=g) * 0.1, torch.randn(96, generator=g)
    act = quantizers.OutlierAwareQuantizer(bits=bits, outlier_bits=8, k=3.0, n_refresh=10)
    act.calibrate(x)
    wq = quantizers.WeightQuantizer(weight, bits)
    with torch.no_grad():
        fake = act(x) @ wq(weight).T + bias
        act_scale, w_scale = act.scale.detach(), wq.scale.detach().reshape(-1)
    assert threshold_margin(x, act.masks(x), act_scale, 3.0, 10, inlier_qmax(bits)) > 1e-5

    q = detect_quant(x.to(DEVICE), act_scale.to(DEVICE), 3.0, 10, bits)
    inlier = q.inlier_packed if bits == 4 else q.inlier_codes
    w_codes = quantize_weight(weight, w_scale, bits).to(DEVICE)
    y = mixed_gemm(inlier.reshape(80, -1), q.inlier_scale.reshape(-1), w_codes, w_scale.to(DEVICE),
                   q.outlier_codes.reshape(80, 64), q.outlier_scale.reshape(-1), bias.to(DEVICE),
                   out_dtype=torch.float32)
    assert q.outlier_mask.any()
    assert rel_error(y.cpu(), fake.reshape(80, 96).double()) < tolerance


# ---- the GPU build, checked on the CPU ----


@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the other tests build the kernels for real")
def test_kernels_build_for_hopper_without_spills():
    """sm_90 builds of the heaviest configurations (ptxas ships with triton): a lowering the GPU compiler
    rejects, a register spill or lost wgmma shows here, before any device time is spent."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "kernels.sm90_build", "--quick"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


# ---- Vim-size cases (GPU only) ----


@real_shapes
@pytest.mark.parametrize(("batch", "channels", "bits", "dtype"), [
    (64, 1536, 4, torch.float16), (64, 768, 8, torch.float32), (16, 48, 4, torch.float16)])
def test_detect_quant_real_shapes(batch, channels, bits, dtype):
    x = moving_outliers(batch, 197, channels, seed=channels, gaussian=False, per_step=max(1, channels // 100),
                        magnitudes=(30.0, 40.0)).to(dtype)
    qmax = inlier_qmax(bits)
    scale = static_scales(x.float(), qmax, seed=4)
    want = detect_quant_reference(x, scale, 3.0, 10, bits)
    assert threshold_margin(x.float(), want.outlier_mask, scale, 3.0, 10, qmax) > 1e-4
    xd = x.to(DEVICE)
    assert_same_detection(detect_quant(xd, scale.to(DEVICE), 3.0, 10, bits, out=poisoned_output(xd, bits)), want)


@real_shapes
@pytest.mark.parametrize("kind", ["channels", "scattered"])
@pytest.mark.parametrize(("m", "n", "k"), [(64 * 197, 3072, 768), (64 * 197, 768, 1536), (197, 80, 1536)])
def test_gathered_outliers_real_shapes(kind, m, n, k):
    ops = gemm_operands(m, n, k, 8, 8, True, seed=k)
    ops["outlier_codes"] = torch.randint(-127, 128, (m, k), generator=torch.Generator().manual_seed(n),
                                         dtype=torch.int8).masked_fill(~outlier_pattern(m, k, kind, seed=n), 0)
    ops = {name: t.to(DEVICE) for name, t in ops.items()}
    dense = mixed_gemm(**ops, out_dtype=torch.float32)
    out = torch.full((m, n), float("nan"), device=DEVICE)
    assert torch.equal(mixed_gemm(**ops, out_dtype=torch.float32, out=out,
                                  outlier_weight_t=ops["weight"].t().contiguous()), dense)


@real_shapes
@pytest.mark.parametrize("variant", ["W8A8O8", "W4A4O8"])
@pytest.mark.parametrize(("m", "n", "k"), [(64 * 197, 3072, 768), (64 * 197, 768, 1536), (64 * 197, 1536, 48),
                                           (64 * 197, 80, 1536), (197, 3072, 768)])
def test_mixed_gemm_real_shapes(variant, m, n, k):
    inlier_bits, weight_bits, outliers = VARIANTS[variant]
    ops = {name: t.to(DEVICE) for name, t in gemm_operands(m, n, k, inlier_bits, weight_bits, outliers, 0).items()}
    ref = mixed_gemm_reference(**ops)
    out = torch.full((m, n), float("nan"), device=DEVICE)
    assert rel_error(mixed_gemm(**ops, out_dtype=torch.float32, out=out), ref) < 1e-5
