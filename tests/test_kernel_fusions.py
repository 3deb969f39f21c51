"""The fused producers of Vim's quantized activations against their PyTorch references.

- ``norm_detect_quant``: residual add + RMSNorm + detect_quant. Its only summation in another order than
  PyTorch's is the sum of squares, so the exact tests use inputs on a 1/16 grid whose per-token sums of squares
  stay below 2^24 grid units: every partial sum is exact in fp32, the normalized values are bit for bit the
  reference's, and every output must be equal. On general data the integers may move by one where an ulp of the
  normalized value crosses a rounding point; that test bounds how much.
- ``conv_silu``: causal depthwise conv1d + SiLU, forward and reversed time, against float64.
- ``merge_detect_quant``: detect_quant of (y_forward + flip(y_backward)) / 2, exact.
- ``add_rms_norm`` and ``merge_directions``: the same producers writing the float value (a float Vim's block entry
  and merge, ``core.models.fused``), exact on the same data.

On the CPU under TRITON_INTERPRET=1 at small shapes; on CUDA compiled, plus Vim-size cases with
KERNELS_REAL_SHAPES=1 (scripts/gpu_session.sh). Outputs are poisoned before every kernel run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.conv_silu import conv_silu, conv_silu_reference
from kernels.detect_quant import DetectQuantOutput, detect_quant, inlier_qmax
from kernels.merge_detect_quant import merge_detect_quant, merge_detect_quant_reference, merge_directions
from kernels.norm_detect_quant import add_rms_norm, norm_detect_quant, norm_detect_quant_reference, rms_norm_reference
from tests.test_kernels import (
    DEVICE,
    assert_same_detection,
    every_growth,
    growth_counts,
    moving_outliers,
    poisoned_output,
    real_shapes,
    rel_error,
    static_scales,
    threshold_margin,
)

EPS = 1e-5  # Vim's norm_eps
GRID = 16  # exact inputs are multiples of 1/GRID
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # float outputs, by dtype


def on_device(out: DetectQuantOutput) -> DetectQuantOutput:
    return DetectQuantOutput(*(None if t is None else t.cpu() for t in out))


# ---- residual add + RMSNorm + detect_quant ----


def block_inputs(batch: int, length: int, channels: int, dtype: torch.dtype, with_residual: bool, seed: int,
                 per_step: int = 3) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """hidden (dtype), residual (fp32, or None for the first block) and an RMSNorm weight, with residual + hidden
    on the 1/GRID grid, U(−1, 1) inliers and moving outliers at ±20 / ±40 (see the module docstring)."""
    total = moving_outliers(batch, length, channels, seed, gaussian=False, per_step=per_step, magnitudes=(20.0, 40.0))
    total = torch.round(total * GRID) / GRID
    assert ((total * GRID) ** 2).sum(-1).max() < 2**24  # every partial sum of squares exact in fp32
    g = torch.Generator().manual_seed(seed + 1)
    weight = 0.5 + torch.rand(channels, generator=g)
    if not with_residual:
        assert torch.equal(total.to(dtype).float(), total)
        return total.to(dtype), None, weight
    hidden = (torch.randint(-2 * GRID, 2 * GRID + 1, total.shape, generator=g) / GRID).to(dtype)  # exact in bf16
    return hidden, total - hidden.float(), weight


def normalized(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """The in_proj input the model quantizes (fp32 view of the value cast to hidden's dtype)."""
    total = hidden.float() if residual is None else residual + hidden.float()
    return rms_norm_reference(total, weight, EPS).to(hidden.dtype).float()


def check_norm_case(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bits: int,
                    n_refresh: int, margin: float = 1e-5) -> None:
    qmax = inlier_qmax(bits)
    scale = static_scales(normalized(hidden, residual, weight), qmax, seed=hidden.shape[-1])
    want, want_residual = norm_detect_quant_reference(hidden, residual, weight, EPS, scale, 3.0, n_refresh, bits)
    assert threshold_margin(normalized(hidden, residual, weight), want.outlier_mask, scale, 3.0, n_refresh,
                            qmax) > margin
    assert want.outlier_mask.any() and (want.inlier_codes.abs() == qmax).any()  # detections and clipping happen
    hd = hidden.to(DEVICE)
    residual_out = torch.full(hidden.shape, float("nan"), device=DEVICE)
    got, got_residual = norm_detect_quant(hd, None if residual is None else residual.to(DEVICE), weight.to(DEVICE),
                                          EPS, scale.to(DEVICE), 3.0, n_refresh, bits,
                                          out=poisoned_output(hd, bits), residual_out=residual_out)
    assert got_residual is residual_out and torch.equal(got_residual.cpu(), want_residual)  # one fp32 add
    assert_same_detection(on_device(got), want)


@pytest.mark.parametrize(("dtype", "bits", "channels", "n_refresh", "with_residual"), [
    (torch.float16, 4, 64, 10, True),  # the model on the GPU: fp16 hidden, fp32 residual
    (torch.float32, 8, 45, 7, False),  # odd C (masked block), the first block (no residual yet)
    (torch.bfloat16, 4, 96, 4, True),
    (torch.float16, 8, 128, 50, False),  # one window longer than L
    (torch.float16, 4, 192, 10, True),  # Vim-T's width: divisions by the rows' reciprocals
])
def test_norm_detect_quant_exact(dtype, bits, channels, n_refresh, with_residual):
    hidden, residual, weight = block_inputs(2, 29, channels, dtype, with_residual, seed=channels)
    check_norm_case(hidden, residual, weight, bits, n_refresh)


@pytest.mark.parametrize("rows", [1, 4])
def test_norm_detect_quant_strided_and_in_place(rows):
    """hidden as the transposed view of a channel-first buffer, residual a strided view updated in place; in
    rounds of 4 steps too, where a row after a growing step is read again by the next round, so it must not have
    been overwritten (sets that never grow, grow once, and grow at most steps: ``every_growth``)."""
    total = torch.round(every_growth(23, 64, seed=3) * GRID) / GRID
    g = torch.Generator().manual_seed(4)
    hidden = (torch.randint(-2 * GRID, 2 * GRID + 1, total.shape, generator=g) / GRID).half()
    residual, weight = total - hidden.float(), torch.ones(64)  # a flat norm weight keeps the three samples apart
    qmax = inlier_qmax(4)
    scale = static_scales(normalized(hidden, residual, weight), qmax, seed=5)
    want, want_residual = norm_detect_quant_reference(hidden, residual, weight, EPS, scale, 3.0, 10, 4)
    counts = growth_counts(want.outlier_mask, 10)
    assert 0 in counts and 1 in counts and max(counts) >= 3
    hd = hidden.transpose(1, 2).contiguous().transpose(1, 2).to(DEVICE)
    buffer = torch.full((3, 23, 128), float("nan"), device=DEVICE)
    rd = buffer[..., ::2]
    rd.copy_(residual)
    got, got_residual = norm_detect_quant(hd, rd, weight.to(DEVICE), EPS, scale.to(DEVICE), 3.0, 10, 4,
                                          out=poisoned_output(hd, 4), residual_out=rd, rows_per_round=rows)
    assert got_residual is rd and torch.equal(rd.cpu(), want_residual)
    assert buffer[..., 1::2].isnan().all()  # nothing written between the strided elements
    assert_same_detection(on_device(got), want)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.float16, 1e-3)])
def test_norm_detect_quant_general_data(dtype, tolerance):
    """Inputs off any grid: the sum of squares rounds differently from PyTorch's, the normalized values differ
    by an ulp (fp32) or, where that crosses an fp16 rounding point, by one fp16 ulp. Masks still agree (data
    away from thresholds), codes differ by at most 1 and rarely, scales within ``tolerance``."""
    g = torch.Generator().manual_seed(9)
    hidden = (moving_outliers(2, 31, 96, seed=9, gaussian=False, magnitudes=(20.0, 40.0)) * 0.3).to(dtype)
    residual = torch.randn(hidden.shape, generator=g) * 0.1
    weight = 0.5 + torch.rand(96, generator=g)
    scale = static_scales(normalized(hidden, residual, weight), 7, seed=10)
    want, want_residual = norm_detect_quant_reference(hidden, residual, weight, EPS, scale, 3.0, 10, 4)
    assert threshold_margin(normalized(hidden, residual, weight), want.outlier_mask, scale, 3.0, 10, 7) > 1e-2
    hd = hidden.to(DEVICE)
    got, got_residual = norm_detect_quant(hd, residual.to(DEVICE), weight.to(DEVICE), EPS, scale.to(DEVICE), 3.0,
                                          10, 4, out=poisoned_output(hd, 4))
    got = on_device(got)
    assert torch.equal(got_residual.cpu(), want_residual) and torch.equal(got.outlier_mask, want.outlier_mask)
    for name in ("inlier_codes", "outlier_codes"):
        moved = (getattr(got, name).int() - getattr(want, name).int()).abs()
        assert moved.max() <= 1 and moved.float().mean() < 0.01, name
    assert torch.equal(got.inlier_scale, want.inlier_scale)
    assert float(((got.outlier_scale - want.outlier_scale) / want.outlier_scale).abs().max()) < tolerance


def test_rms_norm_reference_is_the_models():
    """Our RMSNorm writes rsqrt as 1 / sqrt; core.models.vim's RMSNorm agrees to an ulp of the rsqrt."""
    vim = pytest.importorskip("core.models.vim")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 17, 192, generator=g) * 3
    norm = vim.RMSNorm(192, EPS)
    with torch.no_grad():
        norm.weight.copy_(0.5 + torch.rand(192, generator=g))
        assert rel_error(norm(x), rms_norm_reference(x, norm.weight, EPS).double()) < 1e-6


def test_norm_detect_quant_rejects_bad_inputs():
    hidden, residual, weight = block_inputs(1, 4, 16, torch.float16, True, seed=1)
    scale = torch.ones(4)
    with pytest.raises(ValueError, match="residual must be fp32"):
        norm_detect_quant(hidden, residual.half(), weight, EPS, scale, 3.0, 2, 4)
    with pytest.raises(ValueError, match="norm_weight"):
        norm_detect_quant(hidden, residual, weight[:8], EPS, scale, 3.0, 2, 4)
    with pytest.raises(ValueError, match="residual_out"):
        norm_detect_quant(hidden, residual, weight, EPS, scale, 3.0, 2, 4, residual_out=hidden)


# ---- conv1d + SiLU ----


def conv_inputs(batch: int, length: int, channels: int, width: int, dtype: torch.dtype,
                seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x as the model has it (the first half of in_proj's output: time stride 2E), weight (E, 1, W), bias (E,)."""
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(batch, length, 2 * channels, generator=g).to(dtype).to(DEVICE)
    weight = torch.randn(channels, 1, width, generator=g) / width**0.5
    return xz[..., :channels], weight.to(DEVICE), torch.randn(channels, generator=g).to(DEVICE) * 0.5


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("dtype", "length", "channels", "width"), [
    (torch.float32, 37, 45, 4),  # odd E: a masked channel block
    (torch.float16, 20, 130, 4),  # two channel blocks, the second nearly empty
    (torch.bfloat16, 3, 64, 4),  # L < W: every output sees the zero padding
    (torch.float32, 17, 32, 2),  # another d_conv
])
def test_conv_silu_matches_reference(dtype, length, channels, width, reverse):
    x, weight, bias = conv_inputs(2, length, channels, width, dtype, seed=length + channels)
    out = torch.full(x.shape, float("nan"), dtype=dtype, device=DEVICE)
    y = conv_silu(x, weight, bias, reverse=reverse, out=out)
    assert y is out and rel_error(y.cpu(), conv_silu_reference(x.cpu(), weight.cpu(), bias.cpu(), reverse)) \
        < TOLERANCE[dtype]


def test_conv_silu_reverse_reads_the_flipped_sequence():
    """reverse=True on x is the forward result on a flipped copy, bit for bit (same arithmetic)."""
    x, weight, bias = conv_inputs(2, 21, 64, 4, torch.float32, seed=1)
    assert torch.equal(conv_silu(x, weight, bias, reverse=True), conv_silu(x.flip(1).contiguous(), weight, bias))


def test_conv_silu_is_the_models_branch():
    """The module's own parameters and the model's expression (fp32), output into a channel-first buffer."""
    x, _, _ = conv_inputs(2, 25, 48, 4, torch.float32, seed=2)
    conv = torch.nn.Conv1d(48, 48, 4, groups=48, padding=3).to(DEVICE)
    with torch.no_grad():
        for direction_x, reverse in ((x, False), (x.flip(1), True)):
            model = F.silu(conv(direction_x.transpose(1, 2))[..., :25].transpose(1, 2))
            out = torch.full((2, 48, 25), float("nan"), device=DEVICE).transpose(1, 2)
            y = conv_silu(x, conv.weight, conv.bias, reverse=reverse, out=out)
            assert rel_error(y.cpu(), model.cpu().double()) < 1e-6


def test_conv_silu_rejects_bad_inputs():
    x, weight, bias = conv_inputs(1, 4, 16, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match="depthwise"):
        conv_silu(x, weight[:, 0], bias)
    with pytest.raises(ValueError, match="out must be"):
        conv_silu(x, weight, bias, out=torch.empty(1, 4, 16, dtype=torch.float16, device=DEVICE))


def check_add_rms_norm(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       in_place: bool = False) -> None:
    """``add_rms_norm`` writes the reference's normalized value and residual bit for bit (exact data), into
    poisoned buffers; ``in_place``: the residual updated where it lies."""
    want_residual = hidden.float() if residual is None else residual + hidden.float()
    want = rms_norm_reference(want_residual, weight, EPS).to(hidden.dtype)
    hd, rd = hidden.to(DEVICE), None if residual is None else residual.to(DEVICE)
    out = torch.full(hidden.shape, float("nan"), dtype=hidden.dtype, device=DEVICE)
    residual_out = rd if in_place else torch.full(hidden.shape, float("nan"), device=DEVICE)
    got, got_residual = add_rms_norm(hd, rd, weight.to(DEVICE), EPS, out=out, residual_out=residual_out)
    assert got is out and got_residual is residual_out
    assert torch.equal(got.cpu(), want) and torch.equal(got_residual.cpu(), want_residual)


@pytest.mark.parametrize(("dtype", "channels", "with_residual"), [
    (torch.float16, 64, True), (torch.float32, 45, False), (torch.bfloat16, 96, True), (torch.float16, 640, True)])
def test_add_rms_norm_exact(dtype, channels, with_residual):
    """Rows of 64 to 640 channels (a program takes whole rows: 64 rows of 64, 4 of 640), 29 steps: the last
    program's rows cut short and crossing samples."""
    hidden, residual, weight = block_inputs(3, 29, channels, dtype, with_residual, seed=channels)
    check_add_rms_norm(hidden, residual, weight)


def test_add_rms_norm_strided_in_place_and_as_norm_detect_quant_produces():
    hidden, residual, weight = block_inputs(2, 23, 64, torch.float16, True, seed=5)
    strided = hidden.transpose(1, 2).contiguous().transpose(1, 2)
    check_add_rms_norm(strided, residual, weight, in_place=True)
    # the rows norm_detect_quant quantizes are these: its codes equal detect_quant's on add_rms_norm's output
    x, _ = add_rms_norm(hidden.to(DEVICE), residual.to(DEVICE), weight.to(DEVICE), EPS)
    scale = static_scales(x.float().cpu(), 7, seed=6)
    fused, _ = norm_detect_quant(hidden.to(DEVICE), residual.to(DEVICE), weight.to(DEVICE), EPS, scale.to(DEVICE),
                                 3.0, 10, 4)
    assert_same_detection(on_device(fused), on_device(detect_quant(x, scale.to(DEVICE), 3.0, 10, 4)))


def test_add_rms_norm_rejects_a_wrong_output():
    hidden = torch.zeros(2, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"out must be torch.float32 \(2, 5, 8\)"):
        add_rms_norm(hidden, None, torch.ones(8, device=DEVICE), EPS, out=torch.empty(2, 5, 8, dtype=torch.float16))


# ---- merge of the two directions + detect_quant ----


@pytest.mark.parametrize(("dtype", "bits", "channels", "n_refresh", "rows"), [
    (torch.float16, 4, 64, 10, 1), (torch.float32, 8, 45, 7, 4), (torch.bfloat16, 4, 96, 3, 1),
    (torch.float16, 4, 64, 10, 2), (torch.float16, 4, 384, 10, 1)])
def test_merge_detect_quant_matches_reference(dtype, bits, channels, n_refresh, rows):
    """The model's (y_f + flip(y_b)) / 2 in the dtype, then detect_quant_reference; y_backward strided."""
    y_forward = moving_outliers(2, 27, channels, seed=channels, gaussian=False, magnitudes=(20.0, 40.0)).to(dtype)
    y_backward = moving_outliers(2, 27, channels, seed=channels + 1, gaussian=False, per_step=1,
                                 magnitudes=(20.0, 40.0)).to(dtype)
    qmax = inlier_qmax(bits)
    merged = ((y_forward + y_backward.flip(1)) / 2).float()
    scale = static_scales(merged, qmax, seed=channels)
    want = merge_detect_quant_reference(y_forward, y_backward, scale, 3.0, n_refresh, bits)
    assert threshold_margin(merged, want.outlier_mask, scale, 3.0, n_refresh, qmax) > 1e-5
    assert want.outlier_mask.any() and (want.inlier_codes.abs() == qmax).any()
    yf = y_forward.to(DEVICE)
    yb = y_backward.transpose(1, 2).contiguous().transpose(1, 2).to(DEVICE)
    got = merge_detect_quant(yf, yb, scale.to(DEVICE), 3.0, n_refresh, bits, out=poisoned_output(yf, bits),
                             rows_per_round=rows)
    assert_same_detection(on_device(got), want)
    if dtype == torch.float16:  # the same integers as detect_quant on the materialised merge
        merged_device = (yf + yb.flip(1)) / 2
        assert_same_detection(on_device(detect_quant(merged_device, scale.to(DEVICE), 3.0, n_refresh, bits)), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_merge_directions_is_pytorchs_merge_bit_for_bit(dtype):
    """Random data, strided inputs (the in_proj halves' layout, a transposed view) and a strided output; 300
    channels: two column blocks, the second cut short."""
    g = torch.Generator().manual_seed(7)
    y_forward = (torch.randn(3, 21, 600, generator=g) * 5).to(dtype)[..., ::2]
    y_backward = (torch.randn(3, 300, 21, generator=g) * 5).to(dtype).transpose(1, 2)
    want = (y_forward + y_backward.flip(1)) / 2
    buffer = torch.full((3, 21, 301), float("nan"), dtype=dtype, device=DEVICE)
    got = merge_directions(y_forward.to(DEVICE), y_backward.to(DEVICE), out=buffer[..., 1:])
    assert torch.equal(got.cpu(), want) and buffer[..., 0].isnan().all()
    assert torch.equal(merge_directions(y_forward.to(DEVICE), y_backward.to(DEVICE)).cpu(), want)


def test_merge_detect_quant_rejects_mismatched_inputs():
    y = torch.zeros(1, 4, 16)
    with pytest.raises(ValueError, match="agree"):
        merge_detect_quant(y, y.half(), torch.ones(4), 3.0, 2, 4)


# ---- lean outputs (what the packed model asks for) ----


def lean_poisoned(x: torch.Tensor, bits: int) -> DetectQuantOutput:
    """A poisoned lean output: poisoned_output's buffers without the ones a lean call does not write."""
    return poisoned_output(x, bits)._replace(outlier_mask=None, inlier_packed=None)


@pytest.mark.parametrize("bits", [4, 8])
def test_lean_outputs_are_the_full_ones_without_what_the_gemm_does_not_read(bits):
    """lean=True (no mask, no packed copy: the int8 GEMM's operands) writes the same codes and scales, in all
    three producers; a lean call refuses an output that has the skipped buffers, and the reverse."""
    x = moving_outliers(2, 23, 64, seed=5, gaussian=False, magnitudes=(20.0, 40.0)).to(torch.float16).to(DEVICE)
    scale = static_scales(x.float().cpu(), inlier_qmax(bits), seed=5).to(DEVICE)
    hidden, residual, weight = (None if t is None else t.to(DEVICE)
                                for t in block_inputs(2, 23, 64, torch.float16, True, seed=6))
    producers = {
        "detect": lambda **kw: detect_quant(x, scale, 3.0, 10, bits, **kw),
        "merge": lambda **kw: merge_detect_quant(x, x.flip(1), scale, 3.0, 10, bits, **kw),
        "norm": lambda **kw: norm_detect_quant(hidden, residual, weight, EPS, scale, 3.0, 10, bits, **kw)[0],
    }
    for name, produce in producers.items():
        full = produce(out=poisoned_output(x, bits))
        lean = produce(out=lean_poisoned(x, bits), lean=True)
        assert lean.outlier_mask is None and lean.inlier_packed is None, name
        assert full.outlier_mask.any() and (full.inlier_packed is not None) == (bits == 4), name
        for field in ("inlier_codes", "outlier_codes", "inlier_scale", "outlier_scale"):
            assert torch.equal(getattr(lean, field), getattr(full, field)), (name, field)
        with pytest.raises(ValueError, match=r"must be None: this call does not produce it \(lean output\)"):
            produce(out=poisoned_output(x, bits), lean=True)
        with pytest.raises(ValueError, match="must be a contiguous buffer"):
            produce(out=lean_poisoned(x, bits))


# ---- Vim-size cases (GPU only) ----


@real_shapes
@pytest.mark.parametrize(("batch", "channels", "dtype", "bits", "with_residual", "seed"), [
    (64, 768, torch.float16, 4, True, 771), (16, 192, torch.float32, 8, False, 192)])  # seeds: margins > 1e-4
def test_norm_detect_quant_real_shapes(batch, channels, dtype, bits, with_residual, seed):
    hidden, residual, weight = block_inputs(batch, 197, channels, dtype, with_residual, seed=seed,
                                            per_step=max(1, channels // 100))
    check_norm_case(hidden, residual, weight, bits, 10, margin=1e-4)


@real_shapes
@pytest.mark.parametrize("reverse", [False, True])
def test_conv_silu_real_shape(reverse):
    x, weight, bias = conv_inputs(64, 197, 1536, 4, torch.float16, seed=3)
    y = conv_silu(x, weight, bias, reverse=reverse, out=torch.full(x.shape, float("nan"), dtype=x.dtype,
                                                                   device=DEVICE))
    assert rel_error(y.cpu(), conv_silu_reference(x.cpu(), weight.cpu(), bias.cpu(), reverse)) < 1e-3


@real_shapes
def test_float_producers_real_shapes():
    hidden, residual, weight = block_inputs(64, 197, 768, torch.float16, True, seed=771,
                                            per_step=7)
    check_add_rms_norm(hidden, residual, weight)
    g = torch.Generator().manual_seed(8)
    y_forward, y_backward = (torch.randn(2, 64, 197, 1536, generator=g) * 3).half()
    assert torch.equal(merge_directions(y_forward.to(DEVICE), y_backward.to(DEVICE)).cpu(),
                       (y_forward + y_backward.flip(1)) / 2)


@real_shapes
def test_merge_detect_quant_real_shape():
    y_forward = moving_outliers(64, 197, 1536, seed=1, gaussian=False, per_step=15, magnitudes=(30.0, 40.0)).half()
    y_backward = (torch.rand(y_forward.shape, generator=torch.Generator().manual_seed(2)) * 2 - 1).half()
    merged = ((y_forward + y_backward.flip(1)) / 2).float()
    scale = static_scales(merged, 7, seed=3)
    want = merge_detect_quant_reference(y_forward, y_backward, scale, 3.0, 10, 4)
    assert threshold_margin(merged, want.outlier_mask, scale, 3.0, 10, 7) > 1e-4
    yf, yb = y_forward.to(DEVICE), y_backward.to(DEVICE)
    got = merge_detect_quant(yf, yb, scale.to(DEVICE), 3.0, 10, 4, out=poisoned_output(yf, 4))
    assert_same_detection(on_device(got), want)
