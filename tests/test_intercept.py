"""Interception sites: right names, shapes and time order per direction; free and exact when empty."""

import torch

from core.intercept import (
    DIRECTIONAL_TENSORS,
    SHARED_TENSORS,
    Chain,
    Interceptor,
    Recorder,
    Site,
    intercepting,
)
from core.models import VimConfig, VisionMamba


def model_and_input():
    torch.manual_seed(0)
    cfg = VimConfig(img_size=28, patch_size=4, stride=4, in_chans=1, num_classes=10, embed_dim=16, depth=2)
    return VisionMamba(cfg).eval(), torch.randn(3, 1, 28, 28)


def test_every_site_is_seen_with_the_documented_shape():
    model, x = model_and_input()
    L, D, E, R, N = 50, 16, 32, 1, 16
    with intercepting(model, Recorder(record_states=True)) as rec, torch.no_grad():
        model(x)
    expected_shared = {"in_proj.input": (3, L, D), "in_proj.weight": (2 * E, D),
                       "out_proj.input": (3, L, E), "out_proj.weight": (D, E)}
    expected_dir = {"x_proj.input": (3, L, E), "x_proj.weight": (R + 2 * N, E), "dt_proj.input": (3, L, R),
                    "dt_proj.weight": (E, R), "delta_pre": (3, L, E), "A": (E, N), "B": (3, L, N),
                    "C": (3, L, N), "D": (E,), "h": (3, L, E, N)}
    assert set(expected_shared) == set(SHARED_TENSORS) and set(expected_dir) == set(DIRECTIONAL_TENSORS)
    for layer in range(2):
        for tensor, shape in expected_shared.items():
            assert tuple(rec.tensors[Site(layer, tensor).name].shape) == shape
        for direction in ("fwd", "bwd"):
            for tensor, shape in expected_dir.items():
                assert tuple(rec.tensors[Site(layer, tensor, direction).name].shape) == shape, (tensor, direction)
    assert len(rec.tensors) == 2 * (4 + 2 * 10)


def test_backward_direction_sees_the_flipped_sequence():
    model, x = model_and_input()
    with intercepting(model, Recorder()) as rec, torch.no_grad():
        model(x)
    mixer = model.layers[0].mixer
    xz = rec.tensors["layers.0.in_proj.input"] @ mixer.in_proj.weight.T
    flipped_x = xz.flip(1)[..., :32]
    conv = torch.nn.functional.conv1d(flipped_x.transpose(1, 2), mixer.conv1d_b.weight, mixer.conv1d_b.bias,
                                      padding=3, groups=32)[..., :50]
    assert torch.allclose(rec.tensors["layers.0.bwd.x_proj.input"], torch.nn.functional.silu(conv).transpose(1, 2),
                          atol=1e-6)


def test_empty_and_pass_through_interceptors_change_nothing():
    model, x = model_and_input()
    with torch.no_grad():
        plain = model(x)
        with intercepting(model, Interceptor()):
            passed = model(x)
        with intercepting(model, Chain(Recorder(), Interceptor())):
            chained = model(x)
    assert torch.equal(plain, passed) and torch.equal(plain, chained)
    assert all(m.interceptor is None for m in model.modules() if hasattr(m, "interceptor"))


def test_state_interception_keeps_the_output_within_float_tolerance():
    model, x = model_and_input()
    with torch.no_grad():
        plain = model(x)
        with intercepting(model, Recorder(record_states=True)):
            stepped = model(x)  # states force the step-by-step scan
    assert torch.allclose(plain, stepped, atol=1e-5)


class ZeroSite(Interceptor):
    def __init__(self, name):
        self.name = name

    def intercept(self, site, x):
        return torch.zeros_like(x) if site.name == self.name else x


def test_a_replaced_tensor_changes_the_output():
    model, x = model_and_input()
    with torch.no_grad():
        plain = model(x)
        for name in ("layers.1.fwd.D", "layers.0.bwd.delta_pre", "layers.1.out_proj.weight"):
            with intercepting(model, ZeroSite(name)):
                assert not torch.allclose(model(x), plain), name


class ScaleStates(Interceptor):
    wants_states = True

    def __init__(self):
        self.steps = []

    def intercept_state(self, site, step, h):
        if site.name == "layers.0.fwd.h":
            self.steps.append(step)
            return h * 0
        return h


def test_states_can_be_replaced_inside_the_recurrence():
    model, x = model_and_input()
    with torch.no_grad():
        plain = model(x)
        with intercepting(model, ScaleStates()) as scaler:
            changed = model(x)
    assert scaler.steps == list(range(50))
    assert not torch.allclose(plain, changed)


def test_recorder_selects_by_name():
    model, x = model_and_input()
    with intercepting(model, Recorder(names=["layers.1.bwd.B"])) as rec, torch.no_grad():
        model(x)
    assert list(rec.tensors) == ["layers.1.bwd.B"]


class ScaleSite(Interceptor):
    def __init__(self, name, factor):
        self.name, self.factor = name, factor

    def intercept(self, site, x):
        return x * self.factor if site.name == self.name else x


def test_a_linear_input_site_feeds_only_its_linear():
    """Scaling x_proj's input and dividing its weight by the same factor must change nothing: the scan's
    u is not the x_proj input site's output (a smoothing scale there must not leak into the scan)."""
    model, x = model_and_input()
    with torch.no_grad():
        plain = model(x)
        with intercepting(model, Chain(ScaleSite("layers.0.fwd.x_proj.input", 3.0),
                                       ScaleSite("layers.0.fwd.x_proj.weight", 1 / 3.0))):
            scaled = model(x)
    assert torch.allclose(plain, scaled, atol=1e-5)
