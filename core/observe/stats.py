"""Capturing activations and the basic tidy statistics the app plots: (time-step × channel) magnitude maps,
value histograms, SQNR and cosine similarity.

Every frame is long format (one row per cell or bin) so ``plotly.express`` takes it as is, e.g.
``px.density_heatmap(df, x="time_step", y="channel", z="max_abs", histfunc="max")``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.errors import StudioError
from core.intercept import Chain, Recorder, intercepting
from core.models import VimConfig
from core.observe.probe import (
    batches,
    current_interceptor,
    eval_mode,
    is_static,
    model_device,
    run_probe,
    site_quantizers,
    vim_of,
)


def capture(model: nn.Module, images: torch.Tensor, sites: Iterable[str] | None = None, record_states: bool = False,
            batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Tensors at ``sites`` (all sites when None) as the model uses them, for the stats below.

    Works on a plain Vim (FP tensors) and on a QuantizedVim: there the tensors are recorded after the
    quantizers (what the quantized model computes with) and its quantizers stay plugged in afterwards.
    Activations are (n, L, C) (scan states (n, L, E, N) with ``record_states``); weights, A and D come once.
    Batches of ``batch_size`` images are concatenated; tensors stay on the model's device.
    """
    vim = vim_of(model)
    names = None if sites is None else list(sites)
    inner = current_interceptor(vim)
    device = model_device(vim)
    parts: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad(), eval_mode(model):
        for batch in batches(images, batch_size):
            recorder = Recorder(names, record_states)
            with intercepting(vim, recorder if inner is None else Chain(inner, recorder)):
                model(batch.to(device))
            for name, tensor in recorder.tensors.items():
                parts.setdefault(name, []).append(tensor)
    if names is not None:
        missing = sorted(set(names) - set(parts))
        if missing:
            raise StudioError(f"no tensor passed through {missing}; site names look like 'layers.0.in_proj.input' "
                              "or 'layers.1.fwd.B' (the scan state 'h' needs record_states=True)")
    return {name: chunks[0] if is_static(name) else torch.cat(chunks) for name, chunks in parts.items()}


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(batch, L, C) as is; (L, C) as one image."""
    if x.dim() == 2:
        return x[None]
    if x.dim() != 3:
        raise StudioError(f"expected activations shaped (batch, time-steps, channels), got {tuple(x.shape)}")
    return x


def _select_image(x: torch.Tensor, image: int | None) -> torch.Tensor:
    if image is None:
        return x
    if not -len(x) <= image < len(x):
        raise StudioError(f"image {image} is out of range: the tensor holds {len(x)} images")
    return x[image:image + 1]


def grid_frame(values: torch.Tensor, column: str) -> pd.DataFrame:
    """A (L, C) tensor as rows ``time_step, channel, <column>``."""
    length, channels = values.shape
    return pd.DataFrame({
        "time_step": np.repeat(np.arange(length), channels),
        "channel": np.tile(np.arange(channels), length),
        column: values.detach().cpu().numpy().reshape(-1),
    })


def time_channel_stats(x: torch.Tensor, image: int | None = None) -> pd.DataFrame:
    """max |x| per (time_step, channel) over the batch, or of one image: the outlier heatmap's data.

    Outlier channels show as bright rows; if they move across time-steps (the OuroMamba premise) the
    bright cells wander instead of forming straight lines.
    """
    x = _select_image(_as_tokens(x), image)
    return grid_frame(x.detach().abs().amax(dim=0).float(), "max_abs")


def histogram(x: torch.Tensor, bins: int = 100, log: bool = False,
              value_range: tuple[float, float] | None = None) -> pd.DataFrame:
    """Counts of the values of ``x`` in ``bins`` equal bins (``bin_left, bin_right, count``).

    Over the data's min..max by default, so counts sum to the number of finite values; ``log`` adds
    ``log_count`` = log10(1 + count), which keeps the long outlier tails visible next to the bulk.
    """
    if bins < 1:
        raise StudioError(f"bins must be at least 1, got {bins}")
    values = x.detach().reshape(-1).double()
    values = values[torch.isfinite(values)]
    if value_range is not None:
        low, high = map(float, value_range)
        if not high > low:
            raise StudioError(f"histogram range must have low < high, got {value_range}")
    elif values.numel():
        low, high = float(values.min()), float(values.max())
    else:
        low, high = 0.0, 1.0
    if high == low:  # a constant tensor: one unit-wide bin around it
        low, high = low - 0.5, high + 0.5
    counts = torch.histc(values, bins=bins, min=low, max=high).round().long()
    edges = np.linspace(low, high, bins + 1)
    frame = pd.DataFrame({"bin_left": edges[:-1], "bin_right": edges[1:], "count": counts.cpu().numpy()})
    if log:
        frame["log_count"] = np.log10(1 + frame["count"].to_numpy(dtype=float))
    return frame


class ErrorSums:
    """Running sums for SQNR and cosine over many batches: Σx², Σ(x−x̂)², Σx·x̂, Σx̂² (in float64)."""

    def __init__(self) -> None:
        self.signal = self.noise = self.dot = self.quantized = 0.0

    def add(self, x: torch.Tensor, xq: torch.Tensor) -> None:
        x, xq = x.detach().double(), xq.detach().double()
        self.signal += float((x * x).sum())
        self.noise += float(((x - xq) ** 2).sum())
        self.dot += float((x * xq).sum())
        self.quantized += float((xq * xq).sum())

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf if self.signal > 0 else math.nan
        if self.signal == 0:
            return -math.inf
        return 10 * math.log10(self.signal / self.noise)

    @property
    def cosine(self) -> float:
        norms = math.sqrt(self.signal * self.quantized)
        if norms == 0:
            return 1.0 if self.signal == self.quantized else 0.0
        return self.dot / norms


class StepErrorSums:
    """Σx² and Σ(x−x̂)² per time-step over many batches of (batch, L, C) activations (float64): the SQNR along
    the scan."""

    def __init__(self) -> None:
        self.signal: torch.Tensor | None = None
        self.noise: torch.Tensor | None = None

    def add(self, x: torch.Tensor, xq: torch.Tensor) -> None:
        x, xq = _as_tokens(x.detach()).double(), _as_tokens(xq.detach()).double()
        signal, noise = (x * x).sum(dim=(0, 2)), ((x - xq) ** 2).sum(dim=(0, 2))
        self.signal = signal if self.signal is None else self.signal + signal
        self.noise = noise if self.noise is None else self.noise + noise

    @property
    def sqnr_db(self) -> np.ndarray:
        """SQNR (dB) per time-step: +inf where nothing was rounded, −inf where the signal is 0 (and noise is not),
        NaN where both are 0; empty before any ``add``."""
        if self.signal is None:
            return np.zeros(0)
        signal, noise = self.signal.cpu().numpy(), self.noise.cpu().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            return 10 * np.log10(signal / noise)


def sqnr_db(x: torch.Tensor, xq: torch.Tensor) -> float:
    """10·log10(‖x‖² / ‖x − x̂‖²) in dB: +inf when x̂ equals x; every 6 dB is about one more bit."""
    sums = ErrorSums()
    sums.add(x, xq)
    return sums.sqnr_db


def cosine_similarity(x: torch.Tensor, xq: torch.Tensor) -> float:
    """cos(x, x̂) of the flattened tensors: 1 when x̂ points the same way as x, whatever the scale."""
    sums = ErrorSums()
    sums.add(x, xq)
    return sums.cosine


def quantizer_inputs_bytes(cfg: VimConfig, images: int) -> int:
    """Memory that :func:`capture_quantizer_inputs` holds for ``images`` images of a model (all sites, fp32):
    per layer and token, in_proj's and out_proj's inputs (D + E) and per direction x_proj's input, Δ (E each),
    dt_proj's input (R), B and C (N each). Lets a caller refuse a capture that would not fit, before it starts."""
    per_token = cfg.embed_dim + cfg.d_inner + 2 * (2 * cfg.d_inner + cfg.rank + 2 * cfg.d_state)
    return 4 * images * cfg.seq_len * cfg.depth * per_token


def capture_quantizer_inputs(qmodel: nn.Module, images: torch.Tensor, sites: Iterable[str] | None = None,
                             batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors *entering* the quantizers of a QuantizedVim (all quantized sites when ``sites`` is None):
    what their outlier detection actually sees, upstream quantization error included."""
    quantized = site_quantizers(qmodel)
    names = set(quantized) if sites is None else set(sites)
    unknown = sorted(names - set(quantized))
    if unknown:
        raise StudioError(f"not quantized in this model: {unknown}")
    parts: dict[str, list[torch.Tensor]] = {}
    steps: dict[str, list[torch.Tensor]] = {}

    def keep(site, x: torch.Tensor, _: torch.Tensor) -> None:
        parts.setdefault(site.name, []).append(x.detach().clone())

    def keep_state(site, step: int, h: torch.Tensor, _: torch.Tensor) -> None:
        if step == 0 and site.name in steps:  # a new batch: stack the previous one's steps (batch, L, E, N)
            parts.setdefault(site.name, []).append(torch.stack(steps.pop(site.name), dim=1))
        steps.setdefault(site.name, []).append(h.detach().clone())

    run_probe(qmodel, images, names, keep, batch_size, keep_state)
    for name, chunk in steps.items():
        parts.setdefault(name, []).append(torch.stack(chunk, dim=1))
    return {name: chunks[0] if is_static(name) else torch.cat(chunks) for name, chunks in parts.items()}
