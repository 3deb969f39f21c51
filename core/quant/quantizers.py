"""Quantizer modules: one per interception site, calibrated once on full-precision activations.

Activation quantizers see (batch, L, C) with time along dim 1 (A and D are viewed as one token of E·N and
E channels). Each is either symmetric (±qmax) or asymmetric (unsigned levels + zero point, for Δ before
softplus). Scales that calibration sets are ``nn.Parameter``s, so block reconstruction can learn them
through the straight-through rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from core.errors import StudioError
from core.quant.fake import (
    FULL_PRECISION_BITS,
    MIN_SCALE,
    asymmetric_levels,
    asymmetric_params,
    fake_quant_asymmetric,
    fake_quant_symmetric,
    search_asymmetric_clip,
    search_symmetric_clip,
    symmetric_qmax,
)
from core.quant.outliers import max_abs_scale, most_frequent_channels, outlier_masks, range_scale, strip_outliers


class ActivationQuantizer(nn.Module):
    """Base: ``calibrate(x)`` once, then ``forward(x)`` fake-quantizes. ``smoothing`` (C,) divides the input
    first (its inverse multiplies the matching weight), as SmoothQuant."""

    def __init__(self, bits: int, asymmetric: bool = False, clip_p: float = 2.4):
        super().__init__()
        self.bits, self.asymmetric, self.clip_p = bits, asymmetric, clip_p
        self.qmax = asymmetric_levels(bits) if asymmetric else symmetric_qmax(bits)
        self.smoothing: torch.Tensor | None = None

    def smoothed(self, x: torch.Tensor) -> torch.Tensor:
        """What this quantizer rounds: x / s with a smoothing scale, else x (error reports compare against it)."""
        return x if self.smoothing is None else x / self.smoothing

    def _quant(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        if self.asymmetric:
            return fake_quant_asymmetric(x, scale, zero, self.qmax)
        return fake_quant_symmetric(x, scale, self.qmax)

    def dynamic_params(self, x: torch.Tensor, weights: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-(sample, token) scale (and zero point), (..., 1), from the values themselves, over the channels
        where ``weights`` (0/1 floats: on the CPU, masked fills and products with bool tensors are several times
        slower) is 1 if given."""
        if self.asymmetric:
            chosen = x if weights is None else x * weights  # the others at 0, which the grid spans anyway
            high, low = chosen.amax(-1, keepdim=True), chosen.amin(-1, keepdim=True)
            high, low = torch.nan_to_num(high, neginf=0.0), torch.nan_to_num(low, posinf=0.0)
            return asymmetric_params(low, high, self.qmax)
        magnitude = x.abs() if weights is None else x.abs() * weights
        return magnitude.amax(-1, keepdim=True) / self.qmax, None

    def _dynamic(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return self._quant(x, *self.dynamic_params(x, weights))

    def calibrate(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PerTensorQuantizer(ActivationQuantizer):
    """One static scale (and zero point) from the calibration min/max: the simplest baseline."""

    def calibrate(self, x: torch.Tensor) -> None:
        x = self.smoothed(x).detach()
        if self.asymmetric:
            scale, zero = asymmetric_params(x.min(), x.max(), self.qmax)
            self.register_buffer("zero_point", zero.reshape(1))
        else:
            scale, self.zero_point = (x.abs().max() / self.qmax).clamp(min=MIN_SCALE), None
        self.scale = nn.Parameter(scale.reshape(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant(self.smoothed(x), self.scale, self.zero_point)


class DynamicPerTokenQuantizer(ActivationQuantizer):
    """A scale per (sample, token) measured at run time; nothing to calibrate, no outlier handling."""

    def calibrate(self, x: torch.Tensor) -> None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._dynamic(self.smoothed(x))


class PerTokenStaticQuantizer(ActivationQuantizer):
    """A static scale per time-step t (PTQ4VM-style), clip-searched on the calibration activations."""

    def _search(self, x: torch.Tensor) -> None:
        per_token = x.detach().transpose(0, 1).reshape(x.shape[1], -1)  # (L, batch·C)
        if self.asymmetric:
            self.restore(*search_asymmetric_clip(per_token, self.qmax, self.clip_p))
        else:
            self.restore(search_symmetric_clip(per_token, self.qmax, self.clip_p))

    def restore(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        """Set the calibrated per-token scale (and zero point, asymmetric only), e.g. read back from a file."""
        if (zero_point is None) == self.asymmetric:
            raise StudioError("an asymmetric quantizer needs a zero point, a symmetric one takes none")
        if zero_point is None:
            self.zero_point = None
        else:
            self.register_buffer("zero_point", zero_point)
        self.scale = nn.Parameter(scale)

    def calibrate(self, x: torch.Tensor) -> None:
        self._search(self.smoothed(x))

    def _token_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if x.shape[1] != self.scale.shape[0]:
            raise StudioError(f"this quantizer was calibrated for {self.scale.shape[0]} time-steps, got {x.shape[1]}")
        zero = None if self.zero_point is None else self.zero_point[:, None]
        return self.scale[:, None], zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = self._token_params(x)
        return self._quant(self.smoothed(x), scale, zero)


class OutlierAwareQuantizer(PerTokenStaticQuantizer):
    """OuroMamba-Quant: static per-token inlier scale S^I(t) (clip-searched on outlier-stripped calibration
    data) and outlier channels at ``outlier_bits`` with a dynamic per-(sample, token) scale.

    ``static_channels`` False: outliers detected at every time-step (mean + k·std, windows of n_refresh).
    True: the baseline with a fixed list, chosen at calibration as the channels most often flagged by the
    dynamic rule, as many as the dynamic rule flags per token on average (the same budget, but fixed).
    """

    def __init__(self, bits: int, outlier_bits: int, k: float, n_refresh: int, asymmetric: bool = False,
                 clip_p: float = 2.4, release_compatible: bool = False, static_channels: bool = False):
        super().__init__(bits, asymmetric, clip_p)
        self.outlier_bits, self.k, self.n_refresh = outlier_bits, k, n_refresh
        self.release_compatible, self.static_channels = release_compatible, static_channels
        self.outlier = None if outlier_bits >= FULL_PRECISION_BITS else ActivationQuantizer(outlier_bits, asymmetric)

    def calibrate(self, x: torch.Tensor) -> None:
        x = self.smoothed(x).detach()
        self._search(strip_outliers(x, self.k, self.n_refresh))
        if self.static_channels:
            self.register_buffer("static_mask", most_frequent_channels(self.masks(x)))

    def dynamic_scale_fn(self):
        return range_scale(self.qmax) if self.asymmetric else max_abs_scale(self.qmax)

    def masks(self, x: torch.Tensor) -> torch.Tensor:
        """The outlier mask (batch, L, C) this quantizer applies to (smoothed) x."""
        if self.static_channels and hasattr(self, "static_mask"):
            return self.static_mask.expand_as(x)
        return outlier_masks(x.detach(), self.scale.detach(), self.dynamic_scale_fn(), self.k, self.n_refresh,
                             self.release_compatible)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.smoothed(x)
        return self.quantize_with(x, self.masks(x))

    def quantize_with(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(Smoothed) x fake-quantized with ``mask``'s cells as the outliers: what ``forward`` does with its own
        mask, and what the app shows for a mask of another k or n_refresh (or none)."""
        scale, zero = self._token_params(x)
        inliers = self._quant(x.masked_fill(mask, 0), scale, zero)
        outliers = x if self.outlier is None else self.outlier._dynamic(x, mask.to(x.dtype))
        return torch.where(mask, outliers, inliers)


class StateQuantizer(nn.Module):
    """The scan state h_t (batch, E, N) quantized inside the recurrence, symmetric, with a static scale per
    step: the calibration max |h_t| / qmax (min-max; a clip search over every state element would cost more
    than the whole calibration). Error introduced here feeds back through h_t = Ā_t h_{t−1} + ….
    """

    def __init__(self, bits: int):
        super().__init__()
        self.qmax = symmetric_qmax(bits)
        self._peaks: list[torch.Tensor] = []

    def observe_step(self, step: int, h: torch.Tensor) -> None:
        peak = h.detach().abs().max()
        if step == len(self._peaks):
            self._peaks.append(peak)
        else:
            self._peaks[step] = torch.maximum(self._peaks[step], peak)

    def finish_calibration(self) -> None:
        self.scale = nn.Parameter((torch.stack(self._peaks) / self.qmax).clamp(min=MIN_SCALE))
        self._peaks = []

    def quantize_step(self, step: int, h: torch.Tensor) -> torch.Tensor:
        return fake_quant_symmetric(h, self.scale[step], self.qmax)


class SingleToken(nn.Module):
    """Quantize a static tensor (A: E×N, D: E) as one token whose channels are all its elements."""

    def __init__(self, quantizer: ActivationQuantizer):
        super().__init__()
        self.quantizer = quantizer

    def calibrate(self, x: torch.Tensor) -> None:
        self.quantizer.calibrate(x.reshape(1, 1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(x.reshape(1, 1, -1)).reshape(x.shape)


class WeightQuantizer(nn.Module):
    """Symmetric weights: a clip-searched scale per output channel (and per group of ``group_size`` inputs),
    or one per tensor (min-max). ``smoothing`` (in_features,) multiplies the columns first."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int = 0, clip_p: float = 2.4,
                 per_tensor: bool = False, smoothing: torch.Tensor | None = None):
        super().__init__()
        rows, cols = weight.shape
        self.group_size = group_size or cols
        if cols % self.group_size:
            raise StudioError(f"weight_group_size {group_size} does not divide the {cols} inputs of a weight")
        self.qmax = symmetric_qmax(bits)
        self.smoothing = smoothing
        w = self._grouped(weight.detach())
        if per_tensor:
            scale = (w.abs().max() / self.qmax).clamp(min=MIN_SCALE).reshape(1, 1, 1)
        else:
            scale = search_symmetric_clip(w.reshape(-1, self.group_size), self.qmax, clip_p)
            scale = scale.reshape(rows, -1, 1)
        self.scale = nn.Parameter(scale)

    def smoothed(self, weight: torch.Tensor) -> torch.Tensor:
        """What this quantizer rounds: W · s with a smoothing scale, else W."""
        return weight if self.smoothing is None else weight * self.smoothing

    def _grouped(self, weight: torch.Tensor) -> torch.Tensor:
        return self.smoothed(weight).reshape(weight.shape[0], -1, self.group_size)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quant_symmetric(self._grouped(weight), self.scale, self.qmax).reshape(weight.shape)


def smoothing_scale(activation: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant: s_c = max|x_c|^α / max|W_:,c|^(1−α) per input channel c (x divided by s, W multiplied)."""
    act_max = activation.detach().abs().amax(dim=(0, 1)).clamp(min=1e-5)
    weight_max = weight.detach().abs().amax(dim=0).clamp(min=1e-5)
    return (act_max.pow(alpha) / weight_max.pow(1 - alpha)).clamp(min=1e-5)

