"""Where a quantized run loses precision, as figures of its per-site errors (``core.observe.error_report``'s frame,
or a record's ``site_errors`` through ``core.experiments.site_errors_frame``): a layers × tensors SQNR heatmap,
and one Vim block drawn as its dataflow, every quantizer a node coloured by its SQNR where it sits in the block
(which input of which projection, which scan operand, which direction). The diagram's colours share one scale
across the run's layers, so two layers compare at a glance. The app shows them; the HTML report embeds them
(the diagram with a menu of layers, no server needed). Needs plotly: imported by the app and the report only."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from core.experiments import lowest_site
from core.intercept import BACKWARD, FORWARD, SHARED_TENSORS

METRICS = {  # the report column a diagram colours by
    "SQNR of the quantizer alone": "sqnr_db",
    "SQNR vs the FP model (upstream error included)": "sqnr_db_vs_fp_model",
}
DEFAULT_METRIC = "SQNR of the quantizer alone"
BRANCH_X = {FORWARD: -2.2, BACKWARD: 2.2}  # the two scan branches' columns; the shared projections sit at 0
SHARED_X = 0.0
# (x offset within its column, row) of every quantized tensor; rows run top to bottom in data order
SITE_PLACES = {
    "in_proj.input": (-0.35, 1), "in_proj.weight": (0.35, 1),
    "x_proj.input": (-0.35, 3), "x_proj.weight": (0.35, 3),
    "dt_proj.input": (-0.8, 4), "dt_proj.weight": (-0.2, 4), "B": (0.4, 4), "C": (0.95, 4),
    "delta_pre": (-0.45, 5), "A": (0.2, 5), "D": (0.7, 5),
    "h": (0.0, 6.5),
    "out_proj.input": (-0.35, 9), "out_proj.weight": (0.35, 9),
}
SITE_LABELS = {
    "in_proj.input": "in_proj in", "in_proj.weight": "in_proj W", "x_proj.input": "x_proj in (u)",
    "x_proj.weight": "x_proj W", "dt_proj.input": "dt_proj in", "dt_proj.weight": "dt_proj W", "B": "B", "C": "C",
    "delta_pre": "Δ (pre-softplus)", "A": "A", "D": "D", "h": "h (state)", "out_proj.input": "out_proj in",
    "out_proj.weight": "out_proj W",
}
BRANCH_OPS = (("conv1d + SiLU", 2), ("selective scan", 6), ("× SiLU(z)", 7.5))
SHARED_OPS = (("add + RMSNorm", 0), ("merge (y_f + flip(y_b)) / 2", 8.3), ("block output", 10))
Z_LANE = 1.25  # how far right of its branch the gate z runs down to × SiLU(z)


def _place(tensor: str, direction: str) -> tuple[float, float]:
    dx, row = SITE_PLACES[tensor]
    return (SHARED_X if direction == "shared" else BRANCH_X[direction]) + dx, row


def _edges() -> list[list[tuple[float, float]]]:
    """The block's dataflow as polylines (top to bottom), drawn under the nodes."""
    lines = [[(SHARED_X, 0), (SHARED_X, 1)], [(SHARED_X, 8.3), _place("out_proj.input", "shared")],
             [(SHARED_X, 9), (SHARED_X, 10)]]
    for direction, x in BRANCH_X.items():
        lines += [
            [(SHARED_X, 1), (x, 2)],  # in_proj's x half
            [(SHARED_X, 1), (x + Z_LANE, 2), (x + Z_LANE, 7.5), (x, 7.5)],  # its gate half z
            [(x, 2), _place("x_proj.input", direction)],
            [(x, 2), (x - 1.05, 2), (x - 1.05, 6), (x, 6)],  # u also enters the scan
            [(x, 3), _place("dt_proj.input", direction)], [(x, 3), _place("B", direction)],
            [(x, 3), _place("C", direction)], [_place("dt_proj.weight", direction), _place("delta_pre", direction)],
            *([_place(tensor, direction), (x, 6)] for tensor in ("delta_pre", "A", "B", "C", "D")),
            [(x, 6), (x, 7.5)], [(x, 7.5), (SHARED_X, 8.3)],
        ]
    return lines


def worst_layer(report: pd.DataFrame, metric: str) -> int:
    """The layer holding the run's lowest ``metric`` (dB): where a diagram first looks."""
    worst = lowest_site(report, metric)
    return int(report["layer"].min() if worst is None else worst["layer"])


@dataclass
class LayerNodes:
    """What changes from one layer's diagram to another's: the two node traces' data (quantized sites coloured
    by the metric, floating-point sites hollow) and the title."""

    quantized: dict  # x, y, text, customdata, colours, symbols of the quantized sites
    floating: dict  # x, y, text, symbols of the sites the run left in floating point
    title: str


def _colour_range(report: pd.DataFrame, metric: str) -> tuple[float, float]:
    """The run's finite ``metric`` range: one colour scale for every layer."""
    finite = report[metric].replace([np.inf, -np.inf], np.nan).dropna()
    low, high = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    return low, max(high, low + 1e-6)


def layer_nodes(report: pd.DataFrame, layer: int, metric: str, colour_range: tuple[float, float]) -> LayerNodes:
    """One layer's nodes: every site the diagram has, quantized (in ``report``) or left in floating point."""
    low, high = colour_range
    rows = {(row.tensor, row.direction): row for row in report[report["layer"] == layer].itertuples()}
    tensors = [t for t in SITE_PLACES if t != "h" or (report["tensor"] == "h").any()]  # h only where quantized
    sites = [(t, d) for t in tensors for d in (["shared"] if t in SHARED_TENSORS else [FORWARD, BACKWARD])]
    quantized = [s for s in sites if s in rows]
    left = [s for s in sites if s not in rows]
    values = [getattr(rows[s], metric) for s in quantized]

    def symbols(chosen: list[tuple[str, str]]) -> list[str]:
        return ["square" if t.endswith(".weight") else "circle" for t, _ in chosen]

    name = next(label for label, column in METRICS.items() if column == metric)
    return LayerNodes(
        quantized={"x": [_place(*s)[0] for s in quantized], "y": [_place(*s)[1] for s in quantized],
                   "text": [f"{SITE_LABELS[t]}<br>{db_text(v)}" for (t, _), v in zip(quantized, values, strict=True)],
                   "customdata": [[rows[s].site, bits_text(rows[s].bits), db_text(rows[s].sqnr_db),
                                   _cosine(rows[s].cosine), db_text(rows[s].sqnr_db_vs_fp_model)] for s in quantized],
                   "colours": [high if v == math.inf else low if v == -math.inf or math.isnan(v) else v
                               for v in values],
                   "symbols": symbols(quantized)},
        floating={"x": [_place(*s)[0] for s in left], "y": [_place(*s)[1] for s in left],
                  "text": [f"{SITE_LABELS[t]}<br>FP" for t, _ in left], "symbols": symbols(left)},
        title=(f"Layer {layer}: {name}" if quantized else f"Layer {layer}: every quantizer left in floating point")
        + f"<br><sup>one colour scale for all layers ({low:.1f} to {high:.1f} dB); squares are weights; hollow "
          "nodes stay in floating point</sup>")


def block_diagram_figure(report: pd.DataFrame | None, layer: float | None, metric: str) -> go.Figure | None:
    """``layer``'s block with every quantizer of ``report`` (``core.observe.error_report``'s rows) coloured by
    ``metric`` on the run's common scale; tensors the run left in floating point are hollow grey nodes, the
    operations grey boxes. Hover: site, bits, both SQNRs and the cosine. Always three traces (edges, quantized
    nodes, floating-point nodes; either node trace may be empty), so that a menu can swap layers. None without
    a report, or for a layer past the report's last (one before it without rows was left in floating point)."""
    if (report is None or layer is None or metric not in METRICS.values()
            or not 0 <= int(layer) <= report["layer"].max()):
        return None
    low, high = colour_range = _colour_range(report, metric)
    nodes = layer_nodes(report, int(layer), metric, colour_range)
    quantized, left = nodes.quantized, nodes.floating
    figure = go.Figure()
    xs, ys = [], []
    for line in _edges():
        xs += [p[0] for p in line] + [None]
        ys += [p[1] for p in line] + [None]
    figure.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "#c8c8c8", "width": 1.5},
                                hoverinfo="skip", showlegend=False))
    figure.add_trace(go.Scatter(
        x=quantized["x"], y=quantized["y"], mode="markers+text", text=quantized["text"],
        marker={"size": 22, "color": quantized["colours"], "cmin": low, "cmax": high, "colorscale": "Viridis",
                "symbol": quantized["symbols"], "line": {"color": "#444", "width": 1},
                "colorbar": {"title": "SQNR (dB)"}},
        textposition="bottom center", textfont={"size": 10}, customdata=quantized["customdata"],
        hovertemplate="%{customdata[0]} (%{customdata[1]})<br>SQNR %{customdata[2]}, cosine %{customdata[3]}"
                      "<br>vs FP model %{customdata[4]}<extra></extra>", showlegend=False))
    figure.add_trace(go.Scatter(
        x=left["x"], y=left["y"], mode="markers+text", text=left["text"],
        marker={"size": 18, "color": "white", "line": {"color": "#999", "width": 1.5}, "symbol": left["symbols"]},
        textposition="bottom center", textfont={"size": 10, "color": "#888"},
        hovertemplate="%{text}: not quantized in this run<extra></extra>", showlegend=False))
    ops = [(name, SHARED_X, row) for name, row in SHARED_OPS]
    ops += [(name, x, row) for x in BRANCH_X.values() for name, row in BRANCH_OPS]
    for name, x, row in ops:
        figure.add_annotation(x=x, y=row, text=name, showarrow=False, font={"size": 11},
                              bgcolor="#f2f2f2", bordercolor="#999", borderpad=3)
    for direction, x in BRANCH_X.items():
        figure.add_annotation(x=x, y=-0.7, text=f"<b>{'forward' if direction == FORWARD else 'backward'} scan</b>"
                                                 + ("" if direction == FORWARD else " (time reversed)"),
                              showarrow=False)
    figure.update_xaxes(visible=False, range=[-3.9, 3.9])
    figure.update_yaxes(visible=False, autorange="reversed")
    figure.update_layout(title=nodes.title, height=640, margin={"l": 10, "r": 10, "t": 50, "b": 10},
                         plot_bgcolor="white")
    return figure


def diagram_with_layer_menu(report: pd.DataFrame, metric: str = "sqnr_db") -> go.Figure:
    """The block diagram opened on the run's worst layer, with a menu of every layer that swaps the nodes and
    title in the browser (a standalone page's stand-in for the app's slider)."""
    layers = sorted(set(report["layer"]))
    first = worst_layer(report, metric)
    colour_range = _colour_range(report, metric)
    buttons = []
    for layer in layers:
        nodes = layer_nodes(report, layer, metric, colour_range)
        quantized, left = nodes.quantized, nodes.floating
        swapped = {"x": [quantized["x"], left["x"]], "y": [quantized["y"], left["y"]],
                   "text": [quantized["text"], left["text"]], "customdata": [quantized["customdata"], None],
                   "marker.color": [quantized["colours"], "white"],
                   "marker.symbol": [quantized["symbols"], left["symbols"]]}
        buttons.append({"label": f"layer {layer}", "method": "update",
                        "args": [swapped, {"title.text": nodes.title}, [1, 2]]})
    figure = block_diagram_figure(report, first, metric)
    figure.update_layout(updatemenus=[{"buttons": buttons, "active": layers.index(first), "x": 0.0, "y": 1.0,
                                       "xanchor": "left", "yanchor": "top", "direction": "down"}])
    return figure


def layer_tensor_grids(frame: pd.DataFrame, names: list[str]) -> tuple[list[str], list[str], list[np.ndarray]]:
    """A per-site frame as layers × tensors grids of its columns ``names`` (±inf as NaN, NaN where a layer lacks
    the tensor): the tensor labels ('in_proj.input', 'fwd B', … in forward order), the layer labels, the grids."""
    frame = frame.assign(column=[t if d == "shared" else f"{d} {t}"
                                 for d, t in zip(frame["direction"], frame["tensor"], strict=True)])
    columns = list(dict.fromkeys(frame["column"]))
    grids = [frame.pivot(index="layer", columns="column", values=name).reindex(columns=columns)
             .to_numpy(dtype=float) for name in names]
    grids = [np.where(np.isinf(grid), np.nan, grid) for grid in grids]
    return columns, [f"layer {layer}" for layer in sorted(set(frame["layer"]))], grids


def cell_text(grid: np.ndarray, form: str) -> list[list[str]]:
    """Each cell's value as the heatmap prints it, '' where there is none and never '-0' (a value that rounds to
    zero prints as zero): formatted here, since Chromium's plotly printed the difference map's floats in full
    through ``texttemplate="%{z:+.0f}"``."""
    def text(value: float) -> str:
        shown = form.format(value)
        return form.format(0.0) if float(shown) == 0 else shown
    return [["" if np.isnan(value) else text(value) for value in row] for row in grid]


def sqnr_heatmap(report: pd.DataFrame, images: int, source: str = "test images") -> go.Figure:
    """Layers × tensors heatmap of each quantizer's SQNR (dB) on the first ``images`` of ``source``; hover adds
    bits, cosine and the SQNR against the FP model (error accumulated upstream included)."""
    columns, layers, (sqnr, *extra) = layer_tensor_grids(report, ["sqnr_db", "bits", "cosine",
                                                                  "sqnr_db_vs_fp_model"])
    figure = go.Figure(go.Heatmap(
        z=sqnr, x=columns, y=layers, customdata=np.dstack(extra),
        colorscale="Viridis", colorbar={"title": "SQNR (dB)"}, text=cell_text(sqnr, "{:.0f}"),
        texttemplate="%{text}",
        hovertemplate="%{y}, %{x}<br>SQNR %{z:.1f} dB (%{customdata[0]} bits)<br>cosine %{customdata[1]:.4f}"
                      "<br>SQNR vs FP model %{customdata[2]:.1f} dB<extra></extra>"))
    figure.update_yaxes(autorange="reversed")
    figure.update_layout(title=f"SQNR (dB) of every quantizer, per layer and tensor (first {images} {source})",
                         height=360, margin={"l": 70, "r": 10, "t": 50, "b": 120})
    return figure


def step_sqnr_figure(step_sqnr_db: Sequence[float], site: str, images: int, window: int | None = None) -> go.Figure:
    """One quantizer's SQNR per time-step (its scan direction's order), with its mean over the steps and, for a
    per-time-step outlier rule, the starts of its refresh windows (where the outlier set is emptied)."""
    step_sqnr_db = np.asarray(step_sqnr_db, dtype=float)
    steps = np.arange(len(step_sqnr_db))
    finite = step_sqnr_db[np.isfinite(step_sqnr_db)]
    figure = go.Figure(go.Scatter(x=steps, y=np.where(np.isfinite(step_sqnr_db), step_sqnr_db, np.nan),
                                  mode="lines+markers", marker={"size": 4}, name="SQNR",
                                  hovertemplate="time-step %{x}: %{y:.1f} dB<extra></extra>"))
    if len(finite):
        figure.add_hline(y=float(finite.mean()), line={"dash": "dot", "color": "#888"},
                         annotation_text=f"mean over steps {finite.mean():.1f} dB", annotation_position="top left")
    for start in range(window, len(steps), window) if window else []:
        figure.add_vline(x=start - 0.5, line={"color": "#ddd", "width": 1})
    order = "backward scan order" if ".bwd." in site else "forward scan order" if ".fwd." in site else "token order"
    windows = f"; grey lines: its refresh windows of {window} steps" if window else ""
    figure.update_layout(title=f"{site}: SQNR per time-step<br><sup>the quantizer alone, first {images} test "
                               f"images{windows}</sup>",
                         xaxis_title=f"time-step ({order})", yaxis_title="SQNR (dB)", height=300,
                         margin={"l": 60, "r": 10, "t": 50, "b": 45}, showlegend=False)
    return figure


def sqnr_difference_heatmap(first: pd.DataFrame, second: pd.DataFrame, first_label: str, second_label: str,
                            metric: str = "sqnr_db") -> go.Figure | None:
    """Layers × tensors heatmap of ``second``'s ``metric`` minus ``first``'s (dB) over the sites both runs
    quantized: blue where the second run keeps more precision, red where it loses it; hover gives both values
    and bits. None when the runs share no quantized site (different models)."""
    both = first.merge(second, on=["site", "layer", "direction", "tensor"], suffixes=("_first", "_second"))
    if both.empty:
        return None
    columns, layers, values = layer_tensor_grids(both, [f"{metric}_first", f"{metric}_second", "bits_first",
                                                        "bits_second"])
    difference = values[1] - values[0]
    reach = float(np.nanmax(np.abs(difference))) if np.isfinite(difference).any() else 1.0
    name = next(label for label, column in METRICS.items() if column == metric)
    figure = go.Figure(go.Heatmap(
        z=difference, x=columns, y=layers, customdata=np.dstack(values),
        colorscale="RdBu", zmid=0, zmin=-reach, zmax=reach, colorbar={"title": "ΔSQNR (dB)"},
        text=cell_text(difference, "{:+.1f}"), texttemplate="%{text}",  # differences are often below 1 dB
        hovertemplate="%{y}, %{x}<br>%{z:+.1f} dB: " + f"{second_label} " + "%{customdata[1]:.1f} dB "
                      "(%{customdata[3]} bits), " + f"{first_label} " + "%{customdata[0]:.1f} dB "
                      "(%{customdata[2]} bits)<extra></extra>"))
    figure.update_yaxes(autorange="reversed")
    figure.update_layout(title=f"{second_label} minus {first_label}: {name} per layer and tensor<br><sup>blue: "
                               f"{second_label} keeps more precision there; red: less</sup>",
                         height=380, margin={"l": 70, "r": 10, "t": 60, "b": 120})
    return figure


def db_text(value: float) -> str:
    """An SQNR as text: 'exact' for +inf, 'n/a' where not measured."""
    return "exact" if value == math.inf else "n/a" if math.isnan(value) else f"{value:.1f} dB"


def _cosine(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def bits_text(bits: float | None) -> str:
    """A grid's bits as text ('bits ?' where unknown)."""
    return "bits ?" if bits is None or (isinstance(bits, float) and math.isnan(bits)) else f"{int(bits)} bits"
