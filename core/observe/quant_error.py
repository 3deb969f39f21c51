"""How much each quantizer, and each quantized layer, distorts the tensors: SQNR (dB) and cosine similarity."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from core.errors import expect
from core.intercept import Site
from core.observe.probe import (
    STATE,
    batches,
    eval_mode,
    is_static,
    model_device,
    parse_site,
    run_probe,
    site_columns,
    site_quantizers,
    vim_of,
)
from core.observe.stats import ErrorSums, StepErrorSums, capture
from core.quant import QuantizedVim, quantized_sites


def error_report(fp_model: nn.Module, qmodel: QuantizedVim, images: torch.Tensor,
                 batch_size: int | None = 16) -> pd.DataFrame:
    """One row per quantized site: SQNR (dB) and cosine between a tensor and its fake-quantized version.

    ``sqnr_db``/``cosine`` measure the quantizer alone: what it rounds in the quantized model against its
    output (for weights: the FP weight against quantizer(weight)); with a smoothing scale s that is x / s for
    inputs and W · s for weights, the tensors whose product the layer computes.
    ``sqnr_db_vs_fp_model``/``cosine_vs_fp_model`` compare the quantized tensor with the same site of
    ``fp_model`` on the same images, so they include the error accumulated upstream.
    ``kind`` is ``weight`` for linear weights (w_bits) and ``activation`` for everything quantized with
    a_bits (A, D and, with ``quantize_state``, the scan states h, per step).
    Columns: ``site, layer, direction, tensor, kind, bits, sqnr_db, cosine, sqnr_db_vs_fp_model,
    cosine_vs_fp_model``. ``attrs["step_sqnr_db"]``: site → the quantizer's SQNR per time-step, a tuple (in its scan
    direction's order), for the activations that have time-steps (not weights, A, D or h). Sums run over all
    images; the FP tensors of one batch at every site are held at once, so lower ``batch_size`` for large models.
    """
    expect(qmodel, QuantizedVim, "error_report's qmodel (what quantize() returns)")
    stored = site_quantizers(qmodel)
    order = [site.name for site in quantized_sites(vim_of(qmodel), include_states=True)]
    quantizers = {name: stored[name] for name in order if name in stored}
    watched = set(quantizers)
    local: dict[str, ErrorSums] = {name: ErrorSums() for name in quantizers}
    end_to_end: dict[str, ErrorSums] = {name: ErrorSums() for name in quantizers}
    steps = {name: StepErrorSums() for name in quantizers
             if not is_static(name) and parse_site(name).tensor != STATE}
    reference: dict[str, torch.Tensor] = {}
    states = any(parse_site(name).tensor == STATE for name in quantizers)

    def observe(site: Site, x: torch.Tensor, xq: torch.Tensor) -> None:
        smoothed = getattr(quantizers[site.name], "smoothed", lambda t: t)
        local[site.name].add(smoothed(x), xq)
        end_to_end[site.name].add(smoothed(reference[site.name]), xq)
        if site.name in steps:
            steps[site.name].add(smoothed(x), xq)

    def observe_state(site: Site, step: int, h: torch.Tensor, hq: torch.Tensor) -> None:
        local[site.name].add(h, hq)
        end_to_end[site.name].add(reference[site.name][:, step], hq)

    for batch in batches(images, batch_size):
        reference = capture(fp_model, batch, watched, record_states=states)
        run_probe(qmodel, batch, watched, observe, state_callback=observe_state)
    rows = []
    for name in quantizers:  # forward order
        site = parse_site(name)
        weight = site.tensor.endswith(".weight")
        config = qmodel.config.for_site(name)
        rows.append({
            **site_columns(site),
            "kind": "weight" if weight else "activation",
            "bits": None if config is None else (config.w_bits if weight else config.a_bits),
            "sqnr_db": local[name].sqnr_db,
            "cosine": local[name].cosine,
            "sqnr_db_vs_fp_model": end_to_end[name].sqnr_db,
            "cosine_vs_fp_model": end_to_end[name].cosine,
        })
    frame = pd.DataFrame(rows)
    # tuples, not arrays: pandas compares attrs with == when it prints, concatenates or merges frames
    frame.attrs["step_sqnr_db"] = {name: tuple(sums.sqnr_db.tolist()) for name, sums in steps.items()}
    return frame


def _block_outputs(model: nn.Module, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mixer output, residual stream after the block) of every block of ``model`` for ``images``."""
    vim = vim_of(model)
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_module: nn.Module, _inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        mixer_out, residual = output
        outputs.append((mixer_out.detach().float(), residual.detach() + mixer_out.detach().float()))

    handles = [block.register_forward_hook(hook) for block in vim.layers]
    try:
        with torch.no_grad(), eval_mode(model):
            model(images.to(model_device(vim)))
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def layer_output_error(fp_model: nn.Module, qmodel: nn.Module, images: torch.Tensor,
                       batch_size: int | None = 16) -> pd.DataFrame:
    """Per block: how far the quantized model's hidden state drifts from the FP model's after that block.

    ``sqnr_db``/``cosine`` compare the residual stream after the block (what the next block normalises);
    ``mixer_sqnr_db``/``mixer_cosine`` the block's mixer output alone. Columns: ``layer, sqnr_db, cosine,
    mixer_sqnr_db, mixer_cosine``.
    """
    depth = len(vim_of(fp_model).layers)
    stream = [ErrorSums() for _ in range(depth)]
    mixer = [ErrorSums() for _ in range(depth)]
    for batch in batches(images, batch_size):
        fp_outputs, q_outputs = _block_outputs(fp_model, batch), _block_outputs(qmodel, batch)
        for layer, ((fp_mix, fp_stream), (q_mix, q_stream)) in enumerate(zip(fp_outputs, q_outputs, strict=True)):
            stream[layer].add(fp_stream, q_stream)
            mixer[layer].add(fp_mix, q_mix)
    return pd.DataFrame([{"layer": layer, "sqnr_db": stream[layer].sqnr_db, "cosine": stream[layer].cosine,
                          "mixer_sqnr_db": mixer[layer].sqnr_db, "mixer_cosine": mixer[layer].cosine}
                         for layer in range(depth)])

