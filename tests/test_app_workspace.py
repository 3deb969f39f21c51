"""Choosing the model and data in the page, through the API: each session has its own, every tab uses it, and
bad input of every kind is one line in the page while the app keeps serving."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import core.workspace as workspace_module
from app.common import Run
from app.ui import DEFAULT_CHECKPOINT, build_app
from core.models import save_safetensors
from core.workspace import default_workspace
from tests.test_workspace import BAD_CHECKPOINTS, _junk, _zip_folder, image_folder, tiny_vim

NOISE = "Gaussian noise (no optimisation)"
GEN = "OuroMamba-Gen (contrastive + output loss)"
# method, w_bits, a_bits, o_bits, k, n_refresh, calibration source, count, epochs, seed, test images, overrides
FAST_QUANT = ("ouromamba", 4, 4, 8, 3, 10, "noise", 4, 0, 0, 12, "")


@pytest.fixture(scope="module")
def served():
    demo = build_app()
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        yield demo
    finally:
        demo.close()


@pytest.fixture
def client(served) -> Client:
    """A new browser session on the served app."""
    return Client(served.local_url, verbose=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """Another architecture (32×32 RGB, 3 classes) and a folder of 12 labelled 50×40 images for it."""
    root = tmp_path_factory.mktemp("tiny")
    return save_safetensors(tiny_vim(), root / "tiny.safetensors"), image_folder(root / "data")


def _load(client: Client, path: str = "", upload: str | None = None, data: str = "",
          data_upload: str | None = None) -> str:
    return client.predict(path, handle_file(upload) if upload else None, data,
                          handle_file(data_upload) if data_upload else None, api_name="/load_model")


def _is_one_line_error(text: str) -> bool:
    return text.startswith("**Error:**") and "\n" not in text


@pytest.mark.parametrize("kind", ["random bytes", "truncated safetensors", "another architecture",
                                  "pickle that runs code", "a folder", "missing", "huge"])
def test_bad_checkpoint_path_is_one_line_and_the_model_stays(client: Client, tmp_path: Path, kind: str):
    status = _load(client, str(_junk(tmp_path, kind)))
    assert _is_one_line_error(status) and re.search(BAD_CHECKPOINTS[kind], status)
    assert status.endswith("Still working on `default_model`.")
    assert client.predict(5, api_name="/evaluate")[1]["model"] == "default_model"


def test_bad_uploads_are_one_line(client: Client, tmp_path: Path, monkeypatch):
    status = _load(client, upload=str(_junk(tmp_path, "random bytes")))
    assert _is_one_line_error(status) and "'uploaded random.pth' is not a readable checkpoint" in status
    picture = tmp_path / "photo.png"
    picture.write_bytes(b"\x89PNG not really")
    with pytest.raises(AppError, match="Invalid file type"):  # refused by the upload box itself
        _load(client, upload=str(picture))
    monkeypatch.setattr(workspace_module, "MAX_CHECKPOINT_BYTES", 1000)  # the server runs in this process
    status = _load(client, upload=str(_junk(tmp_path, "truncated safetensors")))
    assert _is_one_line_error(status) and "'uploaded truncated.safetensors' is 0.0 MB, more than" in status
    assert client.predict(5, api_name="/evaluate")[1]["total"] == 5


def test_nothing_to_load_is_a_message(client: Client, tmp_path: Path):
    assert _is_one_line_error(_load(client)) and "type the path of a checkpoint" in _load(client)
    status = _load(client, data=str(tmp_path))  # test images alone: said to be unread, not silently ignored
    assert _is_one_line_error(status) and "test images load with their model, so they were not read" in status


@pytest.mark.parametrize(("folder", "expected"), [
    ("missing", "does not exist"), ("empty", "no images found under"),
    ("broken", "is not a readable image"), ("eleven", "has 11 class folders but the model predicts 10"),
])
def test_bad_data_folder_is_one_line(client: Client, tmp_path: Path, folder: str, expected: str):
    root = tmp_path / folder
    if folder == "empty":
        root.mkdir()
    elif folder == "broken":
        image_folder(root, classes=2, per_class=1)
        (root / "class_1" / "bad.jpg").write_bytes(b"no jpeg")
    elif folder == "eleven":
        image_folder(root, classes=11, per_class=1)
    status = _load(client, str(DEFAULT_CHECKPOINT), data=str(root))
    assert _is_one_line_error(status) and expected in status


def test_another_model_with_its_folder_runs_in_every_tab(client: Client, tiny: tuple[Path, Path]):
    checkpoint, folder = tiny
    status = _load(client, str(checkpoint), data=str(folder))
    assert status.startswith("Loaded `") and "tiny.safetensors (sha256 " in status
    text, record = client.predict(12, api_name="/evaluate")
    assert record["total"] == 12 and record["model"] == "tiny.safetensors" and "image folder" in record["data"]
    assert "`tiny.safetensors`: " in text and "/ 12 correct" in text
    text, record = client.predict(13, api_name="/evaluate")
    assert record is None and "the number of test images must be from 1 to 12 (got 13)" in text
    status, *_, real, manifest, _ = client.predict(GEN, 3, 2, "3", 12, 0.2, 1, 1, 0.2, 0, api_name="/synthesize")
    assert "3 images from `ouromamba` for `tiny.safetensors`" in status and len(manifest["images"]) == 3
    assert all(item["caption"].startswith("real class_") for item in real)
    plot, message = client.predict("test set", 11, 1, "fwd", "patch 10 (row 1, col 2)", "3", api_name="/attention")
    assert message == "" and plot["type"] == "plotly"
    ready = client.predict(4, "noise", 4, 6, 0, api_name="/outliers_prepare")[0]
    assert ready.startswith("Ready") and "the first 6 test images" in ready
    text, _, _, _, record, *_ = client.predict(*FAST_QUANT, api_name="/quantize")
    assert record["model"] == "tiny.safetensors" and record["checkpoint"].startswith(f"{checkpoint} (sha256 ")
    assert record["data"].startswith("image folder") and "`tiny.safetensors`" in text
    text, _, _, _, record, *_ = client.predict(*FAST_QUANT[:6], "real", *FAST_QUANT[7:], api_name="/quantize")
    assert record is None and "real calibration images are Fashion-MNIST" in text


def test_typed_paths_expand_the_home_folder_as_a_shell_does(client: Client, tiny: tuple[Path, Path], monkeypatch):
    """A person types ~/… into a path box as into a shell: the checkpoint, its test images and a calibration folder
    were reported missing."""
    checkpoint, folder = tiny
    monkeypatch.setenv("HOME", str(checkpoint.parent))
    status = _load(client, " ~/tiny.safetensors ", data="~/data")
    assert status.startswith("Loaded `") and "tiny.safetensors (sha256 " in status
    assert client.predict(12, api_name="/evaluate")[1]["total"] == 12
    ready = client.predict(4, "~/data", 4, 6, 0, api_name="/outliers_prepare")[0]
    assert ready.startswith("Ready") and str(folder) in ready
    text, _, _, _, record, *_ = client.predict(*FAST_QUANT[:6], "~/data", *FAST_QUANT[7:], api_name="/quantize")
    assert record["calibration"]["source"] == str(folder), text  # the record names the folder it read


def test_test_images_uploaded_as_a_zip(client: Client, tiny: tuple[Path, Path], tmp_path: Path):
    """What a browser on another machine can do: the folder zipped (under a top folder, as zipping one by hand
    makes), named in the page and the records as the user knows it; a bad archive is one line."""
    checkpoint, folder = tiny
    archive = _zip_folder(folder, tmp_path / "my_val.zip", "my_val/")
    status = _load(client, str(checkpoint), data="/typed/but/ignored", data_upload=str(archive))
    assert status.startswith("Loaded `"), status
    text, record = client.predict(12, api_name="/evaluate")
    assert record["total"] == 12 and record["data"] == "image archive uploaded my_val.zip (3 classes)"
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zipped:
        zipped.writestr("notes/readme.txt", "no images")
    status = _load(client, str(checkpoint), data_upload=str(empty))
    assert _is_one_line_error(status) and "'uploaded empty.zip' holds no images" in status
    assert client.predict(12, api_name="/evaluate")[1]["data"].startswith("image archive uploaded my_val.zip")


def test_model_without_test_images_says_so_where_they_are_needed(client: Client, tiny: tuple[Path, Path]):
    assert _load(client, str(tiny[0])).startswith("Loaded")
    needs = "needs labelled test images, and there are none: this model (32×32, 3 channels, 3 classes) is not a " \
            "Fashion-MNIST one and no data folder was given"
    text, record = client.predict(10, api_name="/evaluate")
    assert record is None and _is_one_line_error(text) and needs in text
    text, _, _, _, record, *_ = client.predict(*FAST_QUANT, api_name="/quantize")
    assert record is None and _is_one_line_error(text) and needs in text
    assert needs in client.predict("test set", 0, 1, "fwd", "CLS token", "3", api_name="/attention")[1]
    status, _, gallery, real, *_ = client.predict(NOISE, 2, 0, "5", 12, 0.2, 1, 1, 0.2, 0, api_name="/synthesize")
    assert "2 images from `noise`" in status and len(gallery) == 2 and real == []  # data-free: still works
    ready = client.predict(4, "noise", 4, 3, 0, api_name="/outliers_prepare")[0]
    assert ready.startswith("Ready") and "3 N(0, 1) noise images" in ready
    view = client.predict(1, "x_proj input (u, after conv1d + SiLU)", "fwd", "image #1", 3, 10,
                          api_name="/outliers_view")[0]
    assert view.startswith("**layers.1.fwd.x_proj.input**, noise image #1")


def test_default_model_button_and_caches_keyed_on_the_workspace(client: Client, tiny: tuple[Path, Path]):
    checkpoint, folder = tiny
    _load(client, str(checkpoint), data=str(folder))
    on_tiny = client.predict(7, api_name="/evaluate")[1]
    status = client.predict(api_name="/default_model")  # the session's state stays on the server
    assert "Back on the embedded default model" in status
    on_default = client.predict(7, api_name="/evaluate")[1]
    assert not on_default["cached"] and on_default["model"] == "default_model"
    assert on_default["fingerprint"] != on_tiny["fingerprint"] and on_default["data"].startswith("fashion-mnist")
    _load(client, str(checkpoint), data=str(folder))
    again = client.predict(7, api_name="/evaluate")[1]
    assert again["cached"] and again["top1"] == on_tiny["top1"]


def test_two_sessions_run_at_once_and_each_gets_its_own_result(served, tiny: tuple[Path, Path]):
    """Two sessions, two models: both jobs are queued together; the queue runs them one at a time, and
    neither is lost nor mixed with the other."""
    first, second = Client(served.local_url, verbose=False), Client(served.local_url, verbose=False)
    _load(first, str(tiny[0]), data=str(tiny[1]))
    jobs = [first.submit(11, api_name="/evaluate"), second.submit(301, api_name="/evaluate")]
    (_, mine), (_, theirs) = (job.result(timeout=120) for job in jobs)
    assert (mine["model"], mine["total"]) == ("tiny.safetensors", 11) and "image folder" in mine["data"]
    assert (theirs["model"], theirs["total"]) == ("default_model", 301) and theirs["data"].startswith("fashion")


@pytest.mark.parametrize(("inputs", "expected"), [
    ((GEN, 5000, 2, "5", 12, 0.2, 1, 1, 0.2, 0), "images must be from 1 to 256 (got 5000)"),
    ((GEN, 0, 2, "5", 12, 0.2, 1, 1, 0.2, 0), "images must be from 1 to 256 (got 0)"),
    ((GEN, 4, 2001, "5", 12, 0.2, 1, 1, 0.2, 0), "iterations must be from 0 to 2,000 (got 2001)"),
    ((GEN, 4, None, "5", 12, 0.2, 1, 1, 0.2, 0), "iterations must be from 0 to 2,000 (got nothing)"),
    ((GEN, 4.5, 2, "5", 12, 0.2, 1, 1, 0.2, 0), "images must be a whole number from 1 to 256 (got 4.5)"),
    ((GEN, 4, 2, "5", 12, 0.2, -1, 1, 0.2, 0), "λ contrastive must be from 0 to 100 (got -1)"),
    ((GEN, 4, 2, "5", 12, 0.2, 1, 1, 50, 0), "the learning rate must be from 0.001 to 10 (got 50)"),
])
def test_out_of_range_synthesis_settings_are_one_line(client: Client, inputs: tuple, expected: str):
    status = client.predict(*inputs, api_name="/synthesize")[0]
    assert _is_one_line_error(status) and expected in status


@pytest.mark.parametrize(("layer", "k", "n_refresh", "expected"), [
    (1, 20, 10, "k must be from 0.5 to 8 (got 20)"), (1, None, 10, "k must be from 0.5 to 8 (got nothing)"),
    (1, 3, 0, "n_refresh must be from 1 to 50 (got 0)"), (1, 3, 51, "n_refresh must be from 1 to 50 (got 51)"),
])
def test_out_of_range_outlier_settings_are_one_line(client: Client, layer, k, n_refresh, expected: str):
    bad = client.predict(layer, "x_proj input (u, after conv1d + SiLU)", "fwd", "image #0", k, n_refresh,
                         api_name="/outliers_view")[0]
    assert bad == "Press **Calibrate & capture** first."  # nothing captured in this session yet
    assert client.predict(4, "real", 4, 2, 0, api_name="/outliers_prepare")[0].startswith("Ready")
    bad = client.predict(layer, "x_proj input (u, after conv1d + SiLU)", "fwd", "image #0", k, n_refresh,
                         api_name="/outliers_view")[0]
    assert _is_one_line_error(bad) and expected in bad
    good = client.predict(1, "x_proj input (u, after conv1d + SiLU)", "fwd", "image #0", 3, 10,
                          api_name="/outliers_view")[0]
    assert good.startswith("**layers.1.fwd.x_proj.input**")


@pytest.mark.parametrize(("endpoint", "inputs", "expected"), [
    ("/outliers_prepare", (4, "noise", 4, 0, 0), "Value 0 is less than minimum value 1"),
    ("/synthesize", (GEN, 4, 2, "5", 60, 0.2, 1, 1, 0.2, 0), "Value 60 is greater than maximum value 48"),
])
def test_slider_values_outside_their_range_are_refused_before_the_job(client: Client, endpoint: str, inputs: tuple,
                                                                      expected: str):
    """Sliders only reach the API that way (the browser clamps what is typed into them): gradio refuses the
    value in one line, and the app keeps serving."""
    with pytest.raises(AppError, match=expected):
        client.predict(*inputs, api_name=endpoint)
    assert client.predict(5, api_name="/evaluate")[1]["total"] == 5


def test_cancelling_outlier_capture_mid_run(served):
    """Cancel pressed while the inlier scales are being calibrated stops the job with a message."""
    prepare = next(f.fn for f in served.fns.values() if f.api_name == "outliers_prepare")
    run = Run()

    def progress(value, desc: str = "", unit: str = "") -> None:
        if isinstance(value, tuple) and value[0] >= 2:
            run.cancel.set()

    status, *_ = prepare(default_workspace(), 4, "noise", 9, 3, 5, run, progress=progress)
    assert status.startswith("**Stopped:**") and "cancelled after" in status and run.done


def test_an_inspection_too_big_for_memory_is_refused_with_the_count_that_fits(client: Client, monkeypatch):
    import app.outliers_tab as outliers_tab
    monkeypatch.setattr(outliers_tab, "MAX_CAPTURE_BYTES", 1_000_000)  # the default model: ~0.62 MB per image
    text = client.predict(4, "noise", 4, 6, 0, api_name="/outliers_prepare")[0]
    assert text.startswith("**Error:**") and "inspecting 6 images of this model would hold 4 MB" in text
    assert "use at most 1 image" in text and "\n" not in text
