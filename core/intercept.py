"""Named interception points: every tensor OuroMamba-Quant touches passes through one.

Each Vim mixer calls ``self.tap(site, tensor)`` at fixed places (the inputs and weights of in_proj,
x_proj, dt_proj, out_proj; Δ before softplus; A, B, C, D; optionally the scan state h at every step).
An :class:`Interceptor` plugged into the model sees the tensor and returns the tensor to use instead
(a fake-quantized copy, the same tensor after recording it, ...). With nothing plugged in a tap is a
single ``is None`` check, so the plain model pays nothing measurable.

Layouts at the sites (time-step t = position along the scan; in the backward direction the sequence is
already flipped, so t counts along the backward scan):

==================  =======================  ==========================================
tensor              shape                    meaning
==================  =======================  ==========================================
in_proj.input       (batch, L, D)            RMSNorm output (shared by both directions)
in_proj.weight      (2E, D)
x_proj.input        (batch, L, E)            u = SiLU(conv1d(x)), per direction
x_proj.weight       (R + 2N, E)
dt_proj.input       (batch, L, R)            the low-rank δ
dt_proj.weight      (E, R)
delta_pre           (batch, L, E)            dt_proj output incl. bias, before softplus
A                   (E, N)                   −exp(A_log)
B, C                (batch, L, N)
D                   (E,)
h                   (batch, E, N) per step   scan state, only if ``wants_states``
out_proj.input      (batch, L, E)            (y_fwd + flip(y_bwd)) / 2
out_proj.weight     (D, E)
==================  =======================  ==========================================
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FORWARD, BACKWARD = "fwd", "bwd"
DIRECTIONS = (FORWARD, BACKWARD)

SHARED_TENSORS = ("in_proj.input", "in_proj.weight", "out_proj.input", "out_proj.weight")
DIRECTIONAL_TENSORS = (
    "x_proj.input", "x_proj.weight", "dt_proj.input", "dt_proj.weight",
    "delta_pre", "A", "B", "C", "D", "h",
)
SITE_TENSORS = SHARED_TENSORS + DIRECTIONAL_TENSORS


@dataclass(frozen=True)
class Site:
    """Where a tensor is intercepted: layer index, tensor name and scan direction (None if shared)."""

    layer: int
    tensor: str
    direction: str | None = None

    @property
    def name(self) -> str:
        parts = [f"layers.{self.layer}", self.direction, self.tensor]
        return ".".join(p for p in parts if p)


def layer_sites(layer: int) -> dict[tuple[str, str | None], Site]:
    """All sites of one mixer, keyed by (tensor, direction); built once per mixer, not per call."""
    sites = {(t, None): Site(layer, t) for t in SHARED_TENSORS}
    sites.update({(t, d): Site(layer, t, d) for t in DIRECTIONAL_TENSORS for d in DIRECTIONS})
    return sites


class Interceptor:
    """Base class: override :meth:`intercept` (and :meth:`intercept_state` with ``wants_states``)."""

    #: Ask the scan for every per-step state h_t. Costs a step-by-step scan, so it is off by default.
    wants_states: bool = False

    def intercept(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        return x

    #: Ask the scan to hand every state h_t over at once, after the scan, as (batch, L, E, N) with its autograd
    #: history (:meth:`collect_states`). Read-only, and it costs keeping the states, so it is off by default.
    collects_states: bool = False

    def intercept_state(self, site: Site, step: int, h: torch.Tensor) -> torch.Tensor:
        return h

    def collect_states(self, site: Site, states: torch.Tensor) -> None:
        """All scan states of one direction, in scan order; called only when ``collects_states``."""

    def linear(self, input_site: Site, weight_site: Site, x: torch.Tensor, weight: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
        """x·Wᵀ + b at one of the four projections. By default the input and the weight pass through
        :meth:`intercept` and the product stays a float matmul; an interceptor that runs integer GEMMs on
        stored weight codes (``core.quant.packed``) overrides this and may receive ``weight`` None."""
        return F.linear(self.intercept(input_site, x), self.intercept(weight_site, weight), bias)


class Chain(Interceptor):
    """Several interceptors in order (e.g. a quantizer, then an observer of the quantized tensors).
    Projections run as float matmuls of the chained inputs and weights (the base :meth:`Interceptor.linear`),
    so an interceptor that overrides ``linear`` does not chain."""

    def __init__(self, *interceptors: Interceptor):
        self.interceptors = interceptors
        self.wants_states = any(i.wants_states for i in interceptors)
        self.collects_states = any(i.collects_states for i in interceptors)

    def intercept(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        for interceptor in self.interceptors:
            x = interceptor.intercept(site, x)
        return x

    def intercept_state(self, site: Site, step: int, h: torch.Tensor) -> torch.Tensor:
        for interceptor in self.interceptors:
            h = interceptor.intercept_state(site, step, h)
        return h

    def collect_states(self, site: Site, states: torch.Tensor) -> None:
        for interceptor in self.interceptors:
            if interceptor.collects_states:
                interceptor.collect_states(site, states)


class Recorder(Interceptor):
    """Keeps detached copies of the tensors at the chosen sites (all sites when ``names`` is None).

    With ``record_states`` the per-step scan states are kept too and appear in :attr:`tensors` stacked
    along time as (batch, L, E, N).
    """

    def __init__(self, names: Iterable[str] | None = None, record_states: bool = False):
        self.names = None if names is None else set(names)
        self.wants_states = record_states
        self._tensors: dict[str, torch.Tensor] = {}
        self._states: dict[str, list[torch.Tensor]] = {}

    def _selected(self, site: Site) -> bool:
        return self.names is None or site.name in self.names

    def intercept(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        if self._selected(site):
            self._tensors[site.name] = x.detach().clone()
        return x

    def intercept_state(self, site: Site, step: int, h: torch.Tensor) -> torch.Tensor:
        if self._selected(site):
            if step == 0:
                self._states[site.name] = []
            self._states[site.name].append(h.detach().clone())
        return h

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        stacked = {name: torch.stack(steps, dim=1) for name, steps in self._states.items()}
        return {**self._tensors, **stacked}


class Tapped(nn.Module):
    """Mixin for modules with interception sites: ``self.tap`` is free when nothing is plugged in."""

    interceptor: Interceptor | None = None

    def tap(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        if self.interceptor is None:
            return x
        return self.interceptor.intercept(site, x)


def set_interceptor(model: nn.Module, interceptor: Interceptor | None) -> None:
    """Plug ``interceptor`` into every tapped module of ``model`` (None unplugs)."""
    for module in model.modules():
        if isinstance(module, Tapped):
            module.interceptor = interceptor


@contextmanager
def intercepting(model: nn.Module, interceptor: Interceptor) -> Iterator[Interceptor]:
    """``with intercepting(model, Recorder()) as rec: model(x)`` — puts back what each tap had on exit
    (a quantized model keeps its quantizers; chain them with :class:`Chain` to observe through them)."""
    saved = [(m, m.interceptor) for m in model.modules() if isinstance(m, Tapped)]
    set_interceptor(model, interceptor)
    try:
        yield interceptor
    finally:
        for module, previous in saved:
            module.interceptor = previous
