"""End-to-end Vim latency on a CUDA GPU: FP32 eager, our FP16 model and the packed integer models.

    python bench/bench_e2e.py [--models Vim-T Vim-B default] [--batches 1 16 64 256] [--budget-s 240]
    python bench/bench_e2e.py --smoke    # the plumbing on the CPU: tiny model, batch 2, nothing written

Variants, all the same random-weight model (latency does not depend on the weights; the default model uses
its trained ones):

* ``fp32 eager`` — fp32 weights and activations, PyTorch's fast scan (``scan_impl="fast"``): what a plain
  PyTorch port runs;
* ``fp16`` — fp16 weights and activations, cuBLAS projections, the scan the model dispatches to on CUDA
  (mamba-ssm's when installed, else our Triton scan): the model's own forward, a baseline of the quantized
  models;
* ``fp16 fused`` — the same weights through :class:`core.models.fused.FusedVim`: the packed models' fused
  skeleton with float operations (conv1d + SiLU, the block entry and the merge as one kernel each, the backward
  branch read in reverse, no flipped or transposed copies; cuBLAS projections; the Triton scan). It differs from
  the fused packed models only where they quantize, so it is the baseline that shows what the integer kernels
  buy;
* ``W8A8O8``, ``W4A8O8``, ``W4A4O8`` — OuroMamba calibrated on 8 noise images (no reconstruction: latency only),
  packed (:mod:`core.quant.packed`), fp16 activations: ``detect_quant`` → ``mixed_gemm`` at every projection,
  Δ/B/C quantized by their simulation quantizers, the same scan as ``fp16``; the fused producers (add + RMSNorm +
  quantize, conv1d + SiLU, merge + quantize) on, and ``W4A4O8 unfused`` without them, to show what fusion buys;
  each detection's warps and rows per round and each GEMM's tiles timed per shape at the first call
  (``kernels.tuning``; the picks are listed in the results' header), and ``W4A4O8 fixed launches`` with the
  kernels' fixed rules instead;
* ``bf16``, ``W4A4O8 bf16`` — the same with bf16 activations (the ratios still against the fp16 baselines).
* ``fp16 fused one stream``, ``W4A4O8 one stream`` — the fused models with both scan directions on one CUDA
  stream; the others run each backward branch on a side stream beside the forward one
  (``FusedForward.branches``), which matters where a branch's kernels leave the GPU idle (small batches).

Per (model, variant, batch): median latency of ``--repeats`` forward passes after one warm-up (CUDA-synchronised
wall time), images/s, and peak memory allocated during the timed passes. ``vs_fp16`` is fp16 latency / this
latency (> 1: faster), ``vs_fp16_fused`` the same against ``fp16 fused`` (each when that baseline ran). On CUDA
each is also timed as a replayed CUDA graph (``graph_ms``, ``graph_vs_…`` against the baseline's graph): eager
PyTorch pays Python and launch overhead per kernel, which at these sizes can exceed the GPU work; the graph shows
what the kernels themselves cost. Stops adding rows when ``--budget-s`` is spent, and says so. Writes
results/e2e_<gpu>[_<models>][_b<batches>].{csv,md} (models and batches named where they are not the defaults).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_parser, machine_header, regenerate_command, run, write_results  # noqa: E402
from core.arguments import Distinct, positive, whole  # noqa: E402
from core.default_model import load_default_model  # noqa: E402
from core.eval import graph_latency, hardware_label, time_forward  # noqa: E402
from core.models import VimConfig, VisionMamba, create_vim  # noqa: E402
from core.models.fused import FusedVim  # noqa: E402
from core.quant import QuantConfig, ReconstructionConfig, quantize  # noqa: E402
from core.quant.packed import pack  # noqa: E402
from kernels import tuning  # noqa: E402

MODELS = {
    "Vim-T": "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "Vim-S": "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "Vim-B": "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2",
}
QUANTIZED = {"W8A8O8": (8, 8), "W4A8O8": (4, 8), "W4A4O8": (4, 4)}
BASELINES = ("fp16", "fp16 fused")
VARIANTS = ("fp32 eager", *BASELINES, *QUANTIZED, "W4A4O8 unfused", "W4A4O8 fixed launches", "W4A4O8 one stream",
            "fp16 fused one stream", "bf16", "W4A4O8 bf16")
SMOKE = VimConfig(img_size=16, patch_size=4, stride=4, in_chans=1, num_classes=4, embed_dim=32, depth=2)


def build(name: str) -> VisionMamba:
    if name == "default":
        return load_default_model()[0]
    if name == "smoke":
        torch.manual_seed(0)
        return VisionMamba(SMOKE).eval()
    return create_vim(MODELS[name]).eval()


def variants(model: VisionMamba, device: torch.device) -> dict[str, Callable[[], torch.nn.Module]]:
    """Builders, called one at a time so that only one variant's weights sit in GPU memory."""
    def activations(dtype: torch.dtype) -> torch.dtype:
        return dtype if device.type == "cuda" else torch.float32  # the CPU smoke run keeps fp32

    def fp32() -> torch.nn.Module:
        copy = VisionMamba(model.cfg)
        copy.load_state_dict(model.state_dict())
        copy.set_scan_impl("fast")
        return copy.eval().to(device)

    def floating(dtype: torch.dtype, fused: bool = False, concurrent: bool = True) -> Callable[[], torch.nn.Module]:
        def make() -> torch.nn.Module:
            copy = VisionMamba(model.cfg)
            copy.load_state_dict(model.state_dict())
            copy = copy.eval().to(device=device, dtype=activations(dtype))
            return FusedVim(copy, concurrent_directions=concurrent).eval() if fused else copy
        return make

    def quantized(w_bits: int, a_bits: int, fused: bool = True, dtype: torch.dtype = torch.float16,
                  tuned: bool = True, concurrent: bool = True) -> Callable[[], torch.nn.Module]:
        def make() -> torch.nn.Module:
            cfg = model.cfg
            calib = torch.randn(8, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
            config = QuantConfig(w_bits=w_bits, a_bits=a_bits, reconstruction=ReconstructionConfig(epochs=0))
            packed = pack(quantize(model.to(device), config, calib.to(device))).to(device)
            model.cpu()
            packed.fused, packed.tune_launches, packed.concurrent_directions = fused, tuned, concurrent
            return packed if activations(dtype) == torch.float32 else packed.half_activations(dtype)
        return make

    makers = {"fp32 eager": fp32, "fp16": floating(torch.float16), "fp16 fused": floating(torch.float16, fused=True),
              **{label: quantized(*bits) for label, bits in QUANTIZED.items()},
              "W4A4O8 unfused": quantized(4, 4, fused=False), "W4A4O8 fixed launches": quantized(4, 4, tuned=False),
              "W4A4O8 one stream": quantized(4, 4, concurrent=False),
              "fp16 fused one stream": floating(torch.float16, fused=True, concurrent=False),
              "bf16": floating(torch.bfloat16),
              "W4A4O8 bf16": quantized(4, 4, dtype=torch.bfloat16)}
    return {label: makers[label] for label in VARIANTS}


def ratios(baselines: dict[str, dict[int, tuple[float, float | str | None]]], batch: int, seconds: float,
           graphed: float | str | None) -> dict[str, float | str]:
    """``vs_<baseline>`` and ``graph_vs_<baseline>``: the baseline's latency / this one (> 1: faster), eager and as
    CUDA graphs, empty where the baseline did not run at this batch."""
    columns = {}
    for label, timings in baselines.items():
        column = label.replace(" ", "_")
        baseline, graph_baseline = timings.get(batch, (None, None))
        columns[f"vs_{column}"] = round(baseline / seconds, 2) if baseline else ""
        columns[f"graph_vs_{column}"] = round(graph_baseline / graphed, 2) \
            if isinstance(graphed, float) and isinstance(graph_baseline, float) else ""
    return columns


def launch_label(option: tuple[int, ...]) -> str:
    """A tuner candidate in words: a detection's (warps, rows per round) or a GEMM's blocks."""
    if len(option) == 2:
        return f"{option[0]}w×{option[1]}"
    block_m, block_n, block_k, warps, stages = option
    return f"{block_m}×{block_n}×{block_k}/{warps}w/{stages}st"


def tuner_picks() -> str:
    """One entry per launch the tuner timed: kernel, shape (a detection's input, a GEMM's M, N, K), the pick and
    the fixed rule with the median ms of each."""
    picks = []
    for key, timings in tuning.TUNER.choices().items():
        (rule, rule_ms), (picked, picked_ms) = timings[0], min(timings, key=lambda timing: timing[1])
        shape = tuple(key[1]) if isinstance(key[1], torch.Size) else key[1:4]
        picks.append(f"{getattr(key[0], '__name__', key[0]).strip('_')} {shape}: {launch_label(picked)} "
                     f"{picked_ms:.3f} ms (rule {launch_label(rule)} {rule_ms:.3f} ms)")
    return "; ".join(picks) or "none timed"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = bench_parser("bench_e2e.py", __doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", action=Distinct, default=["Vim-T", "Vim-S", "Vim-B", "default"],
                        choices=[*MODELS, "default"])
    parser.add_argument("--batches", nargs="+", action=Distinct, type=whole(1), default=[1, 16, 64, 256])
    parser.add_argument("--variants", nargs="+", action=Distinct, choices=VARIANTS, metavar="VARIANT",
                        help=f"only these (default: all of {', '.join(VARIANTS)})")
    parser.add_argument("--repeats", type=whole(1), default=5)
    parser.add_argument("--budget-s", type=positive, default=300.0, help="stop adding rows after this many seconds")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model at batch 2 on the CPU, in fp32 whatever the variant says, written nowhere: "
                             "checks the plumbing only (--models and --batches do not apply)")
    parser.add_argument("--warm-only", action="store_true",
                        help="one forward per variant and batch, nothing timed or written: compiles the kernels "
                             "into Triton's cache (the tuner's candidates included) so that a later timed run "
                             "spends its budget timing; scripts/gpu_session.sh runs it beside the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        device, names, batches = torch.device("cpu"), ["smoke"], [2]
        if any(getattr(args, name) != parser.get_default(name) for name in ("models", "batches")):
            print("--smoke: a tiny model at batch 2; --models and --batches do not apply", file=sys.stderr)
    elif not torch.cuda.is_available():
        sys.exit("bench_e2e.py: no CUDA device; `--smoke` runs the plumbing on the CPU")
    else:
        device, names, batches = torch.device("cuda"), args.models, args.batches
    started, rows, skipped = time.perf_counter(), [], []
    for name in names:
        model = build(name)
        cfg = model.cfg
        baselines: dict[str, dict[int, tuple[float, float | str | None]]] = {label: {} for label in BASELINES}
        for label, make in variants(model, device).items():
            if args.variants and label not in args.variants:
                continue
            if time.perf_counter() - started > args.budget_s:
                skipped.append(f"{name} {label}")
                continue
            variant = make()
            for batch in batches:
                dtype = next(p.dtype for p in variant.parameters() if p.is_floating_point())
                images = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
                if args.warm_only:
                    with torch.inference_mode():
                        variant(images)
                    rows.append({"model": name, "variant": label, "batch": batch, "latency_ms": "warm-up only"})
                    print(rows[-1], flush=True)
                    continue
                try:
                    seconds, peak = time_forward(variant, images, args.repeats)
                except torch.OutOfMemoryError:
                    rows.append({"model": name, "variant": label, "batch": batch, "latency_ms": "out of memory"})
                    torch.cuda.empty_cache()
                    continue
                graphed = graph_latency(variant, images, args.repeats) if device.type == "cuda" else None
                if label in baselines:
                    baselines[label][batch] = seconds, graphed
                rows.append({"model": name, "variant": label, "batch": batch, "latency_ms": round(seconds * 1e3, 3),
                             "images_per_s": round(batch / seconds, 1), "peak_MiB": round(peak / 2**20, 1),
                             "graph_ms": round(graphed * 1e3, 3) if isinstance(graphed, float) else graphed or "",
                             **ratios(baselines, batch, seconds, graphed), "hardware": hardware_label(device)})
                print(rows[-1], flush=True)
            del variant
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.smoke or args.warm_only:
        return rows  # plumbing, or the compile cache filled: nothing is written
    header = machine_header(device)
    if skipped:
        header["not measured (budget spent)"] = ", ".join(skipped)
    header["launches the tuner picked"] = tuner_picks()
    tag = torch.cuda.get_device_name(device).lower().replace(" ", "_")
    if args.models != parser.get_default("models"):
        tag += "_" + "_".join(args.models)
    if args.batches != parser.get_default("batches"):  # a run at other batches never replaces this one's file
        tag += "_b" + "_".join(map(str, args.batches))
    write_results(f"e2e_{tag}", rows, header, regenerate_command("bench_e2e.py", argv), args.out)
    return rows


if __name__ == "__main__":
    run(main)
