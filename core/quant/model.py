"""The quantized model: a Vim copy whose interception sites run through per-site quantizers."""

from __future__ import annotations

import torch
from torch import nn

from core.intercept import Interceptor, Site, set_interceptor
from core.models import VimConfig, VisionMamba
from core.quant.config import QuantConfig
from core.quant.quantizers import StateQuantizer


class QuantInterceptor(Interceptor):
    """Routes each site's tensor through its quantizer (sites without one pass unchanged); scan states go
    through a :class:`StateQuantizer` at every step when the config quantizes them."""

    def __init__(self, quantizers: dict[str, nn.Module]):
        self.quantizers = quantizers
        self.wants_states = any(isinstance(q, StateQuantizer) for q in quantizers.values())

    def intercept(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        quantizer = self.quantizers.get(site.name)
        return x if quantizer is None else quantizer(x)

    def intercept_state(self, site: Site, step: int, h: torch.Tensor) -> torch.Tensor:
        quantizer = self.quantizers.get(site.name)
        return h if quantizer is None else quantizer.quantize_step(step, h)


class QuantizedVim(nn.Module):
    """A fake-quantized copy of a Vim: ``model`` runs every quantized site through ``quantizers``.

    ``provenance`` (config, calibration source and size, time) travels with every result it produces.
    """

    def __init__(self, model: VisionMamba, config: QuantConfig, quantizers: dict[str, nn.Module],
                 provenance: dict):
        super().__init__()
        self.model, self.config, self.provenance = model, config, provenance
        # ModuleDict keys cannot contain dots; ":" stands in for them
        self.quantizers = nn.ModuleDict({name.replace(".", ":"): q for name, q in quantizers.items()})
        set_interceptor(self.model, QuantInterceptor(quantizers))
        self.eval()

    @property
    def cfg(self) -> VimConfig:
        return self.model.cfg

    def check_input(self, x: torch.Tensor) -> None:
        self.model.check_input(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
