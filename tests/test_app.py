"""The app served in-process and driven through its API, as a script or another program would use it."""

from __future__ import annotations

import base64
import contextvars
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import pytest
import torch
from gradio_client import Client

from app import outliers_tab
from app.common import (
    ENGINE,
    WAITING,
    RecentResults,
    Run,
    arm,
    calibration_choices,
    clamped,
    guarded,
    on_engine,
    sets_dir,
)
from app.synthesize_tab import set_name
from app.ui import DEFAULT_CHECKPOINT, build_app
from core.default_model import load_card
from core.errors import StudioError
from core.eval import Cancelled
from core.gen import GenConfig
from core.models import create_vim, save_safetensors
from core.workspace import default_workspace

ROOT = Path(__file__).resolve().parent.parent


def _load_app_script():
    """app.py by path: ``import app`` finds the package app/, not the script beside it."""
    spec = importlib.util.spec_from_file_location("studio_app_script", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _markdown(demo: gr.Blocks) -> str:
    """All the page's Markdown text, as built (before any event changes it)."""
    return "\n".join(str(block.value) for block in demo.blocks.values() if isinstance(block, gr.Markdown))


@pytest.fixture(scope="module")
def served():
    """The default app on a free local port, closed after the module's tests."""
    demo = build_app()
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        yield demo, Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def test_evaluate_small_subset(served):
    _, client = served
    text, record = client.predict(50, api_name="/evaluate")
    assert record["total"] == 50 and 0 <= record["top1"] <= 100 and record["correct"] <= 50
    assert record["device"].startswith("CPU") and "CPU timing" in text
    top1 = float(re.search(r"Top-1: ([\d.]+) %", text).group(1))
    assert top1 == pytest.approx(record["top1"], abs=0.01)
    assert f"{record['correct']} / 50 correct" in text


def test_repeated_request_is_served_from_cache(served):
    _, client = served
    first = client.predict(20, api_name="/evaluate")[1]
    again = client.predict(20, api_name="/evaluate")[1]
    assert not first["cached"] and again["cached"]
    assert again["top1"] == first["top1"] and again["seconds"] == first["seconds"]


@pytest.mark.parametrize("count", [0, 20000, -3])
def test_out_of_range_count_is_a_message_and_the_app_keeps_serving(served, count):
    _, client = served
    text, record = client.predict(count, api_name="/evaluate")
    assert record is None
    assert text.startswith("**Error:**") and "from 1 to 10,000" in text and str(count) in text
    assert client.predict(5, api_name="/evaluate")[1]["total"] == 5


def test_page_shows_header_and_model_card(served):
    texts = _markdown(served[0])
    assert "OuroMamba Studio" in texts and "Vision Mamba" in texts
    card = load_card()
    for expected in (card["name"], f"embed_dim={card['config']['embed_dim']}", f"{card['parameters']:,}",
                     card["training_command"], f"| **Seed** | {card['seed']} |", f"{card['val_top1']:.2f} %",
                     f"{card['test_top1']:.2f} %"):
        assert expected in texts, expected


def test_torch_work_runs_one_job_at_a_time_on_the_engine_thread_in_its_callers_context():
    """Every job's torch work on one thread, wherever Gradio calls it from (its progress bar is found through the
    caller's context variables)."""
    event = contextvars.ContextVar("event", default=None)

    def from_a_worker(name: str, results: dict) -> None:
        event.set(name)
        results[name] = on_engine(lambda: (threading.current_thread().name, event.get()))

    results: dict = {}
    workers = [threading.Thread(target=from_a_worker, args=(name, results)) for name in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    (first, seen_a), (second, seen_b) = results["a"], results["b"]
    assert first == second and first.startswith("ouromamba-engine") and (seen_a, seen_b) == ("a", "b")
    assert ENGINE.submit(lambda: threading.current_thread().name)[0].result() == first


class _Bar(gr.Progress):
    """A progress bar that keeps what it was told."""

    def __init__(self) -> None:
        super().__init__()
        self.descriptions: list[str | None] = []

    def __call__(self, progress: object, desc: str | None = None, **kwargs: object) -> None:
        self.descriptions.append(desc)


def _engine_held() -> tuple[Future, threading.Event]:
    """The engine busy with a job that waits for the returned event (set it to let the next ones run)."""
    started, release = threading.Event(), threading.Event()
    ahead, behind = ENGINE.submit(lambda: (started.set(), release.wait(60)))
    assert not behind and started.wait(10)
    return ahead, release


def test_work_behind_another_job_says_it_waits_and_runs_after_it():
    """Jobs take turns on the engine (before it, a Quantize in one tab and a Synthesize in another ran side by
    side): one that must wait says so on its progress bar rather than sitting at 0."""
    bar, results = _Bar(), []
    ahead, release = _engine_held()
    waiting = threading.Thread(target=lambda: results.append(on_engine(lambda: "done", bar)))
    waiting.start()
    for _ in range(200):  # until it has said so (it cannot run before the release)
        if bar.descriptions:
            break
        threading.Event().wait(0.05)
    assert bar.descriptions == [WAITING] and not results
    release.set()
    waiting.join(10)
    assert ahead.result() and results == ["done"]
    assert on_engine(lambda: "done", bar) == "done" and bar.descriptions == [WAITING]  # idle: nothing to say


def test_cancel_takes_a_waiting_job_out_of_the_line_at_once():
    """Cancel while a job waits behind another stops it there (it used to stop only when its turn came); its work
    never runs, and the job ahead goes on."""
    ran, cancel, outcome = [], threading.Event(), []
    ahead, release = _engine_held()

    def wait_then_record() -> None:
        try:
            on_engine(lambda: ran.append(True), _Bar(), cancel)
        except Cancelled as err:
            outcome.append(str(err))

    waiting = threading.Thread(target=wait_then_record)
    waiting.start()
    cancel.set()
    waiting.join(10)
    still_ahead = not ahead.done()
    release.set()
    ahead.result()
    assert still_ahead and not waiting.is_alive() and outcome == ["cancelled while it waited for the job ahead of it"]
    assert ENGINE.submit(lambda: "next")[0].result() == "next" and ran == []  # the line moves on without it


def _armed(session: str, previous: Run | None = None) -> Run:
    """A Run armed as Gradio arms it for a page of the session ``session`` (the request injected by annotation)."""
    from gradio.helpers import special_args

    inputs, *_ = special_args(arm, [previous], request=gr.Request(session_hash=session))
    return arm(*inputs)


def test_closing_a_page_cancels_its_unfinished_runs_and_no_other_pages(served):
    """A closed or reloaded page's jobs ran to their end, holding the engine (and every other page's jobs behind
    it) for a result nobody would see. Gradio's unload hook now cancels them: one waiting for the engine leaves
    the line at once, one running stops at its next step; finished runs and other pages' runs are left alone."""
    from gradio.helpers import special_args

    demo, _ = served
    (unload,) = [block.fn for block in demo.fns.values() if any(t[1] == "unload" for t in block.targets)]
    finished, waiting, replaced = _armed("closed"), _armed("closed"), _armed("closed")
    guarded(lambda run: None)(finished)
    latest = _armed("closed", replaced)  # a second Run press in the same tab: both are the session's
    elsewhere = _armed("open")
    outcome: list[str] = []
    ahead, release = _engine_held()

    def wait_for_the_engine() -> None:
        try:
            on_engine(lambda: outcome.append("ran"), _Bar(), waiting.cancel)
        except Cancelled as err:
            outcome.append(str(err))

    waiter = threading.Thread(target=wait_for_the_engine)
    waiter.start()
    inputs, *_ = special_args(unload, [], request=gr.Request(session_hash="closed"))
    unload(*inputs)
    waiter.join(10)
    still_ahead = not ahead.done()
    release.set()
    ahead.result()
    assert still_ahead and outcome == ["cancelled while it waited for the job ahead of it"]
    assert waiting.cancel.is_set() and latest.cancel.is_set() and replaced.cancel.is_set()
    assert not finished.cancel.is_set() and not elsewhere.cancel.is_set()
    unload(*special_args(unload, [], request=gr.Request(session_hash="closed"))[0])  # twice, or never armed: nothing
    assert not elsewhere.cancel.is_set()


def test_a_synthesis_cancelled_while_it_waits_leaves_the_line_at_once(served):
    """Synthesize waits for its work's updates rather than for on_engine: a Cancel pressed while another job held
    the engine used to take effect only when its turn came."""
    demo, _ = served
    job = next(f.fn for f in demo.fns.values() if f.api_name == "synthesize")
    run, bar = Run(), _Bar()
    ahead, release = _engine_held()
    updates: list = []
    waiter = threading.Thread(target=lambda: updates.extend(
        job(default_workspace(), None, GEN, 2, 3, "5", 12, 0.2, 1, 1, 0.2, 11, run, progress=bar)))
    waiter.start()
    for _ in range(200):  # until it is in the line
        if bar.descriptions:
            break
        threading.Event().wait(0.05)
    run.cancel.set()
    waiter.join(10)
    still_ahead = not ahead.done()
    release.set()
    ahead.result()
    assert bar.descriptions == [WAITING] and still_ahead and not waiter.is_alive()
    assert updates[-1][0] == "**Stopped:** cancelled while it waited for the job ahead of it."


def test_a_refused_input_or_a_cached_answer_never_waits_behind_another_job(served):
    """A job checks its inputs and its cache before it hands work to the engine: with the engine busy (another
    tab's Quantize) both answer at once, where they used to wait for it."""
    _, client = served
    client.predict(7, api_name="/evaluate")
    ahead, release = _engine_held()
    answers: list = []
    asking = threading.Thread(target=lambda: answers.extend([client.predict(0, api_name="/evaluate"),
                                                             client.predict(7, api_name="/evaluate")]))
    asking.start()
    asking.join(30)
    busy = not ahead.done()
    release.set()
    ahead.result()
    assert busy and not asking.is_alive()
    (refused, record), (_, cached) = answers
    assert refused.startswith("**Error:**") and record is None and cached["cached"] and cached["total"] == 7


def test_the_served_app_gives_the_engine_every_core_and_other_threads_one():
    """In a fresh process as app.py starts: one OpenMP team (the engine's) and never a second one, whose idle
    threads made the default Quantize run 2× slower served than called directly (app.common.ENGINE)."""
    script = f"""
import importlib.util, threading
spec = importlib.util.spec_from_file_location("script", {str(ROOT / "app.py")!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.one_openmp_thread_outside_the_engine()
import torch
from app.common import on_engine
engine = on_engine(torch.get_num_threads)
later = []
thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
thread.start()
thread.join()
torch.randn(2000, 2000).exp()
print(torch.get_num_threads(), engine, later[0], on_engine(torch.get_num_threads))
"""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "3"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "3", "1", "3"]  # main, engine, a thread started later, the engine again


def test_checkpoint_without_card_shows_its_architecture(tmp_path: Path):
    checkpoint = Path(shutil.copy(DEFAULT_CHECKPOINT, tmp_path / "mine.safetensors"))
    texts = _markdown(build_app(checkpoint))
    assert str(checkpoint) in texts and "embed_dim=" in texts and "No card.json beside this checkpoint" in texts


def test_checkpoint_for_other_images_starts_without_test_images(tmp_path: Path):
    model = create_vim("vim_fmnist_patch4_28_midclstok", in_chans=3, num_classes=100, embed_dim=16, depth=1)
    checkpoint = save_safetensors(model, tmp_path / "rgb.safetensors")
    texts = _markdown(build_app(checkpoint))
    assert "28×28, 3 channels, 100 classes" in texts and "not a Fashion-MNIST one and no data folder" in texts


def test_script_defaults_to_localhost():
    args = _load_app_script().parse_args([])
    assert (args.host, args.port, args.checkpoint, args.data) == ("127.0.0.1", 7860, None, None)


def test_script_bad_checkpoint_is_one_line(tmp_path: Path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage")
    assert _load_app_script().main(["--checkpoint", str(junk)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a readable checkpoint" in err and "\n" not in err


GEN = "OuroMamba-Gen (contrastive + output loss)"


def test_synthesize_makes_a_reproducible_downloadable_set(served):
    _, client = served
    status, _, gallery, real, manifest, download = client.predict(
        GEN, 3, 4, "5", 12, 0.2, 1, 1, 0.2, 7, api_name="/synthesize")
    assert "3 images from `ouromamba`" in status and "seed 7" in status and "on the CPU" in status
    assert len(gallery) == 3 and all("target" in item["caption"] for item in gallery)
    assert 1 <= len(real) <= 3 and all(item["caption"].startswith("real ") for item in real)
    assert manifest["config"]["seed"] == 7 and manifest["config"]["neighbourhood"] == 5
    assert len(manifest["images"]) == 3 and "torch" in manifest["versions"]
    with zipfile.ZipFile(download) as archive:
        names = archive.namelist()
    assert sum(n.endswith(".png") for n in names) == 3 and any(n.endswith("manifest.json") for n in names)
    again = client.predict(GEN, 3, 4, "5", 12, 0.2, 1, 1, 0.2, 7, api_name="/synthesize")
    assert "Cached" in again[0] and again[4]["images"] == manifest["images"]
    saved = Path(re.search(r"Saved as `([^`]+)`", status).group(1))
    assert saved.parent == sets_dir() and len(list(saved.glob("*.png"))) == 3
    assert str(saved) in calibration_choices()  # Quantize offers it as a calibration source


@pytest.mark.parametrize(("changes", "expected"), [
    ({1: 0}, "images must be from 1 to 256 (got 0)"),
    ({6: 0, 7: 0}, "every loss weight this source uses is 0"),  # was an AttributeError in the worker thread
    ({9: 10**23}, "the seed must be a whole number from 0 to 4,294,967,295"),  # was torch's overflow
])
def test_synthesize_bad_input_is_one_line(served, changes: dict[int, object], expected: str):
    _, client = served
    inputs = [GEN, 3, 4, "5", 12, 0.2, 1, 1, 0.2, 7]
    for position, value in changes.items():
        inputs[position] = value
    status, *_ = client.predict(*inputs, api_name="/synthesize")
    assert status.startswith("**Error:**") and expected in status and "\n" not in status


def test_a_cancelled_synthesis_puts_the_last_finished_set_back(served):
    """The stopped job's previews used to stay beside the previous set's download and manifest."""
    demo, _ = served
    job = next(f.fn for f in demo.fns.values() if f.api_name == "synthesize")
    workspace = default_workspace()
    inputs = [GEN, 2, 2, "5", 12, 0.2, 1, 1, 0.2, 3]
    quiet = {"progress": lambda *_, **__: None}
    *_, finished = job(workspace, None, *inputs, Run(), **quiet)
    made = finished[-1]
    assert made[0] == workspace.fingerprint and len(finished[2]) == 2
    stopped_run = Run()
    stopped_run.cancel.set()
    *_, last = job(workspace, made, *inputs[:2], 5, *inputs[3:], stopped_run, **quiet)  # 5 iterations: not cached
    status, losses, gallery, *rest = last
    assert status.startswith("**Stopped:**") and "cancelled at iteration 0" in status
    assert [caption for _, caption in gallery] == [item[1] for item in finished[2]]  # the finished set's images
    assert losses.layout.title.text == "losses (mean over batches)"
    assert all(isinstance(value, type(gr.skip())) for value in rest)  # download, manifest… still that set's


def test_sets_with_different_settings_never_share_a_folder():
    """The folder names what a person reads (source, count, iterations, seed), then a digest of the other
    settings: a set made with another λ used to overwrite the first one in place."""
    first = GenConfig(count=2, iterations=2, output_weight=1.0)
    names = {set_name(config, 2, "f" * 64) for config in (first, replace(first, output_weight=0.5),
                                                          replace(first, lr=0.05), replace(first, top_k=3))}
    assert len(names) == 4 and all(name.startswith("ouromamba_2_it2_seed0_") for name in names)
    assert set_name(first, 2, "f" * 64) == set_name(replace(first), 2, "f" * 64)  # the same settings: the same set
    # the name spells out the seed and the iterations; the digest covers only the other settings
    renamed = (first, replace(first, seed=1), replace(first, iterations=9))
    assert len({set_name(config, 2, "f" * 64).split("_")[-2] for config in renamed}) == 1
    real = GenConfig(source="real", count=2, iterations=50)
    assert set_name(real, 2, "f" * 64) == "real_2_seed0_ffffffff"  # no iterations: it is not optimised


def test_live_view_sliders_clamp_typed_values_and_draw_as_sliders():
    """A layer typed past the last one replaced the figure with an error badge; now it is the last layer."""
    with gr.Blocks():
        slider = clamped(gr.Slider(0, 3, 1, step=1))
    assert (slider.preprocess(9), slider.preprocess(-2), slider.preprocess(2)) == (3, 0, 2)
    assert not (ROOT / "app" / "common.pyi").exists()  # no Component subclass: gradio writes stubs beside those


def test_outlier_sentences_never_round_a_rare_outlier_to_none():
    assert [outliers_tab.count_text(v) for v in (0.0, 0.04, 0.2, 1.0, 12.34)] == ["0.0", "0.04", "0.20", "1.0", "12.3"]
    nothing = torch.zeros(1, 4, 3, dtype=torch.bool)
    assert "Nothing is flagged" in outliers_tab.static_sentence(torch.tensor([True, False, False]), None, nothing)


def test_a_bug_in_a_job_is_one_line_and_the_tab_keeps_what_it_showed():
    """Whatever escapes a job becomes a gr.Error of one line (a StudioError as it is), for functions and for
    generators, after what the generator already yielded."""
    def broken(value: int) -> int:
        return {}["missing"] + value

    def failing_generator(value: int):
        yield value
        raise StudioError("the seed needs a value")

    with pytest.raises(gr.Error) as caught:
        guarded(broken)(1)
    assert "unexpected KeyError ('missing')" in str(caught.value) and "\n" not in str(caught.value)
    outputs = guarded(failing_generator)(5)
    assert next(outputs) == 5
    with pytest.raises(gr.Error, match="the seed needs a value"):
        next(outputs)
    assert guarded(broken).__name__ == "broken"  # gradio reads the wrapped signature (gr.Progress hooks)
    run = Run()  # a job that returns early (a refused input) leaves its run done: Cancel has nothing to stop
    assert guarded(lambda value, run: value)(3, run) == 3 and run.done
    # a run that a second Run press replaced shows nothing: its "Stopped" would sit under the new run's progress
    running, finished = Run(), Run(done=True)
    assert arm(running).done is False and arm(finished).done is False
    assert running.replaced and running.cancel.is_set() and not finished.replaced
    skipped = guarded(lambda value, run: ("**Stopped:** cancelled.", value))(3, running)
    assert all(isinstance(update, type(gr.skip())) for update in skipped) and len(skipped) == 2
    assert guarded(lambda value, run: ("**Stopped:** cancelled.", value))(3, finished) == ("**Stopped:** cancelled.", 3)


def test_a_replaced_run_shows_nothing_as_gradio_calls_it_with_its_progress_bar_last():
    """Gradio passes a job's gr.Progress after the Run (helpers.special_args): guarded looked for the Run in the
    last argument only, so in the page a run replaced by a second Run press put its "Stopped" under the new
    run's progress, and a refused input left its run armed. Functions and generators."""
    from gradio.helpers import special_args

    def job(value: int, run: Run, progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 (gradio's hook)
        return "**Stopped:** cancelled.", value

    def generator(value: int, run: Run, progress: gr.Progress = gr.Progress()):  # noqa: B008 (gradio's hook)
        yield "**Stopped:** cancelled.", value

    for wrapped in (guarded(job), lambda *a: next(guarded(generator)(*a))):
        running = Run()
        arm(running)  # a second press replaced it
        inputs, progress_index, *_ = special_args(guarded(job), [3, running])
        assert progress_index == 2 and isinstance(inputs[-1], gr.Progress) and inputs[1] is running
        assert all(isinstance(update, type(gr.skip())) for update in wrapped(*inputs)) and running.done
        finished = Run()
        inputs, *_ = special_args(guarded(job), [4, finished])
        assert wrapped(*inputs) == ("**Stopped:** cancelled.", 4) and finished.done


def test_noise_source_needs_no_iterations(served):
    _, client = served
    status, losses, gallery, real, manifest, _ = client.predict(
        "Gaussian noise (no optimisation)", 2, 0, "5", 12, 0.2, 1, 1, 0.2, 0, api_name="/synthesize")
    assert "2 images from `noise`" in status and len(gallery) == 2 and real == []
    assert losses is None  # no curves to draw (an empty plot kept the previous set's axes)
    assert [image["target"] for image in manifest["images"]] == [None, None]


def test_attention_maps_of_a_test_image_and_clear_errors(served):
    _, client = served
    plot, message = client.predict("test set", 3, 2, "bwd", "patch 30 (row 4, col 2)", "5", api_name="/attention")
    assert message == "" and plot["type"] == "plotly"
    figure = json.loads(plot["plot"])
    assert [trace["type"] for trace in figure["data"]] == ["heatmap", "heatmap", "scatter", "heatmap", "scatter"]
    assert "enhanced" in json.dumps(figure["layout"]["annotations"])
    plot, message = client.predict("test set", 12_000, 2, "bwd", "CLS token", "5", api_name="/attention")
    kept = {"__type__": "update"}  # no new figure: the last maps stay on the page beside the message
    assert plot == kept and message.startswith("**Error:**") and "from 0 to 9,999 (got 12000)" in message
    plot, message = client.predict("test set", 2.5, 2, "bwd", "CLS token", "5", api_name="/attention")
    assert plot == kept and "the image number must be a whole number from 0 to 9,999 (got 2.5)" in message


def test_outliers_over_time_calibrate_then_rerun_detection_live(served):
    _, client = served
    status, summary, images = client.predict(4, "real", 8, 4, 0, api_name="/outliers_prepare")  # the key is state
    assert status.startswith("Ready") and "8 real images" in status and summary["type"] == "plotly"
    names = [trace["name"] for trace in json.loads(summary["plot"])["data"]]
    assert "x_proj.input" in names and {"SQNR with the outliers", "SQNR, all on the inlier grid"} <= set(names)
    assert [choice[0] for choice in images["choices"]] == ["max over all images"] + [f"image #{i}" for i in range(4)]
    text, heatmap, windows, misses, values, steps, data = client.predict(
        1, "x_proj input (u, after conv1d + SiLU)", "fwd", "image #2", 3, 10, api_name="/outliers_view")
    assert text.startswith("**layers.1.fwd.x_proj.input**, test image #2") and "of 128 channels" in text
    growing = float(re.search(r"grows at ([\d.]+) of its steps", text).group(1))
    assert 0 < growing <= 10  # n_refresh 10: one image's windows
    assert all(plot["type"] == "plotly" for plot in (heatmap, windows, misses, values, steps))
    # the grids: the 8-bit outliers lift this site's SQNR well above what the 4-bit grid alone gives
    alone, kept = map(float, re.search(r"SQNR of ([\d.]+) dB; with these outliers kept at 8 bits, ([\d.]+) dB",
                                       text).groups())
    assert kept > alone + 3
    traces = {trace.get("name") for trace in json.loads(steps["plot"])["data"]}
    assert {"SQNR with the outliers", "SQNR, all channels 4-bit", "S^I(t), calibrated inlier step"} <= traces
    assert [trace["type"] for trace in json.loads(values["plot"])["data"]] == ["bar", "bar"]
    # the view's numbers per time-step, with what made them
    table = pd.read_csv(data, comment="#")
    assert len(table) == 50 and table["time_step"].tolist() == list(range(50))
    assert {"outlier_channels", "token_scale", "clipped", "sqnr_db", "sqnr_db_without_outliers"} <= set(table.columns)
    assert float(re.search(r"([\d.]+) of 128 channels", text).group(1)) == pytest.approx(
        table["outlier_channels"].mean(), abs=0.05)
    header = Path(data).read_text().split("\n# model: ")[0]
    assert "# site: layers.1.fwd.x_proj.input" in header and "# k: 3" in header and "# n_refresh: 10" in header
    looser = client.predict(1, "x_proj input (u, after conv1d + SiLU)", "fwd", "image #2", 1, 10,
                            api_name="/outliers_view")[0]
    strict_count = float(re.search(r"([\d.]+) of 128 channels", text).group(1))
    assert float(re.search(r"([\d.]+) of 128 channels", looser).group(1)) > strict_count  # lower k, more outliers
    shared = client.predict(0, "in_proj input (normed hidden state)", "bwd", "max over all images", 3, 50,
                            api_name="/outliers_view")[0]
    assert shared.startswith("**layers.0.in_proj.input**, max over images") and "one window only" in shared
    # the scan state: every (channel, state) pair a column, an outlier rule calibrated for it on first request
    state, heatmap, *_ = client.predict(2, "h (scan state; columns are channel × state)", "bwd", "image #1", 3, 10,
                                        api_name="/outliers_view")
    assert state.startswith("**layers.2.bwd.h**, test image #1") and "of 2048 channels" in state
    assert json.loads(heatmap["plot"])["data"][0]["type"] == "heatmap"
    # Ā = exp(Δ·A), the state's decay per step: every value in (0, 1]
    decay, heatmap, *_ = client.predict(2, "Ā = exp(Δ·A) (the state's decay per step; columns are channel × state)",
                                        "fwd", "image #0", 3, 10, api_name="/outliers_view")
    assert decay.startswith("**layers.2.fwd.A_bar**, test image #0") and "of 2048 channels" in decay
    values = plotly_values(json.loads(heatmap["plot"])["data"][0]["z"])
    assert values.shape == (2048, 50) and ((values > 0) & (values <= 1)).all()


def plotly_values(array: list | dict) -> np.ndarray:
    """A figure's array as sent to the browser: a list, or plotly's typed array (base64 bytes, dtype, shape)."""
    if not isinstance(array, dict):
        return np.asarray(array, dtype=float)
    values = np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"])
    return values.reshape([int(n) for n in str(array.get("shape", values.size)).split(",")])


def test_recent_results_forget_the_least_recently_used_first():
    kept = RecentResults[str](max_items=2)
    kept.put("a", "A"), kept.put("b", "B")
    assert kept.get("a") == "A"  # a is now the most recent: b goes first
    kept.put("c", "C")
    assert (kept.get("a"), kept.get("b"), kept.get("c"), len(kept)) == ("A", None, "C", 2)


def test_recent_results_stay_under_their_byte_limit_but_keep_the_newest():
    kept = RecentResults[bytes](max_items=10, max_bytes=10, size=len)
    kept.put(1, b"x" * 4), kept.put(2, b"x" * 4)
    kept.put(3, b"x" * 4)  # 12 bytes: the oldest goes
    assert kept.get(1) is None and kept.get(2) is not None and kept.get(3) is not None
    kept.put(4, b"x" * 50)  # over the limit alone: what its session is looking at stays
    assert len(kept) == 1 and kept.get(4) == b"x" * 50


def test_recent_results_hold_their_limit_under_concurrent_jobs():
    kept = RecentResults[int](max_items=5)

    def job(worker: int) -> None:
        for i in range(300):
            kept.put((worker, i), i)
            kept.get((worker, i - 1))

    threads = [threading.Thread(target=job, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(kept) == 5


def test_a_released_outlier_capture_asks_for_a_new_one(monkeypatch):
    """Captures are the app's largest results; beyond the kept ones the oldest is released, and the session that
    still points at it is told to capture again (not shown another session's tensors, not a stack trace)."""
    monkeypatch.setattr(outliers_tab, "KEPT_INSPECTIONS", 1)
    demo = build_app()
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        first, second = Client(demo.local_url, verbose=False), Client(demo.local_url, verbose=False)
        view = (1, "x_proj input (u, after conv1d + SiLU)", "fwd", "image #0", 3, 10)
        assert first.predict(4, "real", 4, 2, 0, api_name="/outliers_prepare")[0].startswith("Ready")
        assert first.predict(*view, api_name="/outliers_view")[0].startswith("**layers.1.fwd.x_proj.input**")
        assert second.predict(4, "real", 4, 2, 1, api_name="/outliers_prepare")[0].startswith("Ready")
        released = first.predict(*view, api_name="/outliers_view")[0]
        assert "released to free memory" in released and "Calibrate & capture" in released
        assert second.predict(*view, api_name="/outliers_view")[0].startswith("**layers.1.fwd.x_proj.input**")
    finally:
        demo.close()


def test_a_new_session_starts_while_a_job_holds_the_models_graph():
    """Gradio builds each new session's config with dataclasses.asdict on gr.State defaults, which deep-copies
    the startup Workspace's model (bypassing Workspace.__deepcopy__): while OuroMamba-Gen runs, the model holds
    non-leaf tensors, the copy raised, and a fresh page's first click was silently lost (a 500 on queue/join)."""
    from gradio.state_holder import SessionState

    from core.workspace import default_workspace

    demo = build_app()
    model = default_workspace().model
    model.in_flight = torch.ones(1, requires_grad=True) * 2  # a non-leaf tensor, as mid-generation
    try:
        session = SessionState(demo)
    finally:
        del model.in_flight
    assert session.config_values


def test_an_absurd_typed_number_is_echoed_short():
    """1e308 typed into a number box was echoed as its 309-digit integer expansion in the status line."""
    from app.common import in_range, seed_of
    from core.errors import StudioError

    for check in (lambda: in_range("λ output", 1e308, 0, 100), lambda: seed_of(1e30)):
        with pytest.raises(StudioError, match=r"\(got 1e\+(308|30)\)"):
            check()
    with pytest.raises(StudioError, match=r"\(got 257\)"):
        in_range("images", 257.0, 1, 256)


def _grid_view(static_scale: list[float]) -> tuple:
    from types import SimpleNamespace

    from core.observe import GridView
    n = len(static_scale)
    steps = pd.DataFrame({"time_step": range(n), "static_scale": static_scale, "token_scale": static_scale,
                          "inlier_token_scale": static_scale, "outlier_scale": [float("nan")] * n,
                          "sqnr_db": [20.0] * n, "sqnr_db_without_outliers": [20.0] * n})
    histogram = pd.DataFrame({"bin_left": [-1.0, 0.0], "bin_right": [0.0, 1.0], "inlier": [500, 700],
                              "outlier": [0, 0]})
    quantizer = SimpleNamespace(bits=4, outlier=None, outlier_bits=8, asymmetric=False)
    return GridView(histogram, steps, (-7, 7), 20.0, 20.0, 0.0), quantizer


def test_grid_charts_label_a_log_axis_whose_values_span_less_than_a_decade():
    """Ā's calibrated step is nearly constant: a log axis forced to decade ticks (dtick 1) had no tick to show,
    and the step-size panel drew its line on a bare axis; so did a histogram whose counts span under 10×."""
    view, quantizer = _grid_view([0.0714, 0.0716] * 5)
    steps = outliers_tab.grid_steps_figure(view, quantizer, 4, "test image #0")
    assert steps.layout.yaxis.type == "log" and steps.layout.yaxis.dtick is None
    values = outliers_tab.grid_histogram_figure(view, quantizer, "Values")
    assert values.layout.yaxis.type == "log" and values.layout.yaxis.dtick is None
    wide, _ = _grid_view([0.001, 0.1] * 5)  # across decades, a tick per decade as before
    assert outliers_tab.grid_steps_figure(wide, quantizer, 4, "x").layout.yaxis.dtick == 1


def test_grid_steps_title_keeps_what_it_shows_on_a_line_of_its_own():
    """'(all 32 test images; steps: the largest of them)' ran off the half-width figure's one-line title."""
    view, quantizer = _grid_view([0.1] * 10)
    shown = "all 4 test images; steps: the largest of them"
    title = outliers_tab.grid_steps_figure(view, quantizer, 4, shown).layout.title.text
    assert title.endswith(f"<br><sup>{shown}</sup>")


@pytest.mark.parametrize("query", ["hello 3", "row 3", "3"])
def test_attention_query_must_name_a_patch(query: str):
    """A typed query that is not 'CLS token' or 'patch N' is refused (its second word used to be read as N)."""
    from app.synthesize_tab import _query_position
    from core.models import VimConfig
    with pytest.raises(StudioError, match="must be 'CLS token' or 'patch N'"):
        _query_position(query, VimConfig(img_size=28, patch_size=4, stride=4, in_chans=1, num_classes=10))


def test_the_outlier_heatmap_names_its_axes_and_cells_on_hover():
    """Hovering a cell said 'trace 0 x: 14 y: 64 z: 0.335'; the scan state's rows are channel × state, not
    channels; over all images a red square marks a cell flagged in at least half of them, and says so."""
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    mask = torch.zeros(2, 5, 3, dtype=torch.bool)
    mask[:, 1, 2] = True
    one = outliers_tab.heatmap_figure(x, mask, 0, 2, "t")
    heat, marks = one.data
    assert "time-step %{x}" in heat.hovertemplate and "channel %{y}" in heat.hovertemplate
    assert "|x| %{z" in heat.hovertemplate and marks.name == "outlier" and (marks.x, marks.y) == ((1,), (2,))
    pooled = outliers_tab.heatmap_figure(x, mask, None, 2, "t", channels="channel × state")
    assert pooled.layout.yaxis.title.text == "channel × state"
    assert "max |x| over the images" in pooled.data[0].hovertemplate
    assert pooled.data[1].name == "outlier in at least half of the images"
