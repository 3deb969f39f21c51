"""Fake quantization: round and clamp in floating point, with straight-through gradients.

Symmetric b-bit values use the restricted range ±(2^(b−1) − 1) (±7 for 4 bits, as the release); asymmetric
values use levels 0 … 2^b − 1 with a zero point. Rounding is round-half-to-even (torch.round). Gradients pass
straight through the rounding (and are zero where clamped), so scales declared learnable really learn.
"""

from __future__ import annotations

import torch

FULL_PRECISION_BITS = 16  # "16-bit" outliers are kept in floating point, as the release's W4A8O16 setting
MIN_SCALE = 1e-8


def symmetric_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def asymmetric_levels(bits: int) -> int:
    return 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (plain round when no gradient is wanted: two passes fewer)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.round(x)
    return x + (torch.round(x) - x).detach()


def fake_quant_symmetric(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """scale · clamp(round(x / scale), −qmax, qmax); ``scale`` broadcasts against ``x``."""
    scale = scale.clamp(min=MIN_SCALE)
    return torch.clamp(round_ste(x / scale), -qmax, qmax) * scale


def fake_quant_asymmetric(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, levels: int) -> torch.Tensor:
    """(clamp(round(x / scale) + z, 0, levels) − z) · scale, the unsigned grid with zero point z."""
    scale = scale.clamp(min=MIN_SCALE)
    return (torch.clamp(round_ste(x / scale) + zero_point, 0, levels) - zero_point) * scale


def asymmetric_params(low: torch.Tensor, high: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of the grid that covers [min(low, 0), max(high, 0)] with ``levels`` steps."""
    low, high = low.clamp(max=0), high.clamp(min=0)
    scale = ((high - low) / levels).clamp(min=MIN_SCALE)
    return scale, torch.round(-low / scale)


def search_symmetric_clip(groups: torch.Tensor, qmax: int, p: float = 2.4, steps: int = 100) -> torch.Tensor:
    """Per row of ``groups`` (G, M): the clip m ∈ {1/steps, …, 1}·max|row| minimising mean |x − Q(x)|^p.

    Returns the scales m / qmax, shape (G,). Rows that are all zero get the minimum scale.
    """
    peak = groups.abs().amax(dim=1)
    best_err = torch.full_like(peak, float("inf"))
    best = peak.clone()
    for i in range(1, steps + 1):
        clip = peak * (i / steps)
        scale = (clip / qmax).clamp(min=MIN_SCALE)[:, None]
        err = (fake_quant_symmetric(groups, scale, qmax) - groups).abs().pow(p).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    return (best / qmax).clamp(min=MIN_SCALE)


def search_asymmetric_clip(groups: torch.Tensor, levels: int, p: float = 2.4,
                           steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: shrink [min, max] towards each other by α ∈ {0, 1/steps, …, 0.49}; keep the range (widened to
    include 0, as stored) minimising mean |x − Q(x)|^p. Returns (scale, zero point), shape (G,) each."""
    low, high = groups.amin(dim=1), groups.amax(dim=1)
    best_err = torch.full_like(low, float("inf"))
    best_scale, best_zero = asymmetric_params(low, high, levels)
    for i in range(steps // 2):
        alpha = i / steps
        scale, zero = asymmetric_params(low + alpha * (high - low), high - alpha * (high - low), levels)
        err = (fake_quant_asymmetric(groups, scale[:, None], zero[:, None], levels) - groups).abs().pow(p).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero
