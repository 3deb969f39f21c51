"""kernels.detect_fake_quant (the scan inputs Δ, B, C) against its PyTorch reference, and the reference against
core.quant's OutlierAwareQuantizer, which it must reproduce for the integer model to compute the simulation.

Interpreted on the CPU (TRITON_INTERPRET=1), compiled on a CUDA machine (scripts/gpu_session.sh). Outputs are
compared exactly: the data keep a margin from every threshold (``threshold_margin``), so that the summation
order cannot flip a detection.
"""

from __future__ import annotations

import pytest
import torch

from kernels.detect_fake_quant import detect_fake_quant, detect_fake_quant_reference
from kernels.detect_quant import window_rows
from tests.test_kernels import (
    DEVICE,
    core_quant,
    every_growth,
    growth_counts,
    moving_outliers,
    static_scales,
    threshold_margin,
)

ALWAYS = 1e-30  # threshold_margin's qmax that counts every step as triggered: a margin over a superset


def calibrated(x: torch.Tensor, bits: int, outlier_bits: int, asymmetric: bool):
    """An OutlierAwareQuantizer calibrated on x as core.quant calibrates Δ (asymmetric) or B/C (symmetric)."""
    _, quantizers = core_quant()
    quantizer = quantizers.OutlierAwareQuantizer(bits, outlier_bits, k=3.0, n_refresh=10, asymmetric=asymmetric)
    quantizer.calibrate(x)
    return quantizer


def arguments(quantizer) -> tuple:
    """detect_fake_quant's arguments after x, read off a calibrated quantizer."""
    zero = None if quantizer.zero_point is None else quantizer.zero_point.detach()
    outlier_levels = 0 if quantizer.outlier is None else quantizer.outlier.qmax
    return quantizer.scale.detach(), zero, quantizer.k, quantizer.n_refresh, quantizer.qmax, outlier_levels


@pytest.mark.parametrize(("bits", "outlier_bits", "asymmetric"), [(4, 8, True), (8, 8, True), (4, 16, True),
                                                                  (4, 8, False), (8, 16, False)])
def test_reference_is_the_simulation_quantizer(bits, outlier_bits, asymmetric):
    x = moving_outliers(3, 33, 48, seed=bits + outlier_bits) + (0.5 if asymmetric else 0.0)  # Δ is not centred
    quantizer = calibrated(x, bits, outlier_bits, asymmetric)
    with torch.no_grad():
        want = quantizer(x)
    got = detect_fake_quant_reference(x, *arguments(quantizer))
    assert torch.equal(got, want)
    mask = quantizer.masks(x)
    assert 0 < mask.float().mean() < 0.5  # some detections, not everything
    assert not torch.equal(want, x)  # rounding happened


@pytest.mark.parametrize(("dtype", "bits", "outlier_bits", "asymmetric", "channels"), [
    (torch.float32, 4, 8, True, 64),
    (torch.float16, 4, 8, True, 96),
    (torch.float32, 8, 16, True, 40),
    (torch.float32, 4, 8, False, 16),  # B and C: d_state channels
    (torch.float16, 8, 8, False, 30),
    (torch.float16, 4, 8, False, 384),  # Δ at Vim-T's width: divisions by the rows' reciprocals
])
def test_kernel_matches_reference(dtype, bits, outlier_bits, asymmetric, channels):
    x = (moving_outliers(2, 37, channels, seed=channels, gaussian=False) + (0.3 if asymmetric else 0.0)).to(dtype)
    quantizer = calibrated(x.float(), bits, outlier_bits, asymmetric)
    args = arguments(quantizer)
    want = detect_fake_quant_reference(x, *args)
    mask = quantizer.masks(x.float())
    assert mask.any() and threshold_margin(x.float(), mask, args[0], 3.0, 10, ALWAYS) > 1e-5
    device_args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    got = detect_fake_quant(x.to(DEVICE), *device_args)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got.cpu(), want)
    rows = window_rows(channels, 10)  # as the packed model launches it: rounds over the window, same values
    assert torch.equal(detect_fake_quant(x.to(DEVICE), *device_args, rows_per_round=rows).cpu(), want)


@pytest.mark.parametrize(("rows", "asymmetric"), [(4, True), (16, False), (2, True)])
def test_rounds_give_the_step_walk_bit_for_bit(rows, asymmetric):
    """Windows whose set never grows, grows once and grows at most steps (``every_growth``), in rounds."""
    x = every_growth(37, 48, seed=rows) + (0.3 if asymmetric else 0.0)
    quantizer = calibrated(x, 4, 8, asymmetric)
    args = arguments(quantizer)
    want = detect_fake_quant_reference(x, *args)
    mask = quantizer.masks(x)
    assert threshold_margin(x, mask, args[0], 3.0, 10, ALWAYS) > 1e-5
    counts = growth_counts(mask, 10)
    assert 0 in counts and 1 in counts and max(counts) >= 3
    got = detect_fake_quant(x.to(DEVICE), *(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args),
                            rows_per_round=rows)
    assert torch.equal(got.cpu(), want)


def test_kernel_reads_the_split_views_of_x_proj():
    """B and C are column slices of x_proj's output: the kernel reads the strided view without a copy."""
    x_dbl = moving_outliers(2, 29, 12 + 2 * 16, seed=4, gaussian=False)
    B = torch.split(x_dbl, [12, 16, 16], dim=-1)[1]
    assert not B.is_contiguous()
    scale = static_scales(B, 7, seed=5)
    want = detect_fake_quant_reference(B.contiguous(), scale, None, 3.0, 10, 7, 127)
    got = detect_fake_quant(B.to(DEVICE), scale.to(DEVICE), None, 3.0, 10, 7, 127)
    assert torch.equal(got.cpu(), want)


def test_rejects_mismatched_scales():
    x = torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match="static_scale must be"):
        detect_fake_quant_reference(x, torch.ones(7), None, 3.0, 10, 7, 127)
    with pytest.raises(ValueError, match="zero_point must be"):
        detect_fake_quant_reference(x, torch.ones(8), torch.zeros(3), 3.0, 10, 15, 255)


def extremes_by_hand() -> tuple[torch.Tensor, torch.Tensor]:
    """One window of 4 steps, 16 channels (k = 1), built so that the outlier range after each step cannot come
    from the inliers' extremes alone, which is what ``detect_step`` derives it from without a third reduction:
    step 0 flags only a negative channel while the inliers' largest x (positive) stays under θ; step 1 the kept
    channel turns positive and a larger positive one joins; step 2 nothing joins and the kept channels set the
    range; step 3 is not triggered (huge static scale). Values sit far from every threshold."""
    base = torch.tensor([0.1, -0.1, 0.05, -0.05] * 4)
    x = base.repeat(4, 1)
    x[0, 3] = -5.0  # joins; the inliers' largest x is 0.1
    x[1, 3], x[1, 9] = 3.0, 6.0  # kept channel now positive; channel 9 joins
    x[2, 3], x[2, 9] = -1.0, 0.5  # nothing joins: the range is the kept channels'
    x[3, 3], x[3, 9], x[3, 12] = 2.0, -4.0, 9.0  # not triggered: channel 12 stays an inlier
    static_scale = torch.tensor([1e-6, 1e-6, 1e-6, 1e6])
    return x.unsqueeze(0).to(DEVICE), static_scale.to(DEVICE)


@pytest.mark.parametrize(("asymmetric", "levels", "outlier_levels"), [(True, 15, 255), (False, 7, 127)])
def test_outlier_range_derived_without_a_third_pass_is_exact(asymmetric, levels, outlier_levels):
    x, static_scale = extremes_by_hand()
    zero = torch.full_like(static_scale, 8.0) if asymmetric else None
    args = (static_scale, zero, 1.0, 4, levels, outlier_levels)
    want = detect_fake_quant_reference(x, *args)
    assert torch.equal(detect_fake_quant(x, *args), want)
    assert want[0, 0, 3] == -5.0 and want[0, 1, 9] == 6.0  # the outliers sit on their own grids' ends


def test_detect_quant_outlier_scale_derived_without_a_third_pass_is_exact():
    from kernels.detect_quant import detect_quant, detect_quant_reference
    from tests.test_kernels import assert_same_detection, poisoned_output
    x, static_scale = extremes_by_hand()
    want = detect_quant_reference(x, static_scale, 1.0, 4, 4)
    assert_same_detection(detect_quant(x, static_scale, 1.0, 4, 4, out=poisoned_output(x, 4)), want)
    assert want.outlier_mask[0, :, 3].all() and not want.outlier_mask[0, 3, 12]
    assert torch.equal(want.outlier_scale[0].cpu(), torch.tensor([5.0, 6.0, 1.0, 4.0]) / 127)
