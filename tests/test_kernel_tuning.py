"""kernels.tuning: launch options timed once per shape on the GPU, the fastest kept, no value changed.

On the CPU nothing is timed (the interpreter's timings mean nothing), so these tests give the tuner a fake clock
and let it run on the CPU: every candidate a detecting kernel offers must write what the fixed rule writes.
"""

from __future__ import annotations

import pytest
import torch
import triton

from kernels import mixed_gemm as mixed_gemm_module
from kernels import tuning
from kernels.detect_fake_quant import detect_fake_quant
from kernels.detect_quant import detect_launches, detect_quant, empty_output
from kernels.host import cdiv, next_power_of_2
from kernels.merge_detect_quant import merge_detect_quant
from kernels.mixed_gemm import mixed_gemm
from kernels.norm_detect_quant import norm_detect_quant
from kernels.tuning import LaunchTuner
from tests.test_kernels import DEVICE, gemm_operands, moving_outliers, real_shapes, static_scales

CPU = torch.device("cpu")


def test_each_candidate_is_timed_once_per_key_and_the_fastest_kept():
    clock, ran = iter([3.0, 1.0, 2.0]), []
    tuner = LaunchTuner(timer=lambda run: (run(), next(clock))[1], devices=("cpu",))
    assert tuner.pick("shape", ["rule", "fewer warps", "rounds"], ran.append, CPU) == "fewer warps"
    assert ran == ["rule", "fewer warps", "rounds"]
    assert tuner.pick("shape", ["rule", "fewer warps", "rounds"], ran.append, CPU) == "fewer warps"
    assert len(ran) == 3  # kept, not timed again
    assert tuner.choices() == {"shape": [("rule", 3.0), ("fewer warps", 1.0), ("rounds", 2.0)]}
    assert tuner.pick("shape", ["pinned"], ran.append, CPU) == "pinned"  # one candidate: as asked, never replaced
    tuner.launch("other", ["only"], ran.append, CPU)
    assert ran[-1] == "only" and "other" not in tuner.choices()


def test_nothing_is_timed_where_timings_mean_nothing():
    """Off CUDA (here: the CPU) the first candidate, the launcher's fixed rule, runs untimed."""
    tuner = LaunchTuner(timer=lambda run: pytest.fail("timed on the CPU"))
    assert tuner.pick("shape", ["rule", "other"], lambda option: None, CPU) == "rule"
    assert tuner.choices() == {}


def test_detect_launches_offer_fewer_warps_and_rounds_within_the_register_budget():
    # Vim-B's Δ: rounds of 2 at 8 warps (window_rows), step by step below; 1 warp would hold 64 channels a thread
    assert detect_launches(1536, 10, 2) == ((8, 2), (8, 1), (4, 1), (2, 1))
    assert detect_launches(768, 10, 1) == ((4, 1), (2, 1), (1, 1))
    assert detect_launches(16, 10, 8) == ((1, 8), (1, 1))  # B, C: one warp, the whole window or step by step


def test_the_launchers_host_arithmetic_is_tritons():
    """kernels.host's plain-int cdiv / next_power_of_2 (triton's wrappers cost µs per launch) agree with triton's."""
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 5000))
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(300) for b in range(1, 40))


@pytest.fixture
def recording_tuner(monkeypatch):
    """A tuner on the CPU whose clock makes every later candidate faster (the last one is kept), and which
    snapshots what each timed launch wrote."""
    clock = iter(range(1000, 0, -1))
    tuner = LaunchTuner(timer=lambda run: (run(), next(clock))[1], devices=("cpu", "cuda"))
    monkeypatch.setattr(tuning, "TUNER", tuner)
    return tuner


def test_every_candidate_of_every_detecting_kernel_writes_the_fixed_rules_values(recording_tuner):
    x = moving_outliers(1, 12, 512, seed=21, gaussian=False).to(DEVICE)
    scale = static_scales(x.cpu(), 7, seed=21).to(DEVICE)
    zero = torch.full_like(scale, 8.0)
    snapshots = []
    recording_tuner.timer = lambda run: (run(), snapshots.append(out.inlier_codes.clone()), 1000 - len(snapshots))[2]
    out = empty_output(x, 4, lean=True)
    want = detect_quant(x, scale, 3.0, 4, 4, lean=True, rows_per_round=4)
    detect_quant(x, scale, 3.0, 4, 4, out=out, lean=True, rows_per_round=4, tune=True)
    assert len(snapshots) == len(detect_launches(512, 4, 4)) == 4
    assert all(torch.equal(snapshot, want.inlier_codes) for snapshot in snapshots)
    assert torch.equal(out.outlier_codes, want.outlier_codes)

    clock = iter(range(1000, 0, -1))
    recording_tuner.timer = lambda run: (run(), next(clock))[1]  # every later candidate faster: the last one kept
    fixed = [detect_fake_quant(x, scale, zero, 3.0, 4, 15, 255, rows_per_round=4),
             merge_detect_quant(x, x, scale, 3.0, 4, 4, lean=True, rows_per_round=4),
             norm_detect_quant(x, None, torch.ones(512, device=DEVICE), 1e-5, scale, 3.0, 4, 4, lean=True)]
    tuned = [detect_fake_quant(x, scale, zero, 3.0, 4, 15, 255, rows_per_round=4, tune=True),
             merge_detect_quant(x, x, scale, 3.0, 4, 4, lean=True, rows_per_round=4, tune=True),
             norm_detect_quant(x, None, torch.ones(512, device=DEVICE), 1e-5, scale, 3.0, 4, 4, lean=True,
                               tune=True)]
    assert torch.equal(tuned[0], fixed[0])
    for got, want in ((tuned[1], fixed[1]), (tuned[2][0], fixed[2][0])):
        assert [a is None for a in got] == [b is None for b in want]  # lean: the same buffers left out
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True) if a is not None)
    assert torch.equal(tuned[2][1], fixed[2][1])
    assert len(recording_tuner.choices()) == 4  # detect_quant's, Δ's, the merge's and the norm's shapes


def test_a_residual_updated_in_place_is_never_timed(recording_tuner):
    """Timing runs a launch several times: norm_detect_quant writing the residual over its input would add the
    hidden state each time, so that call keeps the fixed rule."""
    hidden = moving_outliers(1, 12, 512, seed=3, gaussian=False).to(DEVICE)
    residual = torch.randn(1, 12, 512, device=DEVICE)
    want = residual + hidden
    scale = static_scales(hidden.cpu(), 7, seed=3).to(DEVICE)
    norm_detect_quant(hidden, residual, torch.ones(512, device=DEVICE), 1e-5, scale, 3.0, 4, 4, lean=True,
                      residual_out=residual, tune=True)
    assert torch.equal(residual, want) and recording_tuner.choices() == {}


def test_gemm_launches_start_with_the_rule_and_keep_wgmma_sized_tiles():
    for m, n, k in ((197, 3072, 768), (12608, 3072, 768), (12608, 80, 1536), (12608, 1536, 48), (197, 384, 12)):
        launches = mixed_gemm_module.gemm_launches(m, n, k)
        assert launches[0] == mixed_gemm_module._blocks(m, n, k) and len(set(launches)) == len(launches)
        assert all(block_m >= 64 and block_n >= 32 and block_k >= 64 for block_m, block_n, block_k, _, _ in launches)


@pytest.mark.parametrize(("m", "n", "k"), [(1100, 96, 256), (1100, 160, 64), (70, 64, 128)])
def test_every_gemm_candidate_gives_the_rules_output_bit_for_bit(recording_tuner, m, n, k):
    """Dense and gathered outliers (from K = 256, as the packed model multiplies), fp16 out: each tile shape the
    tuner may time writes exactly what the rule's does."""
    ops = {name: t.to(DEVICE) for name, t in gemm_operands(m, n, k, 8, 8, True, seed=m + n + k).items()}
    weight_t = ops["weight"].t().contiguous() if k >= mixed_gemm_module.GATHER_MIN_K else None
    want = mixed_gemm(**ops, outlier_weight_t=weight_t)
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEVICE)
    snapshots = []
    recording_tuner.timer = lambda run: (run(), snapshots.append(out.clone()), -len(snapshots))[2]
    mixed_gemm(**ops, outlier_weight_t=weight_t, out=out, tune=True)
    assert len(snapshots) == len(mixed_gemm_module.gemm_launches(m, n, k)) > 1
    assert all(torch.equal(snapshot, want) for snapshot in snapshots) and torch.equal(out, want)


@real_shapes
def test_on_the_gpu_the_tuner_times_real_launches_and_keeps_the_codes(monkeypatch):
    """Vim-B's Δ-sized detection with the real clock (triton's do_bench): every candidate timed, a positive
    time each, and the codes of the fixed rule."""
    monkeypatch.setattr(tuning, "TUNER", LaunchTuner())
    x = moving_outliers(16, 197, 1536, seed=5, gaussian=False, per_step=15, magnitudes=(30.0, 40.0)).half()
    scale = static_scales(x.float(), 7, seed=5)
    xd, sd = x.to(DEVICE), scale.to(DEVICE)
    want = detect_quant(xd, sd, 3.0, 10, 4, lean=True, rows_per_round=2)
    got = detect_quant(xd, sd, 3.0, 10, 4, lean=True, rows_per_round=2, tune=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True) if a is not None)
    (timings,) = tuning.TUNER.choices().values()
    assert tuple(option for option, _ in timings) == detect_launches(1536, 10, 2) and all(ms > 0 for _, ms in timings)
