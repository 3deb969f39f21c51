"""The Model tab: the model card and an FP32 evaluation with a progress bar and a per-tab Cancel."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.common import Run, Studio, cell, error, stopped, wire_run
from core.data import load_fashion_mnist
from core.default_model import CARD_FILE, DEFAULT_MODEL_DIR, WEIGHTS_FILE
from core.errors import StudioError
from core.eval import Cancelled, EvalResult, evaluate
from core.models import VisionMamba

DEFAULT_CHECKPOINT = DEFAULT_MODEL_DIR / WEIGHTS_FILE
TEST_IMAGES = 10_000  # size of Fashion-MNIST's test split
DEFAULT_COUNT = 1_000
# small batches so that the bar moves and Cancel takes effect within a fraction of a second on a CPU
BATCH_SIZE = 100


def _code(value: str | None) -> str | None:
    return None if value is None else f"`{value}`"


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f} %"


def card_markdown(checkpoint: Path, model: VisionMamba, card: dict | None) -> str:
    """The model card as a table; architecture and size come from the loaded weights, which cannot be stale."""
    where = f"`{cell(checkpoint)}`"
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
                       *(f"| **{name}** | {cell(value)} |" for name, value in rows)])
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


def build_model_tab(studio: Studio) -> None:
    results: dict[tuple[str, int], EvalResult] = {}

    def run_evaluation(count: int | None, run: Run | None,
                       progress: gr.Progress = gr.Progress()) -> tuple[str, dict | None]:  # noqa: B008 (gradio's hook)
        """Top-1 of the first ``count`` test images, as text for people and a record for the API."""
        if count is None or not 1 <= count <= TEST_IMAGES:
            return error(f"the number of test images must be from 1 to {TEST_IMAGES:,} (got {count})."), None
        count = int(count)
        key = (str(studio.checkpoint), count)
        if key in results:
            return result_markdown(results[key], cached=True), {**results[key].to_dict(), "cached": True}
        run = run or Run()  # API calls come without a tab, hence without an armed run

        def report(done: int, total: int) -> None:
            progress((done, total), desc="Evaluating", unit="images")

        report(0, count)
        try:
            result = evaluate(studio.model, load_fashion_mnist("test").subset(count), batch_size=BATCH_SIZE,
                              progress=report, cancel=run.cancel)
        except Cancelled as err:
            return stopped(err), None
        except StudioError as err:
            return error(err), None
        finally:
            run.done = True
        results[key] = result
        return result_markdown(result, cached=False), {**result.to_dict(), "cached": False}

    gr.Markdown(card_markdown(studio.checkpoint, studio.model, studio.card), elem_id="model-card")
    gr.Markdown("## Evaluate FP32 accuracy")
    with gr.Row(equal_height=True):
        count = gr.Number(DEFAULT_COUNT, label="Test images", precision=0, elem_id="eval-count", scale=2,
                          info=f"The first N of Fashion-MNIST's {TEST_IMAGES:,} test images (1 to {TEST_IMAGES:,})")
        run_button = gr.Button("Run", variant="primary", elem_id="eval-run")
        cancel_button = gr.Button("Cancel", variant="stop", elem_id="eval-cancel")
    result = gr.Markdown("Choose how many test images to use and press **Run**.", elem_id="eval-result")
    with gr.Accordion("Record (JSON)", open=False):
        record = gr.JSON(show_label=False)
    wire_run(run_button, cancel_button, gr.State(), run_evaluation, [count], [result, record], "evaluate")
