"""The page in a real browser (Debian's chromium, headless): what a person sees and clicks."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from app.ui import build_app

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


def _type(page: Page, elem_id: str, value: float, slider: bool = False) -> None:
    """Type a value as a person does: into a number box, or into a slider's box to pick an exact value."""
    box = page.locator(f"#{elem_id} input" + ("[type=number]" if slider else ""))
    box.fill(str(value))
    box.press("Enter" if slider else "Tab")


def test_synthesize_shows_live_losses_gallery_and_attention(browser: Browser, url: str):
    page = _open(browser, url, "Synthesize")
    _type(page, "gen-count", 4, slider=True)
    _type(page, "gen-iterations", 12, slider=True)
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
    _type(page, "gen-count", 8, slider=True)
    _type(page, "gen-iterations", 2000, slider=True)
    page.locator("#gen-run").click()
    expect(page.locator("#gen-status")).to_contain_text("Iteration", timeout=60_000)
    page.locator("#gen-cancel").click()
    expect(page.locator("#gen-status")).to_contain_text("Stopped", timeout=30_000)
    page.close()


def test_outliers_heatmap_follows_the_k_slider(browser: Browser, url: str):
    page = _open(browser, url, "Outliers over time")
    page.locator("#outliers-prepare").click()
    expect(page.locator("#outliers-status")).to_contain_text("Ready", timeout=120_000)
    text = page.locator("#outliers-text")
    expect(text).to_contain_text("k = 3,", timeout=20_000)
    expect(page.locator("#outliers-heatmap .js-plotly-plot")).to_be_visible(timeout=20_000)
    _type(page, "outliers-k", 1.5, slider=True)
    expect(text).to_contain_text("k = 1.5,", timeout=20_000)
    _screenshot(page, "app_outliers.png")
    page.close()



def test_quantize_then_compare(browser: Browser, url: str):
    page = _open(browser, url, "Quantize")
    _type(page, "quant-calib-count", 8, slider=True)
    _type(page, "quant-epochs", 0)
    _type(page, "quant-test-count", 40)
    page.locator("#quant-run").click()
    summary = page.locator("#quant-summary")
    expect(summary).to_contain_text(re.compile(r"Top-1: \d+\.\d\d % · FP32"), timeout=120_000)
    expect(page.locator("#quant-sqnr .js-plotly-plot")).to_be_visible(timeout=20_000)
    _screenshot(page, "app_quantize.png")
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-refresh").click()
    expect(page.locator("#compare-table")).to_contain_text("ouromamba", timeout=30_000)
    expect(page.locator("#compare-html")).to_contain_text(".html", timeout=30_000)
    expect(page.locator("#compare-accuracy .js-plotly-plot")).to_be_visible(timeout=30_000)
    _screenshot(page, "app_compare.png")
    page.close()
