"""The Triton selective scan against float64 references, and core's dispatch to it.

On the CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) at small, awkward shapes; the
interpreter's cost grows with programs × time steps, so shapes stay small. On a CUDA machine with
TRITON_INTERPRET=0 the same tests run compiled, and KERNELS_REAL_SHAPES=1 adds Vim-B-size cases
(scripts/gpu_session.sh). Outputs are poisoned with NaN before every kernel run, so an unwritten element fails.
Accuracy is ‖y − ref‖ / ‖ref‖ against float64 on the same (already rounded) inputs: the kernel computes in fp32,
so what remains is fp32 rounding, plus the output's rounding for fp16/bf16 outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.ssm import scan as core_scan
from kernels import selective_scan as scan_module
from kernels.selective_scan import launch_config, selective_scan, selective_scan_reference
from tests.test_kernels import DEVICE, real_shapes

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # by output dtype


def scan_inputs(batch: int, length: int, channels: int, n_state: int, seed: int, dtype: torch.dtype = torch.float32,
                delta_scale: float = 1.0, device: torch.device = DEVICE) -> dict[str, torch.Tensor]:
    """Random inputs in the kernel's layouts; the big ones in ``dtype``, the parameters in fp32. A in [−8, 0)
    (Vim's −exp(A_log) starts at −1 … −16); ``delta_scale`` 20 sends softplus past its threshold and exp(ΔA)
    to underflow."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    tensors = {"u": randn(batch, length, channels), "delta": randn(batch, length, channels) * delta_scale,
               "z": randn(batch, length, channels), "B": randn(batch, length, n_state),
               "C": randn(batch, length, n_state)}
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    tensors |= {"A": -8 * torch.rand(channels, n_state, generator=g), "D": randn(channels),
                "delta_bias": randn(channels) * 0.5}
    return {name: t.to(device) for name, t in tensors.items()}


def poisoned(batch: int, length: int, channels: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((batch, length, channels), float("nan"), dtype=dtype, device=DEVICE)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert not y.isnan().any(), "unwritten or NaN outputs"
    return float((y.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize(("dtype", "shape", "optional", "softplus", "delta_scale"), [
    (torch.float32, (2, 37, 45, 16), ("D", "z", "delta_bias"), True, 1.0),  # odd E: a masked channel block
    (torch.float32, (1, 1, 32, 16), ("D", "z", "delta_bias"), True, 1.0),  # a single step
    (torch.float32, (3, 70, 20, 4), ("D",), True, 1.0),  # N = 4, the longest sequence
    (torch.float32, (2, 9, 33, 5), (), False, 1.0),  # N = 5: masked states; no D, z, bias, softplus
    (torch.float32, (2, 25, 40, 16), ("D", "z"), True, 20.0),  # softplus above 20, exp(ΔA) underflows
    (torch.float16, (2, 41, 64, 16), ("D", "z"), True, 1.0),
    (torch.bfloat16, (1, 23, 64, 16), ("D", "z", "delta_bias"), True, 1.0),
])
def test_matches_float64_reference(dtype, shape, optional, softplus, delta_scale):
    batch, length, channels, n_state = shape
    x = scan_inputs(*shape, seed=sum(shape), dtype=dtype, delta_scale=delta_scale)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    kwargs = {name: x[name] for name in optional} | {"delta_softplus": softplus}
    ref = selective_scan_reference(*args, **kwargs)
    y = selective_scan(*args, **kwargs, out=poisoned(batch, length, channels, dtype))
    assert y.dtype == dtype and rel_error(y, ref) < TOLERANCE[dtype]
    if dtype != torch.float32:  # the arithmetic is fp32 whatever the inputs: an fp32 output shows it
        y32 = selective_scan(*args, **kwargs, out_dtype=torch.float32, out=poisoned(*shape[:3], torch.float32))
        assert rel_error(y32, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("config", [(128, 4), (64, 2)])
def test_wider_blocks_than_the_small_shapes_pick(config):
    """launch_config gives small batches 32-channel blocks; the 64- and 128-wide ones of larger batches run the
    same kernel with another BLOCK_E, here with a partly masked block."""
    x = scan_inputs(2, 19, 150, 16, seed=3)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"])
    y = selective_scan(*args, out=poisoned(2, 19, 150, torch.float32), config=config)
    assert rel_error(y, selective_scan_reference(*args)) < 1e-5


def test_launch_config_follows_the_documented_rule():
    assert launch_config(64, 1536) == (128, 4)  # Vim-B, batch 64: 768 programs of 4 warps
    assert launch_config(16, 1536) == (64, 2)  # 16 · 12 = 192 programs of 4 warps is under 256
    assert launch_config(1, 384) == (32, 1)  # Vim-T, batch 1: 12 programs of 1 warp


def test_softplus_is_pytorchs_elementwise():
    """With A = 0, B = C = u = 1 and one step, y = softplus(delta) per channel: checked element by element over
    [−30, 30], where log(1 + exp(x)) in fp32 would lose small values entirely and exp(x) overflow large ones."""
    delta = torch.linspace(-30, 30, 121).reshape(1, 1, 121)
    ones = torch.ones(1, 1, 1)
    y = selective_scan(torch.ones(1, 1, 121, device=DEVICE), delta.to(DEVICE), torch.zeros(121, 1, device=DEVICE),
                       ones.to(DEVICE), ones.to(DEVICE), out=poisoned(1, 1, 121, torch.float32))
    want = F.softplus(delta.double())
    assert not y.isnan().any()
    assert torch.allclose(y.cpu().double(), want, rtol=4e-6, atol=0)  # GPU exp: ex2.approx(x·log2 e)


def test_strided_inputs_give_bitwise_the_same_result():
    """The layouts Vim hands over: u as the channel-first conv output seen as (batch, L, E) (time stride 1, a
    padded time axis), z as the second half of one projection, B and C as slices of x_proj's output; delta with
    a time stride of 2 and the output written into a channel-first buffer. Same arithmetic, same bits."""
    batch, length, channels, n_state, rank = 2, 23, 32, 16, 5
    x = scan_inputs(batch, length, channels, n_state, seed=7)
    conv_out = torch.randn(batch, channels, length + 3, device=DEVICE)
    conv_out[..., :length] = x["u"].transpose(1, 2)
    xz = torch.cat([torch.randn_like(x["z"]), x["z"]], dim=-1)
    x_dbl = torch.cat([torch.randn(batch, length, rank, device=DEVICE), x["B"], x["C"]], dim=-1)
    delta_every_other = torch.randn(batch, 2 * length, channels, device=DEVICE)
    delta_every_other[:, ::2] = x["delta"]
    out_channel_first = torch.full((batch, channels, length), float("nan"), device=DEVICE)

    u = conv_out[..., :length].transpose(1, 2)
    _, z = xz.chunk(2, dim=-1)
    _, B, C = torch.split(x_dbl, [rank, n_state, n_state], dim=-1)
    assert not any(t.is_contiguous() for t in (u, z, B, C, delta_every_other[:, ::2]))
    strided = selective_scan(u, delta_every_other[:, ::2], x["A"].t().contiguous().t(), B, C, x["D"], z,
                             out=out_channel_first.transpose(1, 2))
    contiguous = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"])
    assert torch.equal(strided, contiguous) and torch.equal(out_channel_first.transpose(1, 2), contiguous)


def test_a_time_reversed_gate_is_read_backwards_bit_for_bit():
    """Vim's backward branch: its gate is in_proj's z in forward time. ``z_reversed`` reads it backwards through
    its strides (the second half of a projection, as the packed model has it): the same bits as scanning with a
    flipped copy, in core's dispatch too, and the same gradient (there through an ordinary flip). fp16: the GPU
    path's dtype."""
    dtype = torch.float16
    x = scan_inputs(2, 19, 32, 16, seed=17, dtype=dtype)
    xz = torch.cat([torch.randn_like(x["z"]), x["z"].flip(1)], dim=-1)
    forward_time_z = xz.chunk(2, dim=-1)[1]
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"])
    flipped = selective_scan(*args, x["z"])
    assert torch.equal(selective_scan(*args, forward_time_z, z_reversed=True,
                                      out=poisoned(2, 19, 32, dtype)), flipped)
    assert torch.equal(core_scan.selective_scan(*args, forward_time_z, impl="triton", z_reversed=True), flipped)
    assert torch.equal(core_scan.selective_scan(*(t.cpu() for t in args), forward_time_z.cpu(), impl="fast",
                                                z_reversed=True),
                       core_scan.selective_scan(*(t.cpu() for t in args), x["z"].cpu(), impl="fast"))
    grad_y = torch.randn(2, 19, 32, device=DEVICE)
    flipped_z = x["z"].detach().clone().requires_grad_()
    (selective_scan(*args, flipped_z).float() * grad_y).sum().backward()
    reversed_z = forward_time_z.detach().clone().requires_grad_()
    (selective_scan(*args, reversed_z, z_reversed=True).float() * grad_y).sum().backward()
    assert torch.equal(reversed_z.grad, flipped_z.grad.flip(1))


def test_int8_inputs_match_dequantize_then_scan():
    """u, B, C as int8 codes with a scale per (sample, step), dequantized in registers, against dequantizing first
    (in fp32) and running the float64 reference; also u alone quantized, B and C in fp16."""
    batch, length, channels, n_state = 2, 31, 50, 16
    x = scan_inputs(batch, length, channels, n_state, seed=11)
    g = torch.Generator().manual_seed(12)
    codes = {name: torch.randint(-127, 128, (batch, length, size), generator=g, dtype=torch.int8).to(DEVICE)
             for name, size in (("u", channels), ("B", n_state), ("C", n_state))}
    scales = {name: ((torch.rand(batch, length, generator=g) + 0.1) / 127).to(DEVICE) for name in codes}
    dequantized = {name: codes[name].float() * scales[name][..., None] for name in codes}
    common = {"D": x["D"], "z": x["z"], "delta_bias": x["delta_bias"]}

    y = selective_scan(codes["u"], x["delta"], x["A"], codes["B"], codes["C"], **common, u_scale=scales["u"],
                       B_scale=scales["B"], C_scale=scales["C"], out=poisoned(batch, length, channels, torch.float32))
    ref = selective_scan_reference(dequantized["u"], x["delta"], x["A"], dequantized["B"], dequantized["C"], **common)
    assert y.dtype == torch.float32 and rel_error(y, ref) < 1e-5

    B16, C16 = x["B"].half(), x["C"].half()
    y = selective_scan(codes["u"], x["delta"], x["A"], B16, C16, **common, u_scale=scales["u"],
                       out_dtype=torch.float16, out=poisoned(batch, length, channels, torch.float16))
    ref = selective_scan_reference(dequantized["u"], x["delta"], x["A"], B16, C16, **common)
    assert rel_error(y, ref) < TOLERANCE[torch.float16]


def test_agrees_with_core_reference_scan():
    """core.ssm.scan.selective_scan_ref (float64, its own code) on the same inputs; the delta bias folded into
    delta, as Vim's dt_proj does before calling core."""
    x = scan_inputs(2, 29, 36, 16, seed=13, device=torch.device("cpu"))
    delta_pre = x["delta"].double() + x["delta_bias"].double()
    core_y = core_scan.selective_scan_ref(x["u"].double(), delta_pre, *(x[name].double() for name in "ABCDz"))
    ours = selective_scan_reference(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"])
    assert rel_error(ours, core_y) < 1e-12
    d = {name: t.to(DEVICE) for name, t in x.items()}
    y = selective_scan(d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], d["z"], d["delta_bias"],
                       out=poisoned(2, 29, 36, torch.float32))
    assert rel_error(y.cpu(), core_y) < 1e-5


def test_rejects_bad_inputs_with_clear_messages():
    x = scan_inputs(2, 5, 8, 4, seed=0)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    with pytest.raises(ValueError, match=r"B must have shape \(2, 5, 4\)"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"][..., :3], x["C"])
    with pytest.raises(ValueError, match=r"A must be \(E, N\) with E = 8"):
        selective_scan(x["u"], x["delta"], x["A"][:7], x["B"], x["C"])
    with pytest.raises(ValueError, match=r"D must have shape \(8,\)"):
        selective_scan(*args, D=x["D"][:4])
    with pytest.raises(ValueError, match="u must be fp32, fp16 or bf16 .or int8 codes with u_scale"):
        selective_scan(x["u"].double(), *args[1:])
    with pytest.raises(ValueError, match="u must be fp32, fp16 or bf16"):
        selective_scan(x["u"].to(torch.int8), *args[1:])
    with pytest.raises(ValueError, match="u_scale is given, so u must hold int8 codes"):
        selective_scan(*args, u_scale=torch.ones(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match=r"out must be torch.float32 \(2, 5, 8\)"):
        selective_scan(*args, out=torch.empty(2, 5, 9, device=DEVICE))
    with pytest.raises(ValueError, match="power of two"):
        selective_scan(*args, config=(48, 2))


# ---- gradients (SelectiveScanFunction) ----

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_gradients(x: dict[str, torch.Tensor], optional: tuple[str, ...], softplus: bool, grad_y: torch.Tensor,
                   scan, return_states: bool = False, states_weight: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """y and the gradient of Σ grad_y·y (+ Σ states_weight·states) w.r.t. every input, through ``scan``."""
    names = ("u", "delta", "A", "B", "C", *optional)
    leaves = {name: x[name].detach().clone().requires_grad_() for name in names}
    kwargs = {name: leaves[name] for name in optional} | {"delta_softplus": softplus}
    out = scan(*(leaves[name] for name in names[:5]), **kwargs, **({"return_states": True} if return_states else {}))
    y = out[0] if return_states else out
    loss = (y.double() * grad_y.double()).sum()
    if return_states:
        loss = loss + (out[1].double() * states_weight.double()).sum()
    loss.backward()
    return y.detach(), {name: leaves[name].grad for name in names}


def reference_with_states(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                          return_states=True):
    """core's float64 step-by-step scan with the kernel's signature (delta bias folded in), states included."""
    delta = delta if delta_bias is None else delta + delta_bias
    return core_scan.selective_scan_ref(*(t.double() for t in (u, delta, A, B, C)),
                                        *(None if t is None else t.double() for t in (D, z)),
                                        delta_softplus=delta_softplus, return_states=return_states)


def assert_gradients_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tolerance: float) -> None:
    """Relative error per input; where the reference gradient is exactly 0 (A after a single step, C, D and z
    without a loss on y) the kernel's must be exactly 0 too."""
    for name, grad in got.items():
        if want[name].any():
            assert rel_error(grad, want[name]) < tolerance, name
        else:
            assert torch.equal(grad, torch.zeros_like(grad)), name


@pytest.mark.parametrize(("dtype", "shape", "optional", "softplus", "delta_scale"), [
    (torch.float32, (2, 9, 45, 16), ("D", "z", "delta_bias"), True, 1.0),  # odd E: a masked channel block
    (torch.float32, (2, 7, 33, 5), (), False, 1.0),  # N = 5: masked states; no D, z, bias, softplus
    (torch.float32, (1, 8, 20, 16), ("D", "z"), True, 20.0),  # softplus past 20, exp(ΔA) underflows
    (torch.float32, (1, 1, 32, 16), ("D",), True, 1.0),  # a single step: no h_{t-1}
    (torch.float16, (2, 11, 32, 16), ("D", "z"), True, 1.0),
    (torch.bfloat16, (1, 10, 32, 16), ("D", "z", "delta_bias"), True, 1.0),
])
def test_gradients_match_float64_autograd(dtype, shape, optional, softplus, delta_scale):
    """Every input's gradient against autograd through the float64 reference on the same (rounded) inputs. The
    kernel computes in fp32 and rounds each gradient to its input's dtype once."""
    x = scan_inputs(*shape, seed=100 + sum(shape), dtype=dtype, delta_scale=delta_scale)
    grad_y = torch.randn(shape[:3], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y, got = scan_gradients(x, optional, softplus, grad_y, selective_scan)
    ref_y, want = scan_gradients(x, optional, softplus, grad_y, selective_scan_reference)
    assert y.dtype == dtype and rel_error(y, ref_y) < TOLERANCE[dtype]
    for name, grad in got.items():
        assert grad.dtype == x[name].dtype and grad.shape == x[name].shape, name
    assert_gradients_match(got, want, TOLERANCE[dtype])


def test_gradients_through_the_returned_states():
    """return_states: the states equal the float64 reference's h_t, and a loss on them (as OuroMamba-Gen's
    patched states) back-propagates through the adjoint recurrence, with or without a loss on y."""
    shape = (1, 8, 36, 16)
    x = scan_inputs(*shape, seed=41)
    g = torch.Generator().manual_seed(2)
    states_weight = torch.randn(*shape, generator=g).to(DEVICE)  # (batch, L, E, N)
    for grad_y in (torch.randn(shape[:3], generator=g).to(DEVICE), torch.zeros(shape[:3], device=DEVICE)):
        _, got = scan_gradients(x, ("D", "z"), True, grad_y, selective_scan, True, states_weight)
        _, want = scan_gradients(x, ("D", "z"), True, grad_y, reference_with_states, True, states_weight)
        assert_gradients_match(got, want, 1e-5)
    with torch.no_grad():
        y, states = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], return_states=True)
        _, want_states = reference_with_states(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"])
    assert states.dtype == torch.float32 and states.shape == (*shape[:3], 16)
    assert rel_error(states, want_states) < 1e-5


def test_gradients_are_deterministic_and_layout_blind():
    """Partial sums are written and added by the launcher, never atomically: two runs give the same bits, and the
    model's strided views (channel-first u, z and B/C slices of one projection) give the contiguous inputs' bits."""
    batch, length, channels, n_state = 2, 5, 40, 16
    x = scan_inputs(batch, length, channels, n_state, seed=43)
    grad_y = torch.randn(batch, length, channels, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    _, first = scan_gradients(x, ("D", "z"), True, grad_y, selective_scan)
    _, again = scan_gradients(x, ("D", "z"), True, grad_y, selective_scan)
    assert all(torch.equal(first[name], again[name]) for name in first)

    u_cf = x["u"].transpose(1, 2).contiguous().requires_grad_()
    xz = torch.cat([torch.randn_like(x["z"]), x["z"]], dim=-1).requires_grad_()
    x_dbl = torch.cat([x["B"], x["C"]], dim=-1).requires_grad_()
    B, C = x_dbl.split(n_state, dim=-1)
    y = selective_scan(u_cf.transpose(1, 2), x["delta"], x["A"], B, C, x["D"], xz.chunk(2, dim=-1)[1])
    (y.double() * grad_y.double()).sum().backward()
    assert torch.equal(u_cf.grad.transpose(1, 2), first["u"])
    assert torch.equal(xz.grad[..., channels:], first["z"]) and not xz.grad[..., :channels].any()
    assert torch.equal(x_dbl.grad, torch.cat([first["B"], first["C"]], dim=-1))


def test_int8_and_out_paths_refuse_gradients_with_a_message():
    x = scan_inputs(1, 4, 8, 4, seed=0)
    u = x["u"].clone().requires_grad_()
    with pytest.raises(ValueError, match="int8 and out= paths are for inference"):
        selective_scan(u, x["delta"], x["A"], x["B"], x["C"], out=torch.empty(1, 4, 8, device=DEVICE))
    codes = torch.zeros(1, 4, 4, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="int8 and out= paths are for inference"):
        selective_scan(u, x["delta"], x["A"], codes, x["C"], B_scale=torch.ones(1, 4, device=DEVICE))


# ---- core's dispatch ----


def test_core_impl_triton_runs_the_kernel_and_says_why_it_cannot():
    """impl='triton' is the kernel (on CPU tensors too under TRITON_INTERPRET=1, as here on the CPU): y, the
    states in core's (batch, L, E, N) layout and gradients, as the fast scan gives them; float64 it refuses."""
    x = scan_inputs(1, 8, 40, 16, seed=5)
    args = (x["u"], x["delta"] + x["delta_bias"], x["A"], x["B"], x["C"], x["D"], x["z"])
    with torch.no_grad():
        y = core_scan.selective_scan(*args, impl="triton")
        y_states, states = core_scan.selective_scan(*args, impl="triton", return_states=True)
        want_y, want_states = core_scan.selective_scan_fast(*args, return_states=True)
    assert rel_error(y, want_y) < 1e-5 and torch.equal(y, y_states)
    assert states.shape == want_states.shape == (1, 8, 40, 16) and rel_error(states, want_states) < 1e-5
    grads = {}
    for impl in ("triton", "fast"):
        u = x["u"].clone().requires_grad_()
        core_scan.selective_scan(u, *args[1:], impl=impl).square().sum().backward()
        grads[impl] = u.grad
    assert rel_error(grads["triton"], grads["fast"]) < 1e-5
    with pytest.raises(RuntimeError, match="fp32, fp16 or bf16"):
        core_scan.selective_scan(*(t.double() for t in args), impl="triton")


def test_core_impl_triton_needs_cuda_tensors_when_compiled(monkeypatch):
    """Without the interpreter the launcher refuses CPU tensors with a message, not Triton's "0 active drivers"."""
    monkeypatch.setattr(scan_module, "_kernel_runs_on", lambda device: device.type == "cuda")
    x = scan_inputs(1, 3, 8, 4, seed=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        core_scan.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], impl="triton")


@pytest.mark.parametrize(("mamba", "triton", "return_states", "dtype", "want"), [
    (True, True, False, torch.float32, "cuda"),  # mamba-ssm first
    (True, True, True, torch.float32, "triton"),  # mamba-ssm returns no states
    (False, True, False, torch.float16, "triton"),
    (False, True, True, torch.bfloat16, "triton"),
    (False, True, False, torch.float64, "fast"),
    (False, False, False, torch.float32, "fast"),  # triton does not import
])
def test_auto_on_cuda_prefers_mamba_ssm_then_triton(monkeypatch, mamba, triton, return_states, dtype, want):
    monkeypatch.setattr(core_scan, "_mamba_ssm_scan", lambda: object() if mamba else None)
    monkeypatch.setattr(core_scan, "_triton_scan", lambda: object() if triton else None)
    assert core_scan.resolve_impl("auto", True, dtype, return_states, False) == want
    assert core_scan.resolve_impl("auto", False, dtype, return_states, False) == "fast"  # CPU
    assert core_scan.resolve_impl("auto", True, dtype, return_states, True) == "ref"  # callback


def test_vim_mixer_through_the_triton_scan_matches_the_fast_scan():
    """A small Vim with every mixer on impl='triton': the kernel gets the model's own views (the transposed conv
    output, z and B/C slices, each direction's A and D) and gives the fast scan's logits and, in a training
    step, the same gradient for every parameter (A_log, D, dt_proj's bias and the rest upstream)."""
    vim = pytest.importorskip("core.models.vim")
    torch.manual_seed(0)
    cfg = vim.VimConfig(img_size=16, patch_size=4, stride=4, in_chans=1, num_classes=4, embed_dim=32, depth=1)
    model = vim.VisionMamba(cfg).to(DEVICE)
    images = torch.randn(1, 1, 16, 16, device=DEVICE)
    labels = torch.tensor([3], device=DEVICE)
    logits, grads = {}, {}
    for impl in ("fast", "triton"):
        model.set_scan_impl(impl)
        assert all(m.scan_impl == impl for m in model.modules() if isinstance(m, vim.BiMambaMixer))
        model.zero_grad(set_to_none=True)
        logits[impl] = model.eval()(images)
        F.cross_entropy(logits[impl], labels).backward()
        grads[impl] = {name: p.grad for name, p in model.named_parameters()}
    assert rel_error(logits["triton"].detach(), logits["fast"].detach()) < 1e-5
    assert grads["fast"].keys() == grads["triton"].keys()
    assert_gradients_match(grads["triton"], grads["fast"], 1e-5)
    with pytest.raises(ValueError, match="scan impl must be one of"):
        model.set_scan_impl("tritonn")


def test_ouromamba_gen_gradients_through_the_triton_scan_match_the_fast_scan():
    """OuroMamba-Gen's losses (output, patch contrastive on the returned states) of a small Vim, back to the
    image: on CUDA the scans of the traced layers return their states through the Triton pair; the image
    gradient equals the fast scan's."""
    vim = pytest.importorskip("core.models.vim")
    from core.gen import GenConfig
    from core.gen.generate import gen_losses
    torch.manual_seed(1)
    cfg = vim.VimConfig(img_size=16, patch_size=4, stride=4, in_chans=1, num_classes=4, embed_dim=32, depth=1)
    model = vim.VisionMamba(cfg).eval().to(DEVICE)
    config = GenConfig(count=1, batch_size=1, neighbourhood=3, top_k=4, layers=(0,))
    targets = torch.tensor([2], device=DEVICE)
    start = torch.randn(1, 1, 16, 16, device=DEVICE)
    grads, losses = {}, {}
    for impl in ("fast", "triton"):
        model.set_scan_impl(impl)
        images = start.clone().requires_grad_()
        terms = gen_losses(model, images, targets, config, [0])
        sum(terms.values()).backward()
        grads[impl], losses[impl] = images.grad, {name: float(t.detach()) for name, t in terms.items()}
    assert set(losses["triton"]) == {"output", "contrastive"}
    assert all(abs(losses["triton"][name] - losses["fast"][name]) < 1e-5 for name in losses["fast"])
    assert rel_error(grads["triton"], grads["fast"]) < 1e-5


# ---- Vim-size cases (GPU only) ----


@real_shapes
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_real_shape_vim_b(dtype):
    """Vim-B, batch 64: (64, 197, 1536), N = 16, with D and z, at launch_config's choice (128 channels, 4 warps)."""
    x = scan_inputs(64, 197, 1536, 16, seed=21, dtype=dtype)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"])
    y = selective_scan(*args, out=poisoned(64, 197, 1536, dtype))
    assert rel_error(y, selective_scan_reference(*args)) < TOLERANCE[dtype]


@real_shapes
def test_real_shape_model_layout_and_int8():
    """Vim-B at batch 16: u as the channel-first conv output view, then int8 u/B/C codes with scales."""
    batch, length, channels = 16, 197, 1536
    x = scan_inputs(batch, length, channels, 16, seed=22)
    u = x["u"].transpose(1, 2).contiguous().transpose(1, 2)
    args = (x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"])
    y = selective_scan(u, *args, out=poisoned(batch, length, channels, torch.float32))
    assert rel_error(y, selective_scan_reference(u, *args)) < 1e-5

    g = torch.Generator(device=DEVICE).manual_seed(23)
    codes = [torch.randint(-127, 128, (batch, length, size), generator=g, device=DEVICE, dtype=torch.int8)
             for size in (channels, 16, 16)]
    scales = [(torch.rand(batch, length, generator=g, device=DEVICE) + 0.1) / 127 for _ in codes]
    kwargs = {"D": x["D"], "z": x["z"], "u_scale": scales[0], "B_scale": scales[1], "C_scale": scales[2]}
    y = selective_scan(codes[0], x["delta"], x["A"], codes[1], codes[2], **kwargs,
                       out=poisoned(batch, length, channels, torch.float32))
    assert rel_error(y, selective_scan_reference(codes[0], x["delta"], x["A"], codes[1], codes[2], **kwargs)) < 1e-5


@real_shapes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_real_shape_gradients_vim_s(dtype):
    """The backward at Vim-S, batch 16, (16, 197, 768): 197 reverse steps over recomputed states, every input's
    gradient against float64 autograd; then with the states returned and a loss on them (OuroMamba-Gen)."""
    shape = (16, 197, 768, 16)
    x = scan_inputs(*shape, seed=24, dtype=dtype)
    g = torch.Generator().manual_seed(25)
    grad_y = torch.randn(shape[:3], generator=g).to(DEVICE)
    _, got = scan_gradients(x, ("D", "z", "delta_bias"), True, grad_y, selective_scan)
    _, want = scan_gradients(x, ("D", "z", "delta_bias"), True, grad_y, selective_scan_reference)
    assert_gradients_match(got, want, TOLERANCE[dtype])
    if dtype == torch.float32:
        states_weight = torch.randn(*shape, generator=g).to(DEVICE)
        _, got = scan_gradients(x, ("D", "z"), True, grad_y, selective_scan, True, states_weight)
        _, want = scan_gradients(x, ("D", "z"), True, grad_y, reference_with_states, True, states_weight)
        assert_gradients_match(got, want, 1e-5)
