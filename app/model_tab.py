"""The Model tab: choose this session's checkpoint and evaluation data, see its card, and evaluate FP32 accuracy
with a progress bar and a per-tab Cancel."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from app.common import (
    RecentResults,
    Run,
    cell,
    error,
    on_engine,
    stopped,
    typed_path,
    whole_in_range,
    wire_run,
)
from core.default_model import CARD_FILE, DEFAULT_CHECKPOINT, DEFAULT_MODEL_DIR
from core.errors import StudioError
from core.eval import Cancelled, EvalResult, evaluate
from core.workspace import Workspace, architecture, default_workspace, fits_fashion_mnist, open_workspace

DEFAULT_COUNT = 1_000
# small batches so that the bar moves and Cancel takes effect within a fraction of a second on a CPU
BATCH_SIZE = 100
KEPT_EVALUATIONS = 256  # finished evaluations kept for repeated requests (a few hundred bytes each)
CHECKPOINT_TYPES = [".pth", ".pt", ".bin", ".safetensors"]


def _code(value: str | None) -> str | None:
    return None if value is None else f"`{value}`"


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f} %"


def workspace_markdown(workspace: Workspace) -> str:
    """One line: which model this session works on and what it is evaluated on."""
    cfg = workspace.model.cfg
    if workspace.data is not None:
        data = f"{len(workspace.data):,} test images from {workspace.data.source}"
    else:
        why = workspace.no_data if fits_fashion_mnist(cfg) else "give a test images folder in the Model tab"
        data = f"none — {why} (Synthesize needs none; Outliers then inspects noise images)"
    return f"**Model:** `{cell(workspace.name)}` ({architecture(cfg)}) · **Data:** {cell(data)}"


def card_markdown(workspace: Workspace) -> str:
    """The model card as a table; architecture and size come from the loaded weights, which cannot be stale."""
    model, card = workspace.model, workspace.card
    where = f"`{cell(workspace.label)}`"
    if workspace.is_default:
        where = f"the embedded default model (`{DEFAULT_CHECKPOINT.relative_to(DEFAULT_MODEL_DIR.parent.parent)}`)"
    config = ", ".join(f"{key}={value}" for key, value in model.cfg.to_dict().items())
    rows = [("Architecture", f"`{config}`"), ("Parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
            ("Evaluation data", workspace.data_label)]
    if card is not None:
        trained = ", ".join(str(card[key]) for key in ("train_device", "date") if key in card) or None
        test_top1 = _percent(card.get("test_top1")) or "not measured yet (`python -m core.cli card-eval`)"
        init = card.get("init_card")  # a continued training: the card of the weights it started from
        continued = None if init is None else \
            f"{init.get('name')}, validation top-1 {_percent(init.get('val_top1'))}, made by " \
            f"{_code(init.get('reproduce_command'))}"
        rows = [("Name", card.get("name")), *rows,
                ("Training command", _code(card.get("training_command"))),
                ("Reproduce with", _code(card.get("reproduce_command"))),
                *([("Continued from", continued)] if continued else []),
                ("Seed", card.get("seed")), ("Data", card.get("data")), ("Trained on", trained),
                ("Validation top-1", _percent(card.get("val_top1"))),
                ("Test top-1 (FP32, the whole test split)", test_top1)]
        if "status" in card:
            rows.append(("Status", card["status"]))
    table = "\n".join([f"| **Checkpoint** | {where} |", "|---|---|",
                       *(f"| **{name}** | {cell(value)} |" for name, value in rows)])
    note = "" if card is not None else f"\n\nNo {CARD_FILE} beside this checkpoint, so how it was trained is unknown."
    return f"## Model\n\n{table}{note}"


def result_markdown(result: EvalResult, workspace: Workspace, cached: bool) -> str:
    """Accuracy with its provenance: which model, how many images, how long, and on which hardware."""
    kind = "a CPU timing" if result.device.startswith("CPU") else "a GPU timing"
    again = " Cached: measured earlier with the same checkpoint, data and count." if cached else ""
    return (f"### Top-1: {result.top1:.2f} %\n\n"
            f"`{cell(workspace.name)}`: {result.correct:,} / {result.total:,} correct on the first {result.total:,} "
            f"test images ({result.data}).\n\n"
            f"Time: {result.seconds:.2f} s on {result.device}, {kind}.{again}")


def count_box(workspace: Workspace) -> dict:
    """A test-images box's value and hint for this workspace (Model's and Quantize's): the default count within
    its range."""
    if workspace.data is None:
        return {"value": None, "info": "No test images for this model: give a test images folder in the Model tab"}
    total = len(workspace.data)
    return {"value": min(DEFAULT_COUNT, total), "info": f"The first N of the {total:,} test images (1 to {total:,})"}


def build_model_tab(workspace: gr.State, startup: Workspace) -> None:
    """The tab that sets ``workspace`` (this browser session's model and data) and evaluates it."""
    results = RecentResults[EvalResult](KEPT_EVALUATIONS)

    def load(path: str | None, upload: str | None, data_folder: str | None, data_upload: str | None,
             current: Workspace, run: Run | None,
             progress: gr.Progress = gr.Progress()) -> Iterator[tuple[Workspace, str]]:  # noqa: B008 (gradio's hook)
        """Open the uploaded file, else the typed path, with the uploaded .zip of test images, else the typed
        folder, if one is given. On any problem, or a Cancel while the images are read, the session keeps its
        model and the status line says why."""
        run = run or Run()  # API calls come without a tab, hence without an armed run

        def reading(done: int, total: int) -> None:
            if run.cancel.is_set():
                raise Cancelled(f"loading cancelled after {done:,} of {total:,} images")
            progress((done, total), desc="Reading images", unit="images")

        path = typed_path(path)
        folder = data_upload or typed_path(data_folder) or None
        if not upload and not path:
            run.done = True
            images = " (test images load with their model, so they were not read)" if folder else ""
            yield current, error(f"type the path of a checkpoint on this machine or upload one{images}. Still working "
                                 f"on `{cell(current.name)}`.")
            return
        shown = f"uploaded {Path(upload).name}" if upload else path
        yield current, f"Loading `{cell(shown)}`…"
        start = time.perf_counter()
        try:
            loaded = open_workspace(upload or path, folder, shown_as=shown if upload else None, progress=reading,
                                    data_shown_as=f"uploaded {Path(data_upload).name}" if data_upload else None)
            if run.cancel.is_set():  # pressed while the checkpoint itself loaded: the tab does not switch
                raise Cancelled("loading cancelled")
        except Cancelled as err:
            yield current, stopped(f"{err}. Still working on `{cell(current.name)}`")
            return
        except StudioError as err:
            yield current, error(f"{err}. Still working on `{cell(current.name)}`.")
            return
        finally:
            run.done = True
        yield loaded, (f"Loaded `{cell(loaded.label)}` in {time.perf_counter() - start:.1f} s. This browser tab "
                       "works on it now; other browser tabs keep theirs.")

    def use_default() -> tuple[Workspace, str]:
        return default_workspace(), "Back on the embedded default model and Fashion-MNIST's test images."

    def run_evaluation(ws: Workspace, count: float | None, run: Run | None,
                       progress: gr.Progress = gr.Progress()) -> tuple[str, dict | None]:  # noqa: B008 (gradio's hook)
        """Top-1 of the first ``count`` test images, as text for people and a record for the API."""
        try:
            data = ws.test_data("evaluating")
            count = whole_in_range("the number of test images", count, 1, len(data))
        except StudioError as err:
            return error(err), None
        key = (ws.fingerprint, count)
        if (earlier := results.get(key)) is not None:
            return result_markdown(earlier, ws, cached=True), {**earlier.to_dict(), **ws.provenance(), "cached": True}
        run = run or Run()  # API calls come without a tab, hence without an armed run

        def report(done: int, total: int) -> None:
            progress((done, total), desc="Evaluating", unit="images")

        report(0, count)
        try:
            result = on_engine(lambda: evaluate(ws.model, data.subset(count), batch_size=BATCH_SIZE, progress=report,
                                                cancel=run.cancel), progress, run.cancel)
        except Cancelled as err:
            return stopped(err), None
        except StudioError as err:
            return error(err), None
        finally:
            run.done = True
        results.put(key, result)
        return result_markdown(result, ws, cached=False), {**result.to_dict(), **ws.provenance(), "cached": False}

    gr.Markdown("## Choose the model\n\nA Vim checkpoint (an official `.pth`, a plain state dict or `.safetensors`) "
                "and, optionally, a folder of labelled test images (one sub-folder per class, ImageNet-val style, "
                "on this machine or uploaded as a .zip; images of any size are resized to the model's input). The "
                "choice holds for this browser tab only.")
    with gr.Row(equal_height=True):
        path = gr.Textbox(label="Checkpoint on this machine", placeholder="/path/to/vim_t_midclstok_76p1acc.pth",
                          elem_id="ws-path", scale=3)
        upload = gr.File(label="…or upload one (used instead of the path)", file_types=CHECKPOINT_TYPES,
                         type="filepath", elem_id="ws-upload", scale=2, height=110)
    with gr.Row(equal_height=True):
        data_folder = gr.Textbox(label="Test images folder (optional)", placeholder="/path/to/imagenet/val",
                                 info="Without one, models of Fashion-MNIST's shape use its test split",
                                 elem_id="ws-data", scale=3)
        data_upload = gr.File(label="…or upload it as a .zip (used instead of the folder)", file_types=[".zip"],
                              type="filepath", elem_id="ws-data-upload", scale=2, height=110)
        load_button = gr.Button("Load", variant="primary", elem_id="ws-load", scale=1)
        load_cancel = gr.Button("Cancel", variant="stop", elem_id="ws-cancel", scale=1)
        default_button = gr.Button("Default model", elem_id="ws-default", scale=1)
    status = gr.Markdown("Type a path or upload a checkpoint, then press **Load**.", elem_id="ws-status")
    card = gr.Markdown(card_markdown(startup), elem_id="model-card")
    gr.Markdown("## Evaluate FP32 accuracy")
    with gr.Row(equal_height=True):
        count = gr.Number(label="Test images", elem_id="eval-count", scale=2, **count_box(startup))
        run_button = gr.Button("Run", variant="primary", elem_id="eval-run")
        cancel_button = gr.Button("Cancel", variant="stop", elem_id="eval-cancel")
    result = gr.Markdown("Choose how many test images to use and press **Run**.", elem_id="eval-result")
    with gr.Accordion("Record (JSON)", open=False):
        record = gr.JSON(show_label=False)
    # loading waits for no job (its own queue lane), and two loads never compete for memory
    wire_run(load_button, load_cancel, gr.State(), load, [path, upload, data_folder, data_upload, workspace],
             [workspace, status], "load_model", concurrency_limit=1, concurrency_id="load")
    default_button.click(use_default, None, [workspace, status], api_name="default_model", concurrency_limit=None)
    wire_run(run_button, cancel_button, gr.State(), run_evaluation, [workspace, count], [result, record], "evaluate")
    workspace.change(lambda ws: (card_markdown(ws), gr.update(**count_box(ws)), "Press **Run** to evaluate it.", None),
                     workspace, [card, count, result, record], api_visibility="private", concurrency_limit=None)
