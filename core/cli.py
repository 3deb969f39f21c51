"""Command line: ``python -m core {info,eval,card-eval,generate,quantize,pack,outliers,sweep,report}``; bad input:
one line, exit 2."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

from core.data import calibration_images, load_fashion_mnist, load_validation
from core.default_model import CARD_FILE, DEFAULT_MODEL_DIR, WEIGHTS_FILE, load_card
from core.errors import StudioError
from core.eval import evaluate
from core.experiments import (
    ERROR_IMAGES,
    accuracy_table,
    quantize_and_evaluate,
    read_records,
    run_name,
    scored_on,
    site_error_table,
    threshold_sweep,
    write_records,
)
from core.gen import GEN_PRESETS, GEN_SOURCES, GenConfig, GenProgress, generate, save_generated
from core.models import load_checkpoint
from core.observe import dynamic_outlier_summary
from core.quant import METHODS, SETTINGS, QuantConfig, ReconstructionConfig, quantize
from core.quant.config import parse_overrides
from core.quant.packed import agreement, pack, save_packed
from core.records import provenance
from core.workspace import architecture, checkpoint_label, file_sha256, fits_fashion_mnist


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
    model = load_checkpoint(args.checkpoint)
    data = load_fashion_mnist("test", args.data)
    if args.limit:
        data = data.subset(args.limit)
    result = evaluate(model, data, batch_size=args.batch_size, progress=_progress)
    print(json.dumps(result.to_dict(), indent=2))


def cmd_card_eval(args: argparse.Namespace) -> None:
    """Measure FP32 test top-1 of a model directory on the CPU and record it in its card."""
    directory = Path(args.model_dir)
    card = load_card(directory)
    model = load_checkpoint(directory / WEIGHTS_FILE)
    result = evaluate(model, load_fashion_mnist("test", args.data), progress=_progress)
    card.update(test_top1=round(result.top1, 2), test_eval={**result.to_dict(),
                "command": f"python -m core.cli card-eval {directory}"})
    (directory / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    print(f"test top-1 {result.top1:.2f}% ({result.correct}/{result.total}) in {result.seconds:.1f} s on "
          f"{result.device}; written to {directory / CARD_FILE}")


def _gen_progress(update: GenProgress) -> None:
    losses = " ".join(f"{name} {value:.4f}" for name, value in update.losses.items())
    print(f"\rbatch {update.batch + 1}/{update.batches} iteration {update.iteration}/{update.iterations}: {losses}",
          end="\n" if update.iteration == update.iterations else "", file=sys.stderr, flush=True)


def cmd_generate(args: argparse.Namespace) -> None:
    """Make a calibration set (OuroMamba-Gen or a baseline) and save it as PNGs + manifest.json."""
    model = load_checkpoint(args.checkpoint)
    names = {f.name for f in fields(GenConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if overrides.get("layers") is not None:
        overrides["layers"] = tuple(overrides["layers"])
    config = replace(GEN_PRESETS[args.preset], **overrides)
    result = generate(model, config, progress=_gen_progress, data_root=args.data)
    folder = save_generated(result, args.out)
    targeted = [(p, t) for p, t in zip(result.predictions, result.targets, strict=True) if t is not None]
    hits = f"FP prediction = target for {sum(p == t for p, t in targeted)} of {len(targeted)}; " if targeted else ""
    print(f"{len(result.images)} {config.source} images in {result.seconds:.1f} s → {folder} ({hits}mean FP "
          f"confidence {sum(result.confidences) / len(result.confidences):.3f})")


def cmd_quantize(args: argparse.Namespace) -> None:
    """Quantize with every requested method × setting, print an accuracy table, write CSV + JSON records."""
    overrides = parse_overrides(args.overrides)  # before any work: a typo costs nothing
    checkpoint = Path(args.checkpoint)
    model = load_checkpoint(checkpoint)
    data = load_validation(args.data) if args.eval_split == "val" else load_fashion_mnist("test", args.data)
    if args.limit:
        data = data.subset(args.limit)
    fp = evaluate(model, data, progress=_progress)
    print(f"FP32: {fp.top1:.2f}% on {fp.total} images of {data.source} ({fp.seconds:.1f} s, {fp.device})",
          file=sys.stderr)
    settings = [SETTINGS[s] for s in args.setting] if args.setting else [(args.w_bits, args.a_bits)]
    records = []
    for method in args.method:
        for w_bits, a_bits in settings:
            config = QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits, o_bits=args.outlier_bits, k=args.k,
                                 n_refresh=args.n_refresh, release_compatible=args.release_compatible,
                                 quantize_state=args.quantize_state, overrides=overrides,
                                 reconstruction=ReconstructionConfig(epochs=args.recon_epochs, seed=args.seed))
            print(f"{config.label}: calibrating on {args.n_calib} {args.calib} images", file=sys.stderr)
            record = quantize_and_evaluate(model, Path(args.checkpoint).parent.name, config, data, fp.top1,
                                           args.calib, args.n_calib, args.seed, args.data,
                                           eval_progress=_progress, checkpoint=checkpoint_label(checkpoint),
                                           error_images=args.error_images).record
            print(f"  top-1 {record.top1:.2f}% ({record.delta_vs_fp:+.2f}), calibration "
                  f"{record.calibration_seconds:.1f} s, eval {record.eval_seconds:.1f} s", file=sys.stderr)
            records.append(record)
            write_records(records, args.out, args.name)  # after every run: an interruption loses nothing
    print(f"FP32 {fp.top1:.2f}% on {fp.total} images of {data.source}; quantized top-1 (Δ vs FP):")
    print(accuracy_table(records))
    print(f"records: {Path(args.out) / args.name}.csv / .json")


def cmd_pack(args: argparse.Namespace) -> None:
    """Calibrate OuroMamba, pack it into integer codes + scales, save one safetensors file, and (``--check N``)
    measure top-1 agreement with the simulation on the first N test images."""
    model = load_checkpoint(args.checkpoint)
    cfg = model.cfg
    w_bits, a_bits = SETTINGS[args.setting]
    config = QuantConfig(w_bits=w_bits, a_bits=a_bits, k=args.k, n_refresh=args.n_refresh,
                         reconstruction=ReconstructionConfig(epochs=args.recon_epochs, seed=args.seed))
    calib = calibration_images(args.calib, args.n_calib, args.seed, cfg.img_size, cfg.in_chans, args.data)
    print(f"{config.label}: calibrating on {args.n_calib} {args.calib} images", file=sys.stderr)
    qmodel = quantize(model, config, calib)
    qmodel.provenance.update(checkpoint=str(args.checkpoint), calibration={"source": args.calib,
                                                                          "images": args.n_calib, "seed": args.seed})
    packed = pack(qmodel)
    path = save_packed(packed, args.out)
    sizes = packed.weight_bytes()
    print(f"{path}: projection weights {sizes['packed'] / 1e3:.1f} kB as codes + scales "
          f"(fp32 {sizes['float32'] / 1e3:.1f} kB)")
    if args.check:
        test = load_fashion_mnist("test", args.data).subset(args.check)
        result = agreement(packed, qmodel, test.normalized(), test.labels)
        print(json.dumps({"checked_on": f"first {args.check} test images", **result.to_dict()}, indent=2))


def cmd_outliers(args: argparse.Namespace) -> None:
    """Per-site statistics of the per-time-step outlier rule: does the outlier set move across time-steps?"""
    model = load_checkpoint(args.checkpoint)
    cfg = model.cfg
    calib = calibration_images(args.calib, args.n_calib, args.seed, cfg.img_size, cfg.in_chans, args.data)
    config = QuantConfig(method="ouromamba", w_bits=4, a_bits=args.a_bits, k=args.k, n_refresh=args.n_refresh,
                         reconstruction=ReconstructionConfig(epochs=0))
    qmodel = quantize(model, config, calib)
    images = load_fashion_mnist("test", args.data).subset(args.images).normalized()
    summary = dynamic_outlier_summary(qmodel, images).sort_values("new_channels_vs_previous_window",
                                                                  ascending=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out, index=False)
    print(summary.head(args.top).to_string(index=False))
    print(f"{len(summary)} sites → {out} (inlier scales from {args.n_calib} {args.calib} images, seed {args.seed}; "
          f"statistics on the first {args.images} test images; a_bits {args.a_bits}, k {args.k}, "
          f"n_refresh {args.n_refresh})")


def _shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it: a command that reruns elsewhere."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else path


def _sweep_command(args: argparse.Namespace) -> str:
    """The command line that reruns a sweep, every default spelled out."""
    return (f"python -m core sweep {_shown_path(args.checkpoint)} --setting {args.setting} "
            f"--k {' '.join(map(str, args.k))} "
            f"--n-refresh {' '.join(map(str, args.n_refresh))} --calib {args.calib} --n-calib {args.n_calib} "
            f"--recon-epochs {args.recon_epochs} --seed {args.seed} --val {args.val} "
            f"--outlier-images {args.outlier_images} --out {args.out}")


def cmd_sweep(args: argparse.Namespace) -> None:
    """Validation top-1 and outlier share for every (k, n_refresh): a CSV of the points and a JSON with them
    and their provenance; the table printed."""
    model = load_checkpoint(args.checkpoint)
    cfg = model.cfg
    if not fits_fashion_mnist(cfg):
        raise StudioError(f"the sweep scores on Fashion-MNIST's validation images, and this checkpoint "
                          f"({architecture(cfg)}) does not read them")
    if min(args.k) <= 0 or min(args.n_refresh) < 1 or args.val < 1:
        raise StudioError(f"k must be positive, n_refresh and --val at least 1; got k {args.k}, n_refresh "
                          f"{args.n_refresh}, --val {args.val}")
    images = load_validation(args.data).subset(args.val)
    fp = evaluate(model, images)
    w_bits, a_bits = SETTINGS[args.setting]
    base = QuantConfig(w_bits=w_bits, a_bits=a_bits,
                       reconstruction=ReconstructionConfig(epochs=args.recon_epochs, seed=args.seed))
    calib = calibration_images(args.calib, args.n_calib, args.seed, cfg.img_size, cfg.in_chans, args.data)
    print(f"FP32 {fp.top1:.2f}% on {fp.total} validation images; {len(args.k) * len(args.n_refresh)} points",
          file=sys.stderr)
    rows = threshold_sweep(model, base, calib, images, args.k, args.n_refresh, fp.top1, args.outlier_images,
                           progress=lambda done, total: print(f"\r{done}/{total} points", file=sys.stderr,
                                                              end="\n" if done == total else "", flush=True))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    checkpoint = Path(args.checkpoint)
    out.with_suffix(".json").write_text(json.dumps({
        "checkpoint": f"{_shown_path(args.checkpoint)} (sha256 {file_sha256(checkpoint)[:12]})",
        "images": images.source,
        "fp_top1": round(fp.top1, 2), "base_config": base.to_dict(),
        "calibration": {"source": args.calib, "images": args.n_calib, "seed": args.seed},
        "outlier_images": min(args.outlier_images, fp.total), "hardware": fp.device, **provenance(),
        "command": _sweep_command(args), "points": rows}, indent=2) + "\n")
    columns = list(rows[0])
    print("\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
                     *("| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows)]))
    print(f"FP32 {fp.top1:.2f}% on the {fp.total} validation images → {out.with_suffix('.csv')} / .json")


def cmd_report(args: argparse.Namespace) -> None:
    from core.report import write_report  # plotly: only here, so the rest runs where it is not installed

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.cli", description="OuroMamba Studio engine")
    sub = parser.add_subparsers(dest="command", required=True)
    default_weights = str(DEFAULT_MODEL_DIR / WEIGHTS_FILE)
    info = sub.add_parser("info", help="architecture of a checkpoint")
    info.add_argument("checkpoint", nargs="?", default=default_weights)
    info.add_argument("--img-size", type=int, help="resample the position embedding to this image size")
    info.set_defaults(run=cmd_info)
    ev = sub.add_parser("eval", help="Fashion-MNIST test top-1 of a checkpoint")
    ev.add_argument("checkpoint", nargs="?", default=default_weights)
    ev.add_argument("--data", help="Fashion-MNIST directory (default: Debian's package)")
    ev.add_argument("--limit", type=int, help="only the first N test images")
    ev.add_argument("--batch-size", type=int, default=500)
    ev.set_defaults(run=cmd_eval)
    card = sub.add_parser("card-eval", help="measure test top-1 of a model directory and write it into its card")
    card.add_argument("model_dir", nargs="?", default=str(DEFAULT_MODEL_DIR))
    card.add_argument("--data")
    card.set_defaults(run=cmd_card_eval)
    gen = sub.add_parser("generate", help="synthetic calibration images (OuroMamba-Gen) or a baseline set")
    gen.add_argument("checkpoint", nargs="?", default=default_weights)
    gen.add_argument("--preset", choices=list(GEN_PRESETS), default="fidelity", help="defaults the flags override")
    gen.add_argument("--source", choices=list(GEN_SOURCES))
    for flag, kind in (("count", int), ("iterations", int), ("batch-size", int), ("lr", float),
                       ("neighbourhood", int), ("top-k", int), ("temperature", float),
                       ("contrastive-weight", float), ("output-weight", float), ("pse-weight", float),
                       ("tv-weight", float), ("l2-weight", float), ("max-shift", int), ("seed", int)):
        gen.add_argument(f"--{flag}", type=kind)
    gen.add_argument("--output-loss", choices=["ce", "mae"])
    gen.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None)
    gen.add_argument("--layers", type=int, nargs="+", help="layers of the contrastive loss (default: all)")
    gen.add_argument("--data", help="Fashion-MNIST directory, for --source real")
    gen.add_argument("--out", required=True, help="folder for the PNGs and manifest.json")
    gen.set_defaults(run=cmd_generate)
    quant = sub.add_parser("quantize", help="quantize the model and report test top-1 per method and setting")
    quant.add_argument("checkpoint", nargs="?", default=default_weights)
    quant.add_argument("--method", nargs="+", default=["ouromamba"], choices=list(METHODS))
    quant.add_argument("--setting", nargs="+", choices=list(SETTINGS), help="e.g. W4A4 W4A8 (overrides the bits)")
    quant.add_argument("--w-bits", type=int, default=4)
    quant.add_argument("--a-bits", type=int, default=4)
    quant.add_argument("--outlier-bits", type=int, default=8, help="8, or 16 to keep outliers in floating point")
    quant.add_argument("--k", type=float, default=3.0)
    quant.add_argument("--n-refresh", type=int, default=10)
    quant.add_argument("--release-compatible", action="store_true")
    quant.add_argument("--quantize-state", action="store_true", help="quantize h inside the recurrence")
    quant.add_argument("--calib", default="real", help="real | noise | a folder of images")
    quant.add_argument("--n-calib", type=int, default=128)
    quant.add_argument("--recon-epochs", type=int, default=10, help="block reconstruction epochs (0: none)")
    quant.add_argument("--seed", type=int, default=0)
    quant.add_argument("--data", help="Fashion-MNIST directory (default: Debian's package)")
    quant.add_argument("--limit", type=int, help="only the first N test images")
    quant.add_argument("--eval-split", choices=["test", "val"], default="test",
                       help="val: the 5,000 held-out training images (train[55000:]), to choose settings without "
                            "touching the test set")
    quant.add_argument("--overrides", default="",
                       help='per-site changes as JSON, applied in order, e.g. \'{"*.out_proj.input": {"a_bits": 8}}\' '
                            'or \'{"layers.0.*": {"skip": true}}\' (the Quantize tab\'s Per-layer overrides)')
    quant.add_argument("--error-images", type=int, default=ERROR_IMAGES,
                       help="every quantizer's SQNR on the first N scored images, into the records (0: skip); "
                            "`report` draws them")
    quant.add_argument("--out", default="results/quant", help="directory for the CSV/JSON records")
    quant.add_argument("--name", default="runs", help="file name (without extension) of the records")
    quant.set_defaults(run=cmd_quantize)
    again = sub.add_parser("rerun", help="make logged runs again from their records; exit 1 if a top-1 differs")
    again.add_argument("records", help="a run file: the app's runs.jsonl or the quantize command's .json")
    again.add_argument("--run", dest="runs", metavar="N", type=int, nargs="+",
                       help="the runs' numbers (#N in the app and the report; default: the newest)")
    again.set_defaults(run=cmd_rerun)
    packer = sub.add_parser("pack", help="OuroMamba as a packed integer model (codes + scales) in one safetensors file")
    packer.add_argument("checkpoint", nargs="?", default=default_weights)
    packer.add_argument("--setting", choices=["W4A4", "W4A8", "W8A8"], default="W4A4")
    packer.add_argument("--k", type=float, default=3.0)
    packer.add_argument("--n-refresh", type=int, default=10)
    packer.add_argument("--calib", default="real", help="real | noise | a folder of images")
    packer.add_argument("--n-calib", type=int, default=128)
    packer.add_argument("--recon-epochs", type=int, default=10)
    packer.add_argument("--seed", type=int, default=0)
    packer.add_argument("--data", help="Fashion-MNIST directory (default: Debian's package)")
    packer.add_argument("--check", type=int, default=0, help="agreement with the simulation on the first N test images")
    packer.add_argument("--out", required=True, help="the .safetensors file to write")
    packer.set_defaults(run=cmd_pack)
    outl = sub.add_parser("outliers", help="per-site statistics of the per-time-step outlier rule")
    outl.add_argument("checkpoint", nargs="?", default=default_weights)
    outl.add_argument("--a-bits", type=int, default=4, help="inlier bits (sets the calibrated inlier scales)")
    outl.add_argument("--k", type=float, default=3.0)
    outl.add_argument("--n-refresh", type=int, default=10)
    outl.add_argument("--calib", default="real")
    outl.add_argument("--n-calib", type=int, default=128)
    outl.add_argument("--images", type=int, default=256, help="test images the statistics are measured on")
    outl.add_argument("--seed", type=int, default=0)
    outl.add_argument("--data")
    outl.add_argument("--top", type=int, default=12, help="rows to print")
    outl.add_argument("--out", default="results/quant/outlier_stats.csv")
    outl.set_defaults(run=cmd_outliers)
    sweep = sub.add_parser("sweep", help="validation top-1 and 8-bit channel share of OuroMamba for each k × n_refresh")
    sweep.add_argument("checkpoint", nargs="?", default=default_weights)
    sweep.add_argument("--setting", choices=["W4A4", "W4A8", "W8A8"], default="W4A4")
    sweep.add_argument("--k", type=float, nargs="+", default=[2.0, 2.5, 3.0, 4.0, 5.0])
    sweep.add_argument("--n-refresh", type=int, nargs="+", default=[1, 5, 10, 25, 50])
    sweep.add_argument("--calib", default="real", help="real | noise | a folder of images")
    sweep.add_argument("--n-calib", type=int, default=128)
    sweep.add_argument("--recon-epochs", type=int, default=0, help="block reconstruction epochs per point (0: none)")
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--val", type=int, default=5000, help="the first N of the 5,000 validation images")
    sweep.add_argument("--outlier-images", type=int, default=256, help="images the outlier shares are measured on")
    sweep.add_argument("--data", help="Fashion-MNIST directory (default: Debian's package)")
    sweep.add_argument("--out", default="results/quant/threshold_sweep", help="path of the .csv / .json, no suffix")
    sweep.set_defaults(run=cmd_sweep)
    report = sub.add_parser("report", help="one standalone HTML page (figures, table, full records) from run files")
    report.add_argument("records", nargs="+", help="the quantize command's .json files or the app's runs.jsonl")
    report.add_argument("--out", default="report.html", help="the .html file to write")
    report.add_argument("--title", default="OuroMamba Studio: quantization runs")
    report.set_defaults(run=cmd_report)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except StudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
