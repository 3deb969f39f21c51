"""The Quantize and Compare tabs served in-process and driven through their API, and the core helpers behind
them: the run log (JSON lines), override parsing, the runs table, figures and the standalone HTML report."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

from app.common import Run
from app.compare_tab import NO_PAIR, build_compare_tab, kept_pair, measured_runs, pair_figure
from app.quantize_tab import (
    RUNS_DIR_ENV,
    RUNS_FILE,
    build_quantize_tab,
    lowest_sqnr_text,
    overrides_for,
    overrides_from_record,
    runs_file,
    top_k_figure,
)
from app.site_errors_section import KEPT_FLOAT, raised, site_choices, with_site_override
from core.cli import main
from core.error_figures import DEFAULT_METRIC
from core.errors import StudioError
from core.experiments import RunRecord, append_record, load_records
from core.quant import QuantConfig
from core.quant.config import parse_overrides, set_override
from core.quant.packed import load_packed
from core.report import accuracy_figure, html_report, latency_figure, run_label, runs_frame, write_report
from core.workspace import default_workspace
from tests.test_app import plotly_values
from tests.test_workspace import tiny_vim

# method, w_bits, a_bits, o_bits, k, n_refresh, calibration source, count, epochs, seed, test images, overrides
FAST = ("ouromamba", 4, 4, 8, 3, 10, "real", 8, 0, 0, 40, "")


def _serve(build) -> tuple[gr.Blocks, Client]:
    with gr.Blocks() as demo:
        build()
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    return demo, Client(demo.local_url, verbose=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app_runs") / RUNS_FILE


@pytest.fixture(scope="module")
def served(runs: Path):
    """Both tabs on one page, logging to a temporary run log, as app/ui.py wires them."""

    def build() -> None:
        workspace = gr.State(default_workspace())
        with gr.Tab("Quantize"):
            record = build_quantize_tab(workspace, default_workspace(), runs)
        with gr.Tab("Compare"):
            build_compare_tab(runs, record)

    demo, client = _serve(build)
    try:
        yield demo, client
    finally:
        demo.close()


def _job(demo: gr.Blocks, api_name: str):
    return next(f.fn for f in demo.fns.values() if f.api_name == api_name)


def test_run_reports_top1_against_fp_and_is_logged(served, runs: Path):
    _, client = served
    (text, plot, sensitivity, gallery, record, model_file, weight_site, weights, top_k, diagram, diagram_layer,
     diagram_metric, pick_site, along_the_scan) = client.predict(*FAST, api_name="/quantize")
    assert not record["cached"] and record["method"] == "ouromamba" and record["setting"] == "W4A4O8"
    assert record["test_images"] == 40 and 0 <= record["top1"] <= 100 and 0 <= record["fp_top1"] <= 100
    assert record["delta_vs_fp"] == pytest.approx(record["top1"] - record["fp_top1"], abs=0.011)
    assert record["calibration"] == {"source": "real", "images": 8, "seed": 0}
    assert record["model"] == "default_model" and "model.safetensors (sha256 " in record["checkpoint"]
    assert record["data"].startswith("fashion-mnist/test") and f"test images of {record['data']}" in text
    assert record["config"]["reconstruction"]["epochs"] == 0 and "torch" in record["versions"] and record["date"]
    assert f"Top-1: {record['top1']:.2f} %" in text and f"FP32 {record['fp_top1']:.2f} %" in text
    assert "CPU fake-quant timings" in text and "8 `real` images, seed 0" in text
    suggestion = record["suggested_overrides"]  # from the 8 calibration images, as the summary says
    assert "Mixed-precision suggestion" in text and isinstance(suggestion, dict)
    assert all(change == {"w_bits": 8, "a_bits": 8} for change in suggestion.values())
    assert ("keep layer" in text) == bool(suggestion)
    figure = json.loads(plot["plot"])
    assert figure["data"][0]["type"] == "heatmap" and len(figure["data"][0]["y"]) == 4  # the default model's depth
    # the block diagram opens on the layer with the heatmap's lowest SQNR, and colours its quantizers by it
    z = plotly_values(figure["data"][0]["z"])
    worst = int(np.nanargmin(np.nanmin(z, axis=1)))
    assert diagram_layer["value"] == worst and diagram_metric["value"] == DEFAULT_METRIC  # gradio updates
    drawn = json.loads(diagram["plot"])
    assert drawn["layout"]["title"]["text"].startswith(f"Layer {worst}: {DEFAULT_METRIC}")
    nodes = next(trace for trace in drawn["data"] if "colorbar" in trace.get("marker", {}))
    expected = sorted(z[worst][~np.isnan(z[worst])])
    assert sorted(plotly_values(nodes["marker"]["color"])) == pytest.approx(expected)  # each quantizer once
    # the site picker lists all 88 quantizers, worst first, the worst picked: a site of the worst layer
    sites = [site for _, site in pick_site["choices"]]
    assert len(sites) == 4 * 22 and pick_site["value"] == sites[0] and sites[0].startswith(f"layers.{worst}.")
    assert f"{np.nanmin(z):.1f} dB" in pick_site["choices"][0][0]
    assert f"| **Lowest SQNR** | `{sites[0]}` {np.nanmin(z):.1f} dB alone; `" in text
    # along the scan: the worst quantizer that has time-steps, its 50 steps, OuroMamba's windows of 10
    along = json.loads(along_the_scan["plot"])
    first_with_steps = next(s for s in sites if not s.endswith((".weight", ".A", ".D")))
    title = along["layout"]["title"]["text"]
    assert title.startswith(f"{first_with_steps}: SQNR per time-step") and "first 32 test images" in title
    assert len(plotly_values(along["data"][0]["y"])) == 50
    assert sorted(s["x0"] for s in along["layout"]["shapes"] if s["x0"] == s["x1"]) == [9.5, 19.5, 29.5, 39.5]
    bars = json.loads(sensitivity["plot"])["data"][0]
    assert bars["type"] == "bar" and len(bars["x"]) == 4 and all(0 <= t <= 100 for t in bars["customdata"])
    # every projection's weights on their 4-bit grid, the first shown: 4 layers × (in, out, 2 × (x, dt))
    assert weight_site["value"] == "layers.0.in_proj.weight" and len(weight_site["choices"]) == 4 * 6
    figure = json.loads(weights["plot"])
    histogram, channels = figure["data"]
    assert histogram["type"] == "bar" and sum(histogram["y"]) == 256 * 64  # in_proj: (2E, D) = (256, 64)
    assert len(channels["x"]) == 256 and "4-bit grid (codes -7…7)" in figure["layout"]["title"]["text"]
    assert len(gallery) == record["changed_predictions"] <= 40
    assert all(" → quantized " in item["caption"] for item in gallery)
    if gallery:  # the first changed image's top classes, FP32 beside quantized; their top classes differ
        first = json.loads(top_k["plot"])
        fp_bars, quantized_bars = first["data"]
        assert fp_bars["y"][-1] != quantized_bars["y"][-1]  # most probable on top (the last bar)
        caption = gallery[0]["caption"]
        assert f"{fp_bars['y'][-1].strip()} → quantized {quantized_bars['y'][-1].strip()}" in caption
        assert caption.split(" ")[0] in first["layout"]["title"]["text"]
    else:
        assert top_k is None
    assert [r.top1 for r in load_records(runs)] == [record["top1"]]
    # the integer model: saved beside the run log, named in the record, offered for download, and it loads
    assert "Integer model (weight codes + scales" in text
    assert Path(record["quantized_model"]).parent == runs.parent / "models"
    assert load_records(runs)[0].quantized_model == record["quantized_model"]
    packed = load_packed(model_file)
    assert packed.config.to_dict() == record["config"] and packed.linears["layers:0:in_proj:weight"].w_bits == 4


def test_use_suggestion_adds_the_suggested_overrides_to_the_box():
    ran_with = {"*.out_proj.*": {"k": 2}}
    record = {"config": {"overrides": ran_with},
              "suggested_overrides": {**ran_with, "layers.0.*": {"w_bits": 8, "a_bits": 8}}}
    assert parse_overrides(overrides_from_record(record, json.dumps(ran_with))) == record["suggested_overrides"]
    # a site the picker kept since the run stays, and the suggestion goes last; pressing twice adds nothing
    picked = '{"*.out_proj.*": {"k": 2}, "layers.3.fwd.B": {"skip": true}}'
    text = overrides_from_record(record, picked)
    assert list(parse_overrides(text).items()) == [*parse_overrides(picked).items(),
                                                   ("layers.0.*", {"w_bits": 8, "a_bits": 8})]
    assert overrides_from_record(record, text) == text
    # the run's own overrides taken out of the box by hand are not put back
    assert parse_overrides(overrides_from_record(record, "")) == {"layers.0.*": {"w_bits": 8, "a_bits": 8}}
    # a layer the run already raised, but before a broader pattern that lowered it again: the suggestion moves it last
    lowered = {"layers.1.*": {"w_bits": 8, "a_bits": 8}, "*.in_proj.*": {"w_bits": 4}}
    moved = {"config": {"overrides": lowered},
             "suggested_overrides": {"*.in_proj.*": {"w_bits": 4}, "layers.1.*": {"w_bits": 8, "a_bits": 8}}}
    assert list(parse_overrides(overrides_from_record(moved, json.dumps(lowered)))) == ["*.in_proj.*", "layers.1.*"]
    for nothing in (None, {"suggested_overrides": {}}):  # no run shown, or nothing to suggest: the box stays
        assert overrides_from_record(nothing, text) == gr.skip()
    with pytest.warns(UserWarning, match="Suggestion not added: overrides are not valid JSON"):  # gradio's toast
        assert overrides_from_record(record, '{"layers.0.*": ') == gr.skip()  # a typo is kept, to be fixed


def test_a_new_model_takes_out_the_overrides_that_match_none_of_its_sites(served):
    """Overrides typed for the 4-layer default model, then a 2-layer model loaded: the patterns it has no site for
    leave the box (the next run would refuse them) and the status spells them out, so none is lost."""
    two_layers = replace(default_workspace(), model=tiny_vim())
    typed = '{"layers.0.*": {"w_bits": 8}, "layers.3.out_proj.input": {"a_bits": 8}, "*.h": {"skip": true}}'
    kept, gone = overrides_for(two_layers, typed)
    assert parse_overrides(kept) == {"layers.0.*": {"w_bits": 8}, "*.h": {"skip": True}}
    assert gone == {"layers.3.out_proj.input": {"a_bits": 8}}
    assert overrides_for(default_workspace(), typed) == (typed, {})
    assert overrides_for(two_layers, '{"layers.2.*": {"w_bits": 8}}') == ("", {"layers.2.*": {"w_bits": 8}})
    assert overrides_for(two_layers, "{not json") == ("{not json", {})  # the next run says what is wrong
    demo, _ = served
    cleared = next(f.fn for f in demo.fns.values() if f.fn.__name__ == "cleared")
    status, *_, box = cleared(two_layers, typed)
    assert box == kept and "**Overrides taken out**" in status
    assert '{"layers.3.out_proj.input": {"a_bits": 8}}' in status
    assert cleared(default_workspace(), typed)[-1] == typed


def test_repeated_run_is_cached_and_not_logged_again(served, runs: Path):
    _, client = served
    first = client.predict(*FAST, api_name="/quantize")[4]
    text, _, _, _, again, model_file, *_ = client.predict(*FAST, api_name="/quantize")
    assert again["cached"] and "Cached" in text
    assert again["top1"] == first["top1"] and again["date"] == first["date"]
    assert len(load_records(runs)) == 1 and Path(model_file).name == Path(first["quantized_model"]).name


@pytest.mark.parametrize(("overrides", "expected"), [
    ("{bad", "overrides are not valid JSON"),
    ('["layers.0.*"]', 'overrides must map site patterns to field changes, e.g. {"layers.0.\\*": {"w_bits": 8}}'),
    ('{"*.out_proj.input": {"w_bits": 8}}', "override '\\*.out_proj.input' changes nothing"),  # * shown, not italics
    ('{"layers.0.*": {"bits": 8}}', "unknown fields ['bits']"),
])
def test_bad_overrides_are_one_line(served, overrides: str, expected: str):
    _, client = served
    text, _, _, _, record, *_ = client.predict(*FAST[:-1], overrides, api_name="/quantize")
    assert record is None and text.startswith("**Error:**") and expected in text and "\n" not in text


@pytest.mark.parametrize(("position", "value", "expected"), [
    (10, 20_000, "test images must be from 1 to 10,000 (got 20000)"), (8, -1, "epochs must be from 0 to 100"),
    (5, 0, "n_refresh must be from 1 to 50 (got 0)"), (6, "no/such/folder", "neither 'real', 'noise' nor a folder"),
    (5, 1_000_000, "n_refresh must be from 1 to 50"),  # was a run padding every scan to a million steps
    (7, 2000, "calibration images must be from 1 to 1,024 (got 2000)"), (4, -0.5, "k must be from 0.5 to 8"),
    (7, 8.5, "calibration images must be a whole number from 1 to 1,024 (got 8.5)"),  # was rounded to 8 silently
    (9, 1.5, "the seed must be a whole number"), (5, 9.99, "n_refresh must be a whole number from 1 to 50"),
    (4, 1e9, "k must be from 0.5 to 8"), (9, 10**23, "the seed must be a whole number from 0 to 4,294,967,295"),
    (11, '{"*": {"skip": true}}', "the overrides skip every quantizer"),
    (10, None, "test images must be from 1 to 10,000 (got nothing)"),
    (11, '{"layers.0.*": {"w_bits": 12}}', "w_bits must be an integer from 2 to 8"),
    (11, '{"layers.0.*": {"n_refresh": 0}}', "n_refresh must be a whole number of time-steps ≥ 1, got 0"),
])
def test_out_of_range_input_is_one_line(served, position: int, value, expected: str):
    _, client = served
    inputs = list(FAST)
    inputs[position] = value
    text, _, _, _, record, *_ = client.predict(*inputs, api_name="/quantize")
    assert record is None and text.startswith("**Error:**") and expected in text and "\n" not in text


def test_bits_outside_the_choices_are_refused_by_gradio(served):
    """The bit-width radios only offer 4, 6 and 8: anything else never reaches the job."""
    _, client = served
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict(FAST[0], 5, *FAST[2:], api_name="/quantize")


def test_cancel_stops_the_run(served, runs: Path):
    demo, _ = served
    run = Run()

    def progress(value, desc: str = "", unit: str = "") -> None:
        """Press Cancel once calibration has gone through a few sites."""
        if unit == "sites" and value[0] >= 3:
            run.cancel.set()

    before = len(load_records(runs))
    text, _, _, _, record, *_ = _job(demo, "quantize")(default_workspace(), *FAST[:-2], 30, "", run,
                                                       progress=progress)
    assert text.startswith("**Stopped:**") and "calibration cancelled after 3 of" in text and record is None
    assert run.done and len(load_records(runs)) == before


def test_compare_lists_runs_and_downloads(served, runs: Path):
    _, client = served
    client.predict(*FAST, api_name="/quantize")
    text, _, _, _, other, no_model, *_ = client.predict("per_tensor", 8, 8, 8, 3, 10, "noise", 8, 0, 1, 40,
                                                        '{"layers.0.*": {"w_bits": 6}}', api_name="/quantize")
    assert other["setting"] == "W8A8" and other["calibration"]["source"] == "noise"
    assert no_model is None and other["quantized_model"] == "" and "No integer model to download: cannot pack" in text
    (status, table, accuracy, latency, csv_file, json_file, html_file, models, first, second, metric, pair,
     pair_status) = client.predict(api_name="/compare")
    assert [Path(m).name for m in models] == [Path(r.quantized_model).name for r in load_records(runs)
                                              if r.quantized_model]
    assert status.startswith("2 run(s)") and "Fake-quant timings" in status
    rows = [dict(zip(table["headers"], row, strict=True)) for row in table["data"]]
    assert [(r["method"], r["setting"], r["calibration"]) for r in rows] == [
        ("ouromamba", "W4A4O8", "real × 8, seed 0"), ("per_tensor", "W8A8", "noise × 8, seed 1")]
    assert rows[1]["Δ vs FP"] == other["delta_vs_fp"] and rows[1]["hardware"].startswith("CPU")
    worst = min(other["site_errors"]["rows"], key=lambda row: row["sqnr_db"])
    assert rows[1]["lowest SQNR"] == f"{worst['site']} {worst['sqnr_db']:.1f} dB"
    assert json.loads(rows[1]["config"])["overrides"] == {"layers.0.*": {"w_bits": 6}}
    assert "CPU fake-quant" in json.loads(latency["plot"])["layout"]["title"]["text"]
    assert {t["name"] for t in json.loads(accuracy["plot"])["data"]} == {"ouromamba O8", "per_tensor + overrides"}
    with open(csv_file, newline="") as f:  # the table's run labels and weakest quantizers, then the records
        exported = list(csv.DictReader(f))
    assert [r["method"] for r in exported] == ["ouromamba", "per_tensor"]
    assert [(r["run"], r["lowest SQNR"]) for r in exported] == [(r["run"], r["lowest SQNR"]) for r in rows]
    assert [r["top1"] for r in json.loads(Path(json_file).read_text())] == [r["top-1 (%)"] for r in rows]
    page = Path(html_file).read_text()
    assert page.startswith("<!DOCTYPE html>") and "Top-1 accuracy vs bit-width" in page
    assert 'class="plotly-graph-div"' in page and "per_tensor" in page and "noise × 8, seed 1" in page
    assert "<script src=" not in page and len(page) > 1_000_000  # plotly.js inlined: no server, no network
    # the two runs quantizer by quantizer: B, the newest (8-bit), minus A (4-bit) per layer and tensor
    assert (first["value"], second["value"]) == (0, 1) and [label for label, _ in first["choices"]] == [
        "#2 per_tensor W8A8 noise×8 seed 1 +1 override", "#1 ouromamba W4A4O8 real×8"]
    assert pair_status.startswith("#2 per_tensor W8A8 noise×8 seed 1 +1 override against #1 ouromamba W4A4O8 real×8")
    assert "first 32" in pair_status
    logged = {i: {row["site"]: row["sqnr_db"] for row in r.site_errors["rows"]} for i, r in enumerate(load_records(
        runs))}
    difference = plotly_values(json.loads(pair["plot"])["data"][0]["z"])
    assert difference.shape == (4, 22)
    assert difference[1, 0] == pytest.approx(logged[1]["layers.1.in_proj.input"] - logged[0]["layers.1.in_proj.input"])


def test_runs_persist_for_a_new_app(served, runs: Path):
    """Another app (a restart) on the same run log shows the runs logged before."""
    _, client = served
    client.predict(*FAST, api_name="/quantize")
    demo, fresh = _serve(lambda: build_compare_tab(runs, gr.JSON()))
    try:
        status, table, *_ = fresh.predict(api_name="/compare")
    finally:
        demo.close()
    first = dict(zip(table["headers"], table["data"][0], strict=True))
    assert status.startswith(f"{len(load_records(runs))} run(s)") and first["method"] == "ouromamba"


def test_a_run_made_in_the_app_is_made_again_by_the_command_line(served, runs: Path, capsys):
    """The record alone (weights checked by SHA-256, test images, calibration, seed, config) gives the app's
    top-1 again, through the engine's own evaluation batch size."""
    _, client = served
    record = client.predict(*FAST, api_name="/quantize")[4]
    number = next(i for i, r in enumerate(load_records(runs), start=1)
                  if (r.date, r.config) == (record["date"], record["config"]))
    capsys.readouterr()
    assert main(["rerun", str(runs), "--run", str(number)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"#{number} ouromamba W4A4O8 real×8: top-1 {record['top1']:.2f} % recorded")
    assert f"{record['top1']:.2f} % now" in printed and printed.endswith(": the same")


def test_empty_and_broken_logs_are_messages(tmp_path: Path):
    empty, broken = tmp_path / "none.jsonl", tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    demo, client = _serve(lambda: (build_compare_tab(empty, gr.JSON()), build_compare_tab(broken, gr.JSON())))
    try:
        endpoints = list(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
        (first, *_), (second, *_) = answers = [client.predict(api_name=name) for name in endpoints]
    finally:
        demo.close()
    html_file, models, *_, pair, pair_status = answers[0][6:]
    assert first.startswith("No runs logged") and html_file is None and models is None and pair is None
    assert pair_status.startswith("Two runs that measured")
    assert second.startswith("**Error:** line 1 of") and "not a run record" in second


def test_runs_file_follows_the_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv(RUNS_DIR_ENV, str(tmp_path))
    assert runs_file() == tmp_path / RUNS_FILE
    monkeypatch.delenv(RUNS_DIR_ENV)
    assert runs_file().parent.parts[-2:] == ("results", "app_runs")


# core helpers

def _record(**changes) -> RunRecord:
    record = RunRecord(model="default_model", method="ouromamba", setting="W4A8O8",
                       calibration={"source": "real", "images": 128, "seed": 0}, top1=88.9, fp_top1=88.94,
                       delta_vs_fp=-0.04, test_images=1000, calibration_seconds=30.0, eval_seconds=12.0,
                       hardware="CPU (2 threads, x86_64)", config={"w_bits": 4, "a_bits": 8, "overrides": {}},
                       versions={"python": "3.11", "torch": "2"}, date="2026-01-01T00:00:00+00:00")
    return replace(record, **changes)


def test_run_log_round_trip_and_errors(tmp_path: Path):
    log = tmp_path / "deep" / "runs.jsonl"
    assert load_records(log) == []
    records = [_record(), _record(method="ptq4vm", setting="W4A4", config={"w_bits": 4, "a_bits": 4})]
    for record in records:
        append_record(record, log)
    assert load_records(log) == records
    with log.open("a") as f:
        f.write('{"method": "x"}\n')
    with pytest.raises(StudioError, match="line 3 of .* is not a run record"):
        load_records(log)
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(StudioError, match="could not save the run"):
        append_record(records[0], blocked / "runs.jsonl")


def test_a_torn_line_in_the_run_log_never_swallows_the_next_run(tmp_path: Path):
    """A crash mid-append left a line without its newline, and the next run's record was glued onto it: both
    lost to the log's reader. The next record now starts a line of its own, so removing the torn line (what the
    reader's message asks) keeps every run."""
    log = tmp_path / "runs.jsonl"
    first, second = _record(), _record(method="ptq4vm")
    append_record(first, log)
    with log.open("a") as f:
        f.write('{"model": "torn')
    append_record(second, log)
    lines = log.read_text().splitlines()
    assert lines[1] == '{"model": "torn' and RunRecord.from_dict(json.loads(lines[2])) == second
    with pytest.raises(StudioError, match="line 2 of .* is not a run record"):
        load_records(log)


def test_a_disk_that_fills_mid_append_leaves_no_torn_line(tmp_path: Path):
    """Out of space halfway through a record: the log is cut back to where it was (a file-size limit stands in
    for the full disk, in a child process so that the limit and its signal stay there)."""
    log = tmp_path / "runs.jsonl"
    append_record(_record(), log)
    before = log.read_bytes()
    root = Path(__file__).resolve().parent.parent
    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(root)!r})
from core.errors import StudioError
from core.experiments import append_record, load_records
from pathlib import Path
log = Path({str(log)!r})
record = load_records(log)[0]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (log.stat().st_size + 100, resource.RLIM_INFINITY))
try:
    append_record(record, log)
except StudioError as err:
    print(err)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "could not save the run" in result.stdout, result.stderr
    assert log.read_bytes() == before and len(load_records(log)) == 1


def test_parse_overrides():
    assert parse_overrides("") == {} and parse_overrides("  \n") == {}
    assert parse_overrides('{"layers.0.*": {"w_bits": 8}}') == {"layers.0.*": {"w_bits": 8}}
    with pytest.raises(StudioError, match=r"not valid JSON \(.* line 1, column 2\)"):
        parse_overrides("{oops}")
    with pytest.raises(StudioError, match="must map site patterns"):
        parse_overrides('{"layers.0.*": 8}')

    # a site picked in the Quantize tab goes last, so it wins over broader patterns; skip and bits replace each other
    broad = {"layers.0.*": {"w_bits": 6}, "layers.0.out_proj.input": {"skip": True, "k": 2}, "*.B": {"a_bits": 6}}
    raised = set_override(broad, "layers.0.out_proj.input", {"w_bits": 8, "a_bits": 8})
    assert list(raised) == ["layers.0.*", "*.B", "layers.0.out_proj.input"]
    assert raised["layers.0.out_proj.input"] == {"k": 2, "w_bits": 8, "a_bits": 8}  # its k kept, the skip ended
    assert QuantConfig(overrides=raised).for_site("layers.0.out_proj.input").a_bits == 8
    floated = set_override(raised, "layers.0.out_proj.input", {"skip": True})
    assert floated["layers.0.out_proj.input"] == {"skip": True}
    assert QuantConfig(overrides=floated).for_site("layers.0.out_proj.input") is None
    assert broad["layers.0.out_proj.input"] == {"skip": True, "k": 2}  # the input is not changed


def test_the_site_picker_lists_worst_first_and_writes_overrides():
    report = pd.DataFrame({"site": ["layers.0.in_proj.input", "layers.0.in_proj.weight", "layers.1.fwd.B"],
                           "layer": [0, 0, 1], "bits": [4.0, 4.0, float("nan")],
                           "sqnr_db": [20.0, float("nan"), 7.5], "sqnr_db_vs_fp_model": [19.0, 18.0, 30.0]})
    assert site_choices(report, "sqnr_db") == [("layers.1.fwd.B: 7.5 dB, bits ?", "layers.1.fwd.B"),
                                               ("layers.0.in_proj.input: 20.0 dB, 4 bits", "layers.0.in_proj.input"),
                                               ("layers.0.in_proj.weight: n/a, 4 bits", "layers.0.in_proj.weight")]
    assert [site for _, site in site_choices(report, "sqnr_db_vs_fp_model")][0] == "layers.0.in_proj.weight"
    text, status = with_site_override('{"layers.0.*": {"w_bits": 8}}', "layers.1.fwd.B", raised("layers.1.fwd.B"))
    assert json.loads(text) == {"layers.0.*": {"w_bits": 8}, "layers.1.fwd.B": {"a_bits": 8}}  # the field that applies
    weight, _ = with_site_override("", "layers.0.in_proj.weight", raised("layers.0.in_proj.weight"))
    assert json.loads(weight) == {"layers.0.in_proj.weight": {"w_bits": 8}}
    QuantConfig(overrides=json.loads(weight)).check_overrides(["layers.0.in_proj.weight", "layers.0.in_proj.input"])
    assert "keep `layers.1.fwd.B` at 8 bits" in status
    text, status = with_site_override(text, "layers.1.fwd.B", KEPT_FLOAT)
    assert json.loads(text)["layers.1.fwd.B"] == {"skip": True} and "in floating point" in status
    assert "packed" not in status  # not a projection's operand
    _, status = with_site_override(text, "layers.3.out_proj.input", KEPT_FLOAT)  # the kernels need both or neither
    assert "no packed integer model" in status and "add `layers.3.out_proj.weight` too" in status
    for box, site, expected in (("{oops", "layers.1.fwd.B", "not valid JSON"), ("", None, "quantize first")):
        unchanged, status = with_site_override(box, site, raised(site))
        assert isinstance(unchanged, type(gr.skip())) and status.startswith("**Error:**") and expected in status


def test_run_labels_name_what_sets_a_run_apart():
    """Runs that differ only in k, n_refresh or overrides used to share one label in every table and menu."""
    base = {"w_bits": 4, "a_bits": 4, "k": 3.0, "n_refresh": 10, "overrides": {}}
    labels = [run_label(i, _record(setting="W4A4O8", config={**base, **change})) for i, change in enumerate((
        {}, {"k": 2.0}, {"n_refresh": 5, "k": 4.5}, {"overrides": {"*.x_proj.input": {"a_bits": 8}}},
        {"overrides": {"layers.0.*": {"skip": True}, "layers.1.*": {"w_bits": 8}}}))]
    assert labels == ["#1 ouromamba W4A4O8", "#2 ouromamba W4A4O8 k 2", "#3 ouromamba W4A4O8 k 4.5 n_refresh 5",
                      "#4 ouromamba W4A4O8 +1 override", "#5 ouromamba W4A4O8 +2 overrides"]
    per_tensor = _record(method="per_tensor", setting="W4A4", config={**base, "k": 2.0})
    assert run_label(0, per_tensor) == "#1 per_tensor W4A4"  # k means nothing to a method without the rule
    # runs that differ only in their calibration images: named by them, beyond the paper's 128 real ones
    calibrations = ({"source": "noise", "images": 128, "seed": 0}, {"source": "/sets/gen_128_it20", "images": 64,
                                                                    "seed": 3})
    assert [run_label(i, _record(calibration=c)) for i, c in enumerate(calibrations)] == [
        "#1 ouromamba W4A8O8 noise×128", "#2 ouromamba W4A8O8 gen_128_it20×64 seed 3"]


def test_fp32_references_a_hair_apart_keep_readable_labels():
    """Two FP32 lines (15 and 40 test images) printed their labels on top of each other."""
    figure = accuracy_figure([_record(fp_top1=88.9, test_images=15), _record(fp_top1=89.0, test_images=40)])
    labels = {a.text[:10]: (a.xanchor, a.yanchor) for a in figure.layout.annotations if a.text.startswith("FP32")}
    assert labels["FP32 88.90"][1] == "top" and labels["FP32 89.00"][1] == "bottom"  # below the lower line,
    assert labels["FP32 88.90"][0] != labels["FP32 89.00"][0]  # above the upper one, at opposite ends


def test_table_figures_and_report():
    records = [_record(), _record(method="per_tensor", setting="W8A8", top1=88.5, delta_vs_fp=-0.44,
                                  config={"w_bits": 8, "a_bits": 8, "overrides": {}},
                                  hardware="NVIDIA H100 80GB HBM3", eval_seconds=0.5)]
    frame = runs_frame(records)
    assert list(frame["run"]) == ["#1 ouromamba W4A8O8", "#2 per_tensor W8A8"]
    assert list(frame.columns[:3]) == ["run", "top-1 (%)", "Δ vs FP"]  # what a narrow table must still show
    assert list(frame["eval ms / image"]) == [12.0, 0.5] and list(frame["calibration"])[0] == "real × 128, seed 0"
    assert runs_frame([]).empty and "config" in runs_frame([]).columns
    accuracy = accuracy_figure(records)
    assert list(accuracy.layout.xaxis.categoryarray) == ["W4A8", "W8A8"]
    assert [t.name for t in accuracy.data] == ["ouromamba O8", "per_tensor"]
    latency = latency_figure(records)
    assert [t.name for t in latency.data] == ["CPU fake-quant timing: CPU (2 threads, x86_64)",
                                              "GPU fake-quant timing: NVIDIA H100 80GB HBM3"]
    assert latency.layout.title.text.startswith("Fake-quant timings")
    assert latency_figure(records[:1]).layout.title.text.startswith("CPU fake-quant timings")
    page = html_report(records)
    assert page.count('class="plotly-graph-div"') == 2 and "#2 per_tensor W8A8" in page and "<table" in page
    with pytest.raises(StudioError, match="no runs"):
        html_report([])


def test_gpu_kernel_timings_get_their_own_labelled_bars():
    timing = {"hardware": "NVIDIA H100 80GB HBM3", "batch": 64, "repeats": 5, "fp16_ms": 6.4, "packed_ms": 3.2}
    records = [_record(), _record(kernel_latency=timing)]
    latency = latency_figure(records)
    names = [t.name for t in latency.data]
    assert names[1:] == ["FP16 model, batch 64: NVIDIA H100 80GB HBM3",
                         "packed integer model (Triton kernels), batch 64: NVIDIA H100 80GB HBM3"]
    assert list(latency.data[1].x) == ["#2 ouromamba W4A8O8"] and list(latency.data[2].y) == [0.05]
    assert "GPU kernel timings where measured" in latency.layout.title.text
    assert not latency.layout.title.text.startswith("CPU")
    graphed = {**timing, "fp16_graph_ms": 3.2, "packed_graph_ms": 1.6}
    names = [t.name for t in latency_figure([_record(), _record(kernel_latency=graphed)]).data]
    assert names[3:] == ["FP16 model, CUDA graph, batch 64: NVIDIA H100 80GB HBM3",
                         "packed integer model, CUDA graph, batch 64: NVIDIA H100 80GB HBM3"]
    # the hover says which FP16 forward was timed; records from before FusedVim timed the model's own
    fused = {**timing, "fp16_model": "fused float path, FusedVim"}
    latency = latency_figure([_record(kernel_latency=timing), _record(kernel_latency=fused)])
    assert list(latency.data[1].customdata) == ["the model's own forward", "fused float path, FusedVim"]
    assert list(latency.data[2].customdata) == ["Triton kernels", "Triton kernels"]


def test_kernel_latency_times_both_models_on_the_named_hardware():
    """The plumbing, on the CPU (where the packed model runs its references: the app never shows this)."""
    import torch

    from core.experiments import kernel_latency
    from core.models import VimConfig, VisionMamba
    from core.quant import QuantConfig, ReconstructionConfig, quantize
    from core.quant.packed import pack
    torch.manual_seed(0)
    model = VisionMamba(VimConfig(img_size=16, patch_size=4, stride=4, in_chans=1, num_classes=4, embed_dim=32,
                                  depth=1)).eval()
    images = torch.randn(4, 1, 16, 16)
    packed = pack(quantize(model, QuantConfig(reconstruction=ReconstructionConfig(epochs=0)), images))
    timing = kernel_latency(model, packed, images, "cpu", repeats=2)
    assert timing["hardware"].startswith("CPU") and timing["batch"] == 4 and timing["repeats"] == 2
    assert timing["fp16_ms"] > 0 and timing["packed_ms"] > 0 and timing["launches"] == "tuned per shape"
    assert timing["fp16_model"] == "the model's own forward"  # FusedVim runs no kernels on the CPU
    assert packed.model.layers[0].mixer.in_proj.weight is None  # measured on copies: the packed model is untouched


def test_write_report_makes_its_folder(tmp_path: Path):
    path = write_report([_record()], tmp_path / "sub" / "report.html")
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_the_gpu_timing_note_states_eager_and_graph_timings_and_keeps_the_run_when_timing_fails(monkeypatch):
    """With CUDA present (faked here) the note quotes what kernel_latency measured; a failing kernel gives one line
    and leaves the run's record without a timing."""
    import torch

    import app.quantize_tab as tab
    from core.data import LabelledImages
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    timing = {"hardware": "NVIDIA H100 80GB HBM3", "batch": 4, "repeats": 5, "fp16_ms": 8.0, "packed_ms": 16.0,
              "fp16_graph_ms": 4.0, "packed_graph_ms": 2.0, "launches": "tuned per shape",
              "fp16_model": "fused float path, FusedVim"}
    monkeypatch.setattr(tab, "kernel_latency", lambda *args: timing)
    test = LabelledImages(torch.zeros(4, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), ("a",), "zeros")
    record = _record()
    note = tab.gpu_kernel_note(default_workspace(), object(), test, record)
    assert "FP16 (fused float path, FusedVim) 8.00 ms, packed integer model 16.00 ms (0.50× FP16)" in note
    assert "as CUDA graphs (no launch overhead) 4.00 ms and 2.00 ms (2.00×); kernel launches tuned per shape." in note
    assert record.kernel_latency == timing

    def broken(*args):
        raise RuntimeError("triton compile error\nlong trace")
    monkeypatch.setattr(tab, "kernel_latency", broken)
    record = _record()
    assert tab.gpu_kernel_note(default_workspace(), object(), test, record) == \
        " GPU kernel timing failed: triton compile error."
    assert not record.kernel_latency


def test_the_sweep_scores_each_pair_on_validation_images_and_caches(served):
    """k × n_refresh with the tab's bits and calibration: one row and one plotted point per pair, scored on
    the held-out validation images; the same request again comes from the cache."""
    _, client = served
    status, plot, table, saved = client.predict(4, 4, "real", 8, 0, "2, 5", "10", 150, api_name="/sweep")
    assert "W4A4O8 on the first 150 validation images" in status and "no reconstruction" in status
    assert re.search(r"uncertain by about ±\d\.\d points", status)
    rows = table["data"]
    columns = table["headers"]
    assert len(rows) == 2 and [row[columns.index("k")] for row in rows] == [2.0, 5.0]
    share = columns.index("outlier_share_pct")
    assert rows[0][share] > rows[1][share] > 0  # a lower threshold keeps more channels at 8 bits
    figure = json.loads(plot["plot"])
    assert [trace["name"] for trace in figure["data"]] == ["n_refresh 10"] and len(figure["data"][0]["x"]) == 2
    # the points travel with what reproduces them (the table alone named neither the model nor the versions)
    record = json.loads(Path(saved).read_text())
    assert [point["k"] for point in record["points"]] == [2.0, 5.0] and record["setting"] == "W4A4O8"
    assert record["calibration"] == {"source": "real", "images": 8, "seed": 0} and record["validation_images"] == 150
    assert record["model"] == "default_model" and record["fingerprint"] and record["versions"]["torch"]
    assert record["base_config"]["reconstruction"]["epochs"] == 0 and record["outlier_images"] == 150
    again, *_, saved_again = client.predict(4, 4, "real", 8, 0, "2, 5", "10", 150, api_name="/sweep")
    assert again.endswith("Cached: swept earlier with the same settings.")
    assert json.loads(Path(saved_again).read_text())["points"] == record["points"]


@pytest.mark.parametrize(("ks", "refreshes", "images", "expected"), [
    ("2, x", "10", 100, "k values: type numbers separated by commas"),
    ("0, 3", "10", 100, "k values must each be from 0.5 to 8"), ("nan", "10", 100, "k values must each be from 0.5"),
    ("3, inf", "10", 100, "k values must each be from 0.5"),
    ("3", "100000", 100, "n_refresh values must each be from 1 to 50"),
    ("3", "0", 100, "n_refresh values must each be from 1 to 50"), ("3", "2.5", 100, "n_refresh values: type numbers"),
    ("1 2 3 4 5 6", "1 2 3 4 5 6", 100, "36 points; at most 30"), ("3", "10", 9000, "validation images must be from 1"),
])
def test_the_sweeps_bad_input_is_one_line(served, ks: str, refreshes: str, images: int, expected: str):
    _, client = served
    status, *_ = client.predict(4, 4, "real", 8, 0, ks, refreshes, images, api_name="/sweep")
    assert status.startswith("**Error:**") and expected in status and "\n" not in status


def test_top_k_figure_shows_the_selected_image_and_nothing_out_of_range():
    items = [{"index": i, "truth": "Bag", "fp": [("Bag", 0.7), ("Shirt", 0.2)],
              "quantized": [("Shirt", 0.6), ("Bag", 0.3)]} for i in (3, 9)]
    figure = top_k_figure(items, 1)
    fp_bars, quantized_bars = figure.data
    assert "#9 (true class Bag)" in figure.layout.title.text
    assert list(fp_bars.y) == ["Shirt ", "Bag "] and list(fp_bars.x) == [0.2, 0.7]  # most probable on top
    assert list(quantized_bars.marker.color) == ["#2ca02c", "#1f77b4"]  # the true class in green
    assert top_k_figure(items, 2) is None and top_k_figure(None) is None and top_k_figure([], 0) is None



def test_the_pair_of_runs_says_when_it_was_measured_on_other_images():
    errors = {"images": 2, "rows": [{"site": "layers.0.in_proj.input", "bits": 4, "sqnr_db": 20.0, "cosine": 0.99,
                                     "sqnr_db_vs_fp_model": 20.0, "cosine_vs_fp_model": 0.99}]}
    records = [_record(site_errors=errors, data="fashion-mnist/test"), _record(site_errors=errors, data="elsewhere"),
               _record()]
    figure, status = pair_figure(records, 0, 1, "SQNR of the quantizer alone")
    assert figure.data[0].z.tolist() == [[0.0]] and "**Measured on different images**" in status
    assert "#1 ouromamba W4A8O8: first 2 of fashion-mnist/test" in status
    assert pair_figure(records, 0, 2, "SQNR of the quantizer alone") == (None, NO_PAIR)  # #3 measured nothing
    assert pair_figure(records, 0, 7, "SQNR of the quantizer alone") == (None, NO_PAIR)
    figure, status = pair_figure(records, 1, 1, "SQNR of the quantizer alone")  # a heatmap of zeros said nothing
    assert figure is None and status.startswith("**Error:**") and "the same run" in status
    assert measured_runs(records) == [("#2 ouromamba W4A8O8", 1), ("#1 ouromamba W4A8O8", 0)]


def test_refresh_keeps_the_picked_pair_while_both_runs_are_listed():
    """Refresh used to put the two newest runs back in place of a person's pick."""
    choices = [("#5", 4), ("#3", 2), ("#2", 1)]  # measured_runs: newest first
    assert kept_pair(choices, 1, 2) == (1, 2)  # the pick, as picked (A older here, but any order is a pick)
    assert kept_pair(choices, 4, 1) == (4, 1)
    assert kept_pair(choices, None, None) == (2, 4)  # nothing picked: the two newest, B the newest
    assert kept_pair(choices, 1, 1) == (2, 4)  # the same run twice is no pair
    assert kept_pair(choices, 3, 4) == (2, 4)  # run #4 measured no site errors (or the log was replaced)
    assert kept_pair(choices[:1], 4, None) == (None, None)


def test_picking_a_smaller_set_lowers_the_calibration_count(tmp_path: Path):
    """A set of 3 images against the default 128: the box follows the set (the engine refuses to calibrate on
    more images than a folder holds, where it used to use 3 and record 128)."""
    from PIL import Image

    from app.common import count_for_source
    for index in range(3):
        Image.new("L", (28, 28), index).save(tmp_path / f"{index}.png")
    assert count_for_source(str(tmp_path), 128) == 3
    skipped = gr.skip()
    assert count_for_source(str(tmp_path), 2) == skipped and count_for_source("real", 128) == skipped
    assert count_for_source(str(tmp_path / "missing"), 128) == skipped and count_for_source("", 128) == skipped


def test_the_weakest_quantizer_never_reads_minus_zero_db():
    """A per_tensor run's weakest site at −0.04 dB read '-0.0 dB'; below −0.05 the sign stays."""
    report = pd.DataFrame({"site": ["a", "b"], "sqnr_db": [-0.04, 3.0], "sqnr_db_vs_fp_model": [-0.3, 1.0]})
    assert lowest_sqnr_text(report) == "`a` 0.0 dB alone; `a` -0.3 dB against the FP model"


def test_the_weight_plot_marks_channels_whose_scale_is_at_the_floor():
    """The default run's first weight plot (layers.0.in_proj.weight) ran to ±12 million codes: two channels'
    scales at the floor. They are drawn on the grid's end as red crosses and named in the title."""
    from app.quantize_tab import weight_figure
    from core.observe import weight_grid
    from core.quant.quantizers import WeightQuantizer

    torch.manual_seed(0)
    weight = torch.randn(6, 4)
    quantizer = WeightQuantizer(weight, 4)
    with torch.no_grad():
        quantizer.scale[[1, 4]] = -0.004
    figure = weight_figure({"w": weight_grid(weight, quantizer)}, "w")
    crosses = [trace for trace in figure.data if trace.name == "scale at the floor"]
    assert len(crosses) == 1 and list(crosses[0].x) == [1, 4] and set(crosses[0].y) == {7.5}
    assert "2 channel(s) whose scale is at the floor round to 0" in figure.layout.title.text
    assert max(max(trace.y) for trace in figure.data if trace.name == "output channels") < 10
