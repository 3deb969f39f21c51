"""Shared benchmark plumbing: the command line, timing, the machine/version header, and writing CSV + markdown
results."""

from __future__ import annotations

import argparse
import csv
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import triton

from core.arguments import OneLineParser
from core.errors import StudioError

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"


def bench_parser(script: str, description: str) -> argparse.ArgumentParser:
    """A benchmark's parser: usage mistakes in one line, and ``--out`` (where the results go)."""
    parser = OneLineParser(prog=f"python bench/{script}", description=description)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help="folder for the .csv and .md (default: results/, where the committed ones live; a "
                             "quick or partial run writes <name>_quick there, never over a full run's files)")
    return parser


def regenerate_command(script: str, argv: list[str] | None = None) -> str:
    """The command line that made these results, as given (every option, so that it reproduces them)."""
    return f"python bench/{script} " + shlex.join(sys.argv[1:] if argv is None else argv)


def run(main: Callable[[], object]) -> None:
    """A benchmark's entry point: bad input (a StudioError from the engine) and Ctrl-C end in one line, never a
    traceback. Results are written at the end, so an interrupted run writes nothing."""
    try:
        main()
    except StudioError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted: nothing written")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_header(device: torch.device) -> dict[str, str]:
    info = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cpu": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    return info


def write_results(name: str, rows: list[dict], header: dict[str, str], command: str,
                  directory: Path = RESULTS_DIR, quick: bool = False, footer: str = "") -> Path:
    """<directory>/<name>.csv and .md (with the header and the command that regenerates them, then ``footer``
    under the table); ``quick`` (a smoke or partial run) writes <name>_quick, so that it never replaces a full
    run's committed numbers."""
    if not rows:
        raise StudioError("nothing was measured, so nothing is written")
    name += "_quick" if quick else ""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StudioError(f"cannot write the results to '{directory}': {err.strerror or err}") from None
    csv_path, md_path = directory / f"{name}.csv", directory / f"{name}.md"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {name}", "", f"Regenerate: `{command}`", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()] + [""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    lines += ["", footer] if footer else []
    md_path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return md_path
