"""Start OuroMamba Studio: ``python app.py [--host HOST] [--port PORT] [--checkpoint FILE] [--data FOLDER]``.

Serves on 127.0.0.1 unless told otherwise, and never phones home. The checkpoint (and data folder) is what every
browser session starts on; each can load another in the Model tab. A bad checkpoint prints one line and exits
with 2, like the CLI.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# before gradio is imported (it reads these at import): no usage analytics, no Hugging Face Hub look-ups,
# no GUI backend for plots on a headless server
for _name, _value in {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}.items():
    os.environ.setdefault(_name, _value)

# one evaluation at a time: concurrent ones would only slow each other down and make the timings meaningless
CONCURRENCY_LIMIT = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app.py", description="OuroMamba Studio (Gradio app)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--checkpoint", help="Vim checkpoint every session starts on (default: the embedded default "
                                             "model); any architecture, each session can load another in the page")
    parser.add_argument("--data", help="its test images: a folder with one sub-folder per class, or a .zip of one "
                                       "(default: Fashion-MNIST's test split for models of its shape, none for others)")
    return parser.parse_args(argv)


def one_openmp_thread_outside_the_engine() -> None:
    """Torch's CPU work runs on one engine thread with every core (OMP_NUM_THREADS if given) and every other
    thread of the server gets one OpenMP thread, so that no second OpenMP team ever competes with it
    (``app.common.ENGINE``). OpenMP reads its settings once, as torch loads: a process that already imported
    torch keeps its threads."""
    if "torch" in sys.modules:
        return
    os.environ.setdefault("OUROMAMBA_ENGINE_THREADS",  # app.common.ENGINE_THREADS_ENV (importing it imports torch)
                          os.environ.get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0))))
    os.environ["OMP_NUM_THREADS"] = "1"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    one_openmp_thread_outside_the_engine()
    # the server's own notes (a closed page's jobs cancelled) beside gradio's, warnings and errors from everything
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("ouromamba").setLevel(logging.INFO)
    from app.quantize_tab import runs_file
    from app.ui import DEFAULT_CHECKPOINT, build_app  # imports gradio, so only after the defaults above
    from core.errors import StudioError
    from core.workspace import MAX_CHECKPOINT_BYTES

    try:
        demo = build_app(args.checkpoint or DEFAULT_CHECKPOINT, args.data)
    except StudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # uploads larger than any checkpoint the studio loads are refused while they arrive, before they fill the disk
    # the quantized models saved beside the run log are served for download (nothing else outside the temp dir)
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT).launch(server_name=args.host, server_port=args.port,
                                                                   max_file_size=MAX_CHECKPOINT_BYTES,
                                                                   allowed_paths=[str(runs_file().parent)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
