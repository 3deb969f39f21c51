"""OuroMamba-Gen: enhanced implicit attention, loss terms, the generation loop, saved sets."""

import copy
import json
import threading

import numpy as np
import pytest
import torch

from core.data import calibration_images
from core.default_model import load_default_model
from core.errors import StudioError
from core.eval import Cancelled
from core.gen import GenConfig, attention_maps, attention_rows, generate, patch_features, save_generated, trace_scans
from core.gen.attention import drop_cls, neighbour_tokens, neighbourhood_matrix, neighbourhood_mean
from core.gen.generate import class_balanced_targets, load_manifest, saved_sets
from core.gen.losses import patch_contrastive_loss, similarity_entropy_loss


@pytest.fixture(scope="module")
def model():
    return load_default_model()[0]


@pytest.fixture(scope="module")
def traces(model):
    images = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return trace_scans(model, images, [0, 2])[1]


@pytest.mark.parametrize("neighbourhood", [1, 3, 5])
def test_patch_features_are_the_enhanced_attention_applied_to_the_input(model, traces, neighbourhood):
    """y_p(t) = C_t · h_p(t) (from the states) must equal Σ_τ α_p(t, τ) u_τ (from the attention row, built
    independently from Δ, A, B, C in float64), per channel, for both directions and border/centre patches."""
    cfg = model.cfg
    for trace in traces:
        features = patch_features(trace, cfg.cls_position, cfg.grid_size, neighbourhood)
        u = trace.token_order(trace.u)[2].double()
        for patch in (0, 6, 23, 24, 48):
            plain, enhanced = attention_rows(trace, patch, cfg.cls_position, cfg.grid_size, neighbourhood, sample=2)
            row = plain if neighbourhood == 1 else enhanced
            expected = features[2, patch].double()
            assert torch.linalg.norm((row.double() * u).sum(0) - expected) < 1e-5 * torch.linalg.norm(expected)
            if neighbourhood == 1:
                assert torch.equal(plain, enhanced)


def test_attention_is_causal_in_scan_order(model, traces):
    cfg = model.cfg
    forward, backward = (next(t for t in traces if t.direction == d and t.layer == 0) for d in ("fwd", "bwd"))
    token = 10  # patch 10 is token 10 (before the middle CLS at 24)
    plain_fwd, _ = attention_rows(forward, token, cfg.cls_position, cfg.grid_size, 1)
    plain_bwd, _ = attention_rows(backward, token, cfg.cls_position, cfg.grid_size, 1)
    assert plain_fwd[token + 1:].abs().max() == 0 and plain_fwd[: token + 1].abs().max() > 0
    assert plain_bwd[:token].abs().max() == 0 and plain_bwd[token:].abs().max() > 0


def test_neighbourhoods_skip_the_middle_cls_token(model):
    cfg = model.cfg  # 7×7 grid, CLS at token 24
    assert cfg.cls_position == 24
    assert neighbour_tokens(23, 7, 1, 24) == [23] and neighbour_tokens(24, 7, 1, 24) == [25]
    assert sorted(neighbour_tokens(0, 7, 5, 24)) == [0, 1, 2, 7, 8, 9, 14, 15, 16]
    matrix = neighbourhood_matrix(7, 5)
    assert torch.equal(matrix, matrix.T) and matrix.sum(1)[0] == 9 and matrix.sum(1)[24] == 25


def test_neighbourhood_mean_matches_a_hand_computed_3x3_grid():
    """Patches 0..8 on a 3×3 grid, values v_k = k, weights w_k = k + 1: a corner averages its 4 neighbours, an
    edge its 6, the centre all 9, each weighted by w."""
    values = torch.arange(9, dtype=torch.float64).reshape(1, 9, 1)
    weights = torch.arange(1, 10, dtype=torch.float64).reshape(1, 9)
    mean = neighbourhood_mean(values, weights, grid=3, size=3)[0, :, 0]
    corner = (0 * 1 + 1 * 2 + 3 * 4 + 4 * 5) / (1 + 2 + 4 + 5)
    edge = (0 * 1 + 1 * 2 + 2 * 3 + 3 * 4 + 4 * 5 + 5 * 6) / (1 + 2 + 3 + 4 + 5 + 6)  # patch 1, top edge
    centre = sum(k * (k + 1) for k in range(9)) / sum(range(1, 10))
    torch.testing.assert_close(mean[[0, 1, 4]], torch.tensor([corner, edge, centre], dtype=torch.float64))
    tokens = torch.arange(10).reshape(1, 10)  # 9 patches with the CLS token inserted at 9 // 2 = 4
    assert drop_cls(tokens, 4).tolist() == [[0, 1, 2, 3, 5, 6, 7, 8, 9]]


def test_neighbourhood_mean_builds_its_mask_on_the_inputs_device():
    """The meta device stands in for CUDA: a mask built on the CPU would fail to combine with it."""
    values, weights = torch.empty(2, 9, 4, device="meta"), torch.empty(2, 9, device="meta")
    assert neighbourhood_mean(values, weights, grid=3, size=3).device.type == "meta"


def test_features_of_an_image_do_not_depend_on_the_rest_of_the_batch(model):
    """Δ-weights are normalised per image (the release normalises across the batch)."""
    cfg = model.cfg
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = trace_scans(model, images[:1], [1])[1]
        together = trace_scans(model, images, [1])[1]
    for a, b in zip(alone, together, strict=True):
        fa = patch_features(a, cfg.cls_position, cfg.grid_size, 5)
        fb = patch_features(b, cfg.cls_position, cfg.grid_size, 5)
        torch.testing.assert_close(fa[0], fb[0], rtol=1e-4, atol=1e-6)


def test_attention_maps_on_the_patch_grid(model):
    image = torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(2))
    cls_maps = attention_maps(model, image, layer=3, direction="bwd", query="cls")
    assert cls_maps["plain"].shape == (7, 7) and torch.equal(cls_maps["plain"], cls_maps["enhanced"])
    patch_maps = attention_maps(model, image, layer=1, direction="fwd", query=30, neighbourhood=3)
    assert not torch.allclose(patch_maps["plain"], patch_maps["enhanced"])
    assert patch_maps["plain"].flatten()[31:].max() == 0  # causal: nothing after patch 30 in the forward scan
    with pytest.raises(StudioError, match="query"):
        attention_maps(model, image, layer=1, direction="fwd", query=49)
    for layer in (4, 1.5, "3", True):
        with pytest.raises(StudioError, match="layers must be indices in 0..3"):
            attention_maps(model, image, layer=layer, direction="fwd")
    with pytest.raises(StudioError, match=r"one image shaped \(channels, height, width\), got \(1, 1, 28, 28\)"):
        attention_maps(model, image[None], layer=0, direction="fwd")
    with pytest.raises(StudioError, match="the query must be 'cls' or a patch index in 0..48, got True"):
        attention_maps(model, image, layer=0, direction="fwd", query=True)
    with pytest.raises(StudioError, match="the neighbourhood must be an odd size"):
        attention_maps(model, image, layer=0, direction="fwd", query=3, neighbourhood=5.0)
    assert torch.equal(attention_maps(model, image, layer=0, direction="fwd", query=np.int64(30))["enhanced"],
                       attention_maps(model, image, layer=0, direction="fwd", query=30)["enhanced"])
    with pytest.raises(StudioError, match="direction"):
        attention_maps(model, image, layer=0, direction="up")


def test_generation_and_attention_maps_give_a_training_model_back_in_training_mode(model):
    training = copy.deepcopy(model).train()
    generate(training, GenConfig(source="noise", count=1))
    generate(training, GenConfig(count=1, iterations=1))
    attention_maps(training, torch.randn(1, 28, 28), layer=0, direction="fwd")
    assert all(module.training for module in training.modules())


def test_contrastive_loss_matches_the_formula():
    features = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(3))
    temperature, top_k = 0.5, 2
    unit = torch.nn.functional.normalize(features, dim=-1)
    expected = []
    for image in unit:
        for anchor in range(6):
            others = [j for j in range(6) if j != anchor]
            sims = torch.stack([image[anchor] @ image[j] for j in others]) / temperature
            positives = sims.topk(top_k).values
            expected.append(torch.logsumexp(sims, 0) - torch.logsumexp(positives, 0))
    loss = patch_contrastive_loss(features, top_k, temperature)
    torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_contrastive_loss_prefers_clustered_patches():
    generator = torch.Generator().manual_seed(4)
    centres = torch.randn(4, 16, generator=generator) * 3
    clustered = centres.repeat_interleave(12, 0)[None] + 0.1 * torch.randn(1, 48, 16, generator=generator)
    scattered = torch.randn(1, 48, 16, generator=generator)
    assert patch_contrastive_loss(clustered, 11, 0.2) < 0.5 * patch_contrastive_loss(scattered, 11, 0.2)


def test_similarity_entropy_is_higher_for_diverse_patches():
    generator = torch.Generator().manual_seed(5)
    diverse = torch.randn(1, 30, 16, generator=generator)
    alike = torch.ones(1, 30, 16) + 0.05 * torch.randn(1, 30, 16, generator=generator)
    assert similarity_entropy_loss(diverse) < similarity_entropy_loss(alike)  # the loss is −entropy


def test_class_balanced_targets():
    targets = class_balanced_targets(25, 10, torch.Generator().manual_seed(0))
    assert sorted(torch.bincount(targets, minlength=10).tolist()) == [2] * 5 + [3] * 5


def test_generation_is_seeded_reports_progress_and_leaves_the_model_alone(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = GenConfig(count=6, iterations=4, batch_size=4, preview_every=2, layers=(0, 3))
    updates = []
    first = generate(model, config, progress=updates.append)
    second = generate(model, config)
    assert torch.equal(first.images, second.images)
    assert first.images.shape == (6, 1, 28, 28) and len(first.targets) == 6
    assert [(u.batch, u.iteration) for u in updates] == [(b, i) for b in range(2) for i in range(1, 5)]
    assert {"total", "output", "contrastive"} <= set(updates[0].losses)
    assert [u.preview is not None for u in updates[:4]] == [True, False, True, True]  # 1, 3 and the last
    assert updates[-1].fraction == 1.0 and len(first.history) == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    low, high = (0 - 0.2860) / 0.3530, (1 - 0.2860) / 0.3530
    assert torch.isfinite(first.images).all()
    assert first.images.min() >= low - 1e-6 and first.images.max() <= high + 1e-6


def test_the_contrastive_loss_falls(model):
    result = generate(model, GenConfig(count=4, iterations=12, output_weight=0, lr=0.2, max_shift=0, flip=False))
    contrastive = [h["contrastive"] for h in result.history]
    assert contrastive[-1] < 0.9 * contrastive[0]


def test_the_output_loss_drives_images_to_their_targets(model):
    result = generate(model, GenConfig(source="output_only", count=8, iterations=30, lr=0.2, seed=1, max_shift=0,
                                       flip=False))
    assert result.history[-1]["output"] < 0.5 * result.history[0]["output"]
    assert result.predictions == result.targets and min(result.confidences) > 0.5


def test_each_source_uses_its_own_losses(model):
    for source, terms in (("ouromamba", {"contrastive", "output"}), ("output_only", {"output"}),
                          ("psaq", {"pse", "output"})):
        result = generate(model, GenConfig(source=source, count=2, iterations=1))
        assert set(result.history[0]) == terms | {"total"}
    assert set(GenConfig(output_weight=0).weights) == {"contrastive"}  # the L^C-only ablation
    noise = generate(model, GenConfig(source="noise", count=3, iterations=50))
    torch.testing.assert_close(noise.images, torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert noise.history == []


def test_generation_can_be_cancelled(model):
    cancel = threading.Event()

    def stop_after_two(update):
        if update.iteration == 2:
            cancel.set()

    with pytest.raises(Cancelled, match="iteration 2 of 10"):
        generate(model, GenConfig(count=2, iterations=10), progress=stop_after_two, cancel=cancel)
    assert all(p.requires_grad for p in model.parameters())


def test_saved_sets_are_calibration_sources(model, tmp_path):
    result = generate(model, GenConfig(source="output_only", count=5, iterations=2, seed=3))
    folder = save_generated(result, tmp_path / "set")
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert len(pngs) == 5 and pngs[0] == f"00000_class{result.targets[0]}.png"
    manifest = load_manifest(folder)
    assert manifest["config"]["seed"] == 3 and manifest["config"]["source"] == "output_only"
    assert [i["target"] for i in manifest["images"]] == result.targets and "torch" in manifest["versions"]
    images = calibration_images(folder, 5, seed=0)  # a Path or its text
    assert images.shape == (5, 1, 28, 28) and torch.equal(images, calibration_images(str(folder), 5, seed=0))
    one_level = 1 / 255 / 0.3530
    reloaded = {float(img.sum()) for img in images}
    assert all(min(abs(r - float(img.sum())) for r in reloaded) < one_level * 28 * 28 for img in result.images)
    (tmp_path / "not-a-set").mkdir()
    assert saved_sets(tmp_path, tmp_path / "missing") == [folder]

    smaller = generate(model, GenConfig(source="noise", count=2, seed=4))
    with pytest.raises(StudioError, match="already holds files: name a new or empty folder"):
        save_generated(smaller, folder)  # the two sets would calibrate as one
    assert len(list(folder.glob("*.png"))) == 5
    save_generated(smaller, folder, replace=True)  # the old set's images go: none stays to mix in
    assert sorted(p.name for p in folder.glob("*.png")) == ["00000.png", "00001.png"]
    (tmp_path / "not-a-set" / "notes.txt").write_text("mine")
    with pytest.raises(StudioError, match="holds files besides a saved set"):
        save_generated(smaller, tmp_path / "not-a-set", replace=True)
    assert (tmp_path / "not-a-set" / "notes.txt").read_text() == "mine"
    (folder / "manifest.json").write_text(json.dumps({"config": {"source": "dream"}}))
    with pytest.raises(StudioError, match="unknown image source"):
        load_manifest(folder)


@pytest.mark.parametrize("overrides, message", [
    ({"neighbourhood": 9}, "larger than the model's 7×7 patch grid"), ({"top_k": 49}, "top-K .49. must be below"),
])
def test_settings_that_do_not_fit_the_model_are_rejected(model, overrides, message):
    with pytest.raises(StudioError, match=message):
        generate(model, GenConfig(count=1, iterations=1, **overrides))


@pytest.mark.parametrize("overrides, message", [
    ({"neighbourhood": 4}, "odd size"), ({"source": "dream"}, "unknown image source"),
    ({"count": 0}, "count must be at least 1"), ({"output_weight": -1}, "output_weight must be a finite number ≥ 0"),
    ({"output_weight": float("nan")}, "output_weight must be a finite"), ({"lr": float("inf")}, "lr must be a finite"),
    ({"contrastive_weight": float("inf")}, "contrastive_weight must be a finite"),
    ({"temperature": 0}, "temperature must be a finite number > 0"), ({"output_loss": "l3"}, "output loss"),
    ({"contrastive_weight": 0, "output_weight": 0}, "every loss weight this source uses is 0"),
    ({"source": "output_only", "output_weight": 0}, "give λ output a value above 0"),
    ({"seed": -1}, "the seed must be"),
    ({"count": 2.5}, r"count = 2.5 \(expected int\)"), ({"top_k": "12"}, "top_k = '12'"),
    ({"layers": 3}, r"layers = 3 \(expected tuple"), ({"layers": (1.5,)}, "layers must be whole layer numbers"),
])
def test_bad_configs_are_rejected_in_one_line(overrides, message):
    with pytest.raises(StudioError, match=message):
        GenConfig(**overrides)


def test_zero_weights_are_fine_where_nothing_is_optimised():
    assert GenConfig(source="noise", contrastive_weight=0, output_weight=0).source == "noise"
    assert GenConfig(contrastive_weight=0, output_weight=0, iterations=0).iterations == 0


def test_manifests_record_only_the_settings_that_shaped_the_images(model, tmp_path):
    """A noise or real set records source, count and seed, not a schedule it never ran; an output-only set
    records no contrastive setting; settings a source ignores are not checked against the model either."""
    unused = {"iterations": 7, "lr": 0.5, "neighbourhood": 9, "top_k": 49, "layers": (99,), "contrastive_weight": 3}
    noise = generate(model, GenConfig(source="noise", count=2, seed=4, **unused))
    assert noise.manifest()["config"] == {"source": "noise", "count": 2, "seed": 4}
    real = generate(model, GenConfig(source="real", count=2, seed=4, **unused))
    assert set(real.manifest()["config"]) == {"source", "count", "seed"} and len(real.images) == 2
    unscheduled = GenConfig(count=2, iterations=0, neighbourhood=9).shaping()
    assert unscheduled == {"source": "ouromamba", "count": 2, "iterations": 0, "seed": 0}
    output_only = generate(model, GenConfig(source="output_only", count=2, iterations=1, neighbourhood=9))
    shaping = output_only.manifest()["config"]
    assert shaping["iterations"] == 1 and shaping["output_loss"] == "ce" and shaping["lr"] == 0.1
    assert not {"neighbourhood", "top_k", "contrastive_weight", "layers", "pse_weight", "preview_every"} & set(shaping)
    assert {"neighbourhood", "top_k", "temperature", "layers"} <= set(GenConfig(iterations=1).shaping())
    assert "output_loss" not in GenConfig(iterations=1, output_weight=0).shaping()
    saved = load_manifest(save_generated(noise, tmp_path / "noise"))  # the defaults fill in what is not recorded
    assert GenConfig.from_dict(saved["config"]).source == "noise"
