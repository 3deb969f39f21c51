"""How long the app takes: to be ready (a fresh Python process imports the app, loads the default model, builds
the page, starts the server and serves the first page; goal: ≤ 15 s on the 2-core CPU), and, with ``--job
quantize``, to answer the Quantize tab's default configuration (OuroMamba W4A4O8, 128 real calibration
images, 10 reconstruction epochs) scored on every test image (``--test-images 1000``: the page's own default
count): served (``python app.py`` in its own process, called through the API from this one, as a browser would
press Quantize) and the same job function called directly (a fresh process with
app.py's threads: one OpenMP thread outside the engine, every core on it).

    python bench/bench_app.py [--repeats 3]
    python bench/bench_app.py --job quantize [--test-images 10000]

Writes results/app_startup.{csv,md} or results/app_quantize.{csv,md}. Each startup repeat is a new process, so
the imports are really paid (the operating system's file cache stays warm after the first).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_parser, machine_header, regenerate_command, run, write_results  # noqa: E402
from core.arguments import whole  # noqa: E402
from core.errors import StudioError  # noqa: E402
from core.eval import hardware_label  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STARTUP = """
import json, os, time, urllib.request
start = time.perf_counter()
for name, value in {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}.items():
    os.environ.setdefault(name, value)
from app.ui import build_app
imported = time.perf_counter()
demo = build_app()
built = time.perf_counter()
demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
urllib.request.urlopen(demo.local_url).read()
served = time.perf_counter()
demo.close()
print(json.dumps({"imports_s": imported - start, "build_s": built - imported, "launch_and_first_page_s":
                  served - built, "ready_s": served - start}))
"""


QUANTIZE_DEFAULTS = ("ouromamba", 4, 4, 8, 3, 10, "real", 128, 10, 0)  # the tab's controls as the page opens
TOP1 = re.compile(r"Top-1: (\d+\.\d\d) %")


def served_app(runs: Path) -> tuple[subprocess.Popen, str]:
    """``python app.py`` on a free port, logging its runs to ``runs`` (never the committed run log), once it
    serves its page."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OUROMAMBA_RUNS_DIR": str(runs)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline:
        if server.poll() is not None:
            last = (server.stderr.read().strip().splitlines() or ["(no output)"])[-1]
            raise StudioError(f"the app did not start (exit {server.returncode}): {last}")
        try:
            urllib.request.urlopen(url).read()
            return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise StudioError("the app did not serve its page within 120 s")


DIRECT = """
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("app_script", "app.py")
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
script.one_openmp_thread_outside_the_engine()
from app.ui import build_app
from core.workspace import default_workspace
job = next(f.fn for f in build_app().fns.values() if f.api_name == "quantize").__wrapped__
start = time.perf_counter()
summary = job(default_workspace(), *json.loads(sys.argv[1]), None, progress=lambda *args, **kwargs: None)[0]
print(json.dumps({"seconds": time.perf_counter() - start, "summary": summary}))
"""


def quantize_rows(test_images: int) -> list[dict]:
    """The default Quantize run served (through the API, from this process) and called directly (the job function
    in a fresh process set up as app.py sets it up, without the server): what serving costs on top of the
    engine's work."""
    from gradio_client import Client

    inputs = (*QUANTIZE_DEFAULTS, test_images, "")
    rows = []
    with tempfile.TemporaryDirectory() as runs:
        server, url = served_app(Path(runs))
        try:
            start = time.perf_counter()
            summary = Client(url, verbose=False).predict(*inputs, api_name="/quantize")[0]
            rows.append(("served: app.py, called through its API from another process",
                         time.perf_counter() - start, summary))
        finally:
            server.terminate()
            server.wait()
        out = subprocess.run([sys.executable, "-c", DIRECT, json.dumps(inputs)], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OUROMAMBA_RUNS_DIR": runs})
        if out.returncode:
            last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise StudioError(f"the direct run failed (exit {out.returncode}): {last}")
        direct = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(("direct: the same job function, app.py's threads, no server", direct["seconds"],
                     direct["summary"]))
    measured = []
    for path, seconds, summary in rows:
        if not (top1 := TOP1.search(summary)):
            raise StudioError(f"the Quantize run did not finish ({path}): {summary.splitlines()[0][:200]}")
        measured.append({"path": path, "seconds": round(seconds, 1), "top1": float(top1.group(1)),
                         "test_images": test_images, "hardware": hardware_label(torch.device("cpu"))})
        print(measured[-1])
    return measured


def main() -> None:
    parser = bench_parser("bench_app.py", "seconds until the app serves its first page, in fresh processes; or "
                                          "the default Quantize run, served and direct")
    parser.add_argument("--repeats", type=whole(1), default=3, help="fresh processes to time (startup)")
    parser.add_argument("--job", choices=["startup", "quantize"], default="startup", help="what to time")
    parser.add_argument("--test-images", type=whole(1), default=10_000,
                        help="test images the Quantize run scores (default: all of Fashion-MNIST's; the page "
                             "starts at 1000)")
    args = parser.parse_args()
    if args.job == "quantize":
        write_results("app_quantize", quantize_rows(args.test_images), machine_header(torch.device("cpu")),
                      regenerate_command("bench_app.py"), args.out, quick=args.test_images < 10_000)
        return
    rows = []
    for repeat in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", STARTUP], cwd=ROOT, capture_output=True, text=True,
                             env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        if out.returncode:
            last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise StudioError(f"the app did not start (exit {out.returncode}): {last}")
        times = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"repeat": repeat + 1, **{k: round(v, 2) for k, v in times.items()},
                     "hardware": hardware_label(torch.device("cpu"))})
        print(rows[-1])
    write_results("app_startup", rows, machine_header(torch.device("cpu")), regenerate_command("bench_app.py"),
                  args.out)


if __name__ == "__main__":
    run(main)
