"""bench/bench_kernels.py runs only on the GPU machine, where device time is scarce: its detection, GEMM and
fusion sections run here at tiny shapes (the kernels interpreted on the CPU, timing replaced by one call), so that
a benchmark that would break or fail its own checks shows before a GPU session is spent on it."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_kernels import DEVICE


@pytest.fixture
def tiny_bench(monkeypatch):
    """The benchmark module with each timing one call (1 µs) and 12 tokens a sample."""
    bench = pytest.importorskip("bench.bench_kernels")
    monkeypatch.setattr(bench, "median_us", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(bench, "TOKENS", 12)
    return bench


def generator():
    return torch.Generator(device=DEVICE).manual_seed(0)


def test_the_detection_benchmark_runs_and_checks_every_variant(tiny_bench):
    bench = tiny_bench
    rows = bench.bench_detect(DEVICE, 1e12, {"tiny": 32}, (1,), generator())
    assert {row["kind"] for row in rows} == {"detect_quant 4-bit", "detect_quant lean rounds",
                                            "detect_fake_quant Δ rounds"}
    per_round = ("1 row a round", "8 rows a round")  # 8: window_rows at 32 and 64 channels
    assert {row["variant"] for row in rows if row["kind"].endswith("rounds")} == {
        f"{data} outliers, {count}" for data in ("moving", "fixed") for count in per_round}
    assert all(row["check"] in ("ok", "ok exact", "reference") for row in rows)
    summary = bench.summary(rows, 1e12)
    assert "checks: 0 failed" in summary
    assert "  detect_fake_quant Δ, fixed outliers: 1.00×" in summary  # the stubbed timings are all equal


def test_the_fusion_benchmark_runs_and_checks_every_producer(tiny_bench):
    rows = tiny_bench.bench_fusions(DEVICE, 1e12, {"tiny": 32}, (1,), generator())
    fused = {row["layer"]: row["check"] for row in rows if row["variant"] == "fused"}
    assert set(fused) == {"add+rmsnorm+detect", "add+rmsnorm (float)", "conv+silu fwd", "conv+silu bwd",
                          "merge+detect", "merge (float)"}
    assert all(check.startswith("ok") for check in fused.values()), fused


def test_the_gemm_section_runs_every_layer_and_checks_every_variant(tiny_bench, monkeypatch):
    """Every Vim layer's shape class at batch 1, dt_proj's included: its K (2 here, 12 at Vim-T) leaves the tuner
    one candidate, which it does not time, and the row says so instead of failing."""
    from kernels import tuning
    monkeypatch.setattr(tuning, "TUNER", tuning.LaunchTuner(timer=lambda run: (run(), 1.0)[1],
                                                            devices=("cpu", "cuda")))
    rows = tiny_bench.bench_gemms(DEVICE, 1e12, {"tiny": 32}, (1,), generator())
    assert {row["layer"] for row in rows} == {"in_proj", "x_proj", "dt_proj", "out_proj"}
    assert all(row["check"].startswith("ok") or row["check"] == "baseline" for row in rows)
    tuned = {row["layer"]: row["variant"] for row in rows if row["variant"].startswith("W8A8, ")}
    assert tuned["dt_proj"].startswith("W8A8, rule only") and tuned["in_proj"].startswith("W8A8, tuned")


def test_warm_only_runs_each_timed_call_once_and_times_nothing(monkeypatch):
    """``--warm-only`` (run beside the tests on the GPU machine to compile the kernels early): every timing the
    sections take goes through ``median_us``, which then calls once, never do_bench, and reports not-a-number."""
    bench = pytest.importorskip("bench.bench_kernels")
    monkeypatch.setattr(bench, "WARM_ONLY", True)
    monkeypatch.setattr(bench, "do_bench", lambda *args, **kwargs: pytest.fail("timed in warm-only mode"))
    calls = []
    assert math.isnan(bench.median_us(lambda: calls.append(1)))
    assert calls == [1]


def test_the_gemm_benchmark_times_the_tuned_tiles_and_checks_them(monkeypatch):
    """The packed model's GEMM operands with ``tune=True``: a fake clock makes the last candidate the fastest;
    the row names its tiles and checks that it wrote the rule's output."""
    bench = pytest.importorskip("bench.bench_kernels")
    from kernels import mixed_gemm as mixed_gemm_module
    from kernels import tuning
    monkeypatch.setattr(bench, "median_us", lambda fn: (fn(), 1.0)[1])
    clock = iter(range(100, 0, -1))
    monkeypatch.setattr(tuning, "TUNER", tuning.LaunchTuner(timer=lambda run: (run(), next(clock))[1],
                                                            devices=("cpu", "cuda")))
    m, n, k = 1100, 96, 256
    ops = bench.gemm_operands(m, n, k, 4, 4, 5, DEVICE, generator(), packed=False, fixed_channels=True, gathered=True)
    shape = {"kind": "gemm", "model": "tiny", "layer": "x_proj", "batch": 1, "M": m, "K": k, "N": n}
    row = bench.bench_tuned_gemm(shape, "W4A4O8 5% fixed ch, int8 gathered", ops, bench.mixed_gemm(**ops), 1.0, 1e12)
    block_m, block_n, block_k, warps, stages = mixed_gemm_module.gemm_launches(m, n, k)[-1]
    assert row["check"] == "ok same as the rule"
    assert row["variant"].endswith(f"tuned {block_m}×{block_n}×{block_k}/{warps}w/{stages}st")


def test_a_spent_budget_skips_the_remaining_shapes_and_says_so(monkeypatch):
    bench = pytest.importorskip("bench.bench_kernels")
    monkeypatch.setattr(bench, "DEADLINE", 0.0)
    monkeypatch.setattr(bench, "SKIPPED", [])
    assert bench.bench_detect(DEVICE, 1e12, {"tiny": 32}, (1, 2), generator()) == []
    assert bench.SKIPPED[:2] == ["detect tiny in_proj batch 1", "detect tiny in_proj batch 2"]


def test_the_launchers_host_cost_benchmark_runs_and_puts_the_kernels_back(monkeypatch, tmp_path):
    """bench_launch_host stubs every kernel to time the launchers' Python alone; the real kernels return after."""
    bench = pytest.importorskip("bench.bench_launch_host")
    monkeypatch.setattr(bench, "time_launchers", lambda: [{"launcher call": "stubbed", "host_us": 1.0}])
    before = [getattr(module, name) for module, name in bench.KERNELS]
    with bench.stubbed_kernels():
        assert all(isinstance(getattr(module, name), bench.StubKernel) for module, name in bench.KERNELS)
        detect_quant = bench.detect_module.detect_quant
        x = torch.randn(1, 4, 8)
        detect_quant(x, torch.ones(4), 3.0, 2, 4)  # launches nothing, on the CPU, whatever TRITON_INTERPRET says
    assert [getattr(module, name) for module, name in bench.KERNELS] == before
    bench.main(["--out", str(tmp_path)])
    assert (tmp_path / "launch_host_cpu.md").read_text().count("stubbed") == 1
