"""Shared benchmark plumbing: timing, the machine/version header, and writing CSV + markdown results."""

from __future__ import annotations

import csv
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import triton

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"


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


def write_results(name: str, rows: list[dict], header: dict[str, str], command: str) -> Path:
    """results/<name>.csv and results/<name>.md (with the header and the command that regenerates them)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = RESULTS_DIR / f"{name}.csv", RESULTS_DIR / f"{name}.md"
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
    md_path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return md_path
