"""The per-site error figures (SQNR heatmap, block diagram, its layer menu), the per-site errors a run record
carries, and the HTML report's section drawn from them."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from core.error_figures import (
    METRICS,
    block_diagram_figure,
    cell_text,
    diagram_with_layer_menu,
    sqnr_difference_heatmap,
    sqnr_heatmap,
    step_sqnr_figure,
    worst_layer,
)
from core.experiments import RunRecord, site_error_table, site_errors_frame, site_errors_of
from core.observe.probe import SHARED
from core.quant.quantize import quantized_sites
from core.report import SITE_ERROR_RUNS, html_report
from core.workspace import default_workspace


def _report(layers: int, states: bool = False) -> pd.DataFrame:
    """error_report's rows for a default-model-shaped run: site values 10·layer + position, so each is known."""
    rows = []
    for position, site in enumerate(quantized_sites(default_workspace().model, include_states=states)):
        if site.layer < layers:
            value = 10.0 * site.layer + position % 40
            rows.append({"site": site.name, "layer": site.layer, "direction": site.direction or SHARED,
                         "tensor": site.tensor, "bits": 4, "sqnr_db": value, "cosine": 0.99,
                         "sqnr_db_vs_fp_model": value - 1, "cosine_vs_fp_model": 0.98})
    return pd.DataFrame(rows)
def test_block_diagram_draws_each_quantizer_of_the_layer_on_the_runs_colour_scale():
    report = _report(2)
    skipped = report["site"] == "layers.1.bwd.dt_proj.weight"  # as a {"skip": true} override leaves it
    report.loc[report["site"] == "layers.1.fwd.B", "sqnr_db"] = math.inf  # an exact quantizer
    report = report[~skipped].reset_index(drop=True)
    figure = block_diagram_figure(report, 1, "sqnr_db")
    edges, quantized, left = figure.data
    layer = report[report["layer"] == 1]
    assert len(quantized.x) == len(layer) == 21 and len(left.x) == 1 and "dt_proj W<br>FP" in left.text[0]
    finite = report["sqnr_db"].replace(math.inf, math.nan)
    assert (quantized.marker.cmin, quantized.marker.cmax) == (finite.min(), finite.max())  # both layers' range
    by_site = dict(zip((row[0] for row in quantized.customdata), quantized.marker.color, strict=True))
    assert by_site["layers.1.fwd.B"] == finite.max() and "exact" in " ".join(quantized.text)
    assert all(by_site[row.site] == row.sqnr_db for row in layer.itertuples() if row.sqnr_db != math.inf)
    assert [s for s, t in zip(quantized.marker.symbol, quantized.customdata, strict=True)
            if t[0].endswith(".weight")] == ["square"] * 5  # in, out and 2 × (x, dt) minus the skipped one
    assert "h (state)" not in " ".join(quantized.text + left.text)  # states unquantized: not drawn
    ops = {a.text for a in figure.layout.annotations}
    assert {"add + RMSNorm", "selective scan", "conv1d + SiLU", "merge (y_f + flip(y_b)) / 2"} <= ops
    vs_fp = block_diagram_figure(report, 1, "sqnr_db_vs_fp_model").data[1]
    assert sorted(vs_fp.marker.color) == sorted(layer["sqnr_db_vs_fp_model"])
    assert block_diagram_figure(report, 2, "sqnr_db") is None and block_diagram_figure(None, 0, "sqnr_db") is None
    all_float = block_diagram_figure(report[report["layer"] == 1], 0, "sqnr_db")  # layer 0 skipped by overrides:
    assert len(all_float.data[1].x) == 0 and len(all_float.data[2].x) == 22  # drawn hollow, not a blank plot
    assert "every quantizer left in floating point" in all_float.layout.title.text
    assert block_diagram_figure(report, 0, "top1") is None
    assert set(METRICS.values()) == {"sqnr_db", "sqnr_db_vs_fp_model"}


def test_block_diagram_shows_quantized_states_and_opens_on_the_worst_layer():
    report = _report(3, states=True)
    report.loc[report["site"] == "layers.2.out_proj.weight", "sqnr_db"] = -3.0
    assert worst_layer(report, "sqnr_db") == 2
    report.loc[report["site"] == "layers.1.fwd.C", "sqnr_db_vs_fp_model"] = -math.inf
    report.loc[report["site"] == "layers.0.fwd.B", "sqnr_db_vs_fp_model"] = math.inf
    assert worst_layer(report, "sqnr_db_vs_fp_model") == 1  # −inf: as bad as it gets; +inf (exact) is not
    doubled = pd.concat([report, report.assign(layer=report["layer"] + 3)])  # an index with repeats
    assert worst_layer(doubled, "sqnr_db") == 2
    quantized = block_diagram_figure(report, 0, "sqnr_db").data[1]
    assert sum("h (state)" in text for text in quantized.text) == 2  # one per direction


def test_the_layer_menu_swaps_in_each_layers_nodes_and_opens_on_the_worst():
    report = _report(3)
    report.loc[report["site"] == "layers.1.fwd.C", "sqnr_db"] = -5.0
    figure = diagram_with_layer_menu(report)
    menu = figure.layout.updatemenus[0]
    assert [button.label for button in menu.buttons] == ["layer 0", "layer 1", "layer 2"] and menu.active == 1
    assert figure.layout.title.text.startswith("Layer 1:")
    for layer, button in enumerate(menu.buttons):
        nodes, layout, traces = button.args
        drawn = block_diagram_figure(report, layer, "sqnr_db")
        assert list(traces) == [1, 2] and layout["title.text"] == drawn.layout.title.text
        assert list(nodes["marker.color"][0]) == list(drawn.data[1].marker.color)
        assert [list(t) for t in nodes["text"]] == [list(drawn.data[1].text), list(drawn.data[2].text)]
    assert list(figure.data[1].marker.color) == list(menu.buttons[1].args[0]["marker.color"][0])


def test_a_record_carries_its_site_errors_as_plain_json_and_they_come_back():
    report = _report(2)
    report.loc[0, "sqnr_db"] = math.inf  # not JSON: stored as null, read back as NaN
    stored = site_errors_of(report, 32)
    text = json.dumps(stored, allow_nan=False)  # raises on inf / NaN
    record = RunRecord.from_dict({**_record_fields(), "site_errors": json.loads(text)})
    frame = site_errors_frame(record)
    assert stored["images"] == 32 and len(stored["rows"]) == len(report) == 44
    assert list(frame.columns[:4]) == ["site", "layer", "direction", "tensor"]
    assert frame[["site", "layer", "direction", "tensor"]].equals(report[["site", "layer", "direction", "tensor"]])
    assert math.isnan(frame.loc[0, "sqnr_db"]) and frame["sqnr_db"][1:].tolist() == report["sqnr_db"][1:].tolist()
    assert site_errors_frame(RunRecord.from_dict(_record_fields())) is None  # runs from before, or not measured
    heatmap = sqnr_heatmap(frame, 32).data[0]
    assert heatmap.z.shape == (2, 22) and "first 32 test images" in sqnr_heatmap(frame, 32).layout.title.text


def _record_fields(**changes) -> dict:
    return {"model": "default_model", "method": "ouromamba", "setting": "W4A4O8",
            "calibration": {"source": "real", "images": 8, "seed": 0}, "top1": 80.0, "fp_top1": 90.0,
            "delta_vs_fp": -10.0, "test_images": 40, "calibration_seconds": 1.0, "eval_seconds": 1.0,
            "hardware": "CPU", "config": {"w_bits": 4, "a_bits": 4}, **changes}


def test_the_html_report_draws_the_newest_runs_site_errors():
    errors = site_errors_of(_report(2), 32)
    records = [RunRecord.from_dict(_record_fields(top1=60.0 + i, site_errors=errors if i % 2 else {}))
               for i in range(2 * SITE_ERROR_RUNS + 2)]
    page = html_report(records)
    assert page.count("<h3>") == SITE_ERROR_RUNS and "Where each run loses precision" in page
    headings = page.split("<h3>")[1:]
    assert all(" images of " in heading.split("</h3>")[0] for heading in headings)  # what each top-1 was scored on
    assert "td:nth-last-child(-n+2)" in page  # the config and file columns wrap instead of widening the page
    drawn = [f"#{i + 1} ouromamba W4A4O8 real×8: top-1 {60.0 + i:.2f} %" for i in range(len(records))]
    shown = sorted((label for label in drawn if label in page), key=page.index)
    assert shown == drawn[-1:1:-2]  # the newest measured runs, newest first
    assert '"label":"layer 1"' in page  # the diagram's layer menu
    assert "Where each run loses precision" not in html_report(records[::2])  # none measured: no section


def test_the_difference_of_two_runs_is_taken_site_by_site_over_the_sites_both_quantized():
    first, second = _report(2), _report(2)
    second["sqnr_db"] = second["sqnr_db"] + second["layer"] * 3.0 - 1.0  # layer 0: −1 dB, layer 1: +2 dB
    second = second[second["site"] != "layers.1.out_proj.weight"]  # skipped in the second run
    figure = sqnr_difference_heatmap(first, second, "#1 a", "#2 b")
    heatmap = figure.data[0]
    assert heatmap.z.shape == (2, 22) and math.isnan(heatmap.z[1][-1])  # the skipped weight: no difference
    assert set(heatmap.z[0]) == {-1.0} and {v for v in heatmap.z[1] if not math.isnan(v)} == {2.0}
    assert (heatmap.zmid, heatmap.zmin, heatmap.zmax) == (0, -2.0, 2.0)  # symmetric: 0 is white
    assert "#2 b minus #1 a" in figure.layout.title.text
    other_model = first.assign(site="other." + first["site"], tensor="other")
    assert sqnr_difference_heatmap(first, other_model, "a", "b") is None


def test_the_site_error_table_averages_each_tensor_over_layers_and_directions():
    report = _report(2)
    report.loc[report["site"] == "layers.1.bwd.C", "sqnr_db"] = -4.0
    records = [RunRecord.from_dict(_record_fields(site_errors=site_errors_of(report, 32))),
               RunRecord.from_dict(_record_fields(method="per_tensor"))]  # measured nothing: no row
    header, rule, row, *rest = site_error_table(records).splitlines()
    assert not rest and header.startswith("| run | in_proj.input | in_proj.weight | x_proj.input |")
    assert header.endswith("| out_proj.weight | lowest |") and rule.count("---") == 15
    cells = dict(zip(header.strip("| ").split(" | ")[1:], row.strip("| ").split(" | ")[1:], strict=True))
    c = report[report["tensor"] == "C"]["sqnr_db"]
    assert cells["C"] == f"{c.mean():.1f}" and cells["lowest"] == "layers.1.bwd.C -4.0"
    assert row.startswith("| ouromamba W4A4O8, real × 8 |") and site_error_table(records[1:]) == ""


def test_a_quantizers_sqnr_along_the_scan_marks_its_windows_and_mean():
    values = np.array([10.0, 20.0, np.inf, 30.0, 40.0, -np.inf, 25.0])
    figure = step_sqnr_figure(values, "layers.1.bwd.B", 32, window=3)
    line = figure.data[0]
    assert list(line.x) == list(range(7)) and np.isnan(line.y[2]) and np.isnan(line.y[5])  # not drawable
    lines = [shape for shape in figure.layout.shapes if shape.x0 == shape.x1]
    assert [shape.x0 for shape in lines] == [2.5, 5.5]  # windows start at steps 3 and 6
    mean = [shape for shape in figure.layout.shapes if shape.y0 == shape.y1]
    assert mean[0].y0 == 25.0 and "backward scan order" in figure.layout.xaxis.title.text
    assert "refresh windows of 3 steps" in figure.layout.title.text
    plain = step_sqnr_figure(values[:2], "layers.0.in_proj.input", 32)
    assert all(shape.y0 == shape.y1 for shape in plain.layout.shapes) and "token order" in plain.layout.xaxis.title.text


def test_cells_print_rounded_values_and_never_minus_zero():
    grid = np.array([[0.04, -0.04, -1.26], [np.nan, 12.5, -0.0]])
    assert cell_text(grid, "{:+.1f}") == [["+0.0", "+0.0", "-1.3"], ["", "+12.5", "+0.0"]]
    assert cell_text(grid, "{:.0f}")[1] == ["", "12", "0"]
