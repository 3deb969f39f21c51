"""The studio's page: the model card and an FP32 evaluation with a progress bar and a per-tab Cancel.

Layout and wiring only: loading, data and evaluation are :mod:`core`'s. Bad input shows up in the page as
a one-line message (a :class:`StudioError`'s), never as a stack trace.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from core.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from core.default_model import CARD_FILE, DEFAULT_MODEL_DIR, WEIGHTS_FILE, load_card
from core.errors import StudioError
from core.eval import Cancelled, EvalResult, evaluate
from core.models import VisionMamba, load_checkpoint

DEFAULT_CHECKPOINT = DEFAULT_MODEL_DIR / WEIGHTS_FILE
TEST_IMAGES = 10_000  # size of Fashion-MNIST's test split
DEFAULT_COUNT = 1_000
# small batches so that the bar moves and Cancel takes effect within a fraction of a second on a CPU
BATCH_SIZE = 100

HEADER = """\
# OuroMamba Studio

OuroMamba Studio quantizes **Vision Mamba** (Vim) image classifiers without any training data
(*data-free* quantization, after the OuroMamba method). This first version shows the model, by default
the embedded one (a small Vim trained on Fashion-MNIST), and measures its full-precision (FP32) accuracy
on the Fashion-MNIST test set. Synthesising calibration images, inspecting outliers and quantizing come
in later versions.
"""


@dataclass
class Run:
    """One evaluation started from one browser tab; kept in that tab's ``gr.State`` so tabs never cancel
    each other's work."""

    cancel: threading.Event = field(default_factory=threading.Event)
    done: bool = False


def _cell(value: object) -> str:
    """A table cell: '—' for a missing value, and pipes escaped so they cannot split the row."""
    return "—" if value is None else str(value).replace("|", "\\|")


def _code(value: str | None) -> str | None:
    return None if value is None else f"`{value}`"


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f} %"


def card_markdown(checkpoint: Path, model: VisionMamba, card: dict | None) -> str:
    """The model card as a table; architecture and size come from the loaded weights, which cannot be stale."""
    where = f"`{_cell(checkpoint)}`"
    if checkpoint.resolve() == DEFAULT_CHECKPOINT.resolve():
        where = f"the embedded default model (`{DEFAULT_CHECKPOINT.relative_to(DEFAULT_MODEL_DIR.parent.parent)}`)"
    config = ", ".join(f"{key}={value}" for key, value in model.cfg.to_dict().items())
    rows = [("Architecture", f"`{config}`"), ("Parameters", f"{sum(p.numel() for p in model.parameters()):,}")]
    if card is not None:
        trained = ", ".join(str(card[key]) for key in ("train_device", "date") if key in card) or None
        test_top1 = _percent(card.get("test_top1")) or "not measured yet (`python -m core.cli card-eval`)"
        rows = [("Name", card.get("name")), *rows,
                ("Training command", _code(card.get("training_command"))),
                ("Reproduce with", _code(card.get("reproduce_command"))),
                ("Seed", card.get("seed")), ("Data", card.get("data")), ("Trained on", trained),
                ("Validation top-1", _percent(card.get("val_top1"))),
                (f"Test top-1 (FP32, all {TEST_IMAGES:,} images)", test_top1)]
        if "status" in card:
            rows.append(("Status", card["status"]))
    table = "\n".join([f"| **Checkpoint** | {where} |", "|---|---|",
                       *(f"| **{name}** | {_cell(value)} |" for name, value in rows)])
    note = "" if card is not None else f"\n\nNo {CARD_FILE} beside this checkpoint, so how it was trained is unknown."
    return f"## Model\n\n{table}{note}"


def result_markdown(result: EvalResult, cached: bool) -> str:
    """Accuracy with its provenance: how many images, how long, and on which hardware."""
    kind = "a CPU timing" if result.device.startswith("CPU") else "a GPU timing"
    again = " Cached: measured earlier with the same checkpoint and count." if cached else ""
    return (f"### Top-1: {result.top1:.2f} %\n\n"
            f"{result.correct:,} / {result.total:,} correct on the first {result.total:,} test images "
            f"({result.data}).\n\n"
            f"Time: {result.seconds:.2f} s on {result.device}, {kind}.{again}")


def _check_fits_fashion_mnist(model: VisionMamba) -> None:
    """This version evaluates on Fashion-MNIST only, so refuse other architectures at start, not mid-run."""
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
    results: dict[tuple[str, int], EvalResult] = {}

    def arm(previous: Run | None) -> Run:
        """A fresh Run for this tab before its evaluation is queued, so Cancel also works while it waits;
        pressing Run again replaces (cancels) the tab's previous run."""
        if previous is not None:
            previous.cancel.set()
        return Run()

    def run_evaluation(count: int | None, run: Run | None,
                       progress: gr.Progress = gr.Progress()) -> tuple[str, dict | None]:  # noqa: B008 (gradio's hook)
        """Top-1 of the first ``count`` test images, as text for people and a record for the API."""
        if count is None or not 1 <= count <= TEST_IMAGES:
            return f"**Error:** the number of test images must be from 1 to {TEST_IMAGES:,} (got {count}).", None
        count = int(count)
        key = (str(checkpoint), count)
        if key in results:
            return result_markdown(results[key], cached=True), {**results[key].to_dict(), "cached": True}
        run = run or Run()  # API calls come without a tab, hence without an armed run

        def report(done: int, total: int) -> None:
            progress((done, total), desc="Evaluating", unit="images")

        report(0, count)
        try:
            result = evaluate(model, load_fashion_mnist("test").subset(count), batch_size=BATCH_SIZE,
                              progress=report, cancel=run.cancel)
        except Cancelled as err:
            return f"**Stopped:** {err}.", None
        except StudioError as err:
            return f"**Error:** {err}", None
        finally:
            run.done = True
        results[key] = result
        return result_markdown(result, cached=False), {**result.to_dict(), "cached": False}

    def cancel(run: Run | None) -> None:
        """Stop this tab's evaluation after its current batch; other tabs' evaluations go on."""
        if run is None or run.done:
            gr.Info("Nothing to cancel: no evaluation is running in this tab.")
            return
        run.cancel.set()
        gr.Info("Cancelling: the evaluation stops after the current batch.")

    with gr.Blocks(title="OuroMamba Studio") as demo:
        gr.Markdown(HEADER, elem_id="header")
        gr.Markdown(card_markdown(checkpoint, model, card), elem_id="model-card")
        gr.Markdown("## Evaluate FP32 accuracy")
        with gr.Row(equal_height=True):
            count = gr.Number(DEFAULT_COUNT, label="Test images", precision=0, elem_id="eval-count", scale=2,
                              info=f"The first N of Fashion-MNIST's {TEST_IMAGES:,} test images (1 to {TEST_IMAGES:,})")
            run_button = gr.Button("Run", variant="primary", elem_id="eval-run")
            cancel_button = gr.Button("Cancel", variant="stop", elem_id="eval-cancel")
        result = gr.Markdown("Choose how many test images to use and press **Run**.", elem_id="eval-result")
        with gr.Accordion("Record (JSON)", open=False):
            record = gr.JSON(show_label=False)
        run_state = gr.State()
        # arm and cancel are instant and must not wait behind a running evaluation: no concurrency limit;
        # the evaluation itself follows the queue's default limit (set where the app is launched)
        run_button.click(arm, run_state, run_state, concurrency_limit=None, api_visibility="private").then(
            run_evaluation, [count, run_state], [result, record], api_name="evaluate")
        cancel_button.click(cancel, run_state, None, concurrency_limit=None, api_visibility="private")
    return demo
