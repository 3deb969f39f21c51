"""The Quantize tab's sweep of OuroMamba's two outlier knobs, k and n_refresh, on held-out validation images:
for each pair, top-1 against FP32 and the share of activation channels kept at 8 bits (what the outlier path
costs). The work is ``core.experiments.threshold_sweep``; this module parses, runs and draws."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from app.common import (
    K_RANGE,
    RecentResults,
    Run,
    download_file,
    error,
    on_engine,
    seed_of,
    stopped,
    typed_path,
    whole_in_range,
    wire_run,
)
from core.data import calibration_images, load_validation
from core.errors import StudioError
from core.eval import Cancelled, EvalResult, evaluate
from core.experiments import threshold_sweep
from core.quant import QuantConfig, ReconstructionConfig
from core.records import provenance
from core.workspace import Workspace, architecture, fits_fashion_mnist

MAX_POINTS = 30  # a point takes ~5 s plus ~3 s per 1,000 images on 2 CPU cores (default model)
MAX_VALIDATION = 5000
KEPT_SWEEPS = 16
SHARE_IMAGES = 256  # the 8-bit channel share is measured on the first of the validation images
EXPLAIN = """\
**Choose k and n_refresh on validation images.** Each (k, n_refresh) pair calibrates OuroMamba anew with the
bit-widths, calibration images and seed above (no reconstruction, so a point takes seconds) and is scored on
Fashion-MNIST's held-out validation images (the last 5,000 training images, never the test set). The plot shows
what each pair costs: the share of a token's activation channels kept at 8 bits, i.e. the part of every
activation GEMM that runs on the outlier path. Lower k and longer windows keep more channels at 8 bits."""


def parse_values(name: str, text: str | None, kind: type, low: float, high: float) -> list:
    """'2, 2.5, 3' → [2.0, 2.5, 3.0]: distinct values, each from ``low`` to ``high``, in the order typed; a
    one-line StudioError otherwise (NaN and infinities included)."""
    try:
        values = list(dict.fromkeys(kind(part) for part in (text or "").replace(",", " ").split()))
    except ValueError:
        raise StudioError(f"{name}: type numbers separated by commas, like '2, 3, 4' (got {text!r})") from None
    if not values:
        raise StudioError(f"{name}: give at least one value")
    if not all(low <= value <= high for value in values):
        raise StudioError(f"{name} must each be from {low:g} to {high:g} (got {text!r})")
    return values


def sweep_figure(frame: pd.DataFrame) -> go.Figure:
    """Top-1 change against the 8-bit channel share, one line per n_refresh through its k values."""
    figure = go.Figure()
    for n_refresh, points in frame.groupby("n_refresh", sort=True):
        points = points.sort_values("k")
        figure.add_scatter(x=points["outlier_share_pct"], y=points["delta_vs_fp"], mode="lines+markers+text",
                           name=f"n_refresh {n_refresh}", text=[f"k {k:g}" for k in points["k"]],
                           textposition="top center", marker={"size": 9},
                           hovertemplate="k %{text}<br>8-bit share %{x:.2f} %<br>Δ top-1 %{y:+.2f}<extra></extra>")
    figure.update_layout(title="Accuracy against the outlier path's share (validation images)", height=420,
                         xaxis_title="channels kept at 8 bits, per token (%)",
                         yaxis_title="top-1 change vs FP32 (points)", margin={"l": 60, "r": 10, "t": 50, "b": 50})
    return figure


def sweep_json(folder: Path, header: dict, frame: pd.DataFrame) -> Path:
    """The sweep's points with what reproduces them (model, config, calibration, images, hardware, versions, date)
    as one JSON file, named by its settings (written beside and renamed: the page may be fetching the last one)."""
    settings = {key: value for key, value in header.items() if key not in ("versions", "date")}
    return download_file(folder, "sweep", ".json", sorted(settings.items()),
                         json.dumps({**header, "points": frame.to_dict("records")}, indent=2) + "\n")


def build_sweep_section(workspace: gr.State, w_bits: gr.Radio, a_bits: gr.Radio, calib_source: gr.Dropdown,
                        calib_count: gr.Number, seed: gr.Number, max_calib: int) -> None:
    """The section, under the Quantize tab's controls it reads (``max_calib``: the tab's limit on
    calibration images)."""
    kept = RecentResults[tuple[str, pd.DataFrame, str]](KEPT_SWEEPS)
    json_folder = Path(tempfile.mkdtemp(prefix="ouromamba-sweeps-"))

    def sweep(ws: Workspace, w: int, a: int, source: str, count: float | None, seed_value: float | None,
              ks_text: str, refresh_text: str, images: float | None, run: Run | None,
              progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 (gradio's hook)
        """Every (k, n_refresh) pair of this session's model, scored on the first N validation images."""
        run = run or Run()  # API calls come without a tab, hence without an armed run
        try:
            if not fits_fashion_mnist(ws.model.cfg):
                raise StudioError(f"the sweep scores on Fashion-MNIST's validation images, and this model "
                                  f"({architecture(ws.model.cfg)}) does not read them")
            ks = parse_values("k values", ks_text, float, *K_RANGE)
            refreshes = parse_values("n_refresh values", refresh_text, int, 1, ws.model.cfg.seq_len)
            if len(ks) * len(refreshes) > MAX_POINTS:
                raise StudioError(f"{len(ks)} k × {len(refreshes)} n_refresh values make "
                                  f"{len(ks) * len(refreshes)} points; at most {MAX_POINTS}")
            count = whole_in_range("calibration images", count, 1, max_calib)
            images = whole_in_range("validation images", images, 1, MAX_VALIDATION)
            seed = seed_of(seed_value)
            if not (source := typed_path(source)):
                raise StudioError("the calibration source (above) needs a value")
            key = json.dumps([ws.fingerprint, w, a, source, count, seed, ks, refreshes, images])
            if (earlier := kept.get(key)) is not None:
                status, frame, saved = earlier
                return f"{status} Cached: swept earlier with the same settings.", sweep_figure(frame), frame, saved
            base = QuantConfig(w_bits=int(w), a_bits=int(a), reconstruction=ReconstructionConfig(
                epochs=0, seed=seed))

            def work() -> tuple[EvalResult, list[dict]]:
                validation = load_validation().subset(images)
                progress(0, desc="FP32 on the validation images")
                fp = evaluate(ws.model, validation, cancel=run.cancel)
                cfg = ws.model.cfg
                calib = calibration_images(source, count, seed, cfg.img_size, cfg.in_chans)
                progress((0, len(ks) * len(refreshes)), desc="Sweeping", unit="points")
                return fp, threshold_sweep(ws.model, base, calib, validation, ks, refreshes, fp.top1, SHARE_IMAGES,
                                           progress=lambda done, total: progress((done, total), desc="Sweeping",
                                                                                 unit="points"),
                                           cancel=run.cancel, eval_batch_size=100)

            fp, rows = on_engine(work, progress, run.cancel)
        except Cancelled as err:
            return stopped(err), gr.skip(), gr.skip(), gr.skip()
        except StudioError as err:
            return error(err), gr.skip(), gr.skip(), gr.skip()
        finally:
            run.done = True
        frame = pd.DataFrame(rows)
        standard_error = 100 * (fp.top1 / 100 * (1 - fp.top1 / 100) / fp.total) ** 0.5
        status = (f"W{w}A{a}O8 on the first {fp.total:,} validation images (FP32 {fp.top1:.2f} %), calibrated on "
                  f"{count} {source} images, seed {seed}, no reconstruction; 8-bit shares on the first "
                  f"{min(SHARE_IMAGES, fp.total)} of them; {fp.device}. A top-1 on {fp.total:,} images is uncertain by "
                  f"about ±{standard_error:.1f} points (one binomial standard error): smaller differences may be "
                  "noise.")
        header = {**ws.provenance(), "setting": f"W{w}A{a}O8", "base_config": base.to_dict(),
                  "calibration": {"source": source, "images": count, "seed": seed},
                  "validation_images": fp.total, "fp_top1": round(fp.top1, 2),
                  "outlier_images": min(SHARE_IMAGES, fp.total), "hardware": fp.device, **provenance()}
        saved = str(sweep_json(json_folder, header, frame))  # gradio's File takes a str
        kept.put(key, (status, frame, saved))
        return status, sweep_figure(frame), frame, saved

    with gr.Accordion("Sweep k × n_refresh on validation images", open=False, elem_id="sweep"):
        gr.Markdown(EXPLAIN)
        with gr.Row(equal_height=True):
            ks = gr.Textbox("2, 3, 4", label="k values", elem_id="sweep-k", scale=2)
            refreshes = gr.Textbox("5, 10, 25", label="n_refresh values", elem_id="sweep-n-refresh", scale=2)
            images = gr.Number(1000, label="Validation images", elem_id="sweep-images",
                               info=f"1 to {MAX_VALIDATION:,}", scale=2)
            run_button = gr.Button("Sweep", variant="primary", elem_id="sweep-run", scale=1)
            cancel_button = gr.Button("Cancel", variant="stop", elem_id="sweep-cancel", scale=1)
        status = gr.Markdown("Pick the values and press **Sweep**.", elem_id="sweep-status")
        plot = gr.Plot(label="Accuracy against the outlier path", elem_id="sweep-plot")
        table = gr.Dataframe(label="Points", interactive=False, elem_id="sweep-table")
        saved = gr.File(label="The points with their provenance (JSON)", elem_id="sweep-json")
    wire_run(run_button, cancel_button, gr.State(), sweep,
             [workspace, w_bits, a_bits, calib_source, calib_count, seed, ks, refreshes, images],
             [status, plot, table, saved], "sweep")
    workspace.change(lambda _: ("Pick the values and press **Sweep**.", None, None, None), workspace,
                     [status, plot, table, saved], api_visibility="private", concurrency_limit=None)
