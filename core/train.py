"""Train a Vim classifier on Fashion-MNIST; writes safetensors + a model card. Reproducible from the card.

    python -m core.train --out assets/default_model --epochs 40 --seed 0

The last 5,000 training images are held out for validation (model selection never sees the test set);
test accuracy is measured afterwards on the CPU by ``python -m core.cli card-eval``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from core.arguments import OneLineParser, whole
from core.data import load_fashion_mnist
from core.data.fashion_mnist import split_validation
from core.eval import evaluate, hardware_label
from core.models import VisionMamba, create_vim, load_checkpoint, save_safetensors
from core.records import utc_now, write_replacing
from core.ssm import SCAN_IMPLEMENTATIONS


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """Random shifts of up to ``pad`` pixels (zero fill) and, with ``flip``, horizontal flips, batched."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), value=float(images.min()))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]
    out = padded[torch.arange(n, device=images.device)[:, None, None], 0, rows, cols].unsqueeze(1)
    flipped = torch.rand(n, generator=generator, device=images.device) < 0.5
    return torch.where(flipped[:, None, None, None], out.flip(-1), out) if flip else out


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def epochs_within_budget(history: list[dict], budget_min: float) -> int:
    """How many epochs fit ``budget_min`` minutes, at the pace of the last epoch in ``history``."""
    elapsed = history[-1]["seconds"]
    per_epoch = elapsed - (history[-2]["seconds"] if len(history) > 1 else 0.0)
    return len(history) + int(max(0.0, budget_min * 60 - elapsed) / max(per_epoch, 1e-9))


def train_step(model: VisionMamba, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               label_smoothing: float = 0.0) -> float:
    """One optimisation step (gradient clipped at norm 1); returns the loss."""
    loss = F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def initial_model(args: argparse.Namespace) -> VisionMamba:
    """The named architecture (with overrides), or ``--init``'s weights to continue training from."""
    overrides = {k: v for k, v in dict(embed_dim=args.embed_dim, depth=args.depth,
                                       drop_path_rate=args.drop_path).items() if v is not None}
    model = create_vim(args.model, **overrides)
    if args.init is not None:
        load_checkpoint(args.init, model=model)
    return model


def train(args: argparse.Namespace,
          on_epoch: Callable[[VisionMamba, dict], None] | None = None) -> tuple[VisionMamba, dict]:
    """Train per ``args``; ``on_epoch(model, info)`` runs after every epoch (e.g. to checkpoint)."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = True
    model = initial_model(args).to(device).set_scan_impl(args.scan_impl)
    fit, val = split_validation(load_fashion_mnist("train", args.data))
    images = fit.normalized().to(device)
    labels = fit.labels.to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n not in model.no_weight_decay()]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or n in model.no_weight_decay()]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    steps_per_epoch = len(fit) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    warmup = steps_per_epoch * args.warmup_epochs
    epochs = args.epochs
    # the budget fixes the epoch count inside the warm-up, whose learning rates do not depend on it, so the
    # card's `--epochs N` alone reproduces the run; from epoch 2's time when the warm-up lasts that long
    # (epoch 1 also pays one-time kernel compilation)
    budget_epoch = max(1, min(2, args.warmup_epochs, args.epochs))
    history, step, started = [], 0, time.perf_counter()
    epoch = 0
    while epoch < epochs:
        model.train()
        order = torch.randperm(len(fit), generator=generator, device=device)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup, args.lr)
            batch = augment(images[idx], generator, args.shift, args.flip)
            running += train_step(model, optimizer, batch, labels[idx], args.label_smoothing)
            step += 1
        val_top1 = evaluate(model, val, batch_size=1000, device=device).top1
        history.append({"epoch": epoch + 1, "loss": running / steps_per_epoch, "val_top1": val_top1,
                        "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(history[-1]), flush=True)
        epoch += 1
        if args.time_budget_min and epoch == budget_epoch:
            epochs = max(epoch, min(epochs, epochs_within_budget(history, args.time_budget_min)))
            total_steps = steps_per_epoch * epochs
        if on_epoch is not None:
            on_epoch(model, _info(epochs, history, device, started))
    return model.cpu().eval(), _info(epochs, history, device, started)


def _info(epochs: int, history: list[dict], device: torch.device, started: float) -> dict:
    return {"epochs": epochs, "history": history, "val_top1": history[-1]["val_top1"],
            "train_device": hardware_label(device), "train_seconds": round(time.perf_counter() - started, 1)}


def _without_budget(argv: list[str], epochs: int) -> list[str]:
    """The command line with the time budget replaced by the epoch count it led to."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--time-budget-min", "--epochs"):
            skip = True
            continue
        if not arg.startswith(("--time-budget-min=", "--epochs=")):
            out.append(arg)
    return [*out, "--epochs", str(epochs)]


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m core.train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vim_fmnist_patch4_28_midclstok")
    parser.add_argument("--embed-dim", type=int)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--drop-path", type=float, default=0.05)
    parser.add_argument("--epochs", type=whole(1), default=40)
    parser.add_argument("--batch-size", type=whole(1), default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=whole(0), default=2)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shift", type=whole(0), default=2, help="random shifts of up to this many pixels (0: none)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                        help="random horizontal flips")
    parser.add_argument("--init", type=Path,
                        help="continue from this checkpoint (same architecture); its card is kept as provenance")
    parser.add_argument("--time-budget-min", type=float,
                        help="cap the epochs so that training fits this many minutes (decided within the "
                             "warm-up, after epoch 2 or 1)")
    parser.add_argument("--data", help="Fashion-MNIST directory (default: Debian's package)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--scan-impl", default="auto", choices=SCAN_IMPLEMENTATIONS,
                        help="the scan's implementation (auto: mamba-ssm or the Triton kernels on CUDA)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (model.safetensors + card.json)")
    args = parser.parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else argv
    card = {
        "name": args.model,
        "training_command": "python -m core.train " + shlex.join(argv_used),
        "seed": args.seed,
        "data": "Fashion-MNIST train[:55000] (train[55000:] held out for validation); test = t10k (10,000)",
        "preprocessing": "pixels / 255, normalised with mean 0.2860, std 0.3530 (1 channel, 28×28)",
        "torch": torch.__version__,
    }
    if args.init is not None and (args.init.parent / "card.json").is_file():
        card["init_card"] = json.loads((args.init.parent / "card.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)

    def write(model: VisionMamba, info: dict, status: str | None = None) -> None:
        save_safetensors(model, args.out / "model.safetensors")
        full = {**card, "config": model.cfg.to_dict(), "parameters": sum(p.numel() for p in model.parameters()),
                "reproduce_command": "python -m core.train " + shlex.join(_without_budget(argv_used, info["epochs"])),
                "date": utc_now(), **info}
        if status is not None:
            full["status"] = status
        write_replacing(args.out / "card.json", json.dumps(full, indent=2) + "\n")

    def checkpoint(model: VisionMamba, info: dict) -> None:
        write(model, info, f"in progress: epoch {len(info['history'])} of {info['epochs']}")

    model, info = train(args, on_epoch=checkpoint)
    write(model, info)
    print(f"saved {args.out}: val top-1 {info['val_top1']:.2f}%")


if __name__ == "__main__":
    main()
