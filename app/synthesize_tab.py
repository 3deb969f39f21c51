"""The Synthesize tab: OuroMamba-Gen and its baselines with live losses and gallery, and attention maps."""

from __future__ import annotations

import hashlib
import json
import queue
import re
import shutil
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path

import gradio as gr
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.common import (
    ENGINE,
    WAITING,
    RecentResults,
    Run,
    cell,
    clamped,
    error,
    in_range,
    leave_the_line,
    seed_of,
    sets_dir,
    slider_top,
    stopped,
    whole_in_range,
    wire_run,
    zoom,
)
from core.errors import StudioError
from core.eval import Cancelled
from core.gen import (
    GEN_PRESETS,
    OPTIMISED_SOURCES,
    GenConfig,
    GenProgress,
    GenResult,
    attention_maps,
    generate,
    save_generated,
    to_pixels,
)
from core.models import VimConfig
from core.workspace import Workspace

SOURCES = {
    "OuroMamba-Gen (contrastive + output loss)": "ouromamba",
    "Gaussian noise (no optimisation)": "noise",
    "Output loss only": "output_only",
    "PSAQ-style (patch-similarity entropy + output loss)": "psaq",
    "Real training images": "real",
}
MAX_COUNT, MAX_ITERATIONS = 256, 2000
MAX_WEIGHT, LR_RANGE = 100, (0.001, 10)
REAL_EXAMPLES_FROM = 2000  # the first test images searched for one real image of each class
KEPT_SETS, KEPT_SET_BYTES = 16, 1_000_000_000  # finished sets kept for repeated requests (images)
APP_COUNT = 16  # the page's default: a first look in seconds; the interactive preset makes the paper's 128
INTERACTIVE, FIDELITY = GEN_PRESETS["interactive"], GEN_PRESETS["fidelity"]
READY = ("Pick a source and press **Synthesize**. The defaults (16 images, 20 iterations) take seconds on 2 CPU cores "
         "for the default model; the paper's schedule is 128 images × 1000 iterations.")

EXPLAIN = """\
**How OuroMamba-Gen works.** The images *are* the trainable variables: they start as Gaussian noise and are
optimised so that the frozen model (1) classifies each one as a target class (**output loss**) and (2) gives
its patches features that cluster — each patch close to its *top-K* most similar patches and far from the
rest (**contrastive loss**). The features come from the scan's hidden states averaged over each patch's
spatial **neighbourhood**, weighted by Δ (how strongly each token updates the state): Mamba scans a flattened
sequence, so this puts the 2-D neighbourhood back. Lower **temperature** makes the contrast sharper.
"""

ATTENTION_EXPLAIN = """\
**Implicit attention.** A Mamba layer's output at token *t* is a weighted sum of its inputs at tokens τ — the
weights α(t, τ) are its implicit attention. The *plain* map is the row of one query token; the *enhanced*
map replaces the query's state by the Δ-weighted average of its neighbourhood's states (what Gen's contrastive
loss sees). The forward scan only sees tokens before the query, the backward scan only tokens after it.
"""


def gallery_items(result: GenResult, workspace: Workspace) -> list[tuple[np.ndarray, str]]:
    """Final images with target class, FP prediction and confidence in the caption."""
    name = workspace.class_name
    items = []
    for index, (pixels, target, prediction, confidence) in enumerate(zip(
            to_pixels(result.images), result.targets, result.predictions, result.confidences, strict=True)):
        label = (f"#{index} {name(prediction)} · FP {confidence:.2f}" if target is None else
                 f"#{index} target {name(target)} · FP {confidence:.2f}"
                 + ("" if prediction == target else f" (predicts {name(prediction)})"))
        items.append((zoom(pixels), label))
    return items


def real_examples(result: GenResult, workspace: Workspace) -> list[tuple[np.ndarray, str]]:
    """One real test image for each class the set targets (among the first test images), to set the synthetic
    ones beside; none when the model has no test images (Gen itself needs no data)."""
    classes = sorted({t for t in result.targets if t is not None})
    if not classes or workspace.data is None:
        return []
    test = workspace.data.subset(REAL_EXAMPLES_FROM)
    items = []
    for label in classes:
        found = (test.labels == label).nonzero()
        if len(found):
            index = int(found[0, 0])
            items.append((zoom(to_pixels(test.normalized(index, index + 1))[0]),
                          f"real {workspace.class_name(label)}"))
    return items


def loss_figure(history: list[dict[str, float]], title: str) -> go.Figure:
    figure = go.Figure()
    names = list(history[0]) if history else []
    for name in names:
        figure.add_scatter(x=list(range(1, len(history) + 1)), y=[h[name] for h in history], name=name,
                           mode="lines")
    figure.update_layout(title=title, xaxis_title="iteration", yaxis_title="loss (unweighted terms, total weighted)",
                         height=320, margin={"l": 50, "r": 10, "t": 40, "b": 40})
    return figure


def set_losses(result: GenResult) -> go.Figure | None:
    """A finished set's loss curves; None for a set made without optimisation (an empty plot kept the previous
    set's axes)."""
    return loss_figure(result.history, "losses (mean over batches)") if result.history else None


def attention_figure(image: np.ndarray, maps: dict, query: int | str, grid: int, title: str) -> go.Figure:
    """The image and the plain/enhanced maps (each scaled to its own maximum), the query patch marked."""
    figure = make_subplots(1, 3, subplot_titles=("image", "plain α (query row)", "enhanced α_p (neighbourhood)"))
    if image.ndim == 3:  # RGB: plotted top row first, so flip it like the heatmaps' rows
        figure.add_image(z=image[::-1], row=1, col=1)
        figure.update_yaxes(autorange=True, row=1, col=1)
    else:
        figure.add_heatmap(z=image[::-1], colorscale="gray", showscale=False, row=1, col=1)
    for col, name in ((2, "plain"), (3, "enhanced")):
        values = maps[name].numpy()
        figure.add_heatmap(z=(values / max(values.max(), 1e-12))[::-1], colorscale="Viridis", zmin=0, zmax=1,
                           showscale=col == 3, row=1, col=col)
        if query != "cls":
            row, column = divmod(int(query), grid)
            figure.add_scatter(x=[column], y=[grid - 1 - row], mode="markers", showlegend=False,
                               marker={"symbol": "x", "size": 12, "color": "red"}, row=1, col=col)
    figure.update_xaxes(showticklabels=False)
    for col in (1, 2, 3):  # square pixels and patches: each y axis follows its own x axis
        figure.update_yaxes(showticklabels=False, scaleanchor=f"x{col if col > 1 else ''}", row=1, col=col)
    figure.update_layout(title=title, height=340, margin={"l": 10, "r": 10, "t": 60, "b": 10})
    return figure


def set_name(config: GenConfig, count: int, fingerprint: str) -> str:
    """The folder name of a saved set: what a person reads in the calibration list (source, images, iterations,
    seed), then a digest of the other settings that shaped an optimised set (``GenConfig.shaping``), then the
    model's fingerprint. So a set is only ever replaced by the same images (the same settings are seeded, hence
    the same set)."""
    if config.source not in OPTIMISED_SOURCES:
        return f"{config.source}_{count}_seed{config.seed}_{fingerprint[:8]}"
    others = {k: v for k, v in config.shaping().items() if k not in ("source", "count", "iterations", "seed")}
    settings = hashlib.sha256(json.dumps(others, sort_keys=True).encode()).hexdigest()[:6]
    return f"{config.source}_{count}_it{config.iterations}_seed{config.seed}_{settings}_{fingerprint[:8]}"


def _save(result: GenResult, workspace: Workspace) -> tuple[Path, str]:
    """The set saved as PNGs + manifest.json under the sets folder (Quantize lists it as a calibration source),
    and the same folder zipped into a fresh temporary folder for the download. The name ends with the model's
    fingerprint: sets of two models never overwrite each other."""
    name = set_name(result.config, len(result.images), workspace.fingerprint)
    folder = save_generated(result, sets_dir() / name, replace=True)  # the same name: the same images
    archive = shutil.make_archive(str(Path(tempfile.mkdtemp(prefix="ouromamba-gen-")) / name), "zip",
                                  folder.parent, name)
    return folder, archive


def _summary(result: GenResult, workspace: Workspace, folder: Path, cached: bool) -> str:
    config = result.config
    hits = sum(p == t for p, t in zip(result.predictions, result.targets, strict=True) if t is not None)
    targeted = sum(t is not None for t in result.targets)
    agreement = f" The FP model predicts the target class for {hits} of {targeted}." if targeted else ""
    again = " Cached: made earlier with the same settings (same seed, same images)." if cached else ""
    return (f"### {len(result.images)} images from `{config.source}` for `{cell(workspace.name)}`\n\n"
            f"{f'{config.iterations} iterations, ' if config.optimised else ''}"
            f"seed {config.seed}, {result.seconds:.1f} s on the CPU.{agreement} Mean FP confidence "
            f"{np.mean(result.confidences):.2f}.{again}\n\nSaved as `{folder}`: pick it as the calibration source "
            f"in **Quantize** or **Outliers over time**.")


def _query_tokens(cfg: VimConfig) -> tuple[list[str], str]:
    """The attention map's query choices for a model (CLS, then every patch) and the default: a patch just
    below the middle, where the default model's objects are."""
    patches = [f"patch {i} (row {i // cfg.grid_size}, col {i % cfg.grid_size})" for i in range(cfg.num_patches)]
    return ["CLS token", *patches], patches[cfg.num_patches // 2 + cfg.grid_size]


def _query_position(query: str, cfg: VimConfig) -> int | str:
    """'CLS token' → 'cls', 'patch 30 (…)' → 30, checked against this model's patches."""
    if query == "CLS token":
        return "cls"
    match = re.fullmatch(r"\s*patch\s+(-?\d+)\b.*", query or "", flags=re.DOTALL)
    if match is None:  # "hello 3" used to be read as patch 3
        raise StudioError(f"the query token must be 'CLS token' or 'patch N', not {query!r}")
    position = int(match.group(1))
    if not 0 <= position < cfg.num_patches:
        raise StudioError(f"this model has patches 0–{cfg.num_patches - 1}, not {position}")
    return position


def next_update(updates: queue.Queue, work: Future, cancel: threading.Event) -> GenProgress | None:
    """The generation's next progress update, None once it has ended. A Cancel pressed while the work still
    waits for the engine takes it out of the line (:class:`Cancelled`) rather than when its turn comes."""
    while True:
        try:
            return updates.get(timeout=0.1)
        except queue.Empty:
            if cancel.is_set():
                leave_the_line(work)


def build_synthesize_tab(workspace: gr.State, startup: Workspace) -> None:
    """The tab; controls that depend on the architecture (top-K, layer, query token) follow ``workspace``."""
    cfg = startup.model.cfg
    cache = RecentResults[GenResult](KEPT_SETS, KEPT_SET_BYTES, size=lambda result: result.images.nbytes)

    def finished(ws: Workspace, result: GenResult, cached: bool) -> tuple:
        folder, archive = _save(result, ws)
        return (_summary(result, ws, folder, cached), set_losses(result),
                gallery_items(result, ws), real_examples(result, ws), result.manifest(), archive,
                (ws.fingerprint, result))

    def message(text: str) -> tuple:
        """Only the status changes; whatever the tab showed (a finished set included) stays."""
        return (text, *(gr.skip(),) * 6)

    def restored(ws: Workspace, made: tuple[str, GenResult] | None, text: object) -> tuple:
        """After a stopped or failed job: the status, and the last finished set's curves and images back in place
        of the stopped job's previews (the rest of the tab still shows that set)."""
        if made is None or made[0] != ws.fingerprint:
            return text, None, [], *(gr.skip(),) * 4
        return text, set_losses(made[1]), gallery_items(made[1], ws), *(gr.skip(),) * 4

    def synthesize(ws: Workspace, made: tuple[str, GenResult] | None, source: str, count: float | None,
                   iterations: float | None, neighbourhood: str, top_k: float, temperature: float,
                   contrastive_weight: float | None, output_weight: float | None, lr: float | None,
                   seed: float | None, run: Run | None,
                   progress: gr.Progress = gr.Progress()):  # noqa: B008 (gradio's hook)
        """Generate a calibration set for this session's model; yields live previews and loss curves, then the
        final set."""
        try:
            if source not in SOURCES:
                raise StudioError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
            count = whole_in_range("images", count, 1, MAX_COUNT)
            iterations = whole_in_range("iterations", iterations, 0, MAX_ITERATIONS)
            for name, weight in (("λ contrastive", contrastive_weight), ("λ output", output_weight)):
                in_range(name, weight, 0, MAX_WEIGHT)
            in_range("the learning rate", lr, *LR_RANGE)
            config = GenConfig(source=SOURCES[source], count=count, iterations=iterations,
                               batch_size=min(count, FIDELITY.batch_size), neighbourhood=int(neighbourhood),
                               top_k=int(top_k), temperature=float(temperature),
                               contrastive_weight=float(contrastive_weight), output_weight=float(output_weight),
                               lr=float(lr), seed=seed_of(seed), preview_every=INTERACTIVE.preview_every,
                               max_shift=0 if iterations < 200 else FIDELITY.max_shift,
                               flip=iterations >= 200)
        except (StudioError, TypeError, ValueError) as err:
            yield message(error(err))
            return
        key = json.dumps({"workspace": ws.fingerprint, **config.to_dict()}, sort_keys=True)
        if (earlier := cache.get(key)) is not None:
            yield finished(ws, earlier, cached=True)
            return
        run = run or Run()
        updates: queue.Queue = queue.Queue()
        outcome: dict = {}

        def work() -> None:
            try:
                outcome["result"] = generate(ws.model, config, progress=updates.put, cancel=run.cancel)
            except Exception as err:  # noqa: BLE001 - a StudioError (Cancelled included) or a bug, shown below
                outcome["error"] = err
            finally:
                updates.put(None)

        future, behind = ENGINE.submit(work)  # this generator yields its updates meanwhile
        history: list[dict[str, float]] = []
        progress(0, desc=WAITING if behind else "Synthesizing")
        try:
            while (update := next_update(updates, future, run.cancel)) is not None:
                history = history[: update.iteration - 1] + [update.losses]
                progress(update.fraction, desc=f"Synthesizing: batch {update.batch + 1}/{update.batches}")
                if update.preview is not None:
                    status = (f"Iteration {update.iteration}/{update.iterations} of batch {update.batch + 1}/"
                              f"{update.batches} · loss {update.losses['total']:.3f}")
                    preview = [(zoom(p), f"#{update.batch * config.batch_size + i}")
                               for i, p in enumerate(to_pixels(update.preview))]
                    yield (status, loss_figure(history, f"losses, batch {update.batch + 1}"), preview,
                           *(gr.skip(),) * 4)
        except Cancelled as err:  # before its turn came
            outcome["error"] = err
        run.done = True
        if "error" in outcome:
            failure = outcome["error"]
            if not isinstance(failure, StudioError):  # a bug: guarded() names it, the server log keeps the trace
                yield restored(ws, made, gr.skip())
                raise failure
            yield restored(ws, made, stopped(failure) if run.cancel.is_set() else error(failure))
            return
        cache.put(key, outcome["result"])
        yield finished(ws, outcome["result"], cached=False)

    def show_attention(ws: Workspace, made: tuple[str, GenResult] | None, origin: str, index: float | None,
                       layer: float, direction: str, query: str,
                       neighbourhood: str) -> tuple[go.Figure | dict, str]:
        """Plain and enhanced attention maps of one image of the generated set or of the test images."""
        model = ws.model
        try:
            if origin == "generated set":
                if made is None or made[0] != ws.fingerprint:
                    raise StudioError("generate a set for this model first, or pick a test image")
                images = made[1].images
                index = whole_in_range("the image number", index, 0, len(images) - 1)
                image = images[index]
            else:
                test = ws.test_data("a test image's map")
                index = whole_in_range("the image number", index, 0, len(test) - 1)
                image = test.normalized(index, index + 1)[0]
            position = _query_position(query, model.cfg)
            maps = attention_maps(model, image, int(layer), direction, position, int(neighbourhood))
        except (StudioError, ValueError) as err:
            return gr.skip(), error(err)  # the last maps stay beside the message
        pixels = to_pixels(image.unsqueeze(0))[0]
        title = f"{origin} #{index}, layer {int(layer)}, {direction} scan, query {query}"
        return attention_figure(pixels, maps, position, model.cfg.grid_size, title), ""

    gr.Markdown(EXPLAIN)
    with gr.Row():
        with gr.Column(scale=1):
            source = gr.Radio(list(SOURCES), value=next(iter(SOURCES)), label="Source", elem_id="gen-source")
            with gr.Row():
                count = gr.Number(APP_COUNT, label="Images", elem_id="gen-count",
                                  info=f"1 to {MAX_COUNT}; the paper calibrates with 128.")
                iterations = gr.Number(INTERACTIVE.iterations, label="Iterations",
                                       elem_id="gen-iterations",
                                       info=f"0 to {MAX_ITERATIONS}; the paper: 1000. On 2 CPU cores ~0.05 s per "
                                            "28×28 image and iteration. From 200 on, random shifts and flips.")
            neighbourhood = gr.Dropdown(["1", "3", "5", "7"], value=str(INTERACTIVE.neighbourhood),
                                        label="Neighbourhood (p×p patches)", elem_id="gen-neighbourhood",
                                        info="1 = plain states; 5×5 is the paper's best.")
            top_k = gr.Slider(1, slider_top(cfg.num_patches - 1, 1), INTERACTIVE.top_k, step=1, label="Top-K positives",
                              info="Patches counted as similar to each anchor patch.")
            temperature = gr.Slider(0.05, 2.0, INTERACTIVE.temperature, step=0.05, label="Temperature τ")
            with gr.Row():
                contrastive_weight = gr.Number(INTERACTIVE.contrastive_weight, label="λ contrastive",
                                               info=f"0 to {MAX_WEIGHT}")
                output_weight = gr.Number(INTERACTIVE.output_weight, label="λ output", info=f"0 to {MAX_WEIGHT}")
            with gr.Row():
                lr = gr.Number(INTERACTIVE.lr, label="Learning rate", info=f"{LR_RANGE[0]} to {LR_RANGE[1]}")
                seed = gr.Number(INTERACTIVE.seed, label="Seed")
            with gr.Row():
                run_button = gr.Button("Synthesize", variant="primary", elem_id="gen-run")
                cancel_button = gr.Button("Cancel", variant="stop", elem_id="gen-cancel")
        with gr.Column(scale=2):
            status = gr.Markdown(READY, elem_id="gen-status")
            losses = gr.Plot(label="Losses", elem_id="gen-losses")
            gallery = gr.Gallery(label="Synthetic images", columns=8, height="auto", elem_id="gen-gallery")
            real = gr.Gallery(label="Real test images of the same classes", columns=8, height="auto",
                              elem_id="gen-real")
            with gr.Row():
                download = gr.File(label="Download the set (PNGs + manifest.json)", elem_id="gen-download")
            with gr.Accordion("Manifest: config, seed, versions (JSON)", open=False):
                manifest = gr.JSON(show_label=False)
    made_state = gr.State()  # (workspace fingerprint, GenResult) of the last finished set
    inputs = [workspace, made_state, source, count, iterations, neighbourhood, top_k, temperature, contrastive_weight,
              output_weight, lr, seed]
    set_outputs = [status, losses, gallery, real, manifest, download, made_state]
    wire_run(run_button, cancel_button, gr.State(), synthesize, inputs, set_outputs, "synthesize")

    gr.Markdown("## Implicit-attention maps\n\n" + ATTENTION_EXPLAIN)
    queries, default_query = _query_tokens(cfg)
    with gr.Row():
        origin = gr.Radio(["generated set", "test set"], value="test set", label="Image from")
        index = gr.Number(0, label="Image #")
        layer = clamped(gr.Slider(0, slider_top(cfg.depth - 1), cfg.depth - 1, step=1, label="Layer"))
        direction = gr.Radio(["fwd", "bwd"], value="fwd", label="Scan direction")
        query = gr.Dropdown(queries, value=default_query, label="Query token", allow_custom_value=True)
        map_neighbourhood = gr.Dropdown(["3", "5", "7"], value="5", label="Neighbourhood")
        attention_button = gr.Button("Show attention", elem_id="attention-run")
    attention_message = gr.Markdown()
    attention_plot = gr.Plot(label="Attention", elem_id="attention-plot")
    attention_button.click(show_attention,
                           [workspace, made_state, origin, index, layer, direction, query, map_neighbourhood],
                           [attention_plot, attention_message], api_name="attention")

    def follow(ws: Workspace) -> tuple:
        """A new model: its ranges in the controls, and nothing of the previous model's left on screen."""
        new_cfg = ws.model.cfg
        new_queries, new_default = _query_tokens(new_cfg)
        return (READY, None, [], [], None, None, None,
                gr.update(maximum=slider_top(new_cfg.num_patches - 1, 1),
                          value=min(INTERACTIVE.top_k, new_cfg.num_patches - 1)),
                gr.update(maximum=slider_top(new_cfg.depth - 1), value=new_cfg.depth - 1),
                gr.update(choices=new_queries, value=new_default), None, "")

    workspace.change(follow, workspace, [*set_outputs, top_k, layer, query, attention_plot, attention_message],
                     api_visibility="private", concurrency_limit=None)
