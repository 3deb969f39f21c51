"""The studio's page: a header, then one tab per step of the workflow (model → synthesize → outliers → …).

Layout and wiring only: every computation is :mod:`core`'s. Bad input shows up in the page as a one-line
message (a :class:`StudioError`'s), never as a stack trace.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.common import Studio
from app.model_tab import DEFAULT_CHECKPOINT, build_model_tab
from app.outliers_tab import build_outliers_tab
from app.quantize_tab import build_compare_tab, build_quantize_tab, runs_file
from app.synthesize_tab import build_synthesize_tab
from core.data import FASHION_MNIST_CLASSES
from core.default_model import CARD_FILE, load_card
from core.errors import StudioError
from core.models import VisionMamba, load_checkpoint

__all__ = ["DEFAULT_CHECKPOINT", "build_app"]

HEADER = """\
# OuroMamba Studio

OuroMamba Studio quantizes **Vision Mamba** (Vim) image classifiers without any training data
(*data-free* post-training quantization, after the OuroMamba method, ICCV 2025). It runs on the embedded
default model — a small Vim trained on Fashion-MNIST — or on a checkpoint you give it.

* **Model** — the model card and its full-precision (FP32) accuracy on the Fashion-MNIST test set.
* **Synthesize** — OuroMamba-Gen: calibration images made from the model alone, starting from noise, and the
  implicit-attention maps that show why they work.
* **Outliers over time** — the activations OuroMamba-Quant sees, time-step by channel, with the outlier
  channels it detects at each time-step and what a fixed outlier list would miss.
* **Quantize** — OuroMamba-Quant or a baseline at the bit-widths you choose, calibrated on real, noise or
  synthetic images: accuracy against FP32, where the error comes from, which predictions changed.
* **Compare** — every run so far (kept on disk) side by side, with CSV/JSON and a standalone HTML report.
"""


def _check_fits_fashion_mnist(model: VisionMamba) -> None:
    """The app evaluates on Fashion-MNIST only, so refuse other architectures at start, not mid-run."""
    cfg = model.cfg
    if (cfg.img_size, cfg.in_chans, cfg.num_classes) != (28, 1, len(FASHION_MNIST_CLASSES)):
        raise StudioError(f"this version evaluates on Fashion-MNIST (28×28, 1 channel, 10 classes), but the "
                          f"checkpoint expects {cfg.img_size}×{cfg.img_size}, {cfg.in_chans} channel(s), "
                          f"{cfg.num_classes} classes")


def build_app(checkpoint: str | Path = DEFAULT_CHECKPOINT) -> gr.Blocks:
    """The page for one checkpoint, with the card beside it if there is one.

    Loads everything now, so that a bad file fails before the server starts (as a :class:`StudioError`).
    """
    checkpoint = Path(checkpoint)
    model = load_checkpoint(checkpoint)
    _check_fits_fashion_mnist(model)
    card = load_card(checkpoint.parent) if (checkpoint.parent / CARD_FILE).is_file() else None
    studio = Studio(checkpoint, model, card)
    with gr.Blocks(title="OuroMamba Studio") as demo:
        gr.Markdown(HEADER, elem_id="header")
        with gr.Tabs():
            with gr.Tab("Model", id="model"):
                build_model_tab(studio)
            with gr.Tab("Synthesize", id="synthesize"):
                build_synthesize_tab(studio)
            with gr.Tab("Outliers over time", id="outliers"):
                build_outliers_tab(studio)
            runs = runs_file()
            with gr.Tab("Quantize", id="quantize"):
                record = build_quantize_tab(studio, runs)
            with gr.Tab("Compare", id="compare"):
                build_compare_tab(runs, record)
    return demo
