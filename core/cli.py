"""Command line: ``python -m core {info,eval,card-eval,generate,quantize,rerun,pack,outliers,sweep,report}``; bad
input: one line, exit 2, before any work."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

from core.arguments import Distinct, OneLineParser, non_negative, positive, whole
from core.data import calibration_images, load_fashion_mnist, load_validation
from core.default_model import CARD_FILE, DEFAULT_MODEL_DIR, WEIGHTS_FILE, load_card
from core.errors import StudioError
from core.eval import evaluate, hardware_label
from core.experiments import (
    ERROR_IMAGES,
    accuracy_table,
    check_runnable,
    quantize_and_evaluate,
    read_records,
    run_name,
    scored_on,
    site_error_table,
    threshold_sweep,
    write_records,
)
from core.gen import GEN_PRESETS, GEN_SOURCES, GenConfig, GenProgress, generate, save_generated
from core.models import VisionMamba, load_checkpoint
from core.observe import dynamic_outlier_summary
from core.quant import METHODS, SETTINGS, QuantConfig, ReconstructionConfig, quantize
from core.quant.config import OUTLIER_METHODS, parse_overrides
from core.quant.packed import agreement, pack, save_packed
from core.records import provenance, rows_csv, write_replacing
from core.workspace import architecture, checkpoint_label, fits_fashion_mnist


def writable_file(path: str | Path, what: str) -> Path:
    """``path`` checked before any work: not empty, not a folder, in a folder that exists or can be made and
    can be written to. A long run must not end in a traceback about its output path."""
    if not str(path).strip():
        raise StudioError(f"the {what} path is empty")
    path = Path(path)
    if path.is_dir():
        raise StudioError(f"{what} '{path}' is a folder: give a file name in it")
    writable_folder(path.parent, what)
    return path


def writable_folder(folder: Path, what: str) -> Path:
    """``folder`` made (with its parents) and checked to be writable, before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StudioError(f"cannot write the {what} under '{folder}': part of that path is a file") from None
    except OSError as err:
        raise StudioError(f"cannot write the {what} under '{folder}': {err.strerror or err}") from None
    if not os.access(folder, os.W_OK):
        raise StudioError(f"cannot write the {what} under '{folder}': permission denied")
    return folder


def new_folder(path: str, what: str) -> Path:
    """A folder for a new set: absent or empty, so that two sets never mix in one folder."""
    if not path.strip():
        raise StudioError(f"the {what} folder is empty: name a new folder")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise StudioError(f"'{folder}' is a file: name a new folder for the {what}")
    if folder.is_dir() and any(folder.iterdir()):
        raise StudioError(f"'{folder}' already holds files: name a new folder for the {what} (two sets in one "
                          "folder would calibrate as one)")
    return writable_folder(folder, what)


def with_suffix(path: str, suffix: str) -> Path:
    """``path`` + ``suffix``, where a dot in the name is part of the name ('sweep_k2.5' → 'sweep_k2.5.csv') and a
    given .csv / .json suffix is swapped."""
    stem = path.removesuffix(".csv").removesuffix(".json")
    return Path(stem + suffix)


def fashion_model(model: VisionMamba, what: str) -> VisionMamba:
    """The model, refused when it does not read Fashion-MNIST as it is: its top-1 there would mean nothing."""
    if not fits_fashion_mnist(model.cfg):
        raise StudioError(f"{what}, and this checkpoint ({architecture(model.cfg)}) does not read "
                          "it: use the app's Model tab with a folder of its own test images")
    return model


def _progress(done: int, total: int) -> None:
    print(f"\r{done}/{total} images", end="", file=sys.stderr, flush=True)
    if done == total:
        print(file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> None:
    model = load_checkpoint(args.checkpoint, img_size=args.img_size)
    print(json.dumps({"config": model.cfg.to_dict(), "seq_len": model.cfg.seq_len,
                      "cls_position": model.cfg.cls_position,
                      "parameters": sum(p.numel() for p in model.parameters())}, indent=2))


def cmd_eval(args: argparse.Namespace) -> None:
    checkpoint = Path(args.checkpoint)
    model = fashion_model(load_checkpoint(checkpoint), "eval scores on Fashion-MNIST")
    data = load_fashion_mnist("test", args.data)
    if args.limit:
        data = data.subset(args.limit)
    result = evaluate(model, data, batch_size=args.batch_size, progress=_progress)
    print(json.dumps({"checkpoint": checkpoint_label(checkpoint), "data": data.source, **result.to_dict()}, indent=2))


def cmd_card_eval(args: argparse.Namespace) -> None:
    """Measure FP32 test top-1 of a model directory on the CPU and record it in its card."""
    directory = Path(args.model_dir)
    if not directory.is_dir():
        raise StudioError(f"'{directory}' is not a model folder (one holding {WEIGHTS_FILE} and {CARD_FILE})")
    card = load_card(directory)
    writable_file(directory / CARD_FILE, "model card")
    model = fashion_model(load_checkpoint(directory / WEIGHTS_FILE), "card-eval scores on Fashion-MNIST")
    result = evaluate(model, load_fashion_mnist("test", args.data), progress=_progress)
    card.update(test_top1=round(result.top1, 2), test_eval={**result.to_dict(),
                "command": f"python -m core card-eval {directory}" + (f" --data {args.data}" if args.data else "")})
    write_replacing(directory / CARD_FILE, json.dumps(card, indent=2) + "\n")
    print(f"test top-1 {result.top1:.2f}% ({result.correct}/{result.total}) in {result.seconds:.1f} s on "
          f"{result.device}; written to {directory / CARD_FILE}")


def _gen_progress(update: GenProgress) -> None:
    losses = " ".join(f"{name} {value:.4f}" for name, value in update.losses.items())
    print(f"\rbatch {update.batch + 1}/{update.batches} iteration {update.iteration}/{update.iterations}: {losses}",
          end="\n" if update.iteration == update.iterations else "", file=sys.stderr, flush=True)


def cmd_generate(args: argparse.Namespace) -> None:
    """Make a calibration set (OuroMamba-Gen or a baseline) and save it as PNGs + manifest.json."""
    out = new_folder(args.out, "calibration set")
    model = load_checkpoint(args.checkpoint)
    names = {f.name for f in fields(GenConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if overrides.get("layers") is not None:
        overrides["layers"] = tuple(overrides["layers"])
    config = replace(GEN_PRESETS[args.preset], **overrides)
    result = generate(model, config, progress=_gen_progress, data_root=args.data)
    folder = save_generated(result, out)
    targeted = [(p, t) for p, t in zip(result.predictions, result.targets, strict=True) if t is not None]
    hits = f"FP prediction = target for {sum(p == t for p, t in targeted)} of {len(targeted)}; " if targeted else ""
    print(f"{len(result.images)} {config.source} images in {result.seconds:.1f} s → {folder} ({hits}mean FP "
          f"confidence {sum(result.confidences) / len(result.confidences):.3f})")


def cmd_quantize(args: argparse.Namespace) -> None:
    """Quantize with every requested method × setting, print an accuracy table, write CSV + JSON records. Every
    input (configs, overrides against the model's sites, calibration images, the records' file) is checked
    before the FP32 evaluation: a typo costs nothing."""
    if not args.name.strip() or Path(args.name).name != args.name:
        raise StudioError(f"--name must be a plain file name without folders, got {args.name!r}")
    records_file = writable_folder(Path(args.out), "records") / f"{args.name}.json"
    if records_file.exists() and not args.append:
        raise StudioError(f"'{records_file}' already holds runs: --append adds to them, or give another --name")
    records = read_records(records_file) if records_file.exists() else []
    overrides = parse_overrides(args.overrides)
    checkpoint = Path(args.checkpoint)
    model = fashion_model(load_checkpoint(checkpoint), "quantize scores on Fashion-MNIST")
    settings = [SETTINGS[s] for s in args.setting] if args.setting else [(args.w_bits, args.a_bits)]
    rule = {"o_bits": args.outlier_bits, "k": args.k, "n_refresh": args.n_refresh}  # for the methods that have it
    configs = [QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits,
                           **(rule if method in OUTLIER_METHODS else {}),
                           release_compatible=args.release_compatible,
                           quantize_state=args.quantize_state, overrides=overrides,
                           reconstruction=_reconstruction(args))
               for method in args.method for w_bits, a_bits in settings]
    for config in configs:
        check_runnable(model, config)
    calibration_images(args.calib, args.n_calib, args.seed, model.cfg.img_size, model.cfg.in_chans, args.data)
    data = load_validation(args.data) if args.eval_split == "val" else load_fashion_mnist("test", args.data)
    if args.limit:
        data = data.subset(args.limit)
    fp = evaluate(model, data, progress=_progress)
    print(f"FP32: {fp.top1:.2f}% on {fp.total} images of {data.source} ({fp.seconds:.1f} s, {fp.device})",
          file=sys.stderr)
    new = []
    for config in configs:
        print(f"{config.label}: calibrating on {args.n_calib} {args.calib} images", file=sys.stderr)
        record = quantize_and_evaluate(model, checkpoint.parent.name, config, data, fp.top1, args.calib,
                                       args.n_calib, args.seed, args.data, eval_progress=_progress,
                                       checkpoint=checkpoint_label(checkpoint), error_images=args.error_images).record
        print(f"  top-1 {record.top1:.2f}% ({record.delta_vs_fp:+.2f}), calibration "
              f"{record.calibration_seconds:.1f} s, eval {record.eval_seconds:.1f} s", file=sys.stderr)
        new.append(record)
        write_records(records + new, args.out, args.name)  # after every run: an interruption loses nothing
    print(f"FP32 {fp.top1:.2f}% on {fp.total} images of {data.source}; quantized top-1 (Δ vs FP):")
    print(accuracy_table(new))
    print(f"records: {Path(args.out) / args.name}.csv / .json" + (f" ({len(records)} earlier run(s) kept)"
                                                                   if records else ""))


def cmd_pack(args: argparse.Namespace) -> None:
    """Calibrate OuroMamba, pack it into integer codes + scales, save one safetensors file, and (``--check N``)
    measure top-1 agreement with the simulation on the first N test images."""
    out = writable_file(args.out, "packed model")
    checkpoint = Path(args.checkpoint)
    model = load_checkpoint(checkpoint)
    if args.check:
        fashion_model(model, "--check scores on Fashion-MNIST")
    cfg = model.cfg
    w_bits, a_bits = SETTINGS[args.setting]
    config = QuantConfig(w_bits=w_bits, a_bits=a_bits, k=args.k, n_refresh=args.n_refresh,
                         reconstruction=_reconstruction(args))
    calib = calibration_images(args.calib, args.n_calib, args.seed, cfg.img_size, cfg.in_chans, args.data)
    print(f"{config.label}: calibrating on {args.n_calib} {args.calib} images", file=sys.stderr)
    qmodel = quantize(model, config, calib)
    qmodel.provenance.update(checkpoint=checkpoint_label(checkpoint), calibration={"source": args.calib,
                                                                          "images": args.n_calib, "seed": args.seed})
    packed = pack(qmodel)
    path = save_packed(packed, out)
    sizes = packed.weight_bytes()
    print(f"{path}: projection weights {sizes['packed'] / 1e3:.1f} kB as codes + scales "
          f"(fp32 {sizes['float32'] / 1e3:.1f} kB)")
    if args.check:
        test = load_fashion_mnist("test", args.data).subset(args.check)
        result = agreement(packed, qmodel, test.normalized(), test.labels)
        print(json.dumps({"checked_on": f"first {args.check} test images",
                          "hardware": hardware_label(test.images.device), **result.to_dict()}, indent=2))


def cmd_outliers(args: argparse.Namespace) -> None:
    """Per-site statistics of the per-time-step outlier rule: does the outlier set move across time-steps?"""
    out = writable_file(args.out, "statistics CSV")
    checkpoint = Path(args.checkpoint)
    model = fashion_model(load_checkpoint(checkpoint), "the statistics are measured on Fashion-MNIST")
    cfg = model.cfg
    calib = calibration_images(args.calib, args.n_calib, args.seed, cfg.img_size, cfg.in_chans, args.data)
    config = QuantConfig(method="ouromamba", w_bits=4, a_bits=args.a_bits, k=args.k, n_refresh=args.n_refresh,
                         reconstruction=ReconstructionConfig(epochs=0))
    qmodel = quantize(model, config, calib)
    images = load_fashion_mnist("test", args.data).subset(args.images).normalized()
    summary = dynamic_outlier_summary(qmodel, images).sort_values("new_channels_vs_previous_window",
                                                                  ascending=False)
    how = (f"inlier scales from {args.n_calib} {args.calib} images, seed {args.seed}; statistics on the first "
           f"{args.images} test images; a_bits {args.a_bits}, k {args.k}, n_refresh {args.n_refresh}")
    # provenance first, as '#' lines (pandas: read_csv(comment="#"))
    write_replacing(out, f"# {checkpoint_label(checkpoint)}\n# {how}\n# {json.dumps(provenance())}\n"
                         + summary.to_csv(index=False))
    print(summary.head(args.top).to_string(index=False))
    print(f"{len(summary)} sites → {out} ({how})")


def _shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it: a command that reruns elsewhere."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else path


def _sweep_command(args: argparse.Namespace) -> str:
    """The command line that reruns a sweep, every default spelled out."""
    return (f"python -m core sweep {_shown_path(args.checkpoint)} --setting {args.setting} "
            f"--k {' '.join(map(str, args.k))} "
            f"--n-refresh {' '.join(map(str, args.n_refresh))} --calib {args.calib} --n-calib {args.n_calib} "
            f"--recon-epochs {args.recon_epochs}{' --reflect-scales' if args.reflect_scales else ''} "
            f"--seed {args.seed} --val {args.val} "
            f"--outlier-images {args.outlier_images} --out {args.out}" + (f" --data {args.data}" if args.data else ""))


def cmd_sweep(args: argparse.Namespace) -> None:
    """Validation top-1 and outlier share for every (k, n_refresh): a CSV of the points and a JSON with them
    and their provenance, rewritten after every point (an interruption keeps the finished ones); the table
    printed."""
    csv_path, json_path = (writable_file(with_suffix(args.out, suffix), "sweep") for suffix in (".csv", ".json"))
    checkpoint = Path(args.checkpoint)
    model = fashion_model(load_checkpoint(checkpoint), "the sweep scores on Fashion-MNIST's validation images")
    cfg = model.cfg
    w_bits, a_bits = SETTINGS[args.setting]
    base = QuantConfig(w_bits=w_bits, a_bits=a_bits,
                       reconstruction=_reconstruction(args))
    calib = calibration_images(args.calib, args.n_calib, args.seed, cfg.img_size, cfg.in_chans, args.data)
    images = load_validation(args.data).subset(args.val)
    fp = evaluate(model, images)
    total = len(args.k) * len(args.n_refresh)
    print(f"FP32 {fp.top1:.2f}% on {fp.total} validation images; {total} points", file=sys.stderr)
    header = {"checkpoint": checkpoint_label(checkpoint, _shown_path(args.checkpoint)),
              "images": images.source, "fp_top1": round(fp.top1, 2), "base_config": base.to_dict(),
              "calibration": {"source": args.calib, "images": args.n_calib, "seed": args.seed},
              "outlier_images": min(args.outlier_images, fp.total), "hardware": fp.device, **provenance(),
              "command": _sweep_command(args)}
    rows: list[dict] = []

    def finished(done: int, total: int) -> None:
        print(f"\r{done}/{total} points", file=sys.stderr, end="\n" if done == total else "", flush=True)
        write_replacing(csv_path, rows_csv(rows))
        write_replacing(json_path, json.dumps({**header, "points_done": f"{done} of {total}", "points": rows},
                                              indent=2) + "\n")

    threshold_sweep(model, base, calib, images, args.k, args.n_refresh, fp.top1, args.outlier_images,
                    progress=finished, rows=rows)
    columns = list(rows[0])
    print("\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
                     *("| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows)]))
    print(f"FP32 {fp.top1:.2f}% on the {fp.total} validation images → {csv_path} / .json")


def cmd_report(args: argparse.Namespace) -> None:
    from core.report import write_report  # plotly: only here, so the rest runs where it is not installed

    writable_file(args.out, "report")
    records = [record for path in args.records for record in read_records(path)]
    if not records:
        raise StudioError("these files hold no runs: quantize first (python -m core quantize, or the app)")
    out = write_report(records, args.out, args.title)
    several_splits = len({scored_on(r) for r in records}) > 1  # a row per method and scoring images then
    print(accuracy_table(records, lambda r: f"{run_name(r)} on {scored_on(r)}") if several_splits else
          accuracy_table(records))
    images = max((r.site_errors.get("images", 0) for r in records), default=0)
    for metric, what in (("sqnr_db", "alone"), ("sqnr_db_vs_fp_model", "against the FP model (upstream error in)")):
        if sites := site_error_table(records, metric):
            print(f"\nSQNR (dB) of each tensor's quantizers {what}, mean over layers and directions (first {images} "
                  f"scored images):\n{sites}")
    print(f"{len(records)} run(s) → {out} (one HTML file: opens with no server and no network)")


def cmd_rerun(args: argparse.Namespace) -> int:
    """Make logged runs again from their records alone; exit 1 when a top-1 came out different."""
    from core.experiments import run_label
    from core.reproduce import rerun

    records = read_records(args.records)
    if not records:
        raise StudioError(f"'{args.records}' holds no runs")
    picked = args.runs or [len(records)]
    if bad := [n for n in picked if not 1 <= n <= len(records)]:
        raise StudioError(f"--run {bad[0]}: the file holds runs #1 to #{len(records)}")
    differ = 0
    for number in picked:
        recorded = records[number - 1]
        label = run_label(number - 1, recorded)
        print(f"{label}: calibrating on {recorded.calibration['images']} {recorded.calibration['source']} images "
              f"(seed {recorded.calibration['seed']}), scoring {recorded.test_images:,} images of "
              f"{scored_on(recorded)}", file=sys.stderr)
        again = rerun(recorded)
        now = again.again.record
        verdict = "the same" if again.same else (f"DIFFERENT: {now.top1 - recorded.top1:+.2f} points, FP32 "
                                                 f"{recorded.fp_top1:.2f} % then, {again.fp_top1:.2f} % now")
        print(f"{label}: top-1 {recorded.top1:.2f} % recorded ({recorded.hardware}, torch "
              f"{recorded.versions.get('torch', '?')}, {recorded.date[:10]}), {now.top1:.2f} % now ({now.hardware}, "
              f"torch {now.versions.get('torch')}): {verdict}")
        differ += not again.same
    return 1 if differ else 0


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """--help names each option's default, except where there is none to name."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        none = action.default is None or action.default is False  # not `in (None, False)`: 0 == False
        return action.help if none else super()._get_help_string(action)


def _checkpoint(command: argparse.ArgumentParser, default: str) -> None:
    command.add_argument("checkpoint", nargs="?", default=default,
                         help="a Vim checkpoint: .safetensors, or a .pth/.pt state dict")


def _data(command: argparse.ArgumentParser) -> None:
    command.add_argument("--data", help="Fashion-MNIST directory (default: Debian's dataset-fashion-mnist package)")


def _calibration(command: argparse.ArgumentParser, epochs: int | None) -> None:
    """The calibration images (source, count, seed) and, where the command reconstructs, its epochs."""
    command.add_argument("--calib", default="real", help="real | noise | a folder of images")
    command.add_argument("--n-calib", type=whole(1), default=128, help="calibration images")
    command.add_argument("--seed", type=int, default=0, help="seed of the calibration draw" +
                         (" and the reconstruction" if epochs is not None else ""))
    if epochs is not None:
        command.add_argument("--recon-epochs", type=whole(0), default=epochs,
                             help="block reconstruction epochs (0: none)")
        command.add_argument("--reflect-scales", action="store_true",
                             help="a scale that reconstruction takes below zero becomes |s| instead of staying under "
                                  "the floor with its channel rounded to 0 (docs/method-decisions.md)")


def _reconstruction(args: argparse.Namespace) -> ReconstructionConfig:
    """The reconstruction that ``_calibration``'s options ask for."""
    return ReconstructionConfig(epochs=args.recon_epochs, seed=args.seed, reflect_scales=args.reflect_scales)


def _rule(command: argparse.ArgumentParser, several: bool = False) -> None:
    """OuroMamba's per-time-step outlier rule: threshold k and window n_refresh (several values for a sweep)."""
    many = {"nargs": "+", "action": Distinct} if several else {}
    command.add_argument("--k", type=positive, default=[2.0, 2.5, 3.0, 4.0, 5.0] if several else 3.0, **many,
                         help="outlier threshold: mean + k·std of a token's inlier channels")
    command.add_argument("--n-refresh", type=whole(1), default=[1, 5, 10, 25, 50] if several else 10, **many,
                         help="window length in time-steps; the outlier set is reset at each window's start")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m core", description="OuroMamba Studio engine")
    sub = parser.add_subparsers(dest="command", required=True)
    default_weights = str(DEFAULT_MODEL_DIR / WEIGHTS_FILE)

    def command(name: str, what: str, run: Callable[[argparse.Namespace], int | None]) -> argparse.ArgumentParser:
        made = sub.add_parser(name, help=what, description=what, formatter_class=DefaultsShown)
        made.set_defaults(run=run)
        return made

    info = command("info", "architecture of a checkpoint", cmd_info)
    _checkpoint(info, default_weights)
    info.add_argument("--img-size", type=whole(1), help="resample the position embedding to this image size")
    ev = command("eval", "Fashion-MNIST test top-1 of a checkpoint", cmd_eval)
    _checkpoint(ev, default_weights)
    _data(ev)
    ev.add_argument("--limit", type=whole(1), help="only the first N test images (default: all 10,000)")
    ev.add_argument("--batch-size", type=whole(1), default=500, help="images per forward pass")
    card = command("card-eval", "measure test top-1 of a model directory and write it into its card", cmd_card_eval)
    card.add_argument("model_dir", nargs="?", default=str(DEFAULT_MODEL_DIR), help=f"a folder with {WEIGHTS_FILE} "
                                                                                    f"and {CARD_FILE}")
    _data(card)
    gen = command("generate", "synthetic calibration images (OuroMamba-Gen) or a baseline set", cmd_generate)
    _checkpoint(gen, default_weights)
    gen.add_argument("--preset", choices=list(GEN_PRESETS), default="fidelity",
                     help="the settings the flags below override (fidelity: the paper's 1000 iterations; "
                          "interactive: 20, for a first look)")
    gen.add_argument("--source", choices=list(GEN_SOURCES), help="what makes the images (default: the preset's, "
                                                                 "ouromamba)")
    for flag, kind, what in (
            ("count", whole(1), "images"), ("iterations", whole(0), "optimisation steps"),
            ("batch-size", whole(1), "images optimised together"), ("lr", positive, "Adam's learning rate"),
            ("neighbourhood", whole(1), "odd side of the patch neighbourhood the contrastive loss aggregates"),
            ("top-k", whole(1), "positives per patch of the contrastive loss"),
            ("temperature", positive, "the contrastive loss's temperature"),
            ("contrastive-weight", non_negative, "λ of the patch contrastive loss"),
            ("output-weight", non_negative, "λ of the output (class) loss"),
            ("pse-weight", non_negative, "λ of PSAQ's patch-similarity entropy (--source psaq)"),
            ("tv-weight", non_negative, "λ of a total-variation prior"),
            ("l2-weight", non_negative, "λ of an L2 prior"),
            ("max-shift", whole(0), "random shift per iteration, pixels"), ("seed", int, "seed of everything random")):
        gen.add_argument(f"--{flag}", type=kind, help=f"{what} (default: the preset's)")
    gen.add_argument("--output-loss", choices=["ce", "mae"], help="the output loss (default: the preset's)")
    gen.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                     help="random horizontal flips (default: the preset's)")
    gen.add_argument("--layers", type=whole(0), nargs="+", action=Distinct,
                     help="layers of the contrastive loss (default: all)")
    gen.add_argument("--data", help="Fashion-MNIST directory, for --source real")
    gen.add_argument("--out", required=True, help="a new (or empty) folder for the PNGs and manifest.json")
    quant = command("quantize", "quantize the model and report top-1 (test images, or --eval-split val) per method "
                    "and setting", cmd_quantize)
    _checkpoint(quant, default_weights)
    quant.add_argument("--method", nargs="+", action=Distinct, default=["ouromamba"], choices=list(METHODS),
                       help="one or more")
    quant.add_argument("--setting", nargs="+", action=Distinct, choices=list(SETTINGS),
                       help="e.g. W4A4 W4A8 (overrides the bits)")
    quant.add_argument("--w-bits", type=int, default=4, help="weight bits (2 to 8)")
    quant.add_argument("--a-bits", type=int, default=4, help="activation (inlier) bits (2 to 8)")
    quant.add_argument("--outlier-bits", type=int, default=8,
                       help="8, or 16 to keep outliers in floating point; with --k and --n-refresh, for the "
                            f"methods that have outlier channels ({', '.join(OUTLIER_METHODS)}), the others' "
                            "records keep the defaults")
    _rule(quant)
    quant.add_argument("--release-compatible", action="store_true",
                       help="as the released code: a batch-wide outlier trigger, mean/std over all channels, S6 "
                            "quantizers shared by both scan directions (docs/method-decisions.md)")
    quant.add_argument("--quantize-state", action="store_true", help="quantize h inside the recurrence")
    _calibration(quant, epochs=10)
    _data(quant)
    quant.add_argument("--limit", type=whole(1), help="only the first N scored images (default: all)")
    quant.add_argument("--eval-split", choices=["test", "val"], default="test",
                       help="val: the 5,000 held-out training images (train[55000:]), to choose settings without "
                            "touching the test set")
    quant.add_argument("--overrides", default="",
                       help='per-site changes as JSON, applied in order, e.g. \'{"*.out_proj.input": {"a_bits": 8}}\' '
                            'or \'{"layers.0.*": {"skip": true}}\' (the Quantize tab\'s Per-layer overrides)')
    quant.add_argument("--error-images", type=whole(0), default=ERROR_IMAGES,
                       help="every quantizer's SQNR on the first N scored images, into the records (0: skip); "
                            "`report` draws them")
    quant.add_argument("--out", default="results/quant", help="directory for the CSV/JSON records")
    quant.add_argument("--name", default="runs", help="file name (without extension) of the records")
    quant.add_argument("--append", action="store_true", help="add the runs to an existing <name>.json (without "
                                                              "it an existing file is refused, never overwritten)")
    again = command("rerun", "make logged runs again from their records; exit 1 if a top-1 differs", cmd_rerun)
    again.add_argument("records", help="a run file: the app's runs.jsonl or the quantize command's .json")
    again.add_argument("--run", dest="runs", metavar="N", type=whole(1), nargs="+", action=Distinct,
                       help="the runs' numbers (#N in the app and the report; default: the newest)")
    packer = command("pack", "OuroMamba as a packed integer model (codes + scales) in one safetensors file", cmd_pack)
    _checkpoint(packer, default_weights)
    packer.add_argument("--setting", choices=["W4A4", "W4A8", "W8A8"], default="W4A4", help="what the kernels run")
    _rule(packer)
    _calibration(packer, epochs=10)
    _data(packer)
    packer.add_argument("--check", type=whole(0), default=0,
                        help="agreement with the simulation on the first N test images (0: none)")
    packer.add_argument("--out", required=True, help="the .safetensors file to write")
    outl = command("outliers", "per-site statistics of the per-time-step outlier rule", cmd_outliers)
    _checkpoint(outl, default_weights)
    outl.add_argument("--a-bits", type=int, default=4, help="inlier bits (sets the calibrated inlier scales)")
    _rule(outl)
    _calibration(outl, epochs=None)
    outl.add_argument("--images", type=whole(1), default=256, help="test images the statistics are measured on")
    _data(outl)
    outl.add_argument("--top", type=whole(1), default=12, help="rows to print")
    outl.add_argument("--out", default="results/quant/outlier_stats.csv", help="the CSV to write")
    sweep = command("sweep", "validation top-1 and 8-bit channel share of OuroMamba for each k × n_refresh", cmd_sweep)
    _checkpoint(sweep, default_weights)
    sweep.add_argument("--setting", choices=["W4A4", "W4A8", "W8A8"], default="W4A4", help="the bits of every point")
    _rule(sweep, several=True)
    _calibration(sweep, epochs=0)
    sweep.add_argument("--val", type=whole(1), default=5000, help="the first N of the 5,000 validation images")
    sweep.add_argument("--outlier-images", type=whole(1), default=256, help="images the outlier shares are measured on")
    _data(sweep)
    sweep.add_argument("--out", default="results/quant/threshold_sweep", help="path of the .csv / .json, no suffix")
    report = command("report", "one standalone HTML page (figures, table, full records) from run files", cmd_report)
    report.add_argument("records", nargs="+", action=Distinct, key=os.path.realpath,
                        help="the quantize command's .json files or the app's runs.jsonl")
    report.add_argument("--out", default="report.html", help="the .html file to write")
    report.add_argument("--title", default="OuroMamba Studio: quantization runs", help="the page's title")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a usage mistake already printed in one line
        return int(done.code or 0)
    try:
        return args.run(args) or 0
    except StudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a disk filling up, a file vanishing mid-run: still one line
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: what was written before stays (quantize and sweep write after every run or point)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
