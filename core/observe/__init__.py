"""Statistics behind the app's outlier heatmaps and error charts, as tidy (long-format) pandas frames.

``capture`` records tensors at interception sites; ``time_channel_stats`` and ``histogram`` describe one tensor;
``outlier_timeline``, ``static_list_misses`` and ``dynamic_outlier_summary`` show where outlier channels are and
how much they move (``state_outliers`` and ``decay_outliers`` look the same way at the scan's state h and its
decay Ā = exp(Δ·A), which nothing quantizes); ``quantization_grid`` how a site's values sit on its inlier and
outlier grids per time-step, ``weight_grids`` every quantized weight on its grid; ``error_report``,
``layer_output_error`` and ``layer_sensitivity`` show what quantization costs, per site and per layer. No plotting
library is imported here.
"""

from core.observe.grid import GridView, WeightGridView, quantization_grid, weight_grid, weight_grids
from core.observe.outliers import (
    DECAY,
    OutlierParams,
    OutlierTimeline,
    decay_outliers,
    detect_outliers,
    dynamic_outlier_summary,
    growing_steps,
    outlier_quantizer,
    outlier_timeline,
    quantizer_at,
    rule_of,
    state_outliers,
    static_list_misses,
    window_counts,
)
from core.observe.probe import SHARED, STATE, QuantProbe, parse_site, site_quantizers
from core.observe.quant_error import error_report, layer_output_error
from core.observe.sensitivity import (
    layer_sensitivity,
    only_layer,
    precision_suggestion,
    run_layer_sensitivity,
    suggest_precision,
    top1,
)
from core.observe.stats import (
    ErrorSums,
    capture,
    capture_quantizer_inputs,
    cosine_similarity,
    histogram,
    quantizer_inputs_bytes,
    sqnr_db,
    time_channel_stats,
)

__all__ = [
    "DECAY", "SHARED", "STATE", "ErrorSums", "GridView", "OutlierParams", "OutlierTimeline", "QuantProbe",
    "WeightGridView", "capture", "capture_quantizer_inputs", "cosine_similarity", "decay_outliers", "detect_outliers",
    "dynamic_outlier_summary", "error_report", "growing_steps", "histogram", "layer_output_error",
    "layer_sensitivity", "only_layer", "outlier_quantizer", "outlier_timeline", "parse_site", "precision_suggestion",
    "quantization_grid", "quantizer_at", "quantizer_inputs_bytes", "rule_of", "run_layer_sensitivity",
    "site_quantizers", "sqnr_db", "state_outliers", "static_list_misses", "suggest_precision", "time_channel_stats",
    "top1", "weight_grid", "weight_grids", "window_counts",
]
