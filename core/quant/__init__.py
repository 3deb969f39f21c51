"""OuroMamba-Quant and its baselines: ``quantize(model, QuantConfig(...), calib_images)``."""

from core.quant.config import METHODS, SETTINGS, QuantConfig
from core.quant.quantize import QuantizedVim, quantize, quantized_sites

__all__ = ["METHODS", "SETTINGS", "QuantConfig", "QuantizedVim", "quantize", "quantized_sites"]
