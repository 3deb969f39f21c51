"""OuroMamba-Gen: data-free calibration images, its baselines, and the implicit-attention maps that explain it."""

from core.gen.attention import attention_maps, attention_rows, patch_features, trace_scans
from core.gen.generate import (
    GEN_PRESETS,
    GEN_SOURCES,
    OPTIMISED_SOURCES,
    GenConfig,
    GenProgress,
    GenResult,
    generate,
    load_manifest,
    save_generated,
    saved_sets,
    to_pixels,
)

__all__ = [
    "attention_maps", "attention_rows", "patch_features", "trace_scans",
    "GEN_PRESETS", "GEN_SOURCES", "OPTIMISED_SOURCES",
    "GenConfig", "GenProgress", "GenResult", "generate", "load_manifest",
    "save_generated", "saved_sets", "to_pixels",
]
