"""OuroMamba-Quant and its baselines: ``quantize(model, QuantConfig(...), calib_images)``."""

from core.quant.config import METHODS, SETTINGS, QuantConfig, ReconstructionConfig
from core.quant.model import QuantizedVim
from core.quant.quantize import quantize, quantized_sites

__all__ = ["METHODS", "SETTINGS", "QuantConfig", "ReconstructionConfig", "QuantizedVim", "quantize", "quantized_sites"]
