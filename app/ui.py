"""The studio's page: a header, then one tab per step of the workflow (model → synthesize → outliers → …).

Layout and wiring only: every computation is :mod:`core`'s. Bad input shows up in the page as a one-line
message (a :class:`StudioError`'s), never as a stack trace.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.common import close_session, shared_state
from app.compare_tab import build_compare_tab
from app.model_tab import build_model_tab, workspace_markdown
from app.outliers_tab import build_outliers_tab
from app.quantize_tab import build_quantize_tab, runs_file
from app.synthesize_tab import build_synthesize_tab
from core.default_model import DEFAULT_CHECKPOINT
from core.workspace import default_workspace, open_workspace

__all__ = ["DEFAULT_CHECKPOINT", "build_app"]

HEADER = """\
# OuroMamba Studio

OuroMamba Studio quantizes **Vision Mamba** (Vim) image classifiers without any training data
(*data-free* post-training quantization, after the OuroMamba method, ICCV 2025). It starts on the embedded
default model — a small Vim trained on Fashion-MNIST — and works on any Vim checkpoint you choose in **Model**
(for this browser tab only: two tabs never mix models or results).

* **Model** — choose the checkpoint and its test images; the model card and its full-precision (FP32) accuracy.
* **Synthesize** — OuroMamba-Gen: calibration images made from the model alone, starting from noise, and the
  implicit-attention maps that show why they work.
* **Outliers over time** — the activations OuroMamba-Quant sees, time-step by channel, with the outlier
  channels it detects at each time-step and what a fixed outlier list would miss.
* **Quantize** — OuroMamba-Quant or a baseline at the bit-widths you choose, calibrated on real, noise or
  synthetic images: accuracy against FP32, where the error comes from, which predictions changed; and a sweep of
  the outlier threshold k and window n_refresh against what they cost in 8-bit channels.
* **Compare** — every run so far (kept on disk) side by side, with CSV/JSON and a standalone HTML report.
"""


def build_app(checkpoint: str | Path = DEFAULT_CHECKPOINT, data_folder: str | Path | None = None) -> gr.Blocks:
    """The page, starting every session on ``checkpoint`` and its test images (``data_folder``, else
    Fashion-MNIST's for models of its shape); each session can then load another one in the Model tab.

    Loads the starting model now, so that a bad file fails before the server starts (as a :class:`StudioError`).
    """
    is_default = Path(checkpoint).resolve() == DEFAULT_CHECKPOINT.resolve() and not data_folder
    startup = default_workspace() if is_default else open_workspace(checkpoint, data_folder)
    with gr.Blocks(title="OuroMamba Studio") as demo:
        gr.Markdown(HEADER, elem_id="header")
        workspace = shared_state(startup)  # this session's model and data: every tab reads it, Model sets it
        banner = gr.Markdown(workspace_markdown(startup), elem_id="workspace-banner")
        workspace.change(workspace_markdown, workspace, banner, api_visibility="private", concurrency_limit=None)
        with gr.Tabs():
            with gr.Tab("Model", id="model"):
                build_model_tab(workspace, startup)
            with gr.Tab("Synthesize", id="synthesize"):
                build_synthesize_tab(workspace, startup)
            with gr.Tab("Outliers over time", id="outliers"):
                build_outliers_tab(workspace, startup)
            runs = runs_file()
            with gr.Tab("Quantize", id="quantize"):
                record = build_quantize_tab(workspace, startup, runs)
            with gr.Tab("Compare", id="compare"):
                build_compare_tab(runs, record)
        demo.unload(close_session)
    return demo
