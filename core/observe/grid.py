"""Where a site's values fall on its quantization grids, time-step by time-step, and a linear weight's on its
per-output-channel grid: the data behind the app's quantization-grid charts.

OuroMamba's inlier grid has one calibrated step S^I(t) per time-step (and, for Δ's unsigned grid, a zero point
z(t)); the channels the rule flags at a step go to their own 8-bit grid, scaled per (image, step). Measured in
steps of the inlier grid, x / S^I(t) (+ z(t)), every value of a site falls on one axis whatever its time-step:
the inlier grid covers the codes −qmax..qmax (0..levels for Δ) and what an inlier channel holds beyond them is
clipped. The error per step with the detected outliers and without any (every channel on the inlier grid)
shows where keeping them at 8 bits pays. Weights have one step per output channel (and group), so the same axis
holds a whole weight matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.observe.outliers import outlier_quantizer
from core.observe.probe import site_quantizers
from core.observe.stats import _as_tokens, _select_image, histogram
from core.quant import QuantizedVim
from core.quant.fake import MIN_SCALE
from core.quant.quantizers import WeightQuantizer


@dataclass(frozen=True)
class GridView:
    """Result of :func:`quantization_grid`.

    ``histogram``: ``bin_left, bin_right, inlier, outlier``, counts of the values on inlier and on outlier
    channels in codes of the inlier grid. ``steps``: ``time_step, static_scale`` (S^I(t)), ``token_scale`` (the
    scale the token itself would need, all channels: the max over the images shown), ``inlier_token_scale``
    (the same over the channels left as inliers: above S^I(t), inliers are clipped), ``outlier_scale`` (the
    outlier grid's step; NaN where no channel is an outlier or outliers stay in floating point), ``clipped``
    (share of the step's inlier values beyond the grid), ``outlier_share``, ``sqnr_db`` (the site's
    quantization with these outliers) and ``sqnr_db_without_outliers`` (every channel on the inlier grid).
    ``codes``: the inlier grid's first and last code. The three floats: the same over all steps."""

    histogram: pd.DataFrame
    steps: pd.DataFrame
    codes: tuple[int, int]
    sqnr_db: float
    sqnr_db_without_outliers: float
    clipped: float


def _sqnr_db(signal: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
    """10·log10(signal / noise) element-wise in float64: +inf without noise, NaN without signal either."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return 10 * np.log10(signal.double().cpu().numpy() / noise.double().cpu().numpy())


def _code_range(codes: torch.Tensor, first: int, last: int) -> tuple[float, float]:
    """A histogram's range in codes: every finite value and a code beyond each end of the grid."""
    finite = codes[torch.isfinite(codes)]
    if not finite.numel():
        return first - 1.0, last + 1.0
    return min(float(finite.min()), first - 1.0), max(float(finite.max()), last + 1.0)


def _off_grid(codes: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """Codes that rounding moves by more than half a step: they lie past the grid's ends, so they are clipped."""
    return (codes < first - 0.5) | (codes > last + 0.5)


CHUNK_VALUES = 1 << 22  # values per pass over a tensor: bounds the temporaries (a Vim-T scan state is 10^8)


def quantization_grid(x: torch.Tensor, quantizer: nn.Module, mask: torch.Tensor, image: int | None = None,
                      bins: int = 121) -> GridView:
    """How ``x`` (the tensor entering ``quantizer``, (batch, L, C)) sits on the quantizer's grids with
    ``mask`` (batch, L, C) as its outlier cells, e.g. ``outlier_timeline(...).mask`` for another k or
    n_refresh. ``image`` restricts everything to one image; ``bins`` sets the histogram's resolution. Images
    go through in chunks of about ``CHUNK_VALUES`` values, so memory stays bounded whatever the tensor."""
    quantizer = outlier_quantizer(quantizer)
    x = _as_tokens(x).detach()
    if mask.shape != x.shape:
        raise ValueError(f"the mask is {tuple(mask.shape)}, the tensor {tuple(x.shape)}")
    x, mask = _select_image(x, image), _select_image(mask, image)
    length = x.shape[1]
    step = max(1, CHUNK_VALUES // max(1, length * x.shape[2]))
    chunks = [(x[i:i + step], mask[i:i + step]) for i in range(0, len(x), step)]
    scale = quantizer.scale.detach().to(x.dtype).clamp(min=MIN_SCALE)
    first, last = (0, int(quantizer.qmax)) if quantizer.asymmetric else (-int(quantizer.qmax), int(quantizer.qmax))

    def codes_of(values: torch.Tensor) -> torch.Tensor:
        codes = values / scale[:, None]
        return codes + quantizer.zero_point[:, None] if quantizer.asymmetric else codes

    ranges = [_code_range(codes_of(quantizer.smoothed(part)), first, last) for part, _ in chunks]
    value_range = (min(low for low, _ in ranges), max(high for _, high in ranges))
    counts = {"inlier": np.zeros(bins, dtype=np.int64), "outlier": np.zeros(bins, dtype=np.int64)}
    sums = {name: torch.zeros(length, dtype=torch.float64) for name in
            ("signal", "noise", "noise_inlier_grid", "clipped", "inliers", "outliers")}
    peaks = {name: torch.full((length,), float("nan"), dtype=torch.float64) for name in
             ("token_scale", "inlier_token_scale", "outlier_scale")}
    for part, part_mask in chunks:
        part = quantizer.smoothed(part)
        inlier = ~part_mask
        codes = codes_of(part)
        for name, chosen in (("inlier", inlier), ("outlier", part_mask)):
            counts[name] += histogram(codes[chosen], bins, value_range=value_range)["count"].to_numpy()
        with torch.no_grad():
            quantized = quantizer.quantize_with(part, part_mask)
            on_inlier_grid = quantizer.quantize_with(part, torch.zeros_like(part_mask))
        wide = part.double()
        sums["signal"] += wide.pow(2).sum((0, 2)).cpu()
        sums["noise"] += (wide - quantized.double()).pow(2).sum((0, 2)).cpu()
        sums["noise_inlier_grid"] += (wide - on_inlier_grid.double()).pow(2).sum((0, 2)).cpu()
        sums["clipped"] += (inlier & _off_grid(codes, first, last)).sum((0, 2)).cpu()
        sums["inliers"] += inlier.sum((0, 2)).cpu()
        sums["outliers"] += part_mask.sum((0, 2)).cpu()
        scales = {"token_scale": quantizer.dynamic_params(part)[0][..., 0],
                  "inlier_token_scale": quantizer.dynamic_params(part, inlier.to(part.dtype))[0][..., 0]}
        if quantizer.outlier is not None:
            outlier_scale = quantizer.outlier.dynamic_params(part, part_mask.to(part.dtype))[0][..., 0]
            scales["outlier_scale"] = outlier_scale.clamp(min=MIN_SCALE).masked_fill(~part_mask.any(-1), float("nan"))
        for name, value in scales.items():  # the largest over images; NaN only where every image's is
            peaks[name] = torch.fmax(peaks[name], value.double().amax(0).cpu())

    edges = np.linspace(*value_range, bins + 1)
    histogram_frame = pd.DataFrame({"bin_left": edges[:-1], "bin_right": edges[1:], **counts})
    cells = sums["inliers"] + sums["outliers"]
    steps = pd.DataFrame({
        "time_step": np.arange(length),
        "static_scale": scale.cpu().numpy(),
        **{name: peak.numpy() for name, peak in peaks.items()},
        "clipped": (sums["clipped"] / sums["inliers"].clamp(min=1)).numpy(),
        "outlier_share": (sums["outliers"] / cells.clamp(min=1)).numpy(),
        "sqnr_db": _sqnr_db(sums["signal"], sums["noise"]),
        "sqnr_db_without_outliers": _sqnr_db(sums["signal"], sums["noise_inlier_grid"]),
    })
    total = sums["signal"].sum()
    return GridView(histogram_frame, steps, (first, last), float(_sqnr_db(total, sums["noise"].sum())),
                    float(_sqnr_db(total, sums["noise_inlier_grid"].sum())),
                    float(sums["clipped"].sum() / sums["inliers"].sum().clamp(min=1)))


@dataclass(frozen=True)
class WeightGridView:
    """Result of :func:`weight_grid`. ``histogram``: ``bin_left, bin_right, count`` of the weights in codes of
    their output channel's (and group's) step. ``channels``: ``output_channel, scale`` (the largest of its
    groups'), ``max_code`` (its largest |W| in steps: above qmax + ½ it is clipped, far below it the grid is
    under-used), ``clipped`` (share of its weights past the grid), ``sqnr_db``, ``floored`` (its scale is at the
    fake quantizer's floor, where reconstruction left it below zero: the channel rounds to 0, and the histogram
    leaves its millions of steps out). ``codes``: the grid's ends."""

    histogram: pd.DataFrame
    channels: pd.DataFrame
    codes: tuple[int, int]
    sqnr_db: float
    clipped: float


def weight_grid(weight: torch.Tensor, quantizer: WeightQuantizer, bins: int = 121) -> WeightGridView:
    """How a linear ``weight`` (out, in) sits on ``quantizer``'s grid (W · s with a smoothing scale s: the
    weight the layer multiplies)."""
    weight = weight.detach()
    with torch.no_grad():
        quantized = quantizer(weight)
    rows, columns = weight.shape
    smoothed = quantizer.smoothed(weight)
    groups = columns // quantizer.group_size
    scale = quantizer.scale.detach().clamp(min=MIN_SCALE).expand(rows, groups, 1)  # one per tensor, or per group
    floored = (scale.reshape(rows, -1) <= MIN_SCALE).any(1)
    codes = (smoothed.reshape(rows, -1, quantizer.group_size) / scale).reshape(rows, -1)
    first, last = -int(quantizer.qmax), int(quantizer.qmax)
    clipped = _off_grid(codes, first, last)
    signal = smoothed.double().pow(2).sum(1)
    noise = (smoothed.double() - quantized.double()).pow(2).sum(1)
    channels = pd.DataFrame({
        "output_channel": np.arange(rows),
        "scale": scale.reshape(rows, -1).amax(1).cpu().numpy(),
        "max_code": codes.abs().amax(1).cpu().numpy(),
        "clipped": clipped.float().mean(1).cpu().numpy(),
        "sqnr_db": _sqnr_db(signal, noise),
        "floored": floored.cpu().numpy(),
    })
    shown = codes[~floored]
    return WeightGridView(histogram(shown, bins, value_range=_code_range(shown, first, last)), channels,
                          (first, last), float(_sqnr_db(signal.sum(), noise.sum())), float(clipped.float().mean()))


def weight_grids(qmodel: QuantizedVim, bins: int = 121) -> dict[str, WeightGridView]:
    """:func:`weight_grid` of every quantized linear weight of ``qmodel``, by site name in forward order."""
    return {name: weight_grid(qmodel.model.linear_at(name).weight, quantizer, bins)
            for name, quantizer in site_quantizers(qmodel).items() if isinstance(quantizer, WeightQuantizer)}
