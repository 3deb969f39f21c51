"""What every tab shares: the loaded model, per-tab runs that can be cancelled, and message formatting."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np

from core.models import VisionMamba


@dataclass
class Studio:
    """The checkpoint the app was started on, loaded once, and its card (None when it has none)."""

    checkpoint: Path
    model: VisionMamba
    card: dict | None


@dataclass
class Run:
    """One job started from one browser tab; kept in that tab's ``gr.State`` so tabs never cancel
    each other's work."""

    cancel: threading.Event = field(default_factory=threading.Event)
    done: bool = False


def arm(previous: Run | None) -> Run:
    """A fresh Run for this tab before its job is queued, so Cancel also works while it waits; pressing
    Run again replaces (cancels) the tab's previous run."""
    if previous is not None:
        previous.cancel.set()
    return Run()


def cancel(run: Run | None) -> None:
    """Stop this tab's job at its next check; other tabs' jobs go on."""
    if run is None or run.done:
        gr.Info("Nothing to cancel: nothing is running in this tab.")
        return
    run.cancel.set()
    gr.Info("Cancelling: the job stops at its next step.")


def wire_run(run_button: gr.Button, cancel_button: gr.Button, run_state: gr.State, job, inputs: list,
             outputs: list, api_name: str) -> None:
    """Run arms a fresh :class:`Run` (instant, never queued), then queues ``job(*inputs, run)``; Cancel sets
    the tab's event. The job follows the queue's default concurrency limit (set where the app is launched)."""
    run_button.click(arm, run_state, run_state, concurrency_limit=None, api_visibility="private").then(
        job, [*inputs, run_state], outputs, api_name=api_name)
    cancel_button.click(cancel, run_state, None, concurrency_limit=None, api_visibility="private")


REPOSITORY = Path(__file__).resolve().parent.parent
SETS_DIR_ENV = "OUROMAMBA_SETS_DIR"
COMMITTED_SETS = REPOSITORY / "results" / "gen" / "sets"  # the evidence sets (results/gen/README.md)


def sets_dir() -> Path:
    """Where Synthesize saves its sets for Quantize: ``$OUROMAMBA_SETS_DIR``, else ``results/app_sets``."""
    return Path(os.environ.get(SETS_DIR_ENV) or REPOSITORY / "results" / "app_sets")


GALLERY_ZOOM = 4  # 28×28 images shown as 112×112, nearest neighbour: every pixel stays visible


def zoom(pixels: np.ndarray) -> np.ndarray:
    """An image enlarged for a gallery without blurring its pixels."""
    return pixels.repeat(GALLERY_ZOOM, axis=0).repeat(GALLERY_ZOOM, axis=1)


def error(message: object) -> str:
    return f"**Error:** {message}"


def stopped(message: object) -> str:
    return f"**Stopped:** {message}."


def cell(value: object) -> str:
    """A table cell: '—' for a missing value, and pipes escaped so they cannot split the row."""
    return "—" if value is None else str(value).replace("|", "\\|")
