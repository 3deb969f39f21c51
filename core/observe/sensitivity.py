"""Layer sensitivity: quantize one layer at a time and see which ones cost the most accuracy."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from threading import Event

import pandas as pd
import torch
from torch import nn

from core.errors import StudioError
from core.eval import Cancelled
from core.intercept import intercepting
from core.observe.probe import batches, eval_mode, model_device, vim_of
from core.quant import QuantConfig, QuantizedVim, quantize
from core.quant.config import set_override
from core.quant.model import QuantInterceptor

Progress = Callable[[int, int], None]


def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
         cancel: Event | None = None) -> float:
    """Top-1 accuracy (%) of ``model`` on normalised ``images`` and their ``labels``."""
    labels = torch.as_tensor(labels).reshape(-1)
    if len(labels) != len(images):
        raise StudioError(f"{len(images)} images but {len(labels)} labels")
    device = model_device(vim_of(model))
    correct = 0
    with torch.no_grad(), eval_mode(model):
        for start, batch in zip(range(0, len(images), batch_size), batches(images, batch_size), strict=True):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"evaluation cancelled after {start} of {len(images)} images")
            predictions = model(batch.to(device)).argmax(-1).cpu()
            correct += int((predictions == labels[start:start + len(batch)]).sum())
    return 100.0 * correct / len(images)


def only_layer(config: QuantConfig, layer: int, depth: int) -> QuantConfig:
    """``config`` with every layer but ``layer`` kept in floating point (the user's overrides stay, first)."""
    skips = {f"layers.{other}.*": {"skip": True} for other in range(depth) if other != layer}
    return replace(config, overrides={**config.overrides, **skips})


def layer_sensitivity(model: nn.Module, config: QuantConfig, calib_images: torch.Tensor, eval_images: torch.Tensor,
                      eval_labels: torch.Tensor, progress: Progress | None = None, cancel: Event | None = None,
                      batch_size: int = 500) -> pd.DataFrame:
    """Top-1 with only layer j quantized (as ``config`` says), for every j, and the drop versus FP in points.

    Tells which layers to keep at higher precision (``QuantConfig.overrides``). One calibration and one
    evaluation per layer; ``progress(done, depth)`` after each; raises :class:`core.eval.Cancelled` once
    ``cancel`` is set. Columns: ``layer, top1, drop_vs_fp``; the FP top-1 is in ``frame.attrs["fp_top1"]``.
    """
    depth = len(vim_of(model).layers)
    fp_top1 = top1(model, eval_images, eval_labels, batch_size, cancel)
    rows = []
    for layer in range(depth):
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"layer sensitivity cancelled after {layer} of {depth} layers")
        qmodel = quantize(model, only_layer(config, layer, depth), calib_images, cancel=cancel)
        accuracy = top1(qmodel, eval_images, eval_labels, batch_size, cancel)
        rows.append({"layer": layer, "top1": accuracy, "drop_vs_fp": fp_top1 - accuracy})
        del qmodel
        if progress is not None:
            progress(layer + 1, depth)
    frame = pd.DataFrame(rows)
    frame.attrs["fp_top1"] = fp_top1
    return frame


def run_layer_sensitivity(qmodel: QuantizedVim, eval_images: torch.Tensor, eval_labels: torch.Tensor,
                          progress: Progress | None = None, cancel: Event | None = None,
                          batch_size: int = 500) -> pd.DataFrame:
    """Top-1 with only layer j's quantizers of a finished run switched on (its own calibrated scales, every
    other layer in floating point), for every j, and the drop versus FP in points.

    No recalibration, so it costs one evaluation per layer (``layer_sensitivity`` recalibrates each layer
    alone, which is the cleaner experiment and depth times dearer). Same columns and ``attrs``."""
    quantizers = {name.replace(":", "."): q for name, q in qmodel.quantizers.items()}
    depth = len(qmodel.model.layers)
    with intercepting(qmodel.model, QuantInterceptor({})):  # nothing quantized: the FP model
        fp_top1 = top1(qmodel, eval_images, eval_labels, batch_size, cancel)
    rows = []
    for layer in range(depth):
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"layer sensitivity cancelled after {layer} of {depth} layers")
        own = {name: q for name, q in quantizers.items() if name.startswith(f"layers.{layer}.")}
        with intercepting(qmodel.model, QuantInterceptor(own)):
            accuracy = top1(qmodel, eval_images, eval_labels, batch_size, cancel)
        rows.append({"layer": layer, "top1": accuracy, "drop_vs_fp": fp_top1 - accuracy})
        if progress is not None:
            progress(layer + 1, depth)
    frame = pd.DataFrame(rows)
    frame.attrs["fp_top1"] = fp_top1
    return frame


def precision_suggestion(frame: pd.DataFrame, config: QuantConfig, share: float = 0.5,
                         min_drop: float = 0.5) -> dict[str, dict]:
    """Overrides that keep the most sensitive layers at 8 bits, from a sensitivity ``frame`` of a ``config`` run.

    The fewest layers, most costly first, whose one-at-a-time drops add up to ``share`` of all layers' drops, at
    most a quarter of the layers (rounded up): mixed precision pays when a few layers carry the loss. {} when the
    run is already 8-bit, no layer alone costs ``min_drop`` points, or the run's own overrides already say so.
    Drops measured one layer at a time do not add up exactly: a starting point that the next run checks."""
    if config.w_bits >= 8 and config.a_bits >= 8:
        return {}
    drops = frame.set_index("layer")["drop_vs_fp"].clip(lower=0).sort_values(ascending=False, kind="stable")
    if drops.empty or drops.iloc[0] < min_drop:
        return {}
    chosen, covered = [], 0.0
    for layer, drop in drops.items():
        if covered >= share * drops.sum() or len(chosen) == math.ceil(len(drops) / 4):
            break
        chosen.append(int(layer))
        covered += drop
    suggested = config.overrides
    for layer in sorted(chosen):  # each last, so that a broader pattern of the run's cannot lower it again
        suggested = set_override(suggested, f"layers.{layer}.*", {"w_bits": 8, "a_bits": 8})
    return {} if list(suggested.items()) == list(config.overrides.items()) else suggested  # order matters


def suggest_precision(qmodel: QuantizedVim, calib_images: torch.Tensor, config: QuantConfig,
                      cancel: Event | None = None, batch_size: int = 500) -> dict[str, dict]:
    """:func:`precision_suggestion` from the run's own calibration images: a layer's cost is how many of their
    FP predictions it alone changes. No labels and never the test set, so the accuracy the next run reports on
    the test images was not tuned on them."""
    with torch.no_grad(), intercepting(qmodel.model, QuantInterceptor({})), eval_mode(qmodel):
        device = model_device(vim_of(qmodel))
        fp_predictions = torch.cat([qmodel(batch.to(device)).argmax(-1).cpu()
                                    for batch in batches(calib_images, batch_size)])
    frame = run_layer_sensitivity(qmodel, calib_images, fp_predictions, cancel=cancel, batch_size=batch_size)
    return precision_suggestion(frame, config)
