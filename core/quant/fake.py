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


def _row_errors(quantized: torch.Tensor, groups: torch.Tensor, p: float) -> torch.Tensor:
    """mean |Q(x) − x|^p per row, computed in place in ``quantized`` (the searches' scratch buffer)."""
    return quantized.sub_(groups).abs_().pow_(p).mean(dim=1)


def search_symmetric_clip(groups: torch.Tensor, qmax: int, p: float = 2.4, steps: int = 100) -> torch.Tensor:
    """Per row of ``groups`` (G, M): the clip m ∈ {1/steps, …, 1}·max|row| minimising mean |x − Q(x)|^p.

    Returns the scales m / qmax, shape (G,). Rows that are all zero get the minimum scale. Each candidate is
    :func:`fake_quant_symmetric`, the same operations in one reused buffer: calibration spends most of its time
    here, and fresh tensors for every step of every candidate cost more than the arithmetic on small sites.
    """
    peak = groups.abs().amax(dim=1)
    best_err = torch.full_like(peak, float("inf"))
    best = peak.clone()
    work = torch.empty_like(groups)
    for i in range(1, steps + 1):
        clip = peak * (i / steps)
        scale = (clip / qmax).clamp(min=MIN_SCALE)[:, None]
        torch.div(groups, scale, out=work).round_().clamp_(-qmax, qmax).mul_(scale)
        err = _row_errors(work, groups, p)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    return (best / qmax).clamp(min=MIN_SCALE)


def search_asymmetric_clip(groups: torch.Tensor, levels: int, p: float = 2.4,
                           steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: shrink [min, max] towards each other by α ∈ {0, 1/steps, …, 0.49}; keep the range (widened to
    include 0, as stored) minimising mean |x − Q(x)|^p. Returns (scale, zero point), shape (G,) each. Each
    candidate is :func:`fake_quant_asymmetric` in one reused buffer, as in :func:`search_symmetric_clip`."""
    low, high = groups.amin(dim=1), groups.amax(dim=1)
    best_err = torch.full_like(low, float("inf"))
    best_scale, best_zero = asymmetric_params(low, high, levels)
    work = torch.empty_like(groups)
    for i in range(steps // 2):
        alpha = i / steps
        scale, zero = asymmetric_params(low + alpha * (high - low), high - alpha * (high - low), levels)
        torch.div(groups, scale.clamp(min=MIN_SCALE)[:, None], out=work).round_().add_(zero[:, None])
        work.clamp_(0, levels).sub_(zero[:, None]).mul_(scale.clamp(min=MIN_SCALE)[:, None])
        err = _row_errors(work, groups, p)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero
