"""OuroMamba-Gen cost on this machine: seconds per optimisation iteration, per source, for a batch of images.

    python bench/bench_gen.py [--batch 64] [--iterations 3]

Writes results/gen_cpu.{csv,md} (or gen_cuda when a GPU is present). One iteration = forward, every loss term,
backward through the model and the scan (the hand-written adjoint), and the Adam step on the images. The last
row is the interactive preset end to end (goal: 128 images in under 120 s on the 2-core CPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_parser, machine_header, regenerate_command, run, write_results  # noqa: E402
from core.arguments import whole  # noqa: E402
from core.default_model import load_default_model  # noqa: E402
from core.eval import hardware_label  # noqa: E402
from core.gen import GEN_PRESETS, GenConfig, generate  # noqa: E402


def main() -> None:
    parser = bench_parser("bench_gen.py", "OuroMamba-Gen seconds per iteration, per source")
    parser.add_argument("--batch", type=whole(1), default=64, help="images optimised together")
    parser.add_argument("--iterations", type=whole(1), default=3, help="iterations timed per source")
    parser.add_argument("--quick", action="store_true",
                        help="without the interactive preset's end-to-end row (writes gen_<device>_quick)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_default_model()
    model.to(device)
    rows = []
    for source in ("output_only", "psaq", "ouromamba"):
        config = GenConfig(source=source, count=args.batch, batch_size=args.batch, iterations=args.iterations)
        generate(model, GenConfig(source=source, count=2, iterations=1))  # warm-up
        result = generate(model, config)
        per_iteration = result.seconds / args.iterations
        rows.append({"source": source, "images": args.batch, "iterations": args.iterations,
                     "seconds_per_iteration": round(per_iteration, 3),
                     "ms_per_image_iteration": round(1000 * per_iteration / args.batch, 2),
                     "minutes_for_128_images_x_1000_iterations": round(per_iteration * 128 / args.batch * 1000 / 60,
                                                                       1),
                     "hardware": hardware_label(device)})
        print(rows[-1])
    if not args.quick:
        preset = GEN_PRESETS["interactive"]
        result = generate(model, preset)
        rows.append({"source": f"{preset.source}, interactive preset (all {preset.count} images, no augmentation)",
                     "images": preset.count, "iterations": preset.iterations,
                     "seconds_per_iteration": round(result.seconds / preset.iterations, 3),
                     "ms_per_image_iteration": round(1000 * result.seconds / preset.iterations / preset.count, 2),
                     "total_seconds": round(result.seconds, 1), "hardware": hardware_label(device)})
        print(rows[-1])
    write_results(f"gen_{device.type}", rows, machine_header(device), regenerate_command("bench_gen.py"), args.out,
                  quick=args.quick)


if __name__ == "__main__":
    run(main)
