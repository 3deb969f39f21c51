"""Command line: ``python -m core.cli {info,eval,card-eval}``. Bad input prints one line and exits with 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.data import load_fashion_mnist
from core.default_model import CARD_FILE, DEFAULT_MODEL_DIR, WEIGHTS_FILE, load_card
from core.errors import StudioError
from core.eval import evaluate
from core.models import load_checkpoint


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
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except StudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
