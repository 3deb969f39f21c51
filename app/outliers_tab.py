"""The Outliers-over-time tab: |x| over time-step × channel with OuroMamba's detected outlier channels."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gradio as gr
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
    clamped,
    count_for_source,
    default_calibration,
    download_file,
    error,
    in_range,
    on_engine,
    seed_of,
    slider_top,
    stopped,
    whole_in_range,
    wire_run,
)
from core.data import calibration_images
from core.errors import StudioError
from core.eval import Cancelled
from core.intercept import DIRECTIONS, SHARED_TENSORS, Site
from core.observe import (
    DECAY,
    STATE,
    GridView,
    capture_quantizer_inputs,
    decay_outliers,
    dynamic_outlier_summary,
    outlier_timeline,
    quantization_grid,
    quantizer_at,
    quantizer_inputs_bytes,
    rule_of,
    state_outliers,
    static_list_misses,
    time_channel_stats,
)
from core.quant import QuantConfig, QuantizedVim, ReconstructionConfig, quantize
from core.quant.outliers import most_frequent_channels
from core.quant.quantizers import OutlierAwareQuantizer
from core.records import provenance
from core.workspace import Workspace

TENSORS = {
    "in_proj input (normed hidden state)": "in_proj.input",
    "x_proj input (u, after conv1d + SiLU)": "x_proj.input",
    "dt_proj input (low-rank δ)": "dt_proj.input",
    "Δ before softplus": "delta_pre",
    "B": "B",
    "C": "C",
    "out_proj input (merged scan output)": "out_proj.input",
    "h (scan state; columns are channel × state)": STATE,
    "Ā = exp(Δ·A) (the state's decay per step; columns are channel × state)": DECAY,
}
LOOKED_AT = {STATE: state_outliers, DECAY: decay_outliers}  # not quantized: a rule is calibrated on them to look
ALL_IMAGES = "max over all images"
MAX_IMAGES = 256
MAX_CAPTURE_BYTES = 2_000_000_000  # activations kept per inspection (Vim-T: 32 images ≈ 1.3 GB)
KEPT_CAPTURE_BYTES = 2 * MAX_CAPTURE_BYTES  # every session's inspections together; the oldest are released
KEPT_INSPECTIONS = 8
READY = "Press **Calibrate & capture** (under a minute on 2 CPU cores for the default model)."

EXPLAIN = """\
**Time-steps.** Mamba reads the image as a sequence of patch tokens (row by row, with the CLS token in the
middle); the *time-step* is a token's position in that scan (the backward branch scans the reversed sequence).
**Outliers.** At each time-step, OuroMamba computes the mean and standard deviation of |x| over the token's
inlier channels; channels above **mean + k·std** are outliers and stay in 8 bits while the rest go to 4 bits.
Detection only runs when the token's inliers would not fit the calibrated 4-bit scale of that time-step.
**Windows.** The outlier list O_list only grows within a window of **n_refresh** time-steps and is cleared at
each window start, so channels that stop being outliers do not keep costing 8-bit work. Each step at which the
list grows depends on the steps before it; where it seldom grows, the GPU kernels detect a window's steps together
instead of one by one. A *static* list (chosen once, as many channels as the dynamic rule flags per token) misses
channels that move — those get clipped.
**Grids.** Each time-step has its own calibrated inlier step S^I(t); measured in those steps, all values fall on
one axis, where the inlier grid covers the codes ±qmax (−7…7 at 4 bits) and an inlier beyond them is clipped.
The outlier channels get an 8-bit grid of their own per token; the SQNR per time-step shows what that buys.
**Inside the scan** (not quantized by OuroMamba; a rule is calibrated on them to show what it would flag): the state
h, and **Ā = exp(Δ·A)**, the factor each (channel, state) pair of h keeps from one step to the next. Near 1 a pair
remembers many steps, and so does any error that enters it; near 0 it forgets at once.
"""


class Inspection:
    """A model calibrated for inspection (inlier scales S^I(t) only, no reconstruction) and the tensors
    entering its quantizers for the first N test images (noise images for a model without test images).
    Made once per model and setting, shared read-only by tabs; ``kind`` names the images ('test', 'noise')."""

    def __init__(self, qmodel: QuantizedVim, calib_images: torch.Tensor, images: torch.Tensor, label: str, kind: str,
                 bits: int):
        self.qmodel, self.calib_images, self.images, self.label, self.kind = qmodel, calib_images, images, label, kind
        self.bits = bits
        self.inputs = capture_quantizer_inputs(qmodel, images)
        self.summary = dynamic_outlier_summary(qmodel, images)
        self._states: dict[str, tuple[torch.Tensor, OutlierAwareQuantizer]] = {}

    @property
    def nbytes(self) -> int:
        """Memory held by the captured tensors, the scan states asked for so far included."""
        return sum(x.nbytes for x in [*self.inputs.values(), *(state for state, _ in self._states.values())])

    def tensor_and_quantizer(self, site: str) -> tuple[torch.Tensor, torch.nn.Module]:
        """What a site's outlier rule sees and the quantizer holding that rule; scan states and Ā are computed
        (and an outlier rule calibrated for them) the first time their site is asked for, then kept."""
        looked_at = LOOKED_AT.get(site.rsplit(".", 1)[-1])
        if looked_at is None:
            return self.inputs[site], quantizer_at(self.qmodel, site)
        if site not in self._states:
            self._states[site] = looked_at(self.qmodel, site, self.calib_images, self.images, self.bits)
        return self._states[site]


def _refresh_range(workspace: Workspace) -> str:
    return f"1 to {workspace.model.cfg.seq_len} (the model's sequence length)"


def _site(layer: int, tensor: str, direction: str) -> str:
    return Site(layer, tensor, None if tensor in SHARED_TENSORS else direction).name


def heatmap_figure(x: torch.Tensor, mask: torch.Tensor, image: int | None, n_refresh: int, title: str,
                   channels: str = "channel") -> go.Figure:
    """|x| (max over images, or one image's) over time-step × channel; detected outlier cells marked (over all
    images: the cells flagged in at least half of them). ``channels`` names the rows (the scan state's are
    channel × state)."""
    stats = time_channel_stats(x, image)
    grid = stats.pivot(index="channel", columns="time_step", values=stats.columns[-1])
    magnitude = "|x|" if image is not None else "max |x| over the images"
    figure = go.Figure(go.Heatmap(z=grid.values, x=grid.columns, y=grid.index, colorscale="Viridis",
                                  colorbar={"title": "|x|"},
                                  hovertemplate=f"time-step %{{x}}<br>{channels} %{{y}}<br>{magnitude} %{{z:.4g}}"
                                                "<extra></extra>"))
    flagged = (mask[image] if image is not None else mask.float().mean(0) >= 0.5).nonzero()
    figure.add_scatter(x=flagged[:, 0].tolist(), y=flagged[:, 1].tolist(), mode="markers",
                       name="outlier" if image is not None else "outlier in at least half of the images",
                       hovertemplate=f"time-step %{{x}}<br>{channels} %{{y}}: outlier<extra></extra>",
                       marker={"symbol": "square-open", "size": 6, "color": "red"})
    for start in range(n_refresh, x.shape[1], n_refresh):
        figure.add_vline(x=start - 0.5, line={"color": "white", "width": 1, "dash": "dot"})
    figure.update_layout(title=title, xaxis_title="time-step (token position along the scan)",
                         yaxis_title=channels, height=460, margin={"l": 50, "r": 10, "t": 50, "b": 40},
                         legend={"orientation": "h", "y": -0.15})
    return figure


def windows_figure(windows: pd.DataFrame) -> go.Figure:
    figure = go.Figure()
    figure.add_bar(x=windows["window"], y=windows["olist_size"], name="O_list size at window end")
    figure.add_bar(x=windows["window"], y=windows["new_channels_vs_previous_window"],
                   name="new vs previous window")
    figure.update_layout(title="O_list per refresh window", xaxis_title="window", yaxis_title="channels",
                         barmode="group", height=300, margin={"l": 50, "r": 10, "t": 50, "b": 40})
    return figure


def misses_figure(misses: pd.DataFrame) -> go.Figure:
    figure = go.Figure()
    figure.add_scatter(x=misses["time_step"], y=misses["dynamic_outliers"], name="dynamic outliers", mode="lines")
    figure.add_scatter(x=misses["time_step"], y=misses["missed"], name="missed by the static list", mode="lines")
    figure.update_layout(title="What a static outlier list misses", xaxis_title="time-step",
                         yaxis_title="channels per token", height=300, margin={"l": 50, "r": 10, "t": 50, "b": 40})
    return figure


def log_axis(values: pd.Series) -> dict:
    """A log axis's settings for ``values``: a tick per decade (dtick 1) where they span one, else plotly's own
    ticks, since a range inside one decade has no decade to label and forced decade ticks left it unlabelled
    (Ā's calibrated step, nearly constant, drew a line on a bare axis)."""
    positive = pd.Series(values, dtype=float)
    positive = positive[positive > 0]
    spans_a_decade = not positive.empty and positive.max() >= 10 * positive.min()
    return {"type": "log", **({"dtick": 1} if spans_a_decade else {})}


def grid_histogram_figure(view: GridView, quantizer: OutlierAwareQuantizer, title: str) -> go.Figure:
    """The values of the inlier and of the outlier channels in steps of the inlier grid (log counts), with the
    grid's ends: what lies beyond them on an inlier channel is clipped."""
    bins = view.histogram
    centres = (bins["bin_left"] + bins["bin_right"]) / 2
    width = float(bins["bin_right"].iloc[0] - bins["bin_left"].iloc[0])
    outliers = ("outlier channels (kept in floating point)" if quantizer.outlier is None else
                f"outlier channels (on their own {quantizer.outlier_bits}-bit grid)")
    figure = go.Figure()
    figure.add_bar(x=centres, y=bins["inlier"], width=width, name="inlier channels", marker_color="#1f77b4")
    figure.add_bar(x=centres, y=bins["outlier"], width=width, name=outliers, marker_color="red", opacity=0.7)
    first, last = view.codes
    for edge in (first - 0.5, last + 0.5):
        figure.add_vline(x=edge, line={"color": "black", "width": 1, "dash": "dash"})
    figure.add_annotation(x=(first + last) / 2, y=1.02, yref="paper", showarrow=False,
                          text=f"{quantizer.bits}-bit inlier grid: codes {first}…{last}")
    axis = "x / S^I(t) + z(t)" if quantizer.asymmetric else "x / S^I(t)"
    figure.update_layout(title=title, xaxis_title=f"{axis} (steps of the time-step's calibrated inlier grid)",
                         yaxis={"title": "values", **log_axis(pd.concat([bins["inlier"], bins["outlier"]]))},
                         barmode="overlay", height=360,
                         margin={"l": 50, "r": 10, "t": 60, "b": 40}, legend={"orientation": "h", "y": -0.25})
    return figure


def grid_steps_figure(view: GridView, quantizer: OutlierAwareQuantizer, n_refresh: int, shown: str) -> go.Figure:
    """Per time-step: the calibrated inlier step against the step the token itself would need (all channels,
    then its inliers only: above S^I(t) they are clipped) and the outliers' step, the largest over the images
    ``shown``; below, the site's SQNR over them with the detected outliers and with every channel on the inlier
    grid."""
    steps = view.steps
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.55, 0.45])
    lines = [("static_scale", "S^I(t), calibrated inlier step", {"color": "black", "width": 2}),
             ("token_scale", "the token's own step, all channels", {"color": "#ff7f0e"}),
             ("inlier_token_scale", "… its inlier channels only", {"color": "#1f77b4", "dash": "dot"})]
    for column, name, line in lines:
        figure.add_scatter(x=steps["time_step"], y=steps[column], name=name, mode="lines", line=line, row=1, col=1)
    if quantizer.outlier is not None:
        figure.add_scatter(x=steps["time_step"], y=steps["outlier_scale"], mode="markers", marker={"color": "red"},
                           name=f"outlier step ({quantizer.outlier_bits}-bit)", row=1, col=1)
    figure.add_scatter(x=steps["time_step"], y=steps["sqnr_db"], mode="lines", line={"color": "red"},
                       name="SQNR with the outliers", row=2, col=1)
    figure.add_scatter(x=steps["time_step"], y=steps["sqnr_db_without_outliers"], mode="lines",
                       line={"color": "#1f77b4"}, name=f"SQNR, all channels {quantizer.bits}-bit", row=2, col=1)
    for start in range(n_refresh, len(steps), n_refresh):
        figure.add_vline(x=start - 0.5, line={"color": "grey", "width": 1, "dash": "dot"})
    scales = [steps[c] for c in ("static_scale", "token_scale", "inlier_token_scale", "outlier_scale") if c in steps]
    figure.update_yaxes(**log_axis(pd.concat(scales)), title_text="step size", row=1, col=1)
    figure.update_yaxes(title_text="SQNR (dB)", row=2, col=1)
    figure.update_xaxes(title_text="time-step", row=2, col=1)
    # what was shown goes on a line of its own: "all 32 test images; steps: the largest of them" ran off the figure
    figure.update_layout(title=f"The grid per time-step, and what the outliers buy<br><sup>{shown}</sup>", height=460,
                         margin={"l": 50, "r": 10, "t": 50, "b": 40}, legend={"orientation": "h", "y": -0.2})
    return figure


def view_csv(folder: Path, header: dict, timeline_steps: pd.DataFrame, grid: GridView) -> Path:
    """The view's numbers per time-step as CSV, its provenance (``header``) as leading ``# key: value`` lines
    (``pandas.read_csv(path, comment="#")`` reads the table); one file per distinct view, whatever its date."""
    steps = timeline_steps.merge(grid.steps.drop(columns=["static_scale", "outlier_share"]), on="time_step")
    lines = [f"# {key}: {json.dumps(value) if isinstance(value, dict) else value}" for key, value in header.items()]
    return download_file(folder, f"outliers_{header['site']}", ".csv", {k: v for k, v in header.items() if k != "date"},
                         "\n".join(lines) + "\n" + steps.to_csv(index=False))


def count_text(mean: float) -> str:
    """A mean count for a sentence: one decimal, two below 1 so that a rare outlier does not read as none."""
    return f"{mean:.2f}" if 0 < mean < 1 else f"{mean:.1f}"


def static_sentence(static: torch.Tensor, misses: pd.DataFrame, mask: torch.Tensor) -> str:
    """What a fixed list with the rule's budget would miss, or that there is nothing to list."""
    if not mask.any():
        return "Nothing is flagged here, so a static list has nothing to keep."
    return (f"A static list of the {int(static.sum())} most frequent outlier channel(s) misses "
            f"{count_text(misses['missed'].mean())} outlier channels per token.")


def grid_sentence(grid: GridView, quantizer: OutlierAwareQuantizer) -> str:
    """The grid charts in one sentence: SQNR on the inlier grid alone, with the outliers, and what is clipped."""
    if not grid.histogram["outlier"].any():
        return (f"No value is on an outlier channel: on the {quantizer.bits}-bit inlier grid this tensor has an SQNR "
                f"of {grid.sqnr_db:.1f} dB, and {grid.clipped:.2%} of its values fall off the grid.")
    kept = "in floating point" if quantizer.outlier is None else f"at {quantizer.outlier_bits} bits"
    return (f"Quantized with every channel on the {quantizer.bits}-bit inlier grid this tensor has an SQNR of "
            f"{grid.sqnr_db_without_outliers:.1f} dB; with these outliers kept {kept}, {grid.sqnr_db:.1f} dB; "
            f"{grid.clipped:.2%} of the inlier values fall off the grid.")


def summary_figure(summary: pd.DataFrame) -> go.Figure:
    """Per site, which have the most moving outliers (O_list channels new in each window) and what keeping the
    outlier channels at 8 bits buys there (SQNR against every channel on the inlier grid)."""
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.06, row_heights=[0.5, 0.5],
                           subplot_titles=("O_list channels new in each window (mean)",
                                           "SQNR: with the outlier channels at 8 bits, and every channel on the "
                                           "inlier grid"))
    hover = ["olist_size", "growing_steps_per_window", "outlier_channels_per_token", "channels"]
    for tensor, rows in summary.groupby("tensor", sort=False):
        figure.add_bar(x=rows["site"].tolist(), y=rows["new_channels_vs_previous_window"].tolist(), name=tensor,
                       legendgroup="tensor", customdata=rows[hover].to_numpy(),
                       hovertemplate="%{x}: %{y:.1f} new of an O_list of %{customdata[0]:.1f}, growing at "
                                     "%{customdata[1]:.1f} steps a window; %{customdata[2]:.1f} of "
                                     "%{customdata[3]} channels a token<extra></extra>", row=1, col=1)
    for column, name, color in (("sqnr_db", "SQNR with the outliers", "red"),
                                ("sqnr_db_without_outliers", "SQNR, all on the inlier grid", "#1f77b4")):
        figure.add_scatter(x=summary["site"].tolist(), y=summary[column].tolist(), mode="markers", name=name,
                           marker={"color": color}, legendgroup="sqnr", row=2, col=1)
    figure.update_yaxes(title_text="channels", row=1, col=1)
    figure.update_yaxes(title_text="dB", row=2, col=1)
    figure.update_xaxes(tickangle=-60, row=2, col=1)
    figure.update_layout(title="Per site: how much the outliers move, and what keeping them buys", height=620,
                         margin={"l": 50, "r": 10, "t": 70, "b": 120}, barmode="relative")
    return figure


def build_outliers_tab(workspace: gr.State, startup: Workspace) -> None:
    """The tab; the layer and n_refresh ranges follow ``workspace``'s architecture."""
    cfg = startup.model.cfg
    inspections = RecentResults[Inspection](KEPT_INSPECTIONS, KEPT_CAPTURE_BYTES, size=lambda i: i.nbytes)
    csv_folder = Path(tempfile.mkdtemp(prefix="ouromamba-outliers-"))

    def prepare(ws: Workspace, a_bits: int, calib: str, n_calib: float, n_images: float, seed: float | None,
                run: Run | None, progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 (gradio's hook)
        """Calibrate the inlier scales of this session's model and capture its quantizer inputs on the first N
        test images (noise images when it has none)."""
        run = run or Run()
        try:
            n_calib = whole_in_range("calibration images", n_calib, 1, MAX_IMAGES)
            n_images = whole_in_range("images to inspect", n_images, 1, MAX_IMAGES)
            needed = quantizer_inputs_bytes(ws.model.cfg, n_images)
            if needed > MAX_CAPTURE_BYTES:
                fits = max(1, MAX_CAPTURE_BYTES // quantizer_inputs_bytes(ws.model.cfg, 1))
                plural = "s" if fits != 1 else ""
                raise StudioError(f"inspecting {n_images} images of this model would hold {needed / 1e6:,.0f} MB "
                                  f"of activations (limit {MAX_CAPTURE_BYTES / 1e6:,.0f} MB): use at most "
                                  f"{fits} image{plural}")
            seed = seed_of(seed)
            calib = calibration_source(calib)
            key = (ws.fingerprint, a_bits, calib, n_calib, n_images, seed)
            inspection = inspections.get(key)
            if inspection is None:
                def work() -> Inspection:
                    model_cfg = ws.model.cfg
                    progress(0, desc="Calibrating inlier scales")
                    calib_images = calibration_images(calib, n_calib, seed, model_cfg.img_size, model_cfg.in_chans)
                    config = QuantConfig(method="ouromamba", w_bits=4, a_bits=a_bits,
                                         reconstruction=ReconstructionConfig(epochs=0))
                    qmodel = quantize(ws.model, config, calib_images, cancel=run.cancel,
                                      progress=lambda stage, done, total, _: progress((done, total), desc=stage))
                    progress(1, desc="Capturing activations")
                    images, described = ws.inspection_images(n_images, seed)
                    label = (f"A{a_bits} inlier scales from {n_calib} {calib} image{'s' if n_calib != 1 else ''} "
                             f"(seed {seed}); statistics of {described}")
                    return Inspection(qmodel, calib_images, images, label, "test" if ws.data is not None else "noise",
                                      a_bits)
                inspection = inspections.put(key, on_engine(work, progress, run.cancel))
        except Cancelled as err:
            return stopped(err), gr.skip(), gr.skip(), gr.skip()
        except StudioError as err:
            return error(err), gr.skip(), gr.skip(), gr.skip()
        finally:
            run.done = True
        choices = [ALL_IMAGES, *(f"image #{i}" for i in range(len(inspection.images)))]
        return (f"Ready: {inspection.label}.", summary_figure(inspection.summary), key,
                gr.update(choices=choices, value="image #0"))

    def show(ws: Workspace, key: tuple | None, layer: float, tensor: str, direction: str, image: str,
             k: float | None, n_refresh: float | None) -> tuple:
        """Outlier detection with this k and n_refresh on the captured tensors: milliseconds, so it runs live."""
        nothing = (None,) * (len(view_outputs) - 1)
        if key is None or key[0] != ws.fingerprint:
            return "Press **Calibrate & capture** first.", *nothing
        inspection = inspections.get(tuple(key))
        if inspection is None:
            return (f"This capture was released to free memory (the app keeps the {KEPT_INSPECTIONS} most recent, "
                    f"at most {KEPT_CAPTURE_BYTES / 1e9:g} GB): press **Calibrate & capture** again.", *nothing)
        model_cfg = ws.model.cfg
        try:
            k = in_range("k", k, *K_RANGE)
            n_refresh = whole_in_range("n_refresh", n_refresh, 1, model_cfg.seq_len)
            site = _site(whole_in_range("the layer", layer, 0, model_cfg.depth - 1), TENSORS[tensor], direction)
            x, quantizer = inspection.tensor_and_quantizer(site)
            chosen = None if image == ALL_IMAGES else int(image.split("#")[1])
            rule = rule_of(quantizer, k=float(k), n_refresh=n_refresh)
            timeline = outlier_timeline(x, rule, image=chosen)
            mask = timeline.mask
            static = most_frequent_channels(mask)
            shown_mask = mask if chosen is None else mask[chosen:chosen + 1]
            misses = static_list_misses(x if chosen is None else x[chosen:chosen + 1], shown_mask, static)
            grid = quantization_grid(x, quantizer, mask, chosen)
        except (StudioError, KeyError, ValueError, IndexError) as err:
            return error(err), *(gr.skip(),) * (len(view_outputs) - 1)  # the last good view stays
        shown = "max over images" if chosen is None else f"{inspection.kind} image #{chosen}"
        pooled = f"all {len(x)} {inspection.kind} images" if chosen is None else shown  # the grids sum, not max
        per_token = timeline.steps["outlier_channels"].mean()
        windows = timeline.windows
        moving = ("one window only: nothing to compare" if len(windows) < 2 else
                  f"{count_text(windows['new_channels_vs_previous_window'].mean())} of them new versus the previous "
                  "window")
        text = (f"**{site}**, {shown}: {count_text(per_token)} of {x.shape[-1]} channels per token are outliers "
                f"(k = {k:g}, n_refresh = {n_refresh}); a window's O_list holds "
                f"{count_text(windows['olist_size'].mean())} channels, {moving}, and grows at "
                f"{count_text(windows['growing_steps'].mean())} of its steps. "
                f"{static_sentence(static, misses, shown_mask)} {grid_sentence(grid, quantizer)} ({inspection.label}.)")
        flagged = "detected outliers" if chosen is not None else "outliers in at least half of the images"
        title = f"|x| at {site} ({shown}); red: {flagged}; dotted: window starts"
        header = {"site": site, "images": pooled, "k": k, "n_refresh": n_refresh, "inlier_bits": quantizer.bits,
                  "capture": inspection.label, **ws.provenance(), **provenance()}
        data = view_csv(csv_folder, header, timeline.steps, grid)
        values_title = f"Values of {site} on the grids ({pooled})"
        rows = "channel × state" if TENSORS[tensor] == STATE else "channel"
        return (text, heatmap_figure(x, mask, chosen, n_refresh, title, rows), windows_figure(timeline.windows),
                misses_figure(misses), grid_histogram_figure(grid, quantizer, values_title),
                grid_steps_figure(grid, quantizer, n_refresh,
                                  pooled if chosen is not None else f"{pooled}; steps: the largest of them"),
                str(data))

    gr.Markdown(EXPLAIN)
    with gr.Row(equal_height=True):
        a_bits = gr.Radio([4, 6, 8], value=4, label="Inlier bits", scale=2, min_width=200,
                          info="Sets the calibrated inlier scale that triggers detection.")
        calib = calibration_dropdown(startup, label="Calibration source", scale=2)
        n_calib = gr.Slider(1, MAX_IMAGES, 64, step=1, label="Calibration images", scale=2)
        n_images = gr.Slider(1, MAX_IMAGES, 32, step=1, label="Images to inspect", scale=2, min_width=200,
                             info="The first test images (noise for a model without any)")
        seed = gr.Number(0, label="Seed", scale=1)
        with gr.Column(scale=1, min_width=160):
            prepare_button = gr.Button("Calibrate & capture", variant="primary", elem_id="outliers-prepare")
            cancel_button = gr.Button("Cancel", variant="stop")
    status = gr.Markdown(READY, elem_id="outliers-status")
    calib.change(count_for_source, [calib, n_calib], n_calib, api_visibility="private", concurrency_limit=None)
    with gr.Row():
        layer = clamped(gr.Slider(0, slider_top(cfg.depth - 1), min(1, cfg.depth - 1), step=1, label="Layer"))
        tensor = gr.Dropdown(list(TENSORS), value="x_proj input (u, after conv1d + SiLU)", label="Tensor")
        direction = gr.Radio(list(DIRECTIONS), value=DIRECTIONS[0], label="Scan direction",
                             info="in_proj/out_proj inputs are shared by both.")
        image = gr.Dropdown([ALL_IMAGES, *(f"image #{i}" for i in range(8))], value="image #0", label="Image")
    with gr.Row():
        k = gr.Number(3, step=0.25, label="k (threshold = mean + k·std)", elem_id="outliers-k",
                      info=f"{K_RANGE[0]:g} to {K_RANGE[1]:g}; the arrows step by 0.25")
        n_refresh = gr.Number(10, label="n_refresh (window length in time-steps)",
                              elem_id="outliers-refresh", info=_refresh_range(startup))
    text = gr.Markdown(elem_id="outliers-text")
    heatmap = gr.Plot(label="Outliers over time", elem_id="outliers-heatmap")
    with gr.Row():
        windows = gr.Plot(label="O_list per window", elem_id="outliers-windows")
        misses = gr.Plot(label="Static list", elem_id="outliers-misses")
    with gr.Row():
        grid_values = gr.Plot(label="Values on the quantization grids", elem_id="outliers-grid-values")
        grid_steps = gr.Plot(label="The grid per time-step", elem_id="outliers-grid-steps")
    data = gr.File(label="This view per time-step (CSV, provenance in its # lines)", elem_id="outliers-csv")
    summary = gr.Plot(label="Per-site summary", elem_id="outliers-summary")
    key = gr.State()
    view_inputs = [workspace, key, layer, tensor, direction, image, k, n_refresh]
    view_outputs = [text, heatmap, windows, misses, grid_values, grid_steps, data]
    run_state = gr.State()
    wire_run(prepare_button, cancel_button, run_state, prepare, [workspace, a_bits, calib, n_calib, n_images, seed],
             [status, summary, key, image], "outliers_prepare")

    def follow(ws: Workspace) -> tuple:
        """A new model: its ranges, and nothing of the previous model's on screen (clearing the key clears
        the views)."""
        depth = ws.model.cfg.depth
        return READY, None, None, gr.update(maximum=slider_top(depth - 1), value=min(1, depth - 1)), \
            gr.update(info=_refresh_range(ws)), default_calibration(ws)

    workspace.change(follow, workspace, [status, summary, key, layer, n_refresh, calib], api_visibility="private",
                     concurrency_limit=None)
    # detection is milliseconds: every control re-runs it live (k's event doubles as the API endpoint)
    k.change(show, view_inputs, view_outputs, api_name="outliers_view")
    for control in (key, layer, tensor, direction, image, n_refresh):
        control.change(show, view_inputs, view_outputs, api_visibility="private")
