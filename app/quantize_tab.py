"""The Quantize tab: one configuration, top-1 vs FP, per-site SQNR, layer sensitivity, changed predictions.
Every fresh run is appended to the run log (a JSON-lines file) that the Compare tab (app/compare_tab.py) reads.
Wiring::

    runs = runs_file()
    with gr.Tab("Quantize", id="quantize"):
        record = build_quantize_tab(workspace, startup, runs)
    with gr.Tab("Compare", id="compare"):
        build_compare_tab(runs, record)

Layer sensitivity reuses the run's calibrated quantizers, switching on one layer at a time
(``core.observe.run_layer_sensitivity``: one evaluation per layer on the first 200 test images, seconds on the
default model); recalibrating each layer alone (``layer_sensitivity``) would cost depth calibrations.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from app.common import (
    K_RANGE,
    RecentResults,
    Run,
    calibration_dropdown,
    calibration_source,
    cell,
    count_for_source,
    default_calibration,
    error,
    in_range,
    on_engine,
    seed_of,
    stopped,
    whole_in_range,
    wire_run,
    zoom,
)
from app.model_tab import BATCH_SIZE, KEPT_EVALUATIONS, count_box
from app.site_errors_section import build_site_errors_section
from app.sweep_section import build_sweep_section
from core.data import LabelledImages
from core.error_figures import sqnr_heatmap
from core.errors import StudioError
from core.eval import Cancelled, EvalResult, evaluate
from core.experiments import (
    RunRecord,
    append_record,
    kernel_latency,
    lowest_site,
    quantize_and_evaluate,
    site_errors_frame,
)
from core.gen import to_pixels
from core.observe import WeightGridView, run_layer_sensitivity, suggest_precision, weight_grids
from core.quant import METHODS, QuantConfig, QuantizedVim, ReconstructionConfig, quantized_sites
from core.quant.config import parse_overrides, set_override, unmatched_patterns
from core.quant.packed import PackedVim, pack, save_packed
from core.report import FAKE_QUANT_NOTE
from core.workspace import Workspace

RUNS_DIR_ENV = "OUROMAMBA_RUNS_DIR"
DEFAULT_RUNS_DIR = Path(__file__).resolve().parent.parent / "results" / "app_runs"
RUNS_FILE = "runs.jsonl"
KERNEL_BATCH = 64  # test images per timed forward pass of the GPU kernel comparison
MODELS_FOLDER = "models"  # beside the run log: the packed integer model of every run that can be packed
MAX_CALIB, MAX_EPOCHS = 1024, 100
SENSITIVITY_IMAGES = 200  # one evaluation per layer: ~1.5 s per layer of the default model on 2 CPU cores
MAX_GALLERY = 48
KEPT_RUNS = 32  # finished runs kept for repeated requests: figures and a gallery each, a few MB at most
EXAMPLE_OVERRIDES = '{"layers.0.*": {"w_bits": 8}}'
READY = ("Choose a configuration and press **Quantize**. On 2 CPU cores, with the default model, 128 calibration "
         "images, 10 reconstruction epochs and 1,000 test images take about 40 s, all 10,000 about 1½ minutes (the "
         "bar moves once per reconstructed block); 0 epochs and 8 images take seconds.")


def runs_file() -> Path:
    """The run log: ``$OUROMAMBA_RUNS_DIR/runs.jsonl``, else ``results/app_runs/runs.jsonl`` of the repository."""
    return Path(os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR) / RUNS_FILE


def save_integer_model(qmodel: QuantizedVim, record: RunRecord, runs: Path) -> tuple[str, PackedVim | None]:
    """Pack a run's quantized model into integer codes + scales and save it beside the run log (its path goes
    into the record). Returns what to tell the user (including why a configuration cannot be packed) and the
    packed model, or None."""
    stem = "_".join([record.date.replace(":", "").replace("-", "")[:15], record.method, record.setting,
                     hashlib.sha256(json.dumps(record.config, sort_keys=True).encode()).hexdigest()[:8]])
    try:
        packed = pack(qmodel)
        path = save_packed(packed, runs.parent / MODELS_FOLDER / f"{stem}.safetensors")
    except StudioError as err:
        return f"No integer model to download: {err}.", None
    except OSError as err:
        return f"**The integer model was not saved:** {err}.", None
    record.quantized_model = str(path)
    return (f"Integer model (weight codes + scales, safetensors, {path.stat().st_size / 1e6:.2f} MB): download it "
            "below; `core.quant.packed.load_packed` reads it back."), packed


def gpu_kernel_note(ws: Workspace, packed: PackedVim | None, test: LabelledImages, record: RunRecord) -> str:
    """With CUDA present: FP16 vs the packed model's Triton kernels on one batch of test images, into the record.
    Without it nothing is timed (the CPU runs the kernels' float64 references: a check, not a speed)."""
    if packed is None or not torch.cuda.is_available():
        return ""
    images = test.normalized(0, min(KERNEL_BATCH, len(test)))
    try:
        record.kernel_latency = kernel_latency(ws.model, packed, images, "cuda")
    except (RuntimeError, StudioError) as err:  # a kernel that fails to build or run must not lose the run
        return f" GPU kernel timing failed: {str(err).splitlines()[0][:160]}."
    timing = record.kernel_latency
    fp16 = f"FP16 ({timing['fp16_model']})" if "fp16_model" in timing else "FP16"
    note = (f" On {timing['hardware']}, batch {timing['batch']}: {fp16} {timing['fp16_ms']:.2f} ms, packed integer "
            f"model {timing['packed_ms']:.2f} ms ({timing['fp16_ms'] / timing['packed_ms']:.2f}× FP16)")
    if "packed_graph_ms" in timing:
        note += (f"; as CUDA graphs (no launch overhead) {timing['fp16_graph_ms']:.2f} ms and "
                 f"{timing['packed_graph_ms']:.2f} ms ({timing['fp16_graph_ms'] / timing['packed_graph_ms']:.2f}×)")
    if "launches" in timing:  # the kernels' launch choices: timed per shape on the warm-up pass, or fixed rules
        note += f"; kernel launches {timing['launches']}"
    return note + "." + (f" {timing['graph_note']}." if "graph_note" in timing else "")


@dataclass
class Shown:
    """A finished run as the tab shows it; kept per configuration so that asking again is instant."""

    record: RunRecord
    figure: go.Figure
    report: pd.DataFrame  # the record's per-site errors as a frame: the heatmap's values, and the block diagram's
    sensitivity: go.Figure
    gallery: list[tuple[np.ndarray, str]]
    changed: int
    fixed: int
    broken: int
    saved: str
    model_note: str
    suggestion: dict[str, dict]  # overrides keeping the most sensitive layers at 8 bits ({}: none to suggest)
    weights: dict[str, WeightGridView]  # every quantized weight on its grid, by site
    top_k: list[dict]  # per gallery image, FP32's and the quantized model's most probable classes (top_k_items)


def sensitivity_figure(frame: pd.DataFrame, images: int) -> go.Figure:
    """Top-1 drop (points vs FP) with only one layer of the run quantized, per layer: where precision matters."""
    figure = go.Figure(go.Bar(x=[f"layer {layer}" for layer in frame["layer"]], y=frame["drop_vs_fp"].tolist(),
                              customdata=frame["top1"].tolist(),
                              hovertemplate="%{x}: top-1 %{customdata:.2f} % (drop %{y:.2f} points)<extra></extra>"))
    figure.update_layout(title=f"Layer sensitivity: top-1 drop with only that layer quantized (first {images} test "
                               f"images, FP32 {frame.attrs['fp_top1']:.2f} %)",
                         yaxis_title="drop vs FP32 (points)", height=320, margin={"l": 60, "r": 10, "t": 50, "b": 40})
    return figure


def weight_figure(weights: dict[str, WeightGridView] | None, site: str | None) -> go.Figure | None:
    """One weight matrix on its grid: its values in steps of their output channel's scale (log counts, the grid's
    ends), and per output channel its largest |W| in steps: above the grid's end it is clipped, well below it
    the channel uses few of its codes."""
    if not weights or site not in weights:
        return None
    view = weights[site]
    first, last = view.codes
    bits = int(np.log2(last + 1)) + 1
    figure = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.1,
                           subplot_titles=("values in steps of their output channel's scale",
                                           "largest |W| per output channel, in steps"))
    bins = view.histogram
    figure.add_bar(x=((bins["bin_left"] + bins["bin_right"]) / 2).tolist(), y=bins["count"].tolist(), name="weights",
                   width=float(bins["bin_right"].iloc[0] - bins["bin_left"].iloc[0]), row=1, col=1)
    floored, channels = view.channels[view.channels["floored"]], view.channels[~view.channels["floored"]]
    figure.add_scatter(x=channels["output_channel"].tolist(), y=channels["max_code"].tolist(), mode="markers",
                       name="output channels",
                       customdata=channels[["scale", "sqnr_db", "clipped"]].to_numpy(),
                       hovertemplate="channel %{x}: largest |W| %{y:.2f} steps<br>scale %{customdata[0]:.3g}, "
                                     "SQNR %{customdata[1]:.1f} dB, %{customdata[2]:.1%} clipped<extra></extra>",
                       row=1, col=2)
    if len(floored):  # on the grid's end: their real |W| / scale is in the millions
        figure.add_scatter(x=floored["output_channel"].tolist(), y=[last + 0.5] * len(floored), mode="markers",
                           name="scale at the floor", marker={"symbol": "x", "color": "red", "size": 9},
                           hovertemplate="channel %{x}: scale at the floor (reconstruction took it below zero), "
                                         "so every weight rounds to 0<extra></extra>", row=1, col=2)
    for edge in (first - 0.5, last + 0.5):
        figure.add_vline(x=edge, line={"color": "black", "width": 1, "dash": "dash"}, row=1, col=1)
    figure.add_hline(y=last + 0.5, line={"color": "black", "width": 1, "dash": "dash"}, row=1, col=2)
    figure.update_yaxes(type="log", dtick=1, title_text="weights", row=1, col=1)
    figure.update_yaxes(title_text="|W| / scale", rangemode="tozero", row=1, col=2)
    figure.update_xaxes(title_text="W / s_W (codes)", row=1, col=1)
    figure.update_xaxes(title_text="output channel", row=1, col=2)
    dead = (f"<br><sup>red ×: {len(floored)} channel(s) whose scale is at the floor round to 0</sup>"
            if len(floored) else "")
    figure.update_layout(title=f"{site}: {bits}-bit grid (codes {first}…{last}), SQNR {view.sqnr_db:.1f} dB, "
                               f"{view.clipped:.2%} of the weights clipped{dead}",
                         height=340, showlegend=False, margin={"l": 60, "r": 10, "t": 70, "b": 40})
    return figure


def changed_images(fp: list[int], quantized: list[int]) -> list[int]:
    """The test images whose predicted class changed, the first MAX_GALLERY: the gallery and its top-k charts."""
    return [i for i, (a, b) in enumerate(zip(fp, quantized, strict=True)) if a != b][:MAX_GALLERY]


def changed_gallery(test: LabelledImages, changed: list[int], fp: list[int], quantized: list[int],
                    workspace: Workspace) -> list[tuple[np.ndarray, str]]:
    """The ``changed`` test images, captioned true / FP / quantized class."""
    items = []
    for index in changed:
        pixels = to_pixels(test.normalized(index, index + 1))[0]
        classes = (int(test.labels[index]), fp[index], quantized[index])
        truth, before, after = (workspace.class_name(c) for c in classes)
        items.append((zoom(pixels), f"#{index} true {truth} · FP {before} → quantized {after}"))
    return items


def top_k_items(test: LabelledImages, changed: list[int], fp: EvalResult, quantized: EvalResult,
                workspace: Workspace) -> list[dict]:
    """Per ``changed`` image (the gallery's order), its true class and both models' most probable classes with
    their probabilities: what the gallery's selection shows side by side."""
    def named(top: list[tuple[int, float]]) -> list[tuple[str, float]]:
        return [(workspace.class_name(c), p) for c, p in top]
    return [{"index": i, "truth": workspace.class_name(int(test.labels[i])), "fp": named(fp.top(i)),
             "quantized": named(quantized.top(i))} for i in changed]


def top_k_figure(items: list[dict] | None, position: int = 0) -> go.Figure | None:
    """One changed test image's FP32 and quantized top classes side by side, the true class in green."""
    if not items or not 0 <= position < len(items):
        return None
    item = items[position]
    figure = make_subplots(rows=1, cols=2, subplot_titles=("FP32", "quantized"), horizontal_spacing=0.25)
    for col, key in enumerate(("fp", "quantized"), start=1):
        names, probabilities = zip(*reversed(item[key]), strict=True)  # most probable on top
        colours = ["#2ca02c" if name == item["truth"] else "#1f77b4" for name in names]
        figure.add_trace(go.Bar(x=probabilities, y=[f"{name} " for name in names], orientation="h",
                                marker_color=colours, text=[f"{p:.1%}" for p in probabilities],
                                textposition="auto", hovertemplate="%{y}: %{x:.2%}<extra></extra>"), row=1, col=col)
        figure.update_xaxes(title_text="probability", range=[0, 1], tickformat=".0%", row=1, col=col)
    figure.update_layout(title=f"Test image #{item['index']} (true class {item['truth']}): the most probable "
                               f"classes", height=300, showlegend=False, margin={"l": 10, "r": 10, "t": 70, "b": 40})
    return figure


def show_top_k(items: list[dict] | None, selected: gr.SelectData) -> go.Figure | None:
    """The changed gallery's selection: the chosen image's top classes under both models."""
    return top_k_figure(items, selected.index)


def lowest_sqnr_text(report: pd.DataFrame) -> str:
    """The run's weakest quantizer, alone and against the FP model, as the summary states it."""
    parts = []
    for column, what in (("sqnr_db", "alone"), ("sqnr_db_vs_fp_model", "against the FP model")):
        if (row := lowest_site(report, column)) is not None:
            parts.append(f"`{row['site']}` {round(row[column], 1) + 0.0:.1f} dB {what}")  # + 0.0: never "-0.0"
    if not parts:
        return "not measured"
    images = report.attrs.get("images")
    return "; ".join(parts) + (f" (first {images} test images; the block diagram below shows where)" if images else "")


def suggestion_text(suggestion: dict[str, dict], config: dict) -> str:
    """The mixed-precision suggestion as the summary shows it."""
    if config["w_bits"] >= 8 and config["a_bits"] >= 8:
        return "none: the run is already 8-bit"
    if not suggestion:
        return "none: no layer alone changes the FP predictions on the calibration images"
    raised = [pattern.split(".")[1] for pattern, change in suggestion.items()
              if config["overrides"].get(pattern) != change]
    return (f"keep layer{'s' if len(raised) > 1 else ''} {', '.join(raised)} at 8 bits, where quantizing one layer "
            f"alone changes the most FP predictions on the calibration images (labels and test images unused): "
            f"`{cell(json.dumps(suggestion))}`; **Use suggestion** puts it in Per-layer overrides")


def overrides_for(ws: Workspace, text: str | None) -> tuple[str, dict[str, dict]]:
    """The Per-layer overrides text kept for a newly loaded model, and the overrides taken out because their
    patterns match none of its sites (``layers.11.*`` on a 4-layer model). Text that is not valid JSON stays as
    typed: the next run says what is wrong with it."""
    try:
        overrides = parse_overrides(text or "")
    except StudioError:
        return text or "", {}
    gone = unmatched_patterns(overrides, [site.name for site in quantized_sites(ws.model, include_states=True)])
    if not gone:
        return text or "", {}
    kept = {pattern: change for pattern, change in overrides.items() if pattern not in gone}
    return json.dumps(kept) if kept else "", {pattern: overrides[pattern] for pattern in gone}


def _followers(overrides: dict[str, dict], pattern: str) -> set[str]:
    """The patterns after ``pattern``: the ones that win over it where both match."""
    order = list(overrides)
    return set(order[order.index(pattern) + 1:])


def overrides_from_record(record: dict | None, text: str | None) -> str:
    """The Per-layer overrides box with the shown run's suggestion added last, so that its layers win over broader
    patterns: what was typed or written by the site picker since the run stays (the box used to be replaced by
    the suggestion, losing it). The suggestion repeats the run's own overrides, so what it adds is a pattern that
    is new, changed, or moved after patterns it used to precede (``precision_suggestion`` puts a raised layer
    last); the rest is left as the box has it, so overrides taken out by hand stay out. The box is unchanged, with
    a note, when there is no suggestion or it is not valid JSON."""
    if not record or not record.get("suggested_overrides"):
        gr.Info("No suggestion to use: run Quantize first, or this run has none (its summary says why).")
        return gr.skip()
    try:
        overrides = parse_overrides(text or "")
    except StudioError as err:
        gr.Warning(f"Suggestion not added: {err}")
        return gr.skip()
    ran_with, suggested = record["config"]["overrides"], record["suggested_overrides"]
    for pattern, change in suggested.items():
        kept = ran_with.get(pattern) == change  # then it is the run's own, and ran_with has it
        if not kept or _followers(suggested, pattern) & set(ran_with) != _followers(ran_with, pattern):
            overrides = set_override(overrides, pattern, change)
    gr.Info("Suggestion added to Per-layer overrides: press Quantize to measure what it buys.")
    return json.dumps(overrides)


def summary_markdown(shown: Shown, cached: bool) -> str:
    """Top-1 against FP with its provenance: config, calibration, data, time and hardware, versions, date."""
    r, config = shown.record, shown.record.config
    calib = r.calibration
    epochs = config["reconstruction"]["epochs"]
    overrides = f"`{cell(json.dumps(config['overrides']))}`" if config["overrides"] else "none"
    kind = "CPU fake-quant timings" if r.hardware.startswith("CPU") else "GPU fake-quant timings"
    rows = [("Configuration", f"`{r.method} {r.setting}`, k {config['k']}, n_refresh {config['n_refresh']}"),
            ("Model", f"`{cell(r.model)}`: `{cell(r.checkpoint)}`"),
            ("Overrides", overrides),
            ("Calibration", f"{calib['images']} `{cell(calib['source'])}` images, seed {calib['seed']}"),
            ("Reconstruction", f"{epochs} epochs" if epochs else "none (clip-searched scales)"),
            ("Predictions changed", f"{shown.changed:,} of {r.test_images:,} (FP wrong → right: {shown.fixed:,}; "
                                    f"FP right → wrong: {shown.broken:,})"),
            ("Lowest SQNR", lowest_sqnr_text(shown.report)),
            ("Mixed-precision suggestion", suggestion_text(shown.suggestion, config)),
            ("Time", f"calibration {r.calibration_seconds:.1f} s, evaluation {r.eval_seconds:.1f} s on {r.hardware}: "
                     f"{kind}"),
            ("Versions, date", f"{', '.join(f'{k} {v}' for k, v in r.versions.items())}; {r.date}")]
    lines = [f"| **{name}** | {value} |" for name, value in rows]
    table = "\n".join([lines[0], "|---|---|", *lines[1:]])  # the first row is the header, as the model card's
    again = "\n\nCached: this configuration ran earlier in this app with the same seed and images." if cached else ""
    return (f"### Top-1: {r.top1:.2f} % · FP32 {r.fp_top1:.2f} % · Δ {r.delta_vs_fp:+.2f} points\n\n"
            f"On the first {r.test_images:,} test images of {r.data}; FP32 measured on the same images.\n\n"
            f"{table}\n\n{shown.saved} {shown.model_note}{again}")


def build_quantize_tab(workspace: gr.State, startup: Workspace, runs: Path) -> gr.JSON:
    """The Quantize tab for this session's model; every fresh run is appended to ``runs``. Returns the record
    output, which changes after every run (Compare listens to it)."""
    cache = RecentResults[Shown](KEPT_RUNS)
    fp_results = RecentResults[EvalResult](KEPT_EVALUATIONS)

    def finished(shown: Shown, cached: bool) -> tuple:
        record = {**asdict(shown.record), "cached": cached, "changed_predictions": shown.changed,
                  "suggested_overrides": shown.suggestion}
        model_file = shown.record.quantized_model
        model_file = model_file if model_file and Path(model_file).is_file() else None
        first = next(iter(shown.weights), None)
        return (summary_markdown(shown, cached), shown.figure, shown.sensitivity, shown.gallery, record, model_file,
                gr.update(choices=list(shown.weights), value=first), weight_figure(shown.weights, first),
                top_k_figure(shown.top_k), *site_errors.shown(shown.report), shown.weights, shown.top_k)

    def quantize_run(ws: Workspace, method: str, w_bits: int, a_bits: int, o_bits: int, k: float | None,
                     n_refresh: float | None, calib_source: str, calib_count: float | None, epochs: float | None,
                     seed: float | None, test_count: float | None, overrides: str, run: Run | None,
                     progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 (gradio's hook)
        """Quantize with one configuration, evaluate against FP32 on the same test images, log the run."""
        unchanged = (gr.skip(), gr.skip(), gr.skip(), None, *(gr.skip(),) * (len(outputs) - 5))  # record clears
        try:
            test_split = ws.test_data("comparing the quantized model with FP32")
            test_count = whole_in_range("test images", test_count, 1, len(test_split))
            epochs = whole_in_range("reconstruction epochs", epochs, 0, MAX_EPOCHS)
            calib_count = whole_in_range("calibration images", calib_count, 1, MAX_CALIB)
            k = in_range("k", k, *K_RANGE)
            n_refresh = whole_in_range("n_refresh", n_refresh, 1, ws.model.cfg.seq_len)
            seed = seed_of(seed)
            source = calibration_source(calib_source)
            config = QuantConfig(method=method, w_bits=int(w_bits), a_bits=int(a_bits), o_bits=int(o_bits), k=float(k),
                                 n_refresh=int(n_refresh), overrides=parse_overrides(overrides or ""),
                                 reconstruction=ReconstructionConfig(epochs=epochs, seed=seed))
        except (StudioError, TypeError, ValueError) as err:
            return error(err), *unchanged
        key = json.dumps({"workspace": ws.fingerprint, "config": config.to_dict(), "source": source,
                          "calib": calib_count, "seed": seed, "test": test_count}, sort_keys=True)
        if (earlier := cache.get(key)) is not None:
            return finished(earlier, cached=True)
        run = run or Run()  # API calls come without a tab, hence without an armed run
        test = test_split.subset(test_count)

        def evaluating(what: str) -> Callable[[int, int], None]:
            return lambda done, total: progress((done, total), desc=f"Evaluating {what}", unit="images")

        def quantizing(stage: str, done: int, total: int, loss: float | None) -> None:
            desc = "Calibrating" if loss is None else f"Reconstructing (block loss {loss:.3g})"
            progress((done, total), desc=desc, unit="sites" if stage == "calibrate" else "blocks")

        sensitivity_images = min(SENSITIVITY_IMAGES, test_count)

        def work() -> tuple:
            """Everything that computes, on the engine: GPU timings too, with nothing else running."""
            fp_key = (ws.fingerprint, test_count)
            fp = fp_results.get(fp_key)
            if fp is None:
                fp = fp_results.put(fp_key, evaluate(ws.model, test, BATCH_SIZE, evaluating("FP32"), run.cancel))
            progress(0, desc="Calibrating")
            result = quantize_and_evaluate(ws.model, ws.name, config, test, fp.top1, source, calib_count, seed,
                                           progress=quantizing, cancel=run.cancel,
                                           eval_progress=evaluating("the quantized model"),
                                           eval_batch_size=BATCH_SIZE, checkpoint=ws.label)
            sensitivity = run_layer_sensitivity(result.qmodel, test.normalized(0, sensitivity_images),
                                                test.labels[:sensitivity_images],
                                                lambda done, total: progress((done, total), desc="Layer sensitivity",
                                                                             unit="layers"),
                                                run.cancel, BATCH_SIZE)
            progress(1, desc="Mixed-precision suggestion (calibration images)")
            suggestion = suggest_precision(result.qmodel, result.calibration, config, run.cancel, BATCH_SIZE)
            model_note, packed = save_integer_model(result.qmodel, result.record, runs)
            model_note += gpu_kernel_note(ws, packed, test, result.record)
            return fp, result, sensitivity, suggestion, weight_grids(result.qmodel), model_note

        try:
            fp, result, sensitivity, suggestion, weights, model_note = on_engine(work, progress, run.cancel)
        except Cancelled as err:
            return stopped(err), *unchanged
        except StudioError as err:
            return error(err), *unchanged
        finally:
            run.done = True
        record, quantized = result.record, result.evaluation
        pairs = list(zip(test.labels.tolist(), fp.predictions, quantized.predictions, strict=True))
        changed = changed_images(fp.predictions, quantized.predictions)
        report = site_errors_frame(record)  # the figures show what the record keeps, and the run's steps
        report.attrs.update(step_sqnr_db=result.step_sqnr_db, images=record.site_errors["images"],
                            config=record.config)
        shown = Shown(record, sqnr_heatmap(report, record.site_errors["images"]), report,
                      sensitivity_figure(sensitivity, sensitivity_images),
                      changed_gallery(test, changed, fp.predictions, quantized.predictions, ws),
                      changed=sum(f != q for _, f, q in pairs), fixed=sum(f != t and q == t for t, f, q in pairs),
                      broken=sum(f == t and q != t for t, f, q in pairs), saved="", model_note=model_note,
                      suggestion=suggestion, weights=weights, top_k=top_k_items(test, changed, fp, quantized, ws))
        try:  # last: a run whose results could not be shown is not logged
            append_record(record, runs)
            shown.saved = "Saved to the run log: see **Compare**."
        except StudioError as err:
            shown.saved = f"**Not saved:** {err}."
        cache.put(key, shown)
        return finished(shown, cached=False)

    gr.Markdown("## Quantize the model\n\nPick a method and bit-widths, calibrate, and compare the quantized model's "
                "top-1 with FP32 on the same test images. " + FAKE_QUANT_NOTE)
    with gr.Row():
        with gr.Column(scale=1):
            method = gr.Dropdown([(f"{name}: {text}", name) for name, text in METHODS.items()], value="ouromamba",
                                 label="Method", elem_id="quant-method")
            with gr.Row():
                w_bits = gr.Radio([4, 6, 8], value=4, label="Weight bits", elem_id="quant-w-bits")
                a_bits = gr.Radio([4, 6, 8], value=4, label="Inlier activation bits", elem_id="quant-a-bits")
            o_bits = gr.Radio([("8", 8), ("16 (float)", 16)], value=8, label="Outlier bits",
                              info="ouromamba and static_outliers only", elem_id="quant-o-bits")
            with gr.Row():
                k = gr.Number(3, label="k (outlier threshold, std devs)", elem_id="quant-k",
                              info=f"{K_RANGE[0]:g} to {K_RANGE[1]:g}")
                n_refresh = gr.Number(10, label="n_refresh (time-steps)", elem_id="quant-n-refresh",
                                      info="1 to the scan's length")
            with gr.Row():
                calib_source = calibration_dropdown(startup, label="Calibration source", elem_id="quant-calib-source",
                                                    info="real, noise, a set saved by Synthesize, or type a folder "
                                                         "of images")
                calib_count = gr.Number(128, label="Calibration images", elem_id="quant-calib-count",
                                        info=f"1 to {MAX_CALIB:,}")
            with gr.Row():
                epochs = gr.Number(10, label="Reconstruction epochs (0 = none)", elem_id="quant-epochs",
                                   info=f"0 to {MAX_EPOCHS}")
                seed = gr.Number(0, label="Seed", elem_id="quant-seed")
                test_count = gr.Number(label="Test images", elem_id="quant-test-count",
                                       **count_box(startup))
            overrides = gr.Textbox("", label="Per-layer overrides (JSON)", placeholder=EXAMPLE_OVERRIDES, lines=2,
                                   elem_id="quant-overrides",
                                   info="Site patterns → w_bits / a_bits / o_bits, the outlier rule's k / n_refresh, "
                                        'or {"skip": true} to keep them in floating point')
            use_suggestion = gr.Button("Use suggestion", size="sm", elem_id="quant-use-suggestion")
            with gr.Row():
                run_button = gr.Button("Quantize", variant="primary", elem_id="quant-run")
                cancel_button = gr.Button("Cancel", variant="stop", elem_id="quant-cancel")
        with gr.Column(scale=2):
            summary = gr.Markdown(READY, elem_id="quant-summary")
            sqnr = gr.Plot(label="SQNR per layer and tensor", elem_id="quant-sqnr")
            site_errors = build_site_errors_section(overrides, startup.model.cfg.depth)
            sensitivity = gr.Plot(label="Layer sensitivity", elem_id="quant-sensitivity")
            weight_site = gr.Dropdown([], label="Weight on its quantization grid", elem_id="quant-weight-site",
                                      info="Every quantized projection of the run")
            weight_plot = gr.Plot(label="Weights on their grid", elem_id="quant-weights")
            gallery = gr.Gallery(label=f"Test images whose prediction changed (first {MAX_GALLERY}; select one to "
                                       "compare the two models' top classes)", columns=6, height="auto",
                                 elem_id="quant-changed")
            top_k_plot = gr.Plot(label="FP32 vs quantized: the most probable classes", elem_id="quant-top-k")
            model_file = gr.File(label="Quantized model: integer weight codes + scales (safetensors)",
                                 elem_id="quant-model-file")
            with gr.Accordion("Record: config, calibration, versions, date (JSON)", open=False):
                record = gr.JSON(show_label=False, elem_id="quant-record")
    build_sweep_section(workspace, w_bits, a_bits, calib_source, calib_count, seed, MAX_CALIB)
    inputs = [workspace, method, w_bits, a_bits, o_bits, k, n_refresh, calib_source, calib_count, epochs, seed,
              test_count, overrides]
    weights, top_k = gr.State(), gr.State()
    outputs = [summary, sqnr, sensitivity, gallery, record, model_file, weight_site, weight_plot, top_k_plot,
               *site_errors.outputs, weights, top_k]
    wire_run(run_button, cancel_button, gr.State(), quantize_run, inputs, outputs, "quantize")
    use_suggestion.click(overrides_from_record, [record, overrides], overrides, api_visibility="private",
                         concurrency_limit=None)
    calib_source.change(count_for_source, [calib_source, calib_count], calib_count, api_visibility="private",
                        concurrency_limit=None)
    weight_site.input(weight_figure, [weights, weight_site], weight_plot, api_visibility="private",
                      concurrency_limit=None)
    gallery.select(show_top_k, top_k, top_k_plot, api_visibility="private", concurrency_limit=None)

    def cleared(ws: Workspace, typed: str) -> tuple:
        """Every output emptied for a new model, the diagram's layers its layers, and the overrides that match
        none of its sites taken out (named in the status, so they can be typed back)."""
        kept, gone = overrides_for(ws, typed)
        status = READY if not gone else (
            f"{READY}\n\n**Overrides taken out** (no site of this model matches them; the box keeps the others): "
            f"`{cell(json.dumps(gone))}`")
        return (status, None, None, [], None, None, gr.update(choices=[], value=None), None, None,
                *site_errors.cleared(ws.model.cfg.depth), None, None, default_calibration(ws),
                gr.update(**count_box(ws)), kept)

    workspace.change(cleared, [workspace, overrides], [*outputs, calib_source, test_count, overrides],
                     api_visibility="private", concurrency_limit=None)
    return record
