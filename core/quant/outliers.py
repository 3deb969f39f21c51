"""Per-time-step outlier channel detection of OuroMamba-Quant (method doc §3.2, §7.1–7.2, §7.8).

Time runs along dim 1 of x (batch, L, C) in windows of ``n_refresh`` steps aligned to step 0. In each window
and for each sample the outlier set starts empty (the refresh) and only grows. At step t:

1. the dynamic inlier scale S^D(t) is measured on the channels not yet in the set;
2. if S^D(t) > S^I(t), the calibrated static inlier scale, detection runs: with a = |x_t| over the token's
   current inlier channels, channels with a > mean(a) + k·std(a) join the set;
3. the set at step t (after detection) is that step's outlier mask.

Per-sample trigger by default (results do not depend on the rest of the batch). ``release_compatible``
reproduces the released code instead: the trigger is OR-ed over the batch, and mean/std are taken over all
C channels of the inlier tensor (flagged channels counted as zeros).

Inside the loop the sets are 0/1 floats, not bools: on the CPU, torch's comparisons and masked fills that read
or write bool tensors run 5–10× slower than float arithmetic, and the two give the same values for finite x.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

DynamicScale = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""S^D per token from (x, keep, inlier magnitude): ``keep`` is 1.0 on the token's inlier channels and 0.0 on its
outliers, the inlier magnitude is |x| · keep; all (..., C)."""


def max_abs_scale(qmax: int) -> DynamicScale:
    """S^D for symmetric inliers: max |x| over the inlier channels / qmax."""
    def scale(x: torch.Tensor, keep: torch.Tensor, inlier_magnitude: torch.Tensor) -> torch.Tensor:
        return inlier_magnitude.amax(dim=-1) / qmax
    return scale


def range_scale(levels: int) -> DynamicScale:
    """S^D for asymmetric inliers (Δ): (max − min) over the inlier channels / levels (0 when there are none)."""
    def scale(x: torch.Tensor, keep: torch.Tensor, inlier_magnitude: torch.Tensor) -> torch.Tensor:
        outside = (1 - keep) * torch.finfo(x.dtype).max  # outliers sit at ∓max, below/above every inlier
        inliers = x * keep
        high, low = (inliers - outside).amax(dim=-1), (inliers + outside).amin(dim=-1)
        return torch.nan_to_num((high - low) / levels, nan=0.0, posinf=0.0, neginf=0.0)
    return scale


def _threshold(magnitude: torch.Tensor, keep: torch.Tensor, inlier_magnitude: torch.Tensor, k: float,
               release_compatible: bool) -> torch.Tensor:
    """mean + k·std of |x| (unbiased) over the token's inlier channels (over all channels when release-compatible)."""
    if release_compatible:
        return inlier_magnitude.mean(-1) + k * inlier_magnitude.std(-1)
    count = keep.sum(-1)
    mean = inlier_magnitude.sum(-1) / count.clamp(min=1)
    deviation = (magnitude - mean[..., None]).mul_(keep)
    var = deviation.mul_(deviation).sum(-1) / (count - 1).clamp(min=1)
    return mean + k * var.sqrt()


def outlier_masks(x: torch.Tensor, static_scale: torch.Tensor, dynamic_scale: DynamicScale, k: float,
                  n_refresh: int, release_compatible: bool = False) -> torch.Tensor:
    """Boolean outlier mask (batch, L, C) for activations x (batch, L, C) and static scales (L,).

    All windows run in parallel; the loop is over the n_refresh positions inside a window.
    """
    batch, length, channels = x.shape
    n_refresh = min(n_refresh, length)  # a longer window is the whole scan: the same masks, no padding to it
    windows = -(-length // n_refresh)
    pad = windows * n_refresh - length
    # time-major (L, batch, C), as Vim's out_proj input already is in memory (other sites take one copy), so
    # that each step's (windows, batch, C) slice is made of contiguous blocks and each per-token reduction reads
    # contiguous channels. Padded steps get an infinite static scale: they never trigger and are cut off at the end.
    steps = F.pad(x.transpose(0, 1), (0, 0, 0, 0, 0, pad)).contiguous().view(windows, n_refresh, batch, channels)
    scale_w = F.pad(static_scale.to(x.dtype), (0, pad), value=float("inf")).view(windows, n_refresh, 1)
    masks = torch.empty_like(steps)
    mask = steps.new_zeros(windows, batch, channels)
    for i in range(n_refresh):
        x_i = steps[:, i]
        magnitude, keep = x_i.abs(), 1 - mask
        inlier_magnitude = magnitude * keep
        trigger = dynamic_scale(x_i, keep, inlier_magnitude) > scale_w[:, i]
        if release_compatible:
            trigger = trigger.any(dim=1, keepdim=True).expand_as(trigger)
        theta = _threshold(magnitude, keep, inlier_magnitude, k, release_compatible)
        # 1 where |x| > θ: the sign of the difference, negatives clamped to 0 (exact for finite values)
        flagged = (magnitude - theta[..., None]).sign_().clamp_(min=0).mul_(trigger[..., None].to(x.dtype))
        mask = torch.maximum(mask, flagged, out=masks[:, i])
    return masks.view(windows * n_refresh, batch, channels)[:length].transpose(0, 1).bool()


def strip_outliers(x: torch.Tensor, k: float, n_refresh: int) -> torch.Tensor:
    """x with the bulk-detected outliers zeroed, for calibrating the inlier scales (method doc §3.2):
    per token, flag |x| > mean + k·std over its channels, OR-accumulate the flags within each window."""
    batch, length, channels = x.shape
    if channels < 2:  # no spread to measure: nothing stands out
        return x
    magnitude = x.abs()
    flags = magnitude > (magnitude.mean(-1, keepdim=True) + k * magnitude.std(-1, keepdim=True))
    n_refresh = min(n_refresh, length)  # a longer window is the whole scan: the same masks, no padding to it
    windows = -(-length // n_refresh)
    pad = windows * n_refresh - length
    accumulated = F.pad(flags, (0, 0, 0, pad)).view(batch, windows, n_refresh, channels)
    for i in range(1, n_refresh):  # in-place ORs: 30× faster than cummax over the window on the CPU
        torch.logical_or(accumulated[:, :, i - 1], accumulated[:, :, i], out=accumulated[:, :, i])
    return x.masked_fill(accumulated.view(batch, -1, channels)[:, :length], 0)


def most_frequent_channels(masks: torch.Tensor) -> torch.Tensor:
    """A fixed outlier list with the dynamic rule's budget: the channels flagged most often in ``masks``
    (batch, L, C), as many as the rule flags per token on average (at least one). Returns (C,) bool."""
    budget = max(1, round(float(masks.sum(-1).float().mean())))
    chosen = torch.zeros(masks.shape[-1], dtype=torch.bool, device=masks.device)
    chosen[masks.float().mean(dim=(0, 1)).topk(budget).indices] = True
    return chosen
