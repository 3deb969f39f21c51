"""Quantization runs side by side: a table, accuracy-vs-bits and latency figures, and a standalone HTML report.

The app's Compare tab shows the same table and figures the report embeds, so a downloaded report is what
was on screen. Every row keeps its provenance (config, calibration, versions, date).
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from core.error_figures import diagram_with_layer_menu, sqnr_heatmap
from core.errors import StudioError
from core.experiments import RunRecord, lowest_sqnr_text, run_label, scored_on, site_errors_frame
from core.records import utc_now, versions, write_replacing

SITE_ERROR_RUNS = 12  # the newest runs whose per-site errors a report draws (two figures each)
FAKE_QUANT_NOTE = ("Fake-quant timings: quantizers are simulated in floating point, so these times show the "
                   "simulation's cost on the hardware named, not the speed of integer kernels.")


def _calibration(record: RunRecord) -> str:
    calib = record.calibration
    return f"{calib.get('source')} × {calib.get('images')}, seed {calib.get('seed')}"


def _ms_per_image(record: RunRecord) -> float:
    return round(1000 * record.eval_seconds / max(record.test_images, 1), 3)


def runs_frame(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run, with everything needed to reproduce its numbers (the config as compact JSON). The
    columns people compare come first (the run's label names its method and setting), so a narrow table still
    shows them; provenance follows."""
    return pd.DataFrame([{
        "run": run_label(index, r), "top-1 (%)": r.top1, "Δ vs FP": r.delta_vs_fp, "FP top-1 (%)": r.fp_top1,
        "test images": r.test_images, "lowest SQNR": lowest_sqnr_text(r), "calibration": _calibration(r),
        "eval ms / image": _ms_per_image(r),
        "hardware": r.hardware, "method": r.method, "setting": r.setting, "model": r.model, "data": r.data or None,
        "calibration time (s)": r.calibration_seconds, "date": r.date,
        "versions": ", ".join(f"{k} {v}" for k, v in r.versions.items()), "checkpoint": r.checkpoint or None,
        "config": json.dumps(r.config, separators=(",", ":")), "quantized model": r.quantized_model or None,
    } for index, r in enumerate(records)], columns=RUN_COLUMNS)


RUN_COLUMNS = ["run", "top-1 (%)", "Δ vs FP", "FP top-1 (%)", "test images", "lowest SQNR", "calibration",
               "eval ms / image", "hardware", "method", "setting", "model", "data", "calibration time (s)", "date",
               "versions", "checkpoint", "config", "quantized model"]


def _series(record: RunRecord, several_models: bool, several_splits: bool) -> str:
    """Runs of one method and outlier precision share a marker series (overrides are marked apart), per model
    and per set of scoring images when the runs have several: their accuracies are not comparable."""
    outliers = record.setting.partition("O")[2]
    overrides = " + overrides" if record.config.get("overrides") else ""
    model = f"{record.model}: " if several_models else ""
    split = f" on {scored_on(record)}" if several_splits else ""
    return model + record.method + (f" O{outliers}" if outliers else "") + overrides + split


def reference_corner(index: int, count: int) -> str:
    """Where the label of the ``index``-th lowest of ``count`` FP32 lines goes: the lower half's below their
    lines, the upper half's above, sides alternating, so that lines a hair apart (FP32 on 15 and on 40 images)
    push their labels apart instead of onto each other."""
    return f"{'top' if index >= count // 2 else 'bottom'} {'left' if index % 2 else 'right'}"


def accuracy_figure(records: list[RunRecord]) -> go.Figure:
    """Top-1 per weight/activation bit-width, one marker series per method, FP32 as dashed lines."""
    bits = {(r.config.get("a_bits"), r.config.get("w_bits")) for r in records}
    order = [f"W{w}A{a}" for a, w in sorted(bits)]
    figure = go.Figure()
    series: dict[str, list[tuple[int, RunRecord]]] = {}
    several_models, several_splits = (len({key(r) for r in records}) > 1 for key in (lambda r: r.model, scored_on))
    for index, record in enumerate(records):
        series.setdefault(_series(record, several_models, several_splits), []).append((index, record))
    for name, runs in series.items():
        figure.add_scatter(
            x=[r.setting.partition("O")[0] for _, r in runs], y=[r.top1 for _, r in runs],
            mode="markers", name=name, marker={"size": 11},
            text=[f"{run_label(i, r)}<br>calibration {_calibration(r)}<br>Δ vs FP {r.delta_vs_fp:+.2f} on "
                  f"{r.test_images} images of {scored_on(r)}<br>{r.date}" for i, r in runs],
            hovertemplate="%{text}<br>top-1 %{y:.2f} %<extra></extra>")
    references = sorted({(r.fp_top1, r.test_images, scored_on(r)) for r in records})
    for index, (fp_top1, images, split) in enumerate(references):
        figure.add_hline(y=fp_top1, line_dash="dash", line_color="gray",
                         annotation_text=f"FP32 {fp_top1:.2f} % ({images} images of {split})",
                         annotation_position=reference_corner(index, len(references)))
    figure.update_xaxes(categoryorder="array", categoryarray=order, title="bit-widths (weights W, activations A)")
    figure.update_layout(title="Top-1 accuracy vs bit-width", yaxis_title="top-1 (%)", height=420,
                         margin={"l": 50, "r": 10, "t": 50, "b": 50})
    return figure


def latency_figure(records: list[RunRecord]) -> go.Figure:
    """Evaluation time per test image of every run, coloured by the hardware that measured it."""
    figure = go.Figure()
    by_hardware: dict[str, list[tuple[int, RunRecord]]] = {}
    for index, record in enumerate(records):
        by_hardware.setdefault(record.hardware, []).append((index, record))
    for hardware, runs in by_hardware.items():
        kind = "CPU fake-quant" if hardware.startswith("CPU") else "GPU fake-quant"
        figure.add_bar(x=[run_label(i, r) for i, r in runs], y=[_ms_per_image(r) for _, r in runs],
                       name=f"{kind} timing: {hardware}",
                       hovertemplate="%{x}<br>%{y:.3f} ms per image<extra>" + html.escape(hardware) + "</extra>")
    kernel_runs = [(i, r) for i, r in enumerate(records) if r.kernel_latency]
    for variant, label in (("fp16", "FP16 model"), ("packed", "packed integer model (Triton kernels)"),
                           ("fp16_graph", "FP16 model, CUDA graph"),
                           ("packed_graph", "packed integer model, CUDA graph")):
        runs = [(i, r) for i, r in kernel_runs if f"{variant}_ms" in r.kernel_latency]
        if runs:
            # which FP16 forward was timed: runs before FusedVim timed the model's own (no record key then)
            paths = [r.kernel_latency.get("fp16_model", "the model's own forward") if variant.startswith("fp16")
                     else "Triton kernels" for _, r in runs]
            figure.add_bar(x=[run_label(i, r) for i, r in runs],
                           y=[r.kernel_latency[f"{variant}_ms"] / r.kernel_latency["batch"] for _, r in runs],
                           name=f"{label}, batch {runs[0][1].kernel_latency['batch']}: "
                                f"{runs[0][1].kernel_latency['hardware']}",
                           customdata=paths,
                           hovertemplate="%{x}<br>%{y:.4f} ms per image (%{customdata})<extra>" + label + "</extra>")
    cpu_only = all(r.hardware.startswith("CPU") for r in records) and not kernel_runs
    kernels = "; GPU kernel timings where measured" if kernel_runs else ""
    figure.update_layout(
        title=("CPU fake-quant timings: " if cpu_only else "Fake-quant timings: ") + "evaluation ms per test image"
        + kernels,
        yaxis_title="ms per image", height=380, legend={"orientation": "h", "y": -0.3},
        margin={"l": 50, "r": 10, "t": 50, "b": 50})
    return figure


def html_report(records: list[RunRecord], title: str = "OuroMamba Studio: quantization runs") -> str:
    """A single HTML page (plotly.js inlined: opens with no server and no network) with the figures, the
    table and every full record."""
    if not records:
        raise StudioError("no runs to report yet: quantize at least once")
    table = runs_frame(records).to_html(index=False, escape=True, border=0, classes="runs")
    accuracy = accuracy_figure(records).to_html(full_html=False, include_plotlyjs=True)
    latency = latency_figure(records).to_html(full_html=False, include_plotlyjs=False)
    made = ", ".join(f"{k} {v}" for k, v in versions().items())
    errors = site_error_sections(records)
    full = html.escape(json.dumps([asdict(r) for r in records], indent=2))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table.runs {{ border-collapse: collapse; font-size: 0.85em; }}
table.runs th, table.runs td {{ border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: left; }}
td:nth-last-child(-n+2) {{ font-family: monospace; min-width: 24em; max-width: 40em; word-break: break-all; }}
div.scrolls {{ overflow-x: auto; }}  /* a wide table scrolls in place; the page keeps the window's width */
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p>{len(records)} run(s). Report made {utc_now()} with {html.escape(made)}. Each row carries its own config,
calibration (source × images, seed), test images, hardware, software versions and date.</p>
<h2>Accuracy</h2>
{accuracy}
<h2>Latency</h2>
<p>{html.escape(FAKE_QUANT_NOTE)}</p>
{latency}
{errors}
<h2>Runs</h2>
<div class="scrolls">{table}</div>
<details><summary>Full records (JSON)</summary><pre>{full}</pre></details>
</body>
</html>
"""


def site_error_sections(records: list[RunRecord]) -> str:
    """HTML of the newest ``SITE_ERROR_RUNS`` runs with per-site errors: each run's SQNR heatmap and its block
    diagram with a layer menu ('' when no run measured them)."""
    measured = [(i, r) for i, r in enumerate(records) if r.site_errors.get("rows")][::-1][:SITE_ERROR_RUNS]
    if not measured:
        return ""
    parts = ["<h2>Where each run loses precision</h2>",
             f"<p>Every quantizer's SQNR, the newest {len(measured)} run(s) that measured it (of {len(records)}); "
             "the block diagram opens on the run's lowest SQNR, its menu shows the other layers.</p>"]
    for index, record in measured:
        frame = site_errors_frame(record)
        images = record.site_errors["images"]
        parts += [f"<h3>{html.escape(run_label(index, record))}: top-1 {record.top1:.2f} % "
                  f"(Δ {record.delta_vs_fp:+.2f}) on {record.test_images:,} images of "
                  f"{html.escape(scored_on(record))}</h3>",
                  sqnr_heatmap(frame, images, f"images of {scored_on(record)}").to_html(full_html=False,
                                                                                         include_plotlyjs=False),
                  diagram_with_layer_menu(frame).to_html(full_html=False, include_plotlyjs=False)]
    return "\n".join(parts)


def write_report(records: list[RunRecord], path: str | Path,
                 title: str = "OuroMamba Studio: quantization runs") -> Path:
    if not isinstance(records, list | tuple) or not all(isinstance(r, RunRecord) for r in records):
        raise StudioError("write_report takes a list of RunRecords (read_records gives one), got "
                          f"{type(records).__name__}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_replacing(path, html_report(records, title))
    except OSError as err:
        raise StudioError(f"could not write the report to '{path}' ({err.strerror or err})") from None
    return path
