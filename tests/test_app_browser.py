"""The page in a real browser (Debian's chromium, headless): what a person sees and clicks."""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from app.ui import DEFAULT_CHECKPOINT, build_app
from core.experiments import RunRecord, site_errors_of
from core.models import save_safetensors
from core.report import write_report
from tests.test_error_figures import _record_fields, _report
from tests.test_workspace import image_folder, tiny_vim

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
TOP1 = re.compile(r"Top-1: \d+\.\d\d %")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    demo = build_app()
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not installed; install it with `sudo apt-get install chromium`")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _open(browser: Browser, url: str, tab: str | None = None) -> Page:
    """A fresh browser tab, i.e. a separate Gradio session, on the page's ``tab`` when one is named."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    expect(page.locator("#header")).to_contain_text("OuroMamba Studio", timeout=20_000)
    if tab is not None:
        page.get_by_role("tab", name=tab).click()
    return page


def _screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / name, full_page=True)


def test_header_card_and_a_small_evaluation(browser: Browser, url: str):
    page = _open(browser, url)
    expect(page.locator("#header")).to_contain_text("Vision Mamba")
    card = page.locator("#model-card")
    expect(card).to_be_visible()
    for text in ("Parameters", "Training command", "Seed", "Validation top-1", "Test top-1"):
        expect(card).to_contain_text(text)
    page.locator("#eval-count input").fill("50")
    page.locator("#eval-run").click()
    result = page.locator("#eval-result")
    expect(result).to_contain_text(TOP1, timeout=25_000)
    expect(result).to_contain_text("/ 50 correct")
    expect(result).to_contain_text("a CPU timing")
    _screenshot(page, "app_evaluate.png")
    page.close()


def test_cancel_stops_only_its_own_tab(browser: Browser, url: str):
    running, other = _open(browser, url), _open(browser, url)
    running.locator("#eval-count input").fill("10000")
    running.locator("#eval-run").click()
    expect(running.get_by_text(re.compile(r"Evaluating - [\d.]+%"))).to_be_visible(timeout=20_000)
    other.locator("#eval-cancel").click()
    expect(other.get_by_text("Nothing to cancel")).to_be_visible(timeout=10_000)
    running.locator("#eval-cancel").click()
    result = running.locator("#eval-result")
    expect(result).to_contain_text("Stopped", timeout=15_000)
    expect(result).to_contain_text("of 10000 images")
    running.close()
    other.close()


def _type(page: Page, elem_id: str, value: float) -> None:
    """Type a value into a number box as a person does, then leave the box."""
    box = page.locator(f"#{elem_id} input")
    box.fill(str(value))
    box.press("Tab")


def test_synthesize_shows_live_losses_gallery_and_attention(browser: Browser, url: str):
    page = _open(browser, url, "Synthesize")
    _type(page, "gen-count", 4)
    _type(page, "gen-iterations", 12)
    page.locator("#gen-run").click()
    status = page.locator("#gen-status")
    expect(status).to_contain_text("4 images from ouromamba", timeout=60_000)
    expect(page.locator("#gen-gallery img")).to_have_count(4)
    expect(page.locator("#gen-losses .js-plotly-plot")).to_be_visible()
    expect(page.locator("#gen-download")).to_contain_text(".zip")
    page.locator("#attention-run").click()
    expect(page.locator("#attention-plot .js-plotly-plot")).to_be_visible(timeout=30_000)
    _screenshot(page, "app_synthesize.png")
    page.close()


def test_synthesis_can_be_cancelled(browser: Browser, url: str):
    page = _open(browser, url, "Synthesize")
    _type(page, "gen-count", 8)
    _type(page, "gen-iterations", 2000)
    page.locator("#gen-run").click()
    expect(page.locator("#gen-status")).to_contain_text("Iteration", timeout=60_000)
    page.locator("#gen-cancel").click()
    expect(page.locator("#gen-status")).to_contain_text("Stopped", timeout=30_000)
    page.close()


def test_closing_a_page_cancels_its_job_and_frees_the_engine(browser: Browser, url: str,
                                                             caplog: pytest.LogCaptureFixture):
    """A closed page's long synthesis used to run on, every other page's jobs waiting behind it; Gradio's unload
    (the page's heartbeat connection dropping) now cancels it, so another page's evaluation runs at once."""
    caplog.set_level(logging.INFO, logger="ouromamba.app")
    closing = _open(browser, url, "Synthesize")
    _type(closing, "gen-count", 8)
    _type(closing, "gen-iterations", 2000)  # minutes of work
    closing.locator("#gen-run").click()
    expect(closing.locator("#gen-status")).to_contain_text("Iteration", timeout=60_000)
    closing.close()
    deadline = time.monotonic() + 20
    while "page closed: 1 job(s) cancelled" not in caplog.messages and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "page closed: 1 job(s) cancelled" in caplog.messages
    other = _open(browser, url)
    other.locator("#eval-count input").fill("50")
    other.locator("#eval-run").click()
    expect(other.locator("#eval-result")).to_contain_text(TOP1, timeout=30_000)
    other.close()


def test_outliers_heatmap_follows_k(browser: Browser, url: str):
    page = _open(browser, url, "Outliers over time")
    page.locator("#outliers-prepare").click()
    expect(page.locator("#outliers-status")).to_contain_text("Ready", timeout=120_000)
    text = page.locator("#outliers-text")
    expect(text).to_contain_text("k = 3,", timeout=20_000)
    for plot in ("heatmap", "grid-values", "grid-steps"):
        expect(page.locator(f"#outliers-{plot} .js-plotly-plot")).to_be_visible(timeout=20_000)
    _type(page, "outliers-k", 1.5)
    expect(text).to_contain_text("k = 1.5,", timeout=20_000)
    expect(text).to_contain_text("with these outliers kept at 8 bits")
    _screenshot(page, "app_outliers.png")
    page.close()


def test_pressing_quantize_again_mid_run_runs_the_new_settings(browser: Browser, url: str):
    """The second press cancels the first run and runs with what the boxes say now (it used to be dropped,
    leaving only the first run's "Stopped")."""
    page = _open(browser, url, "Quantize")
    _type(page, "quant-calib-count", 8)
    _type(page, "quant-epochs", 0)
    _type(page, "quant-test-count", 3000)
    page.locator("#quant-run").click()
    expect(page.locator("#quant-summary")).to_contain_text(re.compile("Calibrating|Evaluating"), timeout=60_000)
    _type(page, "quant-test-count", 40)
    page.locator("#quant-run").click()
    expect(page.locator("#quant-summary")).to_contain_text(re.compile(r"Top-1: \d+\.\d\d % · FP32"), timeout=120_000)
    expect(page.locator("#quant-summary")).to_contain_text("40 test images")
    page.close()


def test_quantize_then_compare(browser: Browser, url: str):
    page = _open(browser, url, "Quantize")
    _type(page, "quant-calib-count", 8)
    _type(page, "quant-epochs", 0)
    _type(page, "quant-test-count", 40)
    page.locator("#quant-run").click()
    summary = page.locator("#quant-summary")
    expect(summary).to_contain_text(re.compile(r"Top-1: \d+\.\d\d % · FP32"), timeout=120_000)
    expect(page.locator("#quant-sqnr .js-plotly-plot")).to_be_visible(timeout=20_000)
    expect(page.locator("#quant-sensitivity .js-plotly-plot")).to_be_visible(timeout=20_000)
    expect(page.locator("#quant-model-file")).to_contain_text(".safetensors", timeout=20_000)
    diagram = page.locator("#quant-diagram .gtitle")  # the block diagram follows its layer and colour controls
    expect(diagram).to_contain_text("SQNR of the quantizer alone", timeout=20_000)
    page.locator("#quant-diagram-metric").get_by_text("SQNR vs the FP model").click()
    expect(diagram).to_contain_text("SQNR vs the FP model", timeout=20_000)
    other = (int(page.locator("#quant-diagram-layer input[type=number]").input_value()) + 1) % 4
    page.locator("#quant-diagram-layer input[type=number]").fill(str(other))
    page.locator("#quant-diagram-layer input[type=number]").press("Enter")
    expect(diagram).to_contain_text(f"Layer {other}: SQNR vs the FP model", timeout=20_000)
    # pick another quantizer: the diagram moves to its layer; keep it at 8 bits: the overrides box says so
    page.locator("#quant-pick-site input").click()
    option = page.get_by_role("option").nth(5)
    site = re.search(r"layers\.[^:]+", option.text_content()).group()  # options carry a hidden ✓
    option.click()
    expect(diagram).to_contain_text(f"Layer {site.split('.')[1]}: SQNR vs the FP model", timeout=20_000)
    if not site.endswith((".weight", ".A", ".D")):  # the plot below follows it along the scan
        expect(page.locator("#quant-site-steps .gtitle")).to_contain_text(f"{site}: SQNR per time-step")
    page.locator("#quant-site-8-bits").click()
    expect(page.locator("#quant-site-status")).to_contain_text(f"keep {site} at 8 bits", timeout=20_000)
    field = "w_bits" if site.endswith(".weight") else "a_bits"  # the one that applies at the site
    expect(page.locator("#quant-overrides textarea")).to_have_value(f'{{"{site}": {{"{field}": 8}}}}')
    thumbnails = page.locator("#quant-changed button.thumbnail-item")
    if thumbnails.count() > 1:  # selecting a changed image shows its top classes under both models
        title = page.locator("#quant-top-k .gtitle")
        expect(title).to_contain_text("Test image #", timeout=20_000)
        first = title.text_content()
        thumbnails.nth(1).click()
        expect(title).not_to_have_text(first, timeout=20_000)
        expect(title).to_contain_text("Test image #")
    _screenshot(page, "app_quantize.png")
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-refresh").click()
    expect(page.locator("#compare-table")).to_contain_text("ouromamba", timeout=30_000)
    expect(page.locator("#compare-html")).to_contain_text(".html", timeout=30_000)
    expect(page.locator("#compare-models")).to_contain_text(".safetensors", timeout=30_000)
    expect(page.locator("#compare-accuracy .js-plotly-plot")).to_be_visible(timeout=30_000)
    _screenshot(page, "app_compare.png")
    page.close()


def test_bad_checkpoint_is_a_message_then_the_default_model_still_evaluates(browser: Browser, url: str,
                                                                            tmp_path: Path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00 not a checkpoint" * 100)
    page = _open(browser, url)
    page.locator("#ws-upload input[type=file]").set_input_files(junk)
    # the upload box shows the name's stem and extension in separate cells, at times rendered "junk .pth"
    expect(page.locator("#ws-upload")).to_contain_text(re.compile(r"junk\s*\.pth"), timeout=10_000)
    page.locator("#ws-load").click()
    status = page.locator("#ws-status")
    expect(status).to_contain_text("'uploaded junk.pth' is not a readable checkpoint", timeout=20_000)
    expect(status).to_contain_text("Still working on default_model")
    _screenshot(page, "app_bad_checkpoint.png")
    page.locator("#eval-count input").fill("30")
    page.locator("#eval-run").click()
    expect(page.locator("#eval-result")).to_contain_text("default_model: ", timeout=25_000)
    expect(page.locator("#eval-result")).to_contain_text("/ 30 correct")
    page.close()


def test_out_of_range_numbers_are_messages(browser: Browser, url: str):
    page = _open(browser, url)
    _type(page, "eval-count", 0)
    page.locator("#eval-run").click()
    expect(page.locator("#eval-result")).to_contain_text("must be from 1 to 10,000 (got 0)", timeout=20_000)
    page.get_by_role("tab", name="Synthesize").click()
    _type(page, "gen-count", 5000)
    page.locator("#gen-run").click()
    expect(page.locator("#gen-status")).to_contain_text("images must be from 1 to 256 (got 5000)", timeout=20_000)
    _screenshot(page, "app_out_of_range.png")
    page.close()


def test_two_pages_on_two_models_run_at_once(browser: Browser, url: str, tmp_path: Path):
    """Each page is a session with its own model; both jobs are queued together and each page gets its own."""
    checkpoint = save_safetensors(tiny_vim(), tmp_path / "tiny.safetensors")
    folder = image_folder(tmp_path / "data")
    mine, theirs = _open(browser, url), _open(browser, url)
    mine.locator("#ws-path input, #ws-path textarea").first.fill(str(checkpoint))
    mine.locator("#ws-data input, #ws-data textarea").first.fill(str(folder))
    mine.locator("#ws-load").click()
    expect(mine.locator("#ws-status")).to_contain_text(re.compile(r"Loaded \S+/tiny\.safetensors \(sha256 \w{12}\)"),
                                                       timeout=30_000)
    expect(mine.locator("#workspace-banner")).to_contain_text("tiny.safetensors (32×32, 3 channels, 3 classes)")
    expect(mine.locator("#model-card")).to_contain_text("No card.json beside this checkpoint")
    expect(mine.locator("#eval-count input")).to_have_value("12")  # the count follows the 12 images of the folder
    mine.get_by_role("tab", name="Outliers over time").click()
    expect(mine.locator("#outliers-refresh")).to_contain_text("1 to 65")  # and the ranges follow the architecture
    mine.get_by_role("tab", name="Model").click()
    expect(theirs.locator("#workspace-banner")).to_contain_text("default_model")
    theirs.locator("#eval-count input").fill("400")
    theirs.locator("#eval-run").click()
    mine.locator("#eval-run").click()
    expect(mine.locator("#eval-result")).to_contain_text("tiny.safetensors: ", timeout=60_000)
    expect(mine.locator("#eval-result")).to_contain_text("/ 12 correct")
    expect(theirs.locator("#eval-result")).to_contain_text("default_model: ", timeout=60_000)
    expect(theirs.locator("#eval-result")).to_contain_text("/ 400 correct")
    _screenshot(mine, "app_two_sessions_loaded.png")
    _screenshot(theirs, "app_two_sessions_default.png")
    mine.close()
    theirs.close()


def test_cancel_stops_loading_and_the_tab_keeps_its_model(browser: Browser, url: str,
                                                          monkeypatch: pytest.MonkeyPatch):
    """A test images folder is read image by image; Cancel stops it there and the tab stays on its model."""
    from app import model_tab
    from core.workspace import open_workspace

    def slow_open(*args, progress, **kwargs):  # 400 images at 20 ms: Cancel lands mid-read
        for done in range(1, 401):
            time.sleep(0.02)
            progress(done, 400)
        return open_workspace(*args, progress=progress, **kwargs)

    monkeypatch.setattr(model_tab, "open_workspace", slow_open)
    page = _open(browser, url)
    page.locator("#ws-path textarea, #ws-path input").first.fill(str(DEFAULT_CHECKPOINT))
    page.locator("#ws-load").click()
    expect(page.get_by_text(re.compile(r"Reading images"))).to_be_visible(timeout=20_000)
    page.locator("#ws-cancel").click()
    status = page.locator("#ws-status")
    expect(status).to_contain_text("Stopped: loading cancelled after", timeout=15_000)
    expect(status).to_contain_text("Still working on default_model")
    page.close()


def test_sweep_draws_accuracy_against_the_outlier_share(browser: Browser, url: str):
    page = _open(browser, url, "Quantize")
    _type(page, "quant-calib-count", 8)
    page.get_by_text("Sweep k × n_refresh on validation images").click()
    page.locator("#sweep-k textarea, #sweep-k input").first.fill("2, 4")
    page.locator("#sweep-n-refresh textarea, #sweep-n-refresh input").first.fill("5, 25")
    _type(page, "sweep-images", 200)
    page.locator("#sweep-run").click()
    expect(page.locator("#sweep-status")).to_contain_text("on the first 200 validation images", timeout=120_000)
    expect(page.locator("#sweep-plot .js-plotly-plot")).to_be_visible(timeout=20_000)
    expect(page.locator("#sweep-table")).to_contain_text("outlier_share_pct")
    page.locator("#sweep").scroll_into_view_if_needed()
    _screenshot(page, "app_sweep.png")
    page.close()


def test_the_html_reports_block_diagram_changes_layer_offline(browser: Browser, tmp_path: Path):
    """The downloaded report, opened from disk with the network cut: its diagram's layer menu redraws the nodes."""
    report = _report(3)
    errors = site_errors_of(report, 32)
    sqnr = report.set_index("site")["sqnr_db"]
    page_file = write_report([RunRecord.from_dict(_record_fields(site_errors=errors))], tmp_path / "report.html")
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:") else route.continue_())
    page.goto(page_file.as_uri())
    diagram = page.locator(".js-plotly-plot").filter(has=page.locator(".updatemenu-container"))
    title = diagram.locator(".gtitle")
    expect(title).to_contain_text("Layer 0: SQNR of the quantizer alone", timeout=20_000)  # _report's lowest
    # the runs table scrolls in its own box (the page was 2122 px wide) with a readable config column (it was
    # ~50 px, a few characters a line)
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    assert page.locator("table.runs td:nth-last-child(2)").first.bounding_box()["width"] > 250
    diagram.locator(".updatemenu-header").click()
    diagram.locator(".updatemenu-dropdown-button", has_text="layer 2").click()
    expect(title).to_contain_text("Layer 2: SQNR of the quantizer alone", timeout=10_000)
    labels = diagram.locator(".scatterlayer .textpoint")
    expect(labels.first).to_contain_text("in_proj in", timeout=10_000)
    layer_2, layer_0 = sqnr["layers.2.in_proj.input"], sqnr["layers.0.in_proj.input"]
    assert f"{layer_2:.1f} dB" in labels.first.text_content() and layer_2 != layer_0
    _screenshot(page, "report_block_diagram.png")
    page.close()
