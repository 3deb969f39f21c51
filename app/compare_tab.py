"""The Compare tab: every logged run (this session's and earlier ones, from the run log the Quantize tab
appends to) as a table, accuracy and latency figures, CSV / JSON / standalone HTML downloads and the packed
models; and two runs side by side quantizer by quantizer: the difference of their per-site SQNR (the records'
``site_errors``), which shows where one method keeps the precision the other loses."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go

from app.common import error
from core.error_figures import DEFAULT_METRIC, METRICS, sqnr_difference_heatmap
from core.errors import StudioError
from core.experiments import RunRecord, load_records, site_errors_frame, write_records
from core.report import FAKE_QUANT_NOTE, accuracy_figure, latency_figure, run_label, runs_frame, write_report

NO_PAIR = "Two runs that measured their per-site SQNR are needed: quantize twice in the **Quantize** tab."


def measured_runs(records: list[RunRecord]) -> list[tuple[str, int]]:
    """(label, position in the log) of every run whose record carries per-site errors, newest first."""
    return [(run_label(i, r), i) for i, r in enumerate(records) if r.site_errors.get("rows")][::-1]


def kept_pair(choices: list[tuple[str, int]], first: int | None, second: int | None) -> tuple[int | None, int | None]:
    """The pair to show from ``choices`` (``measured_runs``): the one picked, while both runs are still listed and
    differ (Refresh used to drop a person's pick), else the two newest, B the newest; (None, None) below two."""
    listed = {i for _, i in choices}
    if first in listed and second in listed and first != second:
        return first, second
    if len(choices) < 2:
        return None, None
    return choices[1][1], choices[0][1]


def pair_figure(records: list[RunRecord] | None, first: int | None, second: int | None,
                metric: str) -> tuple[go.Figure | None, str]:
    """The second run's SQNR minus the first's per layer and tensor, and a one-line status."""
    count = len(records or [])
    if first is None or second is None or not (0 <= first < count and 0 <= second < count):
        return None, NO_PAIR
    if first == second:
        return None, error(StudioError("run A and run B are the same run: pick two different runs"))
    frames = [site_errors_frame(records[i]) for i in (first, second)]
    if any(frame is None for frame in frames):
        return None, NO_PAIR
    labels = [run_label(i, records[i]) for i in (first, second)]
    figure = sqnr_difference_heatmap(*frames, *labels, METRICS.get(metric, "sqnr_db"))
    if figure is None:
        return None, error(StudioError(f"{labels[0]} and {labels[1]} share no quantized site: different models"))
    images = {records[i].site_errors["images"] for i in (first, second)}
    data = {records[i].data for i in (first, second)}
    note = "" if len(images) == 1 and len(data) == 1 else (
        " **Measured on different images**, so part of the difference is the images': "
        + "; ".join(f"{label}: first {records[i].site_errors['images']} of {records[i].data}"
                    for label, i in zip(labels, (first, second), strict=True)) + ".")
    return figure, (f"{labels[1]} against {labels[0]}: each quantizer's SQNR on the first {max(images)} test "
                    f"images.{note}")


def build_compare_tab(runs: Path, updated: gr.JSON) -> None:
    """The Compare tab, refreshed on page load, on Refresh and whenever ``updated`` (the Quantize tab's record)
    changes."""

    def show(first: int | None = None, second: int | None = None, metric: str = DEFAULT_METRIC) -> tuple:
        """Status, table, accuracy and latency figures, the CSV / JSON / HTML files of every logged run, the
        packed models, and the pair (``kept_pair``) with its SQNR ``metric``."""
        empty = (runs_frame([]), None, None, None, None, None, None, gr.update(choices=[], value=None),
                 gr.update(choices=[], value=None), gr.skip(), None, NO_PAIR, [])
        try:
            records = load_records(runs)
        except StudioError as err:
            return error(err), *empty
        if not records:
            return f"No runs logged in `{runs}` yet: quantize once in the **Quantize** tab.", *empty
        folder = Path(tempfile.mkdtemp(prefix="ouromamba-runs-"))
        csv_path, json_path = write_records(records, folder, "ouromamba_runs")
        html_path = write_report(records, folder / "ouromamba_runs.html")
        status = (f"{len(records)} run(s) from `{runs}` (this session's and earlier ones); Δ vs FP compares with FP32 "
                  f"on the same test images. {FAKE_QUANT_NOTE}")
        models = [r.quantized_model for r in records if r.quantized_model and Path(r.quantized_model).is_file()]
        choices = measured_runs(records)
        first, second = kept_pair(choices, first, second)
        metric = metric if metric in METRICS else DEFAULT_METRIC
        figure, pair_status = pair_figure(records, first, second, metric)
        return (status, runs_frame(records), accuracy_figure(records), latency_figure(records), str(csv_path),
                str(json_path), str(html_path), models or None, gr.update(choices=choices, value=first),
                gr.update(choices=choices, value=second), gr.update(value=metric), figure, pair_status,
                records)

    gr.Markdown("## Compare runs")
    with gr.Row():
        status = gr.Markdown(elem_id="compare-status")
        refresh = gr.Button("Refresh", elem_id="compare-refresh", scale=0)
    table = gr.Dataframe(label="Runs", interactive=False, wrap=True, elem_id="compare-table")
    with gr.Row():
        accuracy = gr.Plot(label="Accuracy vs bits", elem_id="compare-accuracy")
        latency = gr.Plot(label="Latency (CPU fake-quant, and GPU kernels where measured)", elem_id="compare-latency")
    with gr.Row():
        csv_file = gr.File(label="All runs (CSV)", elem_id="compare-csv")
        json_file = gr.File(label="All runs (JSON)", elem_id="compare-json")
        html_file = gr.File(label="Standalone HTML report", elem_id="compare-html")
    model_files = gr.File(label="Quantized models (packed safetensors, one per run that could be packed)",
                          file_count="multiple", elem_id="compare-models")
    gr.Markdown("### Two runs, quantizer by quantizer")
    with gr.Row():
        first = gr.Dropdown([], label="Run A", elem_id="compare-first")
        second = gr.Dropdown([], label="Run B", elem_id="compare-second")
        metric = gr.Radio(list(METRICS), value=DEFAULT_METRIC, label="SQNR", elem_id="compare-metric")
    pair_status = gr.Markdown(NO_PAIR, elem_id="compare-pair-status")
    pair = gr.Plot(label="SQNR of B minus A", elem_id="compare-pair")
    records = gr.State([])
    outputs = [status, table, accuracy, latency, csv_file, json_file, html_file, model_files, first, second, metric,
               pair, pair_status, records]
    # reading the log is quick: never queue it behind a running quantization. A new run shows itself against the
    # run before it; Refresh keeps the pair and the SQNR a person picked
    gr.on([updated.change], show, None, outputs, api_name="compare", concurrency_limit=None)
    refresh.click(show, [first, second, metric], outputs, api_visibility="private", concurrency_limit=None)
    gr.on(None, show, None, outputs, api_visibility="private", concurrency_limit=None)  # on page load
    gr.on([first.input, second.input, metric.input], pair_figure, [records, first, second, metric],
          [pair, pair_status], api_visibility="private", concurrency_limit=None)
