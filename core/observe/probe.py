"""Plumbing shared by the observers: plug an interceptor in *next to* whatever a model already runs, see the
tensor before and after each quantizer, and name sites in the columns the charts group by.

A :class:`~core.quant.QuantizedVim` keeps its ``QuantInterceptor`` plugged in for good;
``core.intercept.intercepting`` puts it back after an observer is done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from core.errors import StudioError
from core.intercept import DIRECTIONS, Interceptor, Site, Tapped, intercepting
from core.quant import QuantizedVim

SHARED = "shared"  # the ``direction`` column of sites shared by both scan directions (in_proj, out_proj)
STATIC_TENSORS = ("A", "D")  # parameters quantized as one token: no batch or time dimension
SiteCallback = Callable[[Site, torch.Tensor, torch.Tensor], None]
StateCallback = Callable[[Site, int, torch.Tensor, torch.Tensor], None]
STATE = "h"  # the scan state site: quantized per step inside the recurrence when the config asks


def vim_of(model: nn.Module) -> nn.Module:
    """The Vim that holds the taps: ``model`` itself, or the ``.model`` of a QuantizedVim."""
    return model.model if isinstance(model, QuantizedVim) else model


def current_interceptor(model: nn.Module) -> Interceptor | None:
    """The interceptor plugged into ``model``'s taps now (a QuantizedVim's quantizer router, or None)."""
    for module in model.modules():
        if isinstance(module, Tapped):
            return module.interceptor
    return None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Observe in eval mode (no drop-path noise), then put back every submodule's own training flag (a
    QuantizedVim wrapper says training while its Vim is in eval mode; ``train(flag)`` would flip both)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def batches(images: torch.Tensor, batch_size: int | None) -> Iterator[torch.Tensor]:
    """Slices of ``images``; one slice when ``batch_size`` is None."""
    if images.ndim != 4 or len(images) == 0:
        raise StudioError("expected a non-empty image batch shaped (n, channels, height, width)")
    if batch_size is not None and batch_size < 1:
        raise StudioError(f"batch size must be at least 1, got {batch_size}")
    step = batch_size or len(images)
    for start in range(0, len(images), step):
        yield images[start:start + step]


def parse_site(name: str) -> Site:
    """``layers.2.bwd.delta_pre`` → Site(2, 'delta_pre', 'bwd'); the inverse of ``Site.name``."""
    parts = name.split(".")
    try:
        if parts[0] != "layers":
            raise ValueError
        layer = int(parts[1])
        if parts[2] in DIRECTIONS:
            return Site(layer, ".".join(parts[3:]), parts[2])
        return Site(layer, ".".join(parts[2:]))
    except (IndexError, ValueError):
        raise StudioError(f"{name!r} is not a site name (they look like 'layers.0.in_proj.input' or "
                          "'layers.1.fwd.B')") from None


def site_columns(site: Site) -> dict:
    """The ``site, layer, direction, tensor`` columns of a row about ``site``."""
    return {"site": site.name, "layer": site.layer, "direction": site.direction or SHARED, "tensor": site.tensor}


def is_static(name: str) -> bool:
    """Weights, A and D have no (batch, time) dimensions: they are the same for every image."""
    tensor = parse_site(name).tensor
    return tensor.endswith(".weight") or tensor in STATIC_TENSORS


def site_quantizers(qmodel: QuantizedVim) -> dict[str, nn.Module]:
    """Site name → the quantizer module at that site (as stored, SingleToken wrappers included)."""
    return {key.replace(":", "."): quantizer for key, quantizer in qmodel.quantizers.items()}


class QuantProbe(Interceptor):
    """Runs the model's own interceptor and reports (site, tensor before, tensor after) at watched sites.

    Wrapped around a QuantizedVim's router, "before" is the quantizer's input in the quantized model and
    "after" its fake-quantized output, which is what the per-site error and outlier statistics need. Scan
    states (quantized per step when the config quantizes them) go to ``state_callback(site, step, h, ĥ)``.
    """

    def __init__(self, inner: Interceptor | None, watched: set[str], callback: SiteCallback,
                 state_callback: StateCallback | None = None):
        self.inner, self.watched, self.callback, self.state_callback = inner, watched, callback, state_callback
        self.wants_states = bool(inner is not None and inner.wants_states)

    def intercept(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        out = x if self.inner is None else self.inner.intercept(site, x)
        if site.name in self.watched:
            self.callback(site, x, out)
        return out

    def intercept_state(self, site: Site, step: int, h: torch.Tensor) -> torch.Tensor:
        out = h if self.inner is None else self.inner.intercept_state(site, step, h)
        if self.state_callback is not None and site.name in self.watched:
            self.state_callback(site, step, h, out)
        return out


def run_probe(qmodel: QuantizedVim, images: torch.Tensor, watched: set[str], callback: SiteCallback,
              batch_size: int | None = None, state_callback: StateCallback | None = None) -> None:
    """Run ``qmodel`` over ``images`` (in batches) with a :class:`QuantProbe` on ``watched`` sites."""
    vim = vim_of(qmodel)
    probe = QuantProbe(current_interceptor(vim), watched, callback, state_callback)
    device = model_device(vim)
    with torch.no_grad(), eval_mode(qmodel), intercepting(vim, probe):
        for batch in batches(images, batch_size):
            qmodel(batch.to(device))
