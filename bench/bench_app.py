"""How long the app takes to be ready: a fresh Python process imports the app, loads the default model, builds
the page, starts the server and serves the first page (goal: ≤ 15 s on the 2-core CPU).

    python bench/bench_app.py [--repeats 3]

Writes results/app_startup.{csv,md}. Each repeat is a new process, so the imports are really paid (the operating
system's file cache stays warm after the first).
"""

from __future__ import annotations

import json
import subprocess
import sys
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


def main() -> None:
    parser = bench_parser("bench_app.py", "seconds until the app serves its first page, in fresh processes")
    parser.add_argument("--repeats", type=whole(1), default=3, help="fresh processes to time")
    args = parser.parse_args()
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
