"""The Quantize tab's per-site error section: one Vim block drawn with every quantizer coloured by its SQNR
(``core.error_figures``), a layer slider and a colouring choice, and a picker of the run's sites, worst first,
that writes "keep this site at 8 bits" or "keep it in floating point" into the tab's Per-layer overrides: see
where precision is lost, raise it there, quantize again, compare; and the picked quantizer's SQNR along the
scan, time-step by time-step. The values are the shown run record's ``site_errors`` (the per-step ones come
with the run, in the frame's attrs); nothing here computes them."""

from __future__ import annotations

import json
from dataclasses import dataclass

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from app.common import clamped, error, slider_top
from core.error_figures import (
    DEFAULT_METRIC,
    METRICS,
    bits_text,
    block_diagram_figure,
    db_text,
    step_sqnr_figure,
    worst_layer,
)
from core.errors import StudioError
from core.quant import QuantConfig
from core.quant.config import parse_overrides, set_override

KEPT_FLOAT = {"skip": True}
PICKER_HELP = "Pick a site (worst first) to see its layer, then keep it at 8 bits or in floating point."


def site_choices(report: pd.DataFrame, metric: str) -> list[tuple[str, str]]:
    """(label, site) of every quantizer of the run, lowest ``metric`` first (non-finite values last)."""
    ordered = report.assign(key=report[metric].fillna(float("inf"))).sort_values("key", kind="stable")
    return [(f"{row.site}: {db_text(getattr(row, metric))}, {bits_text(row.bits)}", row.site)
            for row in ordered.itertuples()]


def site_steps_figure(report: pd.DataFrame | None, site: str | None) -> go.Figure | None:
    """``site``'s SQNR per time-step from ``report.attrs`` (``step_sqnr_db``, ``images``, the run's ``config``),
    with OuroMamba's refresh windows as the site's config has them; None for sites without time-steps
    (weights, A, D) or without a report."""
    if report is None or site is None:
        return None
    steps = report.attrs.get("step_sqnr_db", {}).get(site)
    if steps is None:
        return None
    config = report.attrs.get("config")
    site_config = QuantConfig.from_dict(config).for_site(site) if config else None
    window = site_config.n_refresh if site_config is not None and site_config.method == "ouromamba" else None
    return step_sqnr_figure(steps, site, report.attrs.get("images", 0), window)


def raised(site: str | None) -> dict[str, int]:
    """"Keep at 8 bits" for ``site``: the one field that applies there (w_bits on a weight, a_bits elsewhere)."""
    return {"w_bits": 8} if site and site.endswith(".weight") else {"a_bits": 8}


def with_site_override(text: str | None, site: str | None, change: dict) -> tuple[str, str]:
    """The overrides box with ``site`` → ``change`` added last, and a one-line status (the box unchanged and
    the reason when it holds no valid overrides or no site is picked)."""
    if not site:
        return gr.skip(), error(StudioError("quantize first, then pick a site"))
    try:
        overrides = set_override(parse_overrides(text or ""), site, change)
    except StudioError as err:
        return gr.skip(), error(err)
    what = "in floating point" if change.get("skip") else "at 8 bits"
    side, other = ("input", "weight") if site.endswith(".input") else ("weight", "input")
    packing = (f" Its projection's {other} stays quantized, so this run will have no packed integer model (the "
               f"kernels need a projection's input and weight both in floating point or neither): add "
               f"`{site.removesuffix(side)}{other}` too for one." if change.get("skip") and site.endswith(
                   (".input", ".weight")) else "")
    return (json.dumps(overrides),
            f"Overrides now keep `{site}` {what}: press **Quantize** to measure what it buys.{packing}")


@dataclass
class SiteErrorsSection:
    """The section's components a run fills (``outputs``, in the order ``shown`` and ``cleared`` give)."""

    diagram: gr.Plot
    layer: gr.Slider
    metric: gr.Radio
    site: gr.Dropdown
    steps: gr.Plot
    report: gr.State  # the run's site errors as a frame

    @property
    def outputs(self) -> list:
        return [self.diagram, self.layer, self.metric, self.site, self.steps, self.report]

    @staticmethod
    def shown(report: pd.DataFrame) -> tuple:
        """A finished run: the diagram on its worst layer, coloured by the default metric, its sites listed
        (the worst picked), and the worst site with time-steps along the scan."""
        metric = METRICS[DEFAULT_METRIC]
        layer = worst_layer(report, metric)
        choices = site_choices(report, metric)
        along = next((site for _, site in choices if site in report.attrs.get("step_sqnr_db", {})), None)
        return (block_diagram_figure(report, layer, metric),
                gr.update(maximum=slider_top(int(report["layer"].max())), value=layer), gr.update(value=DEFAULT_METRIC),
                gr.update(choices=choices, value=choices[0][1]), site_steps_figure(report, along), report)

    @staticmethod
    def cleared(depth: int) -> tuple:
        """A new model: nothing shown, the slider over its layers."""
        return (None, gr.update(maximum=slider_top(depth - 1), value=0), gr.skip(),
                gr.update(choices=[], value=None), None, None)


def show_block_diagram(report: pd.DataFrame | None, layer: float | None, metric: str) -> go.Figure | None:
    """The block diagram's controls: the shown run's layer ``layer`` coloured by ``metric`` (a METRICS label)."""
    return block_diagram_figure(report, layer, METRICS.get(metric, ""))


def build_site_errors_section(overrides: gr.Textbox, depth: int) -> SiteErrorsSection:
    """The section under the Quantize tab's SQNR heatmap; its buttons edit ``overrides``."""
    with gr.Row():
        layer = clamped(gr.Slider(0, slider_top(depth - 1), 0, step=1, label="Layer in the block diagram",
                                  elem_id="quant-diagram-layer", info="A run opens on the layer with its lowest SQNR"))
        metric = gr.Radio(list(METRICS), value=DEFAULT_METRIC, label="Colour by", elem_id="quant-diagram-metric")
    diagram = gr.Plot(label="One block's quantizers where they sit in the dataflow", elem_id="quant-diagram")
    with gr.Row():
        site = gr.Dropdown([], label="Quantizers, lowest SQNR first", elem_id="quant-pick-site", scale=3)
        raise_button = gr.Button("Keep at 8 bits", size="sm", elem_id="quant-site-8-bits", scale=1)
        float_button = gr.Button("Keep in floating point", size="sm", elem_id="quant-site-float", scale=1)
    status = gr.Markdown(PICKER_HELP, elem_id="quant-site-status")
    steps = gr.Plot(label="The quantizer along the scan (weights, A and D have no time-steps)",
                    elem_id="quant-site-steps")
    report = gr.State()

    def recolour(rows: pd.DataFrame | None, layer_value: float | None, name: str) -> tuple:
        """A new colouring: the diagram redrawn and the sites re-sorted by it (the picked site kept)."""
        if rows is None:
            return None, gr.skip()
        return show_block_diagram(rows, layer_value, name), gr.update(choices=site_choices(rows, METRICS[name]))

    def follow(rows: pd.DataFrame | None, picked: str | None, name: str) -> tuple:
        """A picked site: the diagram moves to its layer, the plot below follows it along the scan."""
        if rows is None or picked not in set(rows["site"]):
            return gr.skip(), gr.skip(), gr.skip()
        picked_layer = int(rows.loc[rows["site"] == picked, "layer"].iloc[0])
        return picked_layer, show_block_diagram(rows, picked_layer, name), site_steps_figure(rows, picked)

    private = {"api_visibility": "private", "concurrency_limit": None}
    layer.input(show_block_diagram, [report, layer, metric], diagram, **private)
    metric.input(recolour, [report, layer, metric], [diagram, site], **private)
    site.input(follow, [report, site, metric], [layer, diagram, steps], **private)
    raise_button.click(lambda text, picked: with_site_override(text, picked, raised(picked)), [overrides, site],
                       [overrides, status], **private)
    float_button.click(lambda text, picked: with_site_override(text, picked, KEPT_FLOAT), [overrides, site],
                       [overrides, status], **private)
    return SiteErrorsSection(diagram, layer, metric, site, steps, report)
