"""Observers: planted outliers land in the right cells, hand-computed window counts, SQNR formula, per-site
error report on the default model, histograms, layer sensitivity, and quantized models left untouched."""

import math
import threading
from dataclasses import fields

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import core.observe.grid as grid
import core.observe.sensitivity as sensitivity
from core.data import load_fashion_mnist
from core.default_model import load_default_model
from core.errors import StudioError
from core.eval import Cancelled
from core.intercept import intercepting
from core.models import VimConfig, VisionMamba
from core.observe import (
    DECAY,
    OutlierParams,
    capture,
    capture_quantizer_inputs,
    cosine_similarity,
    decay_outliers,
    dynamic_outlier_summary,
    error_report,
    growing_steps,
    histogram,
    layer_output_error,
    layer_sensitivity,
    outlier_timeline,
    parse_site,
    precision_suggestion,
    quantization_grid,
    quantizer_at,
    quantizer_inputs_bytes,
    rule_of,
    run_layer_sensitivity,
    sqnr_db,
    state_outliers,
    static_list_misses,
    suggest_precision,
    time_channel_stats,
    top1,
    weight_grid,
    weight_grids,
)
from core.quant import QuantConfig, quantize, quantized_sites
from core.quant.model import QuantInterceptor
from core.quant.quantizers import OutlierAwareQuantizer, PerTokenStaticQuantizer, WeightQuantizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning OpenMP threads make these ops 10–40×
    slower whenever the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def static_config(**kwargs) -> QuantConfig:
    """Calibration only: block reconstruction (where this version has it) would dominate test time."""
    if "reconstruction" in {f.name for f in fields(QuantConfig)}:
        from core.quant import ReconstructionConfig
        kwargs["reconstruction"] = ReconstructionConfig(epochs=0)
    return QuantConfig(**kwargs)


# ------------------------------------------------------------------------------------------------
# Synthetic tensors


PLANTED = [3, 7, 11, 14]  # the outlier channel of each window of 5 time-steps


def planted_tensor() -> torch.Tensor:
    torch.manual_seed(0)
    x = 0.5 * torch.randn(4, 20, 16)
    for t in range(20):
        x[:, t, PLANTED[t // 5]] = 40.0 * (-1) ** t
    return x


def test_moving_planted_outlier_is_found_where_it_is_and_a_static_list_misses_it():
    x = planted_tensor()
    dynamic = OutlierAwareQuantizer(4, 8, k=3.0, n_refresh=5)
    dynamic.calibrate(x)
    timeline = outlier_timeline(x, dynamic)
    assert torch.equal(timeline.mask, dynamic.masks(x))
    cells = timeline.cells.set_index(["time_step", "channel"])["fraction_flagged"]
    for t in range(20):
        assert cells[(t, PLANTED[t // 5])] == 1.0
    heat = time_channel_stats(x)
    assert heat.loc[heat.groupby("time_step")["max_abs"].idxmax(), "channel"].tolist() == \
        [PLANTED[t // 5] for t in range(20)]
    assert len(timeline.windows) == 4 and math.isnan(timeline.windows["new_channels_vs_previous_window"][0])
    assert (timeline.windows["new_channels_vs_previous_window"][1:] >= 1).all()  # the outlier moved
    assert (timeline.steps["window"] == [t // 5 for t in range(20)]).all()
    assert torch.allclose(torch.tensor(timeline.steps["inlier_scale"].to_numpy()), dynamic.scale.detach())

    static = OutlierAwareQuantizer(4, 8, k=3.0, n_refresh=5, static_channels=True)
    static.calibrate(x)
    static_timeline = outlier_timeline(x, static)
    assert (static_timeline.mask == static.static_mask).all()  # the fixed list, at every step
    assert torch.equal(outlier_timeline(x, static, dynamic_rule=True).mask, timeline.mask)
    misses = static_list_misses(x, timeline.mask, static.static_mask)
    missed_windows = [w for w, channel in enumerate(PLANTED) if not static.static_mask[channel]]
    assert len(missed_windows) >= 2  # a list of the per-token budget cannot hold four moving channels
    for w in missed_windows:
        rows = misses[misses["time_step"] // 5 == w]
        assert (rows["missed"] >= 1).all() and (rows["missed_max_abs"] >= 40).all()


def hand_case() -> torch.Tensor:
    """Image 0: outlier at ch1 (t0), ch2 (t1, t2), ch5 (t3); image 1: no outlier. Windows of 2 steps."""
    x = torch.ones(2, 4, 8)
    for t, channel in enumerate([1, 2, 2, 5]):
        x[0, t, channel] = 100.0
    return x


def test_window_frames_match_a_hand_computed_case():
    x = hand_case()
    params = OutlierParams(k=1.0, n_refresh=2, static_scale=0.0)
    # image 0: O_list {1} → {1, 2} | refresh | {2} → {2, 5}; image 1: never flagged
    timeline = outlier_timeline(x, params)
    assert timeline.steps["outlier_channels"].tolist() == [0.5, 1.0, 0.5, 1.0]
    assert timeline.steps["fraction_outlier"].tolist() == [0.5 / 8, 1 / 8, 0.5 / 8, 1 / 8]
    assert timeline.windows["olist_size"].tolist() == [1.0, 1.0]
    assert timeline.windows["new_channels_vs_previous_window"].tolist()[1] == 0.5  # ch5 new for image 0 only
    assert timeline.windows[["first_step", "last_step"]].values.tolist() == [[0, 1], [2, 3]]
    cells = timeline.cells.set_index(["time_step", "channel"])["fraction_flagged"]
    assert cells[(1, 1)] == 0.5 and cells[(2, 1)] == 0.0 and cells[(3, 2)] == 0.5 and cells.sum() == 3.0

    one = outlier_timeline(x, {"k": 1.0, "n_refresh": 2, "static_scale": torch.zeros(4)}, image=0)
    assert one.steps["outlier_channels"].tolist() == [1, 2, 1, 2]
    assert one.windows["olist_size"].tolist() == [2, 2]
    assert one.windows["new_channels_vs_previous_window"].tolist()[1] == 1
    flagged = one.cells[one.cells["flagged"]]
    assert sorted(zip(flagged["time_step"], flagged["channel"], strict=True)) == \
        [(0, 1), (1, 1), (1, 2), (2, 2), (3, 2), (3, 5)]

    static_mask = torch.zeros(8, dtype=torch.bool)
    static_mask[1] = True
    misses = static_list_misses(x, timeline.mask, static_mask)
    assert misses["dynamic_outliers"].tolist() == [0.5, 1.0, 0.5, 1.0]
    assert misses["missed"].tolist() == [0.0, 0.5, 0.5, 1.0]
    assert misses["missed_max_abs"].tolist() == [0.0, 100.0, 100.0, 100.0]
    assert misses["missed_fraction"].tolist() == [0.0, 0.5, 1.0, 1.0]
    with pytest.raises(StudioError, match="time-steps"):
        outlier_timeline(x, OutlierParams(k=1.0, n_refresh=2, static_scale=torch.zeros(3)))


def test_sqnr_and_cosine_follow_the_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 8)
    assert sqnr_db(x, x.clone()) == math.inf and cosine_similarity(x, x) == pytest.approx(1.0)
    assert sqnr_db(torch.ones(1000), torch.ones(1000) + 0.1) == pytest.approx(20.0)  # 10·log10(1 / 0.01)
    noisy = x + 0.05 * torch.randn_like(x)
    expected = 10 * math.log10(float((x.double() ** 2).sum() / ((x - noisy).double() ** 2).sum()))
    assert sqnr_db(x, noisy) == pytest.approx(expected)
    assert cosine_similarity(x, noisy) == pytest.approx(float(torch.nn.functional.cosine_similarity(
        x.reshape(-1), noisy.reshape(-1), dim=0)), abs=1e-6)
    assert cosine_similarity(x, -x) == pytest.approx(-1.0)


def test_histogram_counts_every_value():
    torch.manual_seed(0)
    x = torch.randn(7, 13, 5)
    frame = histogram(x, bins=30, log=True)
    assert list(frame.columns) == ["bin_left", "bin_right", "count", "log_count"] and len(frame) == 30
    assert frame["count"].sum() == x.numel()
    assert frame["bin_left"].iloc[0] == pytest.approx(float(x.min()))
    assert frame["bin_right"].iloc[-1] == pytest.approx(float(x.max()))
    assert histogram(torch.full((10,), 3.0), bins=4)["count"].sum() == 10
    assert histogram(torch.tensor([1.0, float("nan"), 2.0]), bins=2)["count"].sum() == 2


def test_time_channel_stats_of_the_batch_and_of_one_image():
    x = torch.zeros(2, 3, 4)
    x[0, 1, 2], x[1, 1, 2], x[1, 0, 3] = 5.0, -7.0, 2.0
    batch = time_channel_stats(x).set_index(["time_step", "channel"])["max_abs"]
    assert len(batch) == 12 and batch[(1, 2)] == 7.0 and batch[(0, 3)] == 2.0
    first = time_channel_stats(x, image=0).set_index(["time_step", "channel"])["max_abs"]
    assert first[(1, 2)] == 5.0 and first[(0, 3)] == 0.0
    with pytest.raises(StudioError, match="out of range"):
        time_channel_stats(x, image=2)


# ------------------------------------------------------------------------------------------------
# The default model


@pytest.fixture(scope="module")
def default_setup():
    model, _ = load_default_model()
    data = load_fashion_mnist("test")
    images = data.normalized(0, 16)
    qmodel = quantize(model, static_config(method="ptq4vm", w_bits=8, a_bits=8), images)
    return model, qmodel, images, data


def test_capture_fp_and_quantized_leaves_the_quantized_model_as_it_was(default_setup):
    model, qmodel, images, _ = default_setup
    with torch.no_grad():
        before = qmodel(images)
    flags = [m.training for m in qmodel.modules()]
    site = "layers.1.fwd.x_proj.input"
    fp = capture(model, images, [site, "layers.1.fwd.A"], batch_size=5)
    q = capture(qmodel, images, [site])
    assert fp[site].shape == (16, 50, 128) and fp["layers.1.fwd.A"].shape == (128, 16)
    assert not torch.equal(fp[site], q[site])  # the quantized model records quantized tensors
    inputs = capture_quantizer_inputs(qmodel, images, [site])
    assert torch.equal(qmodel.quantizers[site.replace(".", ":")](inputs[site]), q[site])
    assert [m.training for m in qmodel.modules()] == flags
    with torch.no_grad():
        assert torch.equal(qmodel(images), before)
    with pytest.raises(StudioError, match="no tensor passed"):
        capture(model, images[:2], ["layers.9.in_proj.input"])


def test_error_report_has_one_row_per_quantized_site(default_setup):
    model, qmodel, images, _ = default_setup
    report = error_report(model, qmodel, images[:8], batch_size=4)
    assert report["site"].tolist() == [s.name for s in quantized_sites(model) if s.name in set(report["site"])]
    assert sorted(report["site"]) == sorted(key.replace(":", ".") for key in qmodel.quantizers)
    assert {"site", "layer", "direction", "tensor", "kind", "sqnr_db", "cosine"} <= set(report.columns)
    assert report["sqnr_db"].map(math.isfinite).all() and (report["sqnr_db"] > 0).all()
    assert (report["cosine"] > 0.9).all() and (report["cosine"] <= 1 + 1e-9).all()
    assert set(report["kind"]) == {"weight", "activation"} and set(report["bits"]) == {8}
    weight_row = report.set_index("site").loc["layers.2.out_proj.weight"]
    weight = model.layers[2].mixer.out_proj.weight
    expected = sqnr_db(weight, qmodel.quantizers["layers:2:out_proj:weight"](weight))
    assert weight_row["sqnr_db"] == pytest.approx(expected) and weight_row["direction"] == "shared"
    first = report.set_index("site").loc["layers.0.in_proj.input"]  # nothing upstream is quantized
    assert first["sqnr_db_vs_fp_model"] == pytest.approx(first["sqnr_db"])
    # along the scan: every activation with time-steps, 50 of them (7 × 7 patches + the class token); the
    # pooled SQNR, Σsignal / Σnoise over the steps, lies between the steps' own ratios
    steps = {site: np.array(values) for site, values in report.attrs["step_sqnr_db"].items()}
    with_steps = report[(report["kind"] == "activation") & ~report["tensor"].isin(["A", "D"])]["site"]
    assert sorted(steps) == sorted(with_steps) and len(steps) == 4 * 12
    for site, pooled in report.set_index("site").loc[list(steps), "sqnr_db"].items():
        assert steps[site].shape == (50,) and steps[site].min() - 1e-9 <= pooled <= steps[site].max() + 1e-9
        assert steps[site].max() - steps[site].min() > 0.01  # the steps differ: not one value repeated
    assert "layers.0.in_proj.input" in repr(report) and len(pd.concat([report, report])) == 2 * len(report)

    layers = layer_output_error(model, qmodel, images[:8])
    assert layers["layer"].tolist() == [0, 1, 2, 3]
    assert layers["sqnr_db"].map(math.isfinite).all() and (layers["cosine"] > 0.9).all()
    assert layer_output_error(model, model, images[:2])["sqnr_db"].eq(math.inf).all()


def test_error_report_of_smoothed_sites_compares_what_the_quantizer_rounds(default_setup):
    """With a smoothing scale s the input quantizer returns Q(x / s): its error is against x / s (and the
    weight's against W · s), not against x — at 8 bits that is a small error, not a meaningless one."""
    model, _, images, _ = default_setup
    smooth = quantize(model, static_config(method="ptq4vm_smooth", w_bits=8, a_bits=8), images)
    report = error_report(model, smooth, images[:8], batch_size=8).set_index("site")
    for name in ("layers.1.fwd.x_proj.input", "layers.1.out_proj.input", "layers.1.out_proj.weight"):
        assert report.loc[name, "sqnr_db"] > 25 and report.loc[name, "cosine"] > 0.99, name
    quantizer = smooth.quantizers["layers:1:out_proj:weight"]
    weight = model.layers[1].mixer.out_proj.weight
    assert quantizer.smoothing is not None
    expected = sqnr_db(weight * quantizer.smoothing, quantizer(weight))
    assert report.loc["layers.1.out_proj.weight", "sqnr_db"] == pytest.approx(expected)


def test_layer_sensitivity_quantizes_one_layer_at_a_time(default_setup, monkeypatch):
    model, _, images, data = default_setup
    quantized_layers = []

    def spy(*args, **kwargs):
        qmodel = quantize(*args, **kwargs)
        quantized_layers.append({parse_site(key.replace(":", ".")).layer for key in qmodel.quantizers})
        return qmodel

    monkeypatch.setattr(sensitivity, "quantize", spy)
    calls = []
    config = static_config(method="dynamic_per_token", w_bits=8, a_bits=8)
    frame = layer_sensitivity(model, config, images[:4], data.normalized(0, 20), data.labels[:20],
                              progress=lambda i, n: calls.append((i, n)))
    assert frame["layer"].tolist() == [0, 1, 2, 3] and list(frame.columns) == ["layer", "top1", "drop_vs_fp"]
    assert quantized_layers == [{0}, {1}, {2}, {3}]
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert (frame["drop_vs_fp"] == frame.attrs["fp_top1"] - frame["top1"]).all()
    assert frame["top1"].between(0, 100).all()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        layer_sensitivity(model, config, images[:4], data.normalized(0, 20), data.labels[:20], cancel=cancel)


def test_run_layer_sensitivity_switches_on_one_layer_of_the_run_at_a_time(default_setup):
    model, qmodel, _, data = default_setup
    images, labels = data.normalized(0, 60), data.labels[:60]
    with torch.no_grad():
        before = qmodel(images[:4])
    seen = []
    original_intercept = QuantInterceptor.intercept

    def spy(self, site, x):
        if site.name in self.quantizers:
            seen.append(site.layer)
        return original_intercept(self, site, x)

    QuantInterceptor.intercept = spy
    try:
        frame = run_layer_sensitivity(qmodel, images, labels)
    finally:
        QuantInterceptor.intercept = original_intercept
    assert frame["layer"].tolist() == [0, 1, 2, 3] and set(seen) == {0, 1, 2, 3}
    assert frame.attrs["fp_top1"] == pytest.approx(top1(model, images, labels))
    assert (frame["drop_vs_fp"] == frame.attrs["fp_top1"] - frame["top1"]).all()
    with torch.no_grad():
        assert torch.equal(qmodel(images[:4]), before)  # the run's own interceptor is back
    only_first = {k.replace(":", "."): q for k, q in qmodel.quantizers.items() if k.startswith("layers:0:")}
    with intercepting(qmodel.model, QuantInterceptor(only_first)):
        assert frame["top1"][0] == pytest.approx(top1(qmodel, images, labels))


@pytest.fixture(scope="module")
def tiny_ouromamba():
    torch.manual_seed(0)
    cfg = VimConfig(img_size=28, patch_size=4, stride=4, in_chans=1, num_classes=10, embed_dim=16, depth=2)
    model, images = VisionMamba(cfg).eval(), torch.randn(6, 1, 28, 28)
    config = static_config(method="ouromamba", w_bits=8, a_bits=4, n_refresh=10, quantize_state=True)
    return model, quantize(model, config, images[:4]), images


def test_growing_steps_count_where_a_window_list_gains_a_channel():
    """Steps 0 and 2 of the first window grow the list, step 1 repeats it; the second window starts empty, so
    its first step grows whatever the first window ended with; a step that only keeps the list grows nothing."""
    mask = torch.zeros(1, 6, 4, dtype=torch.bool)
    mask[0, 0, 1] = mask[0, 1, 1] = True  # step 0 grows, step 1 keeps
    mask[0, 2, [1, 3]] = True  # step 2 grows
    mask[0, 3, [1, 3]] = True  # window 2 (n_refresh 3) starts: step 3 grows from empty
    mask[0, 4, [1, 3]] = True
    mask[0, 5, [0, 1, 3]] = True
    assert growing_steps(mask, 3).tolist() == [[True, False, True, True, False, True]]
    timeline = outlier_timeline(torch.randn(2, 6, 4), OutlierParams(k=3.0, n_refresh=3, static_scale=0.01))
    assert timeline.windows["growing_steps"].between(0, 3).all()


def test_dynamic_outlier_summary_ranks_sites_of_an_ouromamba_model(tiny_ouromamba):
    model, qmodel, images = tiny_ouromamba
    summary = dynamic_outlier_summary(qmodel, images, batch_size=3)
    per_layer = 1 + 2 * 5 + 1  # in_proj, (x_proj, dt_proj, delta_pre, B, C) per direction, out_proj
    assert len(summary) == 2 * per_layer and not summary["tensor"].isin(["A", "D", "h"]).any()
    assert {"layer", "direction", "tensor", "outlier_channels_per_token", "olist_size",
            "new_channels_vs_previous_window"} <= set(summary.columns)
    assert (summary["olist_size"] >= summary["outlier_channels_per_token"] - 1e-9).all()  # lists only grow
    assert summary["growing_steps_per_window"].between(0, 10).all() and summary["growing_steps_per_window"].max() > 0
    # what the outlier channels buy: the site's SQNR as quantized against every channel on its 4-bit grid
    report = error_report(model, qmodel, images, batch_size=3).set_index("site")
    assert summary.set_index("site")["sqnr_db"].to_numpy() == pytest.approx(
        report.loc[summary["site"], "sqnr_db"].to_numpy(), rel=1e-9)
    flagging = summary[summary["outlier_channels_per_token"] > 0.5]
    assert len(flagging) and (flagging["sqnr_db"] > flagging["sqnr_db_without_outliers"]).all()
    site = "layers.1.fwd.x_proj.input"
    row = summary.set_index("site").loc[site]
    x = capture_quantizer_inputs(qmodel, images, [site], batch_size=3)[site]
    timeline = outlier_timeline(x[:3], quantizer_at(qmodel, site))
    second = outlier_timeline(x[3:], quantizer_at(qmodel, site))
    per_token = (timeline.steps["outlier_channels"].mean() + second.steps["outlier_channels"].mean()) / 2
    assert row["outlier_channels_per_token"] == pytest.approx(per_token)
    with_ad = dynamic_outlier_summary(qmodel, images[:2], include_single_token=True)
    assert with_ad["tensor"].isin(["A", "D"]).sum() == 8
    ptq = quantize(model, static_config(method="dynamic_per_token"), images[:2])
    with pytest.raises(StudioError, match="outlier channels"):
        dynamic_outlier_summary(ptq, images[:2])
    with pytest.raises(StudioError, match="keeps no outlier"):
        outlier_timeline(x, quantizer_at(ptq, site))


def test_error_report_covers_scan_states_quantized_inside_the_recurrence(tiny_ouromamba):
    model, qmodel, images = tiny_ouromamba
    report = error_report(model, qmodel, images[:4], batch_size=3).set_index("site")
    assert len(report) == len(qmodel.quantizers)
    states = report[report["tensor"] == "h"]
    assert sorted(states.index) == sorted(f"layers.{i}.{d}.h" for i in range(2) for d in ("fwd", "bwd"))
    assert states["sqnr_db"].map(math.isfinite).all() and (states["sqnr_db"] > 0).all()
    site = "layers.0.bwd.h"
    h = capture_quantizer_inputs(qmodel, images[:4], [site], batch_size=3)[site]
    assert h.shape == (4, 50, 32, 16)
    quantizer = qmodel.quantizers[site.replace(".", ":")]
    hq = torch.stack([quantizer.quantize_step(t, h[:, t]) for t in range(50)], dim=1)
    assert states.loc[site, "sqnr_db"] == pytest.approx(sqnr_db(h, hq))
    assert torch.equal(capture(qmodel, images[:4], [site], record_states=True)[site], hq)


def test_state_outliers_sees_every_channel_state_pair_and_calibrates_a_rule(default_setup):
    model, qmodel, images, data = default_setup
    states, quantizer = state_outliers(qmodel, "layers.1.fwd.h", images[:6], data.normalized(0, 3), bits=4)
    cfg = model.cfg
    assert states.shape == (3, cfg.seq_len, cfg.d_inner * cfg.d_state)
    assert quantizer.scale.shape == (cfg.seq_len,) and (quantizer.scale > 0).all()
    # the states are the scan's own (the recorded h of the inspected images), the rule calibrated on the others'
    site = "layers.1.fwd.h"
    inspected, calibration = (capture(qmodel, batch, [site], record_states=True)[site].flatten(2)
                              for batch in (data.normalized(0, 3), images[:6]))
    assert torch.equal(states, inspected)
    for values, same in ((calibration, True), (inspected, False)):
        rule = OutlierAwareQuantizer(4, 8, k=3.0, n_refresh=10)
        rule.calibrate(values)
        assert torch.equal(rule.scale, quantizer.scale) is same
    timeline = outlier_timeline(states, rule_of(quantizer, k=3.0, n_refresh=10))
    assert timeline.mask.shape == states.shape
    with pytest.raises(StudioError, match="not a scan-state site"):
        state_outliers(qmodel, "layers.1.fwd.B", images[:2], images[:2], bits=4)


def test_decay_is_the_factor_the_scan_state_decays_by_at_each_step(default_setup):
    """Ā from decay_outliers drives the recurrence the scan computes: h_t = Ā_t ⊙ h_{t−1} + Δ_t u_t B_t."""
    model, qmodel, images, data = default_setup
    site, cfg = "layers.1.bwd", model.cfg
    batch = data.normalized(0, 3)
    decay, quantizer = decay_outliers(model, f"{site}.{DECAY}", images[:6], batch, bits=4)
    assert decay.shape == (3, cfg.seq_len, cfg.d_inner * cfg.d_state) and ((decay > 0) & (decay <= 1)).all()
    assert quantizer.scale.shape == (cfg.seq_len,) and (quantizer.scale > 0).all()
    names = [f"{site}.{t}" for t in ("h", "x_proj.input", "B", "delta_pre")]
    h, u, b, delta_pre = (capture(model, batch, names, record_states=True)[n].double() for n in names)
    decay = decay.double().reshape(h.shape)
    previous = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
    driven = F.softplus(delta_pre)[..., None] * u[..., None] * b[:, :, None, :]
    torch.testing.assert_close(decay * previous + driven, h, rtol=1e-4, atol=1e-5)
    with pytest.raises(StudioError, match="not a decay site"):
        decay_outliers(model, f"{site}.h", images[:2], images[:2], bits=4)


def test_quantizer_inputs_bytes_is_what_a_capture_holds(default_setup):
    model, qmodel, _, data = default_setup
    captured = capture_quantizer_inputs(qmodel, data.normalized(0, 3))
    activations = [t for name, t in captured.items() if not name.endswith((".weight", ".A", ".D"))]
    assert quantizer_inputs_bytes(model.cfg, 3) == sum(t.numel() * t.element_size() for t in activations)


def sensitivity_frame(drops: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"layer": range(len(drops)), "top1": [90 - d for d in drops], "drop_vs_fp": drops})


def test_precision_suggestion_raises_the_fewest_layers_that_carry_the_loss():
    w4a4 = QuantConfig(w_bits=4, a_bits=4)
    assert precision_suggestion(sensitivity_frame([0.2, 6.0, 1.0, 0.5]), w4a4) == {
        "layers.1.*": {"w_bits": 8, "a_bits": 8}}
    # evenly spread loss: at most a quarter of the layers (rounded up), most costly first
    spread = sensitivity_frame([1.0, 1.2, 1.1, 0.9, 1.0, 1.3, 0.8, 1.0])
    assert list(precision_suggestion(spread, w4a4)) == ["layers.1.*", "layers.5.*"]
    assert precision_suggestion(sensitivity_frame([0.3, 0.1, -0.4, 0.0]), w4a4) == {}  # no layer costs 0.5 points
    assert precision_suggestion(sensitivity_frame([5.0, 0.0]), QuantConfig(w_bits=8, a_bits=8)) == {}
    mine = QuantConfig(w_bits=4, a_bits=4, overrides={"*.out_proj.*": {"skip": True}})
    assert precision_suggestion(sensitivity_frame([0.0, 3.0]), mine) == {
        "*.out_proj.*": {"skip": True}, "layers.1.*": {"w_bits": 8, "a_bits": 8}}
    already = QuantConfig(w_bits=4, a_bits=4, overrides={"layers.1.*": {"w_bits": 8, "a_bits": 8}})
    assert precision_suggestion(sensitivity_frame([0.0, 3.0]), already) == {}
    # the run's own pattern for that layer moves last, where a broader pattern after it can no longer lower it
    lowered = QuantConfig(w_bits=4, a_bits=4, overrides={"layers.1.*": {"a_bits": 6}, "*.in_proj.*": {"w_bits": 4}})
    suggestion = precision_suggestion(sensitivity_frame([0.0, 3.0]), lowered)
    assert list(suggestion.items()) == [("*.in_proj.*", {"w_bits": 4}), ("layers.1.*", {"w_bits": 8, "a_bits": 8})]
    assert QuantConfig(w_bits=4, a_bits=4, overrides=suggestion).for_site("layers.1.in_proj.weight").w_bits == 8


def test_suggested_precision_comes_from_calibration_images_without_labels(default_setup):
    """suggest_precision measures each layer by the calibration images' FP predictions it alone changes."""
    model, _, images, data = default_setup
    config = static_config(w_bits=4, a_bits=4)
    qmodel = quantize(model, config, images[:8])
    calib = data.normalized(0, 64)
    suggestion = suggest_precision(qmodel, calib, config)
    with torch.no_grad():
        fp = model(calib).argmax(-1)
    frame = run_layer_sensitivity(qmodel, calib, fp)
    assert frame.attrs["fp_top1"] == 100.0  # agreement with its own predictions
    assert suggestion == precision_suggestion(frame, config)


def _restored(scale: torch.Tensor, zero_point: torch.Tensor | None = None, outlier_bits: int = 8
              ) -> OutlierAwareQuantizer:
    quantizer = OutlierAwareQuantizer(4, outlier_bits, k=3.0, n_refresh=10, asymmetric=zero_point is not None)
    quantizer.restore(scale, zero_point)
    return quantizer


def test_quantize_with_its_own_mask_is_the_forward_and_with_none_the_inlier_grid_alone():
    torch.manual_seed(0)
    x = torch.randn(3, 20, 32)
    x[:, :, 5] *= 30  # a planted outlier channel
    quantizer = OutlierAwareQuantizer(4, 8, k=3.0, n_refresh=10)
    quantizer.calibrate(x)
    assert torch.equal(quantizer.quantize_with(x, quantizer.masks(x)), quantizer(x))
    static = PerTokenStaticQuantizer(4)
    static.restore(quantizer.scale.detach())
    assert torch.equal(quantizer.quantize_with(x, torch.zeros_like(x, dtype=torch.bool)), static(x))


def test_quantization_grid_counts_clipped_values_and_what_the_outliers_buy():
    """S^I = 1 at every step, 4 bits (codes −7…7): 7.4 rounds onto the grid, 7.6 and −9 fall off it; the
    outlier channel holds 100, far off the grid, and on its own 8-bit grid costs almost nothing."""
    x = torch.full((2, 3, 4), 0.5)
    x[0, 0, 0], x[0, 1, 1], x[1, 2, 2] = 7.4, 7.6, -9.0
    x[:, :, 3] = 100.0
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, :, 3] = True
    view = quantization_grid(x, _restored(torch.ones(3)), mask)
    assert view.codes == (-7, 7)
    assert view.histogram["inlier"].sum() == 18 and view.histogram["outlier"].sum() == 6
    assert view.clipped == pytest.approx(2 / 18)
    assert view.steps["clipped"].tolist() == pytest.approx([0, 1 / 6, 1 / 6])
    assert view.steps["outlier_share"].tolist() == pytest.approx([0.25] * 3)
    assert view.steps["static_scale"].tolist() == [1.0] * 3
    assert view.steps["token_scale"].tolist() == pytest.approx([100 / 7] * 3)  # what the token alone would need
    assert view.steps["inlier_token_scale"].tolist() == pytest.approx([7.4 / 7, 7.6 / 7, 9 / 7])
    assert view.steps["outlier_scale"].tolist() == pytest.approx([100 / 127] * 3)
    # every channel on the inlier grid: 100 becomes 7; the step's SQNR from its own slice, independently
    inlier_grid = torch.clamp(torch.round(x), -7, 7)
    for t in range(3):
        assert view.steps["sqnr_db_without_outliers"][t] == pytest.approx(sqnr_db(x[:, t], inlier_grid[:, t]))
    assert view.sqnr_db_without_outliers == pytest.approx(sqnr_db(x, inlier_grid))
    assert view.sqnr_db > view.sqnr_db_without_outliers + 30
    # one image: the same as the view of that image alone
    alone = quantization_grid(x[1:], _restored(torch.ones(3)), mask[1:])
    chosen = quantization_grid(x, _restored(torch.ones(3)), mask, image=1)
    pd.testing.assert_frame_equal(chosen.steps, alone.steps)
    assert chosen.clipped == alone.clipped == pytest.approx(1 / 9)


def test_quantization_grid_in_chunks_of_images_equals_one_pass(monkeypatch):
    """Large tensors (a scan state) go through a few images at a time; every number is the same."""
    torch.manual_seed(0)
    x = torch.randn(5, 20, 32)
    x[:, :, 3] *= 40
    quantizer = OutlierAwareQuantizer(4, 8, k=3.0, n_refresh=10)
    quantizer.calibrate(x)
    mask = quantizer.masks(x)
    whole = quantization_grid(x, quantizer, mask)
    monkeypatch.setattr(grid, "CHUNK_VALUES", 2 * 20 * 32)  # two images a chunk: chunks of 2, 2, 1
    chunked = quantization_grid(x, quantizer, mask)
    pd.testing.assert_frame_equal(chunked.histogram, whole.histogram)
    pd.testing.assert_frame_equal(chunked.steps, whole.steps, rtol=1e-12)
    assert (chunked.sqnr_db, chunked.clipped) == pytest.approx((whole.sqnr_db, whole.clipped), rel=1e-12)
    assert whole.histogram["outlier"].sum() == mask.sum() > 0


def test_quantization_grid_of_an_unsigned_grid_counts_in_codes_from_its_zero_point():
    """Δ's grid: step 0.5, zero point 4, 4 bits: codes 0…15 cover x ∈ [−2, 5.5]; −2 is code 0, 6 falls off."""
    x = torch.tensor([[[-2.0, 0.0, 5.5, 6.0]]])
    view = quantization_grid(x, _restored(torch.tensor([0.5]), torch.tensor([4.0])), torch.zeros_like(x, dtype=bool))
    assert view.codes == (0, 15)
    bins = view.histogram
    centres = ((bins["bin_left"] + bins["bin_right"]) / 2)[bins["inlier"] > 0]
    assert centres.tolist() == pytest.approx([0, 4, 15, 16], abs=(bins["bin_right"] - bins["bin_left"]).iloc[0])
    assert view.clipped == pytest.approx(1 / 4) and math.isnan(view.steps["outlier_scale"][0])


def test_quantization_grid_refuses_a_mask_of_another_shape_and_sites_without_outliers():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="the mask is"):
        quantization_grid(x, _restored(torch.ones(3)), torch.zeros(2, 3, 5, dtype=torch.bool))
    plain = PerTokenStaticQuantizer(4)
    plain.restore(torch.ones(3))
    with pytest.raises(StudioError, match="keeps no outlier channels"):
        quantization_grid(x, plain, torch.zeros_like(x, dtype=torch.bool))


@pytest.mark.parametrize("per_tensor, group_size", [(False, 0), (False, 2), (True, 0)])
def test_weight_grid_measures_each_output_channel_in_its_own_steps(per_tensor: bool, group_size: int):
    """4 bits: one scale per output channel (or group, or tensor); a weight set to 7.6 steps is clipped."""
    torch.manual_seed(0)
    weight = torch.randn(6, 4)
    quantizer = WeightQuantizer(weight, 4, group_size=group_size, per_tensor=per_tensor)
    scale = quantizer.scale.detach().expand(6, 4 // (group_size or 4), 1)
    weight[2, 1] = 7.6 * scale[2, 1 // (group_size or 4), 0]
    view = weight_grid(weight, quantizer)
    codes = (weight.reshape(6, -1, group_size or 4) / scale).reshape(6, 4)
    assert view.codes == (-7, 7) and view.histogram["count"].sum() == 24
    assert view.channels["max_code"].tolist() == pytest.approx(codes.abs().amax(1).tolist())
    assert view.channels["scale"].tolist() == pytest.approx(scale.reshape(6, -1).amax(1).tolist())
    clipped = (codes.abs() > 7.5).float()
    assert view.channels["clipped"].tolist() == pytest.approx(clipped.mean(1).tolist()) and clipped[2, 1] == 1
    assert view.clipped == pytest.approx(float(clipped.mean()))
    assert view.channels["sqnr_db"][0] == pytest.approx(sqnr_db(weight[0], quantizer(weight)[0]))
    assert view.sqnr_db == pytest.approx(sqnr_db(weight, quantizer(weight)))


def test_a_channel_whose_scale_fell_below_zero_is_named_and_kept_out_of_the_histogram():
    """Reconstruction can leave a scale below zero (docs/method-decisions.md, "scales that cross zero"): at the
    floor its weights measure millions of steps, which stretched the histogram past reading."""
    torch.manual_seed(0)
    weight = torch.randn(6, 4)
    quantizer = WeightQuantizer(weight, 4)
    with torch.no_grad():
        quantizer.scale[3] = -0.004
    view = weight_grid(weight, quantizer)
    assert view.channels["floored"].tolist() == [False, False, False, True, False, False]
    assert view.histogram["count"].sum() == 20 and view.histogram["bin_right"].max() < 10
    assert view.channels["max_code"][3] > 1e6  # the channel's own numbers stay what they are


def test_weight_grids_cover_every_quantized_projection_in_forward_order(tiny_ouromamba):
    model, qmodel, _ = tiny_ouromamba
    views = weight_grids(qmodel)
    weights = [site.name for site in quantized_sites(model) if site.tensor.endswith(".weight")]
    assert list(views) == weights and len(views) == model.cfg.depth * 6
    assert views["layers.0.in_proj.weight"].histogram["count"].sum() == model.layers[0].mixer.in_proj.weight.numel()
    assert views["layers.1.bwd.x_proj.weight"].codes == (-127, 127)  # the run's 8-bit weights
