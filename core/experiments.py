"""Quantization runs as plain records: config + calibration + accuracy + timings + provenance.

The CLI prints them, the app shows them and the exports write them; every number carries what it takes
to reproduce it (model, config, calibration source/count/seed, data, versions, hardware, date).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from threading import Event

import numpy as np
import pandas as pd
import torch

from core.data import LabelledImages, calibration_images
from core.errors import StudioError
from core.eval import Cancelled, EvalResult, evaluate, graph_latency, hardware_label, time_forward
from core.models import VisionMamba
from core.models.fused import FusedVim
from core.observe import dynamic_outlier_summary, error_report, parse_site
from core.observe.probe import site_columns
from core.quant import QuantConfig, QuantizedVim, quantize, quantized_sites
from core.quant.config import OUTLIER_METHODS, Progress
from core.quant.packed import PackedVim
from core.records import checked_fields, rows_csv, utc_now, versions, write_replacing


@dataclass
class RunRecord:
    model: str
    method: str
    setting: str
    calibration: dict
    top1: float
    fp_top1: float
    delta_vs_fp: float
    test_images: int
    calibration_seconds: float
    eval_seconds: float
    hardware: str
    config: dict
    reconstruction: list[dict] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    date: str = ""
    checkpoint: str = ""  # the file and its SHA-256 prefix ('' in logs from before it was recorded)
    data: str = ""  # the test images' source
    quantized_model: str = ""  # the packed integer model's file ('' when the config cannot be packed, or none saved)
    # FP16 vs packed integer model on a GPU: {"hardware", "batch", "fp16_ms", "packed_ms", "repeats"} ({} if unmeasured)
    kernel_latency: dict = field(default_factory=dict)
    # every quantizer's SQNR / cosine on the first scored images (test or validation, as ``data`` says):
    # {"images": N, "rows": [{"site", "bits", "sqnr_db", "cosine", "sqnr_db_vs_fp_model", "cosine_vs_fp_model"},
    # ...]} ({} if not measured); null: not finite
    site_errors: dict = field(default_factory=dict)

    def flat(self) -> dict:
        """One CSV row: scalars as they are, nested fields as JSON."""
        return {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> RunRecord:
        return cls(**checked_fields(cls, values, "run record"))


@dataclass
class QuantizationRun:
    """A run's record plus what the app shows beyond it: the quantized model (for error charts), the
    evaluation with its per-image predictions, and the calibration images (for label-free analyses)."""

    record: RunRecord
    qmodel: QuantizedVim
    evaluation: EvalResult
    calibration: torch.Tensor
    step_sqnr_db: dict[str, np.ndarray] = field(default_factory=dict)  # site → SQNR per time-step (not recorded)


ERROR_IMAGES = 32  # per-site SQNR on the first 32 test images: about a second for the default model on 2 CPU cores
SITE_ERROR_COLUMNS = ("bits", "sqnr_db", "cosine", "sqnr_db_vs_fp_model", "cosine_vs_fp_model")


def site_errors_of(report: pd.DataFrame, images: int) -> dict:
    """``core.observe.error_report``'s rows as a record carries them: plain JSON (non-finite values as null)."""
    def plain(value: float | None) -> float | None:
        return None if value is None or not math.isfinite(value) else round(float(value), 6)

    rows = [{"site": row["site"], **{name: plain(row[name]) for name in SITE_ERROR_COLUMNS}}
            for row in report.to_dict("records")]
    return {"images": images, "rows": rows}


def site_errors_frame(record: RunRecord) -> pd.DataFrame | None:
    """A record's per-site errors as ``error_report``'s frame (site, layer, direction, tensor, bits, SQNRs,
    cosines; NaN where not finite), or None when the run did not measure them."""
    rows = record.site_errors.get("rows") if record.site_errors else None
    if not rows:
        return None
    frame = pd.DataFrame([{**site_columns(parse_site(row["site"])), **row} for row in rows])
    return frame.astype({name: float for name in SITE_ERROR_COLUMNS})


def check_runnable(model: VisionMamba, config: QuantConfig) -> None:
    """Refuse, before any work, a config whose overrides name no site of ``model`` or skip every quantizer
    (the run would be the FP model under a quantized label)."""
    sites = [site.name for site in quantized_sites(model, config.quantize_state)]
    config.check_overrides(sites)
    if all(config.for_site(name) is None for name in sites):
        raise StudioError("the overrides skip every quantizer, so the run would be the FP model under a quantized "
                          'label: narrow the skip patterns (e.g. {"layers.0.*": {"skip": true}})')


def quantize_and_evaluate(model: VisionMamba, model_name: str, config: QuantConfig, test: LabelledImages,
                          fp_top1: float, calib_source: str, n_calib: int, seed: int, data_root: str | None = None,
                          progress: Progress | None = None, cancel: Event | None = None,
                          eval_progress: Callable[[int, int], None] | None = None,
                          eval_batch_size: int = 500, checkpoint: str = "",
                          error_images: int = ERROR_IMAGES) -> QuantizationRun:
    """Calibrate, quantize and evaluate one configuration; keeps the quantized model and the predictions
    beside the record (smaller ``eval_batch_size``: a finer progress bar and a quicker cancel). ``checkpoint``
    names the weights file in the record, the test images name themselves. Every quantizer's SQNR against FP
    is measured on the first ``error_images`` of the scored images (0: not measured) and travels in the record."""
    if error_images < 0:
        raise StudioError(f"the per-site error images must be 0 (none) or more (got {error_images})")
    check_runnable(model, config)
    cfg = model.cfg
    calib = calibration_images(calib_source, n_calib, seed, cfg.img_size, cfg.in_chans, data_root)
    torch.manual_seed(seed)
    qmodel = quantize(model, config, calib, progress, cancel)
    result = evaluate(qmodel, test, eval_batch_size, eval_progress, cancel)
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled before the per-site errors")
    error_images = min(error_images, len(test))
    site_errors, step_sqnr_db = {}, {}
    if error_images:
        report = error_report(model, qmodel, test.normalized(0, error_images))
        site_errors, step_sqnr_db = site_errors_of(report, error_images), report.attrs["step_sqnr_db"]
    record = RunRecord(
        model=model_name, method=config.method, setting=config.setting,
        calibration={"source": calib_source, "images": n_calib, "seed": seed},
        top1=round(result.top1, 2), fp_top1=round(fp_top1, 2), delta_vs_fp=round(result.top1 - fp_top1, 2),
        test_images=result.total, calibration_seconds=qmodel.provenance["calibration_seconds"],
        eval_seconds=round(result.seconds, 2), hardware=result.device, config=config.to_dict(),
        reconstruction=qmodel.provenance.get("reconstruction", {}).get("blocks", []), versions=versions(),
        date=utc_now(), checkpoint=checkpoint, data=test.source, site_errors=site_errors)
    return QuantizationRun(record, qmodel, result, calib, step_sqnr_db)


def kernel_latency(model: VisionMamba, packed: PackedVim, images: torch.Tensor, device: str | torch.device,
                   repeats: int = 5) -> dict:
    """Median time of one forward pass over ``images`` for the FP16 model and the packed integer model (fp16
    activations) on ``device``: the speed the kernels give, on the hardware named. For CUDA: elsewhere the
    packed model runs the kernels' float64 references (a check, not a speed) and there is no fp16 fast path.
    On CUDA the FP16 model runs the packed model's fused skeleton with float operations
    (``core.models.fused.FusedVim``), so the two differ only where the packed one quantizes, and both are also
    timed as replayed CUDA graphs (``*_graph_ms``): eager PyTorch pays launch overhead per kernel, which for a
    small model can exceed the GPU work (measured, kernels/README.md). ``launches`` says whether the packed
    model's launches were tuned per shape on the first (warm-up) pass (``kernels.tuning``) or ran the kernels'
    fixed rules."""
    device = torch.device(device)
    half = torch.float16 if device.type == "cuda" else torch.float32
    fp16 = FusedVim(copy.deepcopy(model).to(device=device, dtype=half)).eval()
    integer = copy.deepcopy(packed).to(device)
    if device.type == "cuda":
        integer.half_activations()
    batch = images.to(device=device, dtype=half)
    candidates = (("fp16", fp16), ("packed", integer))
    timings = {f"{name}_ms": round(1000 * time_forward(candidate, batch, repeats)[0], 3)
               for name, candidate in candidates}
    if device.type == "cuda":
        graphed = {name: graph_latency(candidate, batch, repeats) for name, candidate in candidates}
        failures = [value for value in graphed.values() if isinstance(value, str)]
        if failures:  # the eager timings stand; say why the graph ones are missing
            timings["graph_note"] = failures[0]
        else:
            timings |= {f"{name}_graph_ms": round(1000 * seconds, 3) for name, seconds in graphed.items()}
    fp16_model = "fused float path, FusedVim" if device.type == "cuda" else "the model's own forward"
    return {"hardware": hardware_label(device), "batch": len(images), "repeats": repeats, "fp16_model": fp16_model,
            "launches": "tuned per shape" if integer.tune_launches else "fixed rules", **timings}


def threshold_sweep(model: VisionMamba, base: QuantConfig, calib: torch.Tensor, images: LabelledImages,
                    ks: list[float], n_refreshes: list[int], fp_top1: float, outlier_images: int = 256,
                    progress: Callable[[int, int], None] | None = None, cancel: Event | None = None,
                    eval_batch_size: int = 500, rows: list[dict] | None = None) -> list[dict]:
    """OuroMamba-Quant's two knobs of the outlier rule against what they cost, one row per (k, n_refresh):
    top-1 on ``images`` (held-out images to choose on, never the test set) and the share of activation
    channels at outlier precision. A larger k flags fewer channels; a larger n_refresh lets a window's outlier
    set grow longer (the paper's Fig. 9d: its 8-bit work grows), a smaller one resets it more often. Each point
    is calibrated anew from ``calib`` (the inlier scales are calibrated with the rule), with ``base``'s other
    settings (Δ keeps its own ``k_delta``). ``outlier_share_pct``: per token, the outlier channels over all
    channels of every outlier-aware site (``core.observe.dynamic_outlier_summary`` on the first
    ``outlier_images`` images), i.e. the share of the activation GEMMs' reduction that runs at 8 bits;
    ``olist_share_pct``: the same for a window's final set. The points are appended to ``rows`` as they
    finish (pass a list of your own to keep them when the sweep is interrupted)."""
    if base.method != "ouromamba":
        raise StudioError(f"the sweep varies OuroMamba's per-time-step rule; method {base.method!r} has none")
    points = [(k, n) for k in ks for n in n_refreshes]
    rows = [] if rows is None else rows
    for index, (k, n_refresh) in enumerate(points):
        config = replace(base, k=float(k), n_refresh=n_refresh)  # QuantConfig refuses a fractional window
        torch.manual_seed(base.reconstruction.seed)
        qmodel = quantize(model, config, calib, cancel=cancel)
        result = evaluate(qmodel, images, eval_batch_size, cancel=cancel)
        summary = dynamic_outlier_summary(qmodel, images.normalized(0, outlier_images))
        channels = summary["channels"].sum()
        rows.append({"k": float(k), "n_refresh": n_refresh, "top1": round(result.top1, 2),
                     "delta_vs_fp": round(result.top1 - fp_top1, 2),
                     "outlier_share_pct": round(float(100 * summary["outlier_channels_per_token"].sum() / channels), 2),
                     "olist_share_pct": round(float(100 * summary["olist_size"].sum() / channels), 2),
                     "calibration_s": qmodel.provenance["calibration_seconds"], "eval_s": round(result.seconds, 2)})
        if progress is not None:
            progress(index + 1, len(points))
    return rows


def write_records(records: list[RunRecord], directory: str | Path, name: str) -> tuple[Path, Path]:
    """``name``.csv (one row per run: its label and weakest quantizer as tables show them, then the record's
    fields) and ``name``.json (full records, which ``read_records`` reads back) under ``directory``."""
    if not records:
        raise StudioError("no runs to write: the records list is empty")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = directory / f"{name}.csv", directory / f"{name}.json"
    rows = [{"run": run_label(i, r), "lowest SQNR": lowest_sqnr_text(r), **r.flat()} for i, r in enumerate(records)]
    write_replacing(csv_path, rows_csv(rows))  # after every run: an interruption keeps the previous files whole
    write_replacing(json_path, json.dumps([asdict(r) for r in records], indent=2) + "\n")
    return csv_path, json_path


def append_record(record: RunRecord, path: str | Path) -> None:
    """Add one run to a JSON-lines log (one record a line): every finished run is kept, whatever comes after,
    and the runs of earlier sessions stay beside it."""
    path = Path(path)
    line = (json.dumps(asdict(record)) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a+b", buffering=0) as log:
            end = log.seek(0, os.SEEK_END)
            if end:
                log.seek(end - 1)  # appending writes at the end wherever the file is read
                if log.read(1) != b"\n":
                    line = b"\n" + line  # a line torn by an earlier crash stays on its own, not glued to this run
            try:
                written = 0
                while written < len(line):
                    written += log.write(line[written:])
            except OSError:
                log.truncate(end)  # a disk that filled mid-line: no torn line left behind
                raise
    except OSError as err:
        raise StudioError(f"could not save the run to '{path}' ({err.strerror or err})") from None


def load_records(path: str | Path) -> list[RunRecord]:
    """Every run in a JSON-lines log, oldest first; no file yet means no runs."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise StudioError(f"'{path}' is not text, so not a log of run records") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(RunRecord.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError, StudioError) as err:
            raise StudioError(f"line {number} of '{path}' is not a run record ({err}); fix or remove that line") \
                from None
    return records


def read_records(path: str | Path) -> list[RunRecord]:
    """The runs in a file either writer makes: a JSON array (``write_records``, the command line's
    ``<name>.json``) or a JSON-lines log (``append_record``, the app's run log)."""
    path = Path(path)
    if not path.exists():
        raise StudioError(f"'{path}' does not exist: give a file of run records (the quantize command's .json or "
                          "the app's runs.jsonl, written by its first run)")
    if not path.is_file():
        raise StudioError(f"'{path}' is not a file of run records (the quantize command's .json or the app's "
                          "runs.jsonl)")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise StudioError(f"'{path}' is not text, so not a file of run records") from None
    if text.lstrip().startswith("{") and "\n" in text.strip():  # one pretty-printed object, not JSON lines
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            kind = "a sweep's points (python -m core sweep)" if "points" in whole else "one JSON object"
            raise StudioError(f"'{path}' holds {kind}, not run records")
    if not text.lstrip().startswith("["):
        return load_records(path)
    try:
        return [RunRecord.from_dict(record) for record in json.loads(text)]
    except (json.JSONDecodeError, TypeError, AttributeError, StudioError) as err:
        raise StudioError(f"'{path}' is not a list of run records ({err})") from None


def scored_on(record: RunRecord) -> str:
    """The images a run was scored on, short: 'fashion-mnist/test' or 'fashion-mnist/train[55000:], validation'
    (where the files were read dropped). Records older than the ``data`` field were all scored on test images."""
    return (record.data or "test images").split(" (")[0]


def lowest_site(frame: pd.DataFrame, metric: str = "sqnr_db") -> pd.Series | None:
    """The row of a per-site error frame with the lowest ``metric``: −inf counts (nothing of the signal left),
    +inf (an exact quantizer) and NaN do not; None when no row has a value."""
    values = frame[metric].to_numpy(dtype=float).copy()
    values[np.isposinf(values)] = np.nan
    return None if np.isnan(values).all() else frame.iloc[int(np.nanargmin(values))]


DEFAULT_QUANT_CONFIG = QuantConfig()  # what a run label leaves unsaid


DEFAULT_CALIBRATION = {"source": "real", "images": 128, "seed": 0}  # the paper's 128 images; ours real, seed 0


def run_label(index: int, record: RunRecord) -> str:
    """How one run is named in tables, figures and menus: its position in the log, method and setting, then
    what else sets it apart: the outlier rule's k and n_refresh where they are not the defaults (for the methods
    that have the rule), the calibration images where they are not 128 real ones with seed 0 ('noise×128',
    'my_set×64 seed 3'), and its per-site overrides, counted (the config column spells them out)."""
    config, parts = record.config, [f"#{index + 1} {record.method} {record.setting}"]
    if record.method in OUTLIER_METHODS:
        parts += [f"{name} {config[name]:g}" for name in ("k", "n_refresh")
                  if name in config and config[name] != getattr(DEFAULT_QUANT_CONFIG, name)]
    calibration = {**DEFAULT_CALIBRATION, **record.calibration}
    if calibration != DEFAULT_CALIBRATION:
        parts.append(f"{Path(str(calibration['source'])).name}×{calibration['images']}"
                     + (f" seed {calibration['seed']}" if calibration["seed"] != DEFAULT_CALIBRATION["seed"] else ""))
    if overrides := config.get("overrides"):
        parts.append(f"+{len(overrides)} override{'s' if len(overrides) > 1 else ''}")
    return " ".join(parts)


def lowest_sqnr_text(record: RunRecord) -> str | None:
    """The run's weakest quantizer, 'layers.3.out_proj.input 6.8 dB' (None if it measured none)."""
    frame = site_errors_frame(record)
    worst = None if frame is None else lowest_site(frame)
    return None if worst is None else f"{worst['site']} {worst['sqnr_db']:.1f} dB"


def run_name(record: RunRecord) -> str:
    """The method, with its per-site overrides when it has any: how tables tell runs of one method apart."""
    overrides = record.config.get("overrides") or {}
    return record.method + (f" + {json.dumps(overrides, separators=(',', ':'))}" if overrides else "")


def site_error_table(records: list[RunRecord], metric: str = "sqnr_db") -> str:
    """Markdown: one row per run that measured its per-site errors (method, setting, calibration source × images),
    one column per tensor in forward order,
    each cell the mean ``metric`` (dB) over the layers and both scan directions, then the run's lowest site;
    '' when no run measured them."""
    frames = [(r, site_errors_frame(r)) for r in records]
    frames = [(r, frame) for r, frame in frames if frame is not None]
    if not frames:
        return ""
    tensors = list(dict.fromkeys(t for _, frame in frames for t in frame["tensor"]))
    lines = ["| run | " + " | ".join(tensors) + " | lowest |", "|---|" + "---|" * (len(tensors) + 1)]
    for r, frame in frames:
        means = frame.groupby("tensor")[metric].mean()
        worst = lowest_site(frame, metric)
        cells = [f"{means[t]:.1f}" if t in means and pd.notna(means[t]) else "–" for t in tensors]
        lowest = "–" if worst is None else f"{worst['site']} {worst[metric]:.1f}"
        calibration = f"{Path(r.calibration['source']).name} × {r.calibration['images']}"
        lines.append(f"| {run_name(r)} {r.setting}, {calibration} | " + " | ".join(cells) + f" | {lowest} |")
    return "\n".join(lines)


def _what_differs(records: list[RunRecord]) -> Callable[[RunRecord], str]:
    """Each run described by the aspects that vary across ``records`` (outlier bits, calibration, the rule's
    k and n_refresh, the scored images, the model): what tells apart runs that would share a table cell."""
    aspects = [lambda r: r.setting.partition("O")[2] and f"O{r.setting.partition('O')[2]}",
               lambda r: f"{r.calibration.get('source')} × {r.calibration.get('images')}, seed "
                         f"{r.calibration.get('seed')}",
               lambda r: f"k {r.config.get('k')}", lambda r: f"n_refresh {r.config.get('n_refresh')}",
               lambda r: f"{r.test_images:,} images of {scored_on(r)}", lambda r: r.model]
    varying = [aspect for aspect in aspects if len({aspect(r) for r in records}) > 1]
    return lambda r: ", ".join(text for aspect in varying if (text := aspect(r)))


def accuracy_table(records: list[RunRecord], row: Callable[[RunRecord], str] = run_name,
                   label: str = "method") -> str:
    """Markdown: one row per ``row(record)`` (default: the method and its overrides), one column per setting
    (top-1, Δ vs FP). Runs that would share a cell (another calibration, seed, k, outlier bits or set of
    images) get rows of their own, named by what differs; identical configurations by their run number."""
    def setting(r: RunRecord) -> str:
        return r.setting.split("O")[0]

    names = [row(r) for r in records]
    if len({(n, setting(r)) for n, r in zip(names, records, strict=True)}) < len(records):
        apart = _what_differs(records)
        names = [f"{n} ({apart(r)})" if apart(r) else n for n, r in zip(names, records, strict=True)]
    if len({(n, setting(r)) for n, r in zip(names, records, strict=True)}) < len(records):
        names = [f"#{i} {n}" for i, n in enumerate(names, start=1)]
    settings = list(dict.fromkeys(setting(r) for r in records))
    cell = {(n, setting(r)): f"{r.top1:.2f} ({r.delta_vs_fp:+.2f})" for n, r in zip(names, records, strict=True)}
    lines = [f"| {label} | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    lines += [f"| {name} | " + " | ".join(cell.get((name, s), "–") for s in settings) + " |"
              for name in dict.fromkeys(names)]
    return "\n".join(lines)
