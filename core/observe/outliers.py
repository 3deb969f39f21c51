"""Where outlier channels are and how much they move: the data behind the app's outlier timeline charts.

OuroMamba's premise is that activation outlier channels change across time-steps, so a channel list fixed
at calibration misses many of them. These functions show, for one site, which (time-step, channel) cells
the detection rule flags, how large the per-window outlier list O_list grows, how many of its channels are
new compared with the previous window, and what a fixed list would miss; and for a whole quantized model,
which layers have the most dynamic outliers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import StudioError
from core.intercept import Site
from core.observe.probe import parse_site, run_probe, site_columns, site_quantizers
from core.observe.stats import ErrorSums, _as_tokens, _select_image, capture, grid_frame
from core.quant import QuantizedVim
from core.quant.fake import asymmetric_levels, symmetric_qmax
from core.quant.outliers import max_abs_scale, outlier_masks, range_scale
from core.quant.quantizers import OutlierAwareQuantizer, SingleToken

DECAY = "A_bar"  # Ā = exp(Δ·A) per step: derived from the Δ and A sites (``decay_outliers``), not a tap of its own


@dataclass(frozen=True)
class OutlierParams:
    """The detection rule without a quantizer: threshold k, window n_refresh and the static inlier scale
    S^I (one float, or one per time-step); ``bits``/``asymmetric`` give the dynamic scale S^D it is
    compared with (max|x|/qmax, or range/levels for Δ)."""

    k: float
    n_refresh: int
    static_scale: float | torch.Tensor
    bits: int = 8
    asymmetric: bool = False
    release_compatible: bool = False


OutlierSource = OutlierAwareQuantizer | SingleToken | OutlierParams | Mapping


@dataclass(frozen=True)
class OutlierTimeline:
    """Result of :func:`outlier_timeline`.

    ``mask``: the boolean outlier mask (batch, L, C) of all images. ``cells``: ``time_step, channel,
    fraction_flagged`` (share of images with that cell flagged; plus ``flagged`` for the chosen image).
    ``steps``: ``time_step, window, outlier_channels, fraction_outlier, inlier_scale``. ``windows``:
    ``window, first_step, last_step, olist_size, new_channels_vs_previous_window`` (NaN for window 0,
    which has no previous list), ``growing_steps`` (steps at which the O_list gained a channel).
    """

    mask: torch.Tensor
    cells: pd.DataFrame
    steps: pd.DataFrame
    windows: pd.DataFrame


def outlier_quantizer(source: nn.Module) -> OutlierAwareQuantizer:
    """The OutlierAwareQuantizer in ``source`` (unwrapping A/D's SingleToken), or a StudioError saying why not."""
    quantizer = source.quantizer if isinstance(source, SingleToken) else source
    if not isinstance(quantizer, OutlierAwareQuantizer):
        raise StudioError(f"this site is quantized by {type(quantizer).__name__}, which keeps no outlier channels; "
                          "outlier timelines need the 'ouromamba' or 'static_outliers' method")
    if not hasattr(quantizer, "scale"):
        raise StudioError("this outlier quantizer is not calibrated yet (quantize() calibrates it)")
    return quantizer


def state_outliers(model: nn.Module, site: str, calib_images: torch.Tensor, images: torch.Tensor, bits: int,
                   k: float = 3.0, n_refresh: int = 10) -> tuple[torch.Tensor, OutlierAwareQuantizer]:
    """The scan state h at ``site`` (e.g. ``layers.1.fwd.h``) on ``images`` as (n, L, E·N) — every (channel,
    state) pair a column — and an OuroMamba outlier quantizer calibrated on the states of ``calib_images``:
    what the per-time-step rule would flag if h were quantized with it. Neither the paper nor the release
    quantizes h that way (the studio's own h quantizer, ``quantize_state``, is per-step min-max); this is for
    looking. States are captured by the step-by-step scan, so this costs one such pass per image set."""
    if not site.endswith(".h"):
        raise StudioError(f"{site!r} is not a scan-state site; they look like 'layers.1.fwd.h'")
    states = [capture(model, batch, [site], record_states=True)[site] for batch in (calib_images, images)]
    return _looked_at(*states, bits, k, n_refresh)


def decay_outliers(model: nn.Module, site: str, calib_images: torch.Tensor, images: torch.Tensor, bits: int,
                   k: float = 3.0, n_refresh: int = 10) -> tuple[torch.Tensor, OutlierAwareQuantizer]:
    """Ā = exp(Δ·A) at ``site`` (e.g. ``layers.1.fwd.A_bar``) on ``images`` as (n, L, E·N), with Δ =
    softplus(Δ before softplus) per token and channel: the factor by which each (channel, state) pair of the
    scan state decays at each time-step (h_t = Ā_t h_{t−1} + …). Near 1 a pair remembers many steps, and
    whatever error enters it lasts as long; near 0 it forgets at once. Computed from the Δ and A the model
    itself uses (after their quantizers in a QuantizedVim), and, as for ``state_outliers``, with an outlier
    quantizer calibrated on ``calib_images``: what the rule would flag if Ā were quantized (nobody does; the
    scan computes it in floating point)."""
    if not site.endswith(f".{DECAY}"):
        raise StudioError(f"{site!r} is not a decay site; they look like 'layers.1.fwd.{DECAY}'")
    prefix = site.removesuffix(f".{DECAY}")
    delta_site, a_site = f"{prefix}.delta_pre", f"{prefix}.A"

    def decay(batch: torch.Tensor) -> torch.Tensor:
        tensors = capture(model, batch, [delta_site, a_site])
        return torch.exp(F.softplus(tensors[delta_site])[..., None] * tensors[a_site])
    return _looked_at(decay(calib_images), decay(images), bits, k, n_refresh)


def _looked_at(calib_values: torch.Tensor, values: torch.Tensor, bits: int, k: float,
               n_refresh: int) -> tuple[torch.Tensor, OutlierAwareQuantizer]:
    """(n, L, E, N) values of a tensor nobody quantizes, as (n, L, E·N), with an outlier quantizer calibrated
    on ``calib_values``."""
    calib_values, values = (v.reshape(v.shape[0], v.shape[1], -1) for v in (calib_values, values))
    quantizer = OutlierAwareQuantizer(bits, 8, k, n_refresh)
    quantizer.calibrate(calib_values)
    return values, quantizer


def quantizer_at(qmodel: QuantizedVim, site: str) -> nn.Module:
    """The quantizer of ``site`` in ``qmodel`` (A and D: the SingleToken wrapper)."""
    quantizers = site_quantizers(qmodel)
    if site not in quantizers:
        raise StudioError(f"{site!r} is not quantized in this model (skipped, or not a quantized site); "
                          f"quantized sites look like {next(iter(quantizers), '?')!r}")
    return quantizers[site]


def rule_of(source: nn.Module, k: float | None = None, n_refresh: int | None = None) -> OutlierParams:
    """The outlier rule of a calibrated quantizer (its S^I(t), bits, trigger mode) as explicit parameters,
    with ``k`` / ``n_refresh`` replaced: what the app's sliders re-run detection with, without recalibrating."""
    quantizer = outlier_quantizer(source)
    return OutlierParams(k=quantizer.k if k is None else k,
                         n_refresh=quantizer.n_refresh if n_refresh is None else n_refresh,
                         static_scale=quantizer.scale.detach(), bits=quantizer.bits,
                         asymmetric=quantizer.asymmetric, release_compatible=quantizer.release_compatible)


def _params(source: OutlierParams | Mapping) -> OutlierParams:
    if isinstance(source, OutlierParams):
        return source
    try:
        return OutlierParams(**source)
    except TypeError as err:
        raise StudioError(f"outlier parameters need k, n_refresh and static_scale ({err})") from None


Detection = tuple[torch.Tensor, int, torch.Tensor]


def detect_outliers(x: torch.Tensor, source: OutlierSource, dynamic_rule: bool = False) -> Detection:
    """Outlier mask (batch, L, C) of ``x`` (the tensor entering the quantizer), the window length and S^I (L,).

    With a quantizer this is exactly the mask it applies (its smoothing, k, n_refresh, static scale, trigger
    mode; a static-list quantizer's fixed list). ``dynamic_rule`` asks for the per-time-step rule even of a
    static-list quantizer: what a dynamic detector would have flagged.
    """
    if isinstance(source, nn.Module):
        if isinstance(source, SingleToken) and x.dim() != 3:
            x = x.reshape(1, 1, -1)
        quantizer = outlier_quantizer(source)
        x = _as_tokens(x).detach()
        static_scale = quantizer.scale.detach().to(x.device)
        if static_scale.shape[0] != x.shape[1]:
            raise StudioError(f"the quantizer was calibrated for {static_scale.shape[0]} time-steps, the tensor has "
                              f"{x.shape[1]}")
        if quantizer.smoothing is not None:
            x = x / quantizer.smoothing
        if dynamic_rule:
            mask = outlier_masks(x, static_scale, quantizer.dynamic_scale_fn(), quantizer.k, quantizer.n_refresh,
                                 quantizer.release_compatible)
        else:
            mask = quantizer.masks(x).expand_as(x).clone()
        return mask, quantizer.n_refresh, static_scale
    params = _params(source)
    if params.n_refresh < 1:
        raise StudioError(f"n_refresh must be at least 1 time-step (got {params.n_refresh})")
    x = _as_tokens(x).detach()
    static_scale = torch.as_tensor(params.static_scale, dtype=x.dtype, device=x.device).reshape(-1)
    static_scale = static_scale.expand(x.shape[1]) if static_scale.numel() == 1 else static_scale
    if static_scale.shape[0] != x.shape[1]:
        raise StudioError(f"static_scale has {static_scale.shape[0]} time-steps, the tensor has {x.shape[1]}")
    if params.asymmetric:
        dynamic = range_scale(asymmetric_levels(params.bits))
    else:
        dynamic = max_abs_scale(symmetric_qmax(params.bits))
    mask = outlier_masks(x, static_scale, dynamic, params.k, params.n_refresh, params.release_compatible)
    return mask, params.n_refresh, static_scale


def window_ends(length: int, n_refresh: int) -> list[int]:
    """Index of the last time-step of every refresh window (the last window may be short)."""
    return [min(start + n_refresh, length) - 1 for start in range(0, length, n_refresh)]


def growing_steps(mask: torch.Tensor, n_refresh: int) -> torch.Tensor:
    """(batch, L) bool: the time-steps at which a window's O_list gained a channel (it starts empty at each
    window start and only grows). A detection kernel cannot skip these: a step's rule depends on the list
    before it, so every growing step is one more dependent round (kernels/README.md, "Rounds")."""
    before = torch.roll(mask, 1, dims=1)
    before[:, ::n_refresh] = False
    return (mask & ~before).any(-1)


def window_counts(mask: torch.Tensor, n_refresh: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: outlier channels per time-step (b, L), O_list size at each window's end (b, W) and channels
    of each O_list not in the previous window's (b, W−1). O_list only grows inside a window, so its end
    state is the window's whole list."""
    lists = mask[:, window_ends(mask.shape[1], n_refresh)]
    new = (lists[:, 1:] & ~lists[:, :-1]).sum(-1)
    return mask.sum(-1), lists.sum(-1), new


def outlier_timeline(x: torch.Tensor, source: OutlierSource, image: int | None = None,
                     dynamic_rule: bool = False) -> OutlierTimeline:
    """Which (time-step, channel) cells are outliers at a site, and how the per-window O_list moves.

    ``x`` is the tensor entering the quantizer (batch, L, C); ``source`` an OutlierAwareQuantizer (or its
    SingleToken) or explicit :class:`OutlierParams`. Detection runs on the whole batch (the release's
    batch-wide trigger depends on it); ``image`` then restricts the counts to one image and adds its boolean
    ``flagged`` column to ``cells``.
    """
    mask, n_refresh, static_scale = detect_outliers(x, source, dynamic_rule)
    chosen = _select_image(mask, image)
    cells = grid_frame(mask.float().mean(0), "fraction_flagged")
    if image is not None:
        cells["flagged"] = chosen[0].cpu().numpy().reshape(-1)
    per_step, sizes, new = window_counts(chosen, n_refresh)
    length, channels = mask.shape[1], mask.shape[2]
    outlier_channels = per_step.float().mean(0).cpu().numpy()
    steps = pd.DataFrame({
        "time_step": np.arange(length),
        "window": np.arange(length) // n_refresh,
        "outlier_channels": outlier_channels,
        "fraction_outlier": outlier_channels / channels,
        "inlier_scale": static_scale.detach().float().cpu().numpy(),
    })
    ends = window_ends(length, n_refresh)
    new_mean = new.float().mean(0).cpu().numpy()
    growth = growing_steps(chosen, n_refresh).float().mean(0)
    windows = pd.DataFrame({
        "window": np.arange(len(ends)),
        "first_step": np.arange(len(ends)) * n_refresh,
        "last_step": ends,
        "olist_size": sizes.float().mean(0).cpu().numpy(),
        "new_channels_vs_previous_window": np.concatenate([[np.nan], new_mean]),
        "growing_steps": [float(growth[start:start + n_refresh].sum()) for start in range(0, length, n_refresh)],
    })
    return OutlierTimeline(mask, cells, steps, windows)


def static_list_misses(x: torch.Tensor, dynamic_mask: torch.Tensor, static_mask: torch.Tensor) -> pd.DataFrame:
    """Per time-step, the dynamically detected outlier channels that a fixed channel list misses.

    Missed channels are quantized with the inlier scale and clipped, so ``missed_max_abs`` (largest |x|
    among them over the batch, 0 when none) shows how much that costs. ``static_mask`` is (C,) or broadcasts
    to x; columns: ``time_step, dynamic_outliers, missed, missed_fraction, missed_max_abs`` (counts are means
    over the images).
    """
    x = _as_tokens(x).detach()
    dynamic_mask = _as_tokens(dynamic_mask).bool()
    if dynamic_mask.shape != x.shape:
        raise StudioError(f"dynamic mask {tuple(dynamic_mask.shape)} does not match the tensor {tuple(x.shape)}")
    try:
        static_mask = static_mask.bool().to(x.device).expand_as(x)
    except RuntimeError:
        raise StudioError(f"static mask {tuple(static_mask.shape)} does not fit the tensor {tuple(x.shape)}; "
                          "pass one flag per channel") from None
    missed = dynamic_mask & ~static_mask
    dynamic_count = dynamic_mask.sum(-1).float().mean(0)
    missed_count = missed.sum(-1).float().mean(0)
    missed_max = (x.abs() * missed).amax(dim=(0, 2)).float()
    fraction = torch.where(dynamic_count > 0, missed_count / dynamic_count.clamp(min=1e-12), 0.0)
    return pd.DataFrame({
        "time_step": np.arange(x.shape[1]),
        "dynamic_outliers": dynamic_count.cpu().numpy(),
        "missed": missed_count.cpu().numpy(),
        "missed_fraction": fraction.cpu().numpy(),
        "missed_max_abs": missed_max.cpu().numpy(),
    })


class _SiteOutlierSums:
    """Running totals of one site's outlier counts over batches, and of its quantization error with its
    outlier channels and with every channel on the inlier grid."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.flagged = self.tokens = self.list_sum = self.lists = self.new_sum = self.pairs = self.growing = 0
        self.quantized, self.inlier_grid = ErrorSums(), ErrorSums()

    def add(self, mask: torch.Tensor, n_refresh: int) -> None:
        per_step, sizes, new = window_counts(mask, n_refresh)
        self.growing += int(growing_steps(mask, n_refresh).sum())
        self.flagged += int(per_step.sum())
        self.tokens += per_step.numel()
        self.list_sum += int(sizes.sum())
        self.lists += sizes.numel()
        self.new_sum += int(new.sum())
        self.pairs += new.numel()


def _ratio(total: int, count: int) -> float:
    return total / count if count else math.nan


def dynamic_outlier_summary(qmodel: QuantizedVim, images: torch.Tensor, batch_size: int | None = None,
                            include_single_token: bool = False) -> pd.DataFrame:
    """Per outlier-aware site of ``qmodel``: how many outlier channels per token, how big the O_list of a
    window gets and how many of its channels are new versus the previous window — which layers have the most
    dynamic outliers, i.e. whether the paper's premise (outliers move across time-steps) holds for a model.

    Counts come from the per-time-step rule on the tensors entering each quantizer in the quantized model
    (for a static-list quantizer too: what a dynamic detector would flag; ``static_list`` marks those rows).
    A and D (one token, no time axis) are left out unless ``include_single_token``. ``sqnr_db`` is the site's
    quantization as configured (its outlier channels on their own grid), ``sqnr_db_without_outliers`` with every
    channel on the inlier grid: what the outlier channels buy there. Columns: ``site, layer, direction, tensor,
    channels, outlier_channels_per_token, fraction_outlier, olist_size, new_channels_vs_previous_window,
    growing_steps_per_window, sqnr_db, sqnr_db_without_outliers, static_list``.
    """
    sources: dict[str, nn.Module] = {}
    for name, quantizer in site_quantizers(qmodel).items():
        single = isinstance(quantizer, SingleToken)
        inner = quantizer.quantizer if single else quantizer
        if isinstance(inner, OutlierAwareQuantizer) and (include_single_token or not single):
            sources[name] = quantizer
    if not sources:
        raise StudioError(f"no site of this model is quantized with outlier channels (method "
                          f"{qmodel.config.method!r}); use 'ouromamba' or 'static_outliers'")
    sums: dict[str, _SiteOutlierSums] = {}

    def observe(site: Site, x: torch.Tensor, xq: torch.Tensor) -> None:
        mask, n_refresh, _scale = detect_outliers(x, sources[site.name], dynamic_rule=True)
        totals = sums.setdefault(site.name, _SiteOutlierSums(mask.shape[-1]))
        totals.add(mask, n_refresh)
        quantizer = outlier_quantizer(sources[site.name])
        tokens = quantizer.smoothed(_as_tokens(x.reshape(1, 1, -1) if x.dim() < 3 else x))
        totals.quantized.add(tokens, xq.reshape(tokens.shape))
        totals.inlier_grid.add(tokens, quantizer.quantize_with(tokens, torch.zeros_like(tokens, dtype=torch.bool)))

    run_probe(qmodel, images, set(sources), observe, batch_size)
    rows = []
    for name, totals in sums.items():
        per_token = _ratio(totals.flagged, totals.tokens)
        rows.append({
            **site_columns(parse_site(name)),
            "channels": totals.channels,
            "outlier_channels_per_token": per_token,
            "fraction_outlier": per_token / totals.channels,
            "olist_size": _ratio(totals.list_sum, totals.lists),
            "new_channels_vs_previous_window": _ratio(totals.new_sum, totals.pairs),
            "growing_steps_per_window": _ratio(totals.growing, totals.lists),
            "sqnr_db": totals.quantized.sqnr_db,
            "sqnr_db_without_outliers": totals.inlier_grid.sqnr_db,
            "static_list": bool(outlier_quantizer(sources[name]).static_channels),
        })
    return pd.DataFrame(rows)
