"""``quantize(model, config, calib_images) -> QuantizedVim``: a config in, a new fake-quantized model out.

The FP model is never modified: it is deep-copied, every quantized site gets its own quantizer (per layer
and per scan direction), activation quantizers are calibrated on one full-precision pass over the
calibration images, and the copy runs with an interceptor that routes each site through its quantizer.

Which tensors (method doc §3.2): the inputs and weights of in_proj, x_proj, dt_proj and out_proj; Δ before
softplus (asymmetric, k_delta); B and C (per token over d_state); A and D (each as one token). Patch embed,
conv1d, norms, the z gate and the head stay in floating point.
"""

from __future__ import annotations

import copy
import time
from threading import Event

import torch
from torch import nn

from core.errors import StudioError, expect
from core.eval import Cancelled
from core.intercept import DIRECTIONS, Interceptor, Site, intercepting, set_interceptor
from core.models import VisionMamba
from core.quant.config import Progress, QuantConfig
from core.quant.model import QuantizedVim
from core.quant.quantizers import (
    DynamicPerTokenQuantizer,
    OutlierAwareQuantizer,
    PerTensorQuantizer,
    PerTokenStaticQuantizer,
    SingleToken,
    StateQuantizer,
    WeightQuantizer,
    smoothing_scale,
)
from core.quant.reconstruct import reconstruct

LINEARS = ("in_proj", "out_proj", "x_proj", "dt_proj")
SHARED_LINEARS = ("in_proj", "out_proj")
S6_TENSORS = ("delta_pre", "A", "B", "C", "D")


def quantized_sites(model: VisionMamba, include_states: bool = False) -> list[Site]:
    """The sites OuroMamba-Quant touches, in forward order (the scan states h only if asked)."""
    sites = []
    for layer in range(model.cfg.depth):
        sites += [Site(layer, "in_proj.input"), Site(layer, "in_proj.weight")]
        for direction in DIRECTIONS:
            sites += [Site(layer, f"{name}.{part}", direction) for name in ("x_proj", "dt_proj")
                      for part in ("input", "weight")]
            sites += [Site(layer, name, direction) for name in S6_TENSORS]
            if include_states:
                sites.append(Site(layer, "h", direction))
        sites += [Site(layer, "out_proj.input"), Site(layer, "out_proj.weight")]
    return sites


def _linear_weight(model: VisionMamba, site: Site) -> torch.Tensor:
    mixer = model.layers[site.layer].mixer
    linear = site.tensor.split(".")[0]
    suffix = "_b" if site.direction == "bwd" and linear not in SHARED_LINEARS else ""
    return getattr(mixer, linear + suffix).weight


def activation_quantizer(config: QuantConfig, site: Site) -> nn.Module:
    """The uncalibrated quantizer ``config`` puts at an activation site (A and D wrapped as one token)."""
    if site.tensor == "h":
        return StateQuantizer(config.a_bits)
    asymmetric = site.tensor == "delta_pre"
    k = config.k_delta if asymmetric else config.k
    method = config.method
    if method == "per_tensor":
        quantizer = PerTensorQuantizer(config.a_bits, asymmetric, config.clip_p)
    elif method == "dynamic_per_token":
        quantizer = DynamicPerTokenQuantizer(config.a_bits, asymmetric, config.clip_p)
    elif method in ("ptq4vm", "ptq4vm_smooth"):
        quantizer = PerTokenStaticQuantizer(config.a_bits, asymmetric, config.clip_p)
    else:
        quantizer = OutlierAwareQuantizer(config.a_bits, config.o_bits, k, config.n_refresh, asymmetric,
                                          config.clip_p, config.release_compatible,
                                          static_channels=method == "static_outliers")
    return SingleToken(quantizer) if site.tensor in ("A", "D") else quantizer


class _Calibrator(Interceptor):
    """One FP pass: each activation quantizer calibrates on the tensor at its site, which passes unchanged."""

    def __init__(self, quantizers: dict[str, nn.Module], weights: dict[str, torch.Tensor], alpha: float | None,
                 progress: Progress | None, cancel: Event | None):
        self.quantizers, self.weights, self.alpha = quantizers, weights, alpha
        self.progress, self.cancel, self.done = progress, cancel, 0
        self.wants_states = any(isinstance(q, StateQuantizer) for q in quantizers.values())

    def intercept_state(self, site: Site, step: int, h: torch.Tensor) -> torch.Tensor:
        quantizer = self.quantizers.get(site.name)
        if quantizer is not None:
            quantizer.observe_step(step, h)
        return h

    def intercept(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        quantizer = self.quantizers.get(site.name)
        if quantizer is None or site.tensor.endswith(".weight"):
            return x
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"calibration cancelled after {self.done} of {len(self.quantizers)} sites")
        if self.alpha is not None and site.name in self.weights:
            quantizer.smoothing = smoothing_scale(x, self.weights[site.name], self.alpha)
        quantizer.calibrate(x)
        self.done += 1
        if self.progress is not None:
            self.progress("calibrate", self.done, len(self.quantizers), None)
        return x


def quantize(model: VisionMamba, config: QuantConfig, calib_images: torch.Tensor,
             progress: Progress | None = None, cancel: Event | None = None) -> QuantizedVim:
    """Quantize a copy of ``model`` as ``config`` says, calibrated on ``calib_images`` (n, C, H, W):
    static scales from one FP pass, then block-wise reconstruction (``config.reconstruction``)."""
    expect(model, VisionMamba, "quantize's model (a float Vim, as load_checkpoint gives)")
    expect(config, QuantConfig, "quantize's config")
    expect(calib_images, torch.Tensor, "the calibration images")
    if calib_images.ndim != 4 or len(calib_images) == 0:
        raise StudioError("calibration needs at least one image batch shaped (n, channels, height, width)")
    model.check_input(calib_images)
    if not torch.isfinite(calib_images).all():
        raise StudioError("the calibration images hold NaN or infinite values: every scale would be NaN")
    start = time.perf_counter()
    qmodel = copy.deepcopy(model).eval()
    set_interceptor(qmodel, None)
    sites = quantized_sites(qmodel, include_states=config.quantize_state)
    config.check_overrides([s.name for s in sites])
    quantizers: dict[str, nn.Module] = {}
    linear_inputs: dict[str, torch.Tensor] = {}  # input site name → weight, for smoothing
    for site in sites:
        site_config = config.for_site(site.name)
        if site_config is None or site.tensor.endswith(".weight"):
            continue
        shared = site.name.replace(".bwd.", ".fwd.")
        if config.release_compatible and site.tensor in S6_TENSORS and shared in quantizers:
            quantizers[site.name] = quantizers[shared]  # one quantizer for both directions, as the release
            continue
        quantizers[site.name] = activation_quantizer(site_config, site)
        if site.tensor.endswith(".input"):
            linear_inputs[site.name] = _linear_weight(qmodel, site)
    alpha = config.smoothing_alpha if config.method == "ptq4vm_smooth" else None
    calibrator = _Calibrator(quantizers, linear_inputs, alpha, progress, cancel)
    with torch.no_grad(), intercepting(qmodel, calibrator):
        qmodel(calib_images)
    for quantizer in quantizers.values():
        if isinstance(quantizer, StateQuantizer):
            quantizer.finish_calibration()
    for site in sites:
        site_config = config.for_site(site.name)
        if site_config is None or not site.tensor.endswith(".weight"):
            continue
        input_quantizer = quantizers.get(site.name.replace(".weight", ".input"))
        smoothing = getattr(input_quantizer, "smoothing", None)
        quantizers[site.name] = WeightQuantizer(_linear_weight(qmodel, site), site_config.w_bits,
                                                site_config.weight_group_size, site_config.clip_p,
                                                per_tensor=config.method == "per_tensor", smoothing=smoothing)
    quantized = QuantizedVim(qmodel, config, quantizers, {"config": config.to_dict(),
                                                          "calibration_images": len(calib_images)})
    if config.reconstruction.epochs:
        reconstruct(quantized, model, calib_images, config.reconstruction, progress, cancel)
    quantized.provenance["calibration_seconds"] = round(time.perf_counter() - start, 2)
    return quantized
