"""The float model through the fused kernels (core.models.fused): the FP16 speed baseline of the packed model."""

import pytest
import torch

from core.errors import StudioError
from core.eval import capture_cuda_graph
from core.intercept import Recorder, intercepting
from core.models import create_vim
from core.models.fused import FusedVim
from tests.test_kernels import DEVICE, real_shapes
from tests.test_models import VIM_S, tiny

# fp32 on the GPU: cuDNN's convolutions may use TF32 (PyTorch's default for them), the conv kernel does not
FP32_TOLERANCE = 1e-5 if DEVICE.type == "cpu" else 3e-3


def images(model, count=3):
    cfg = model.cfg
    x = torch.randn(count, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    return x.to(DEVICE)


def counting(patch, calls: dict, name: str, copies=lambda tensor: True) -> None:
    """Count the calls of ``torch.Tensor.<name>`` that ``copies`` says make a copy."""
    original = getattr(torch.Tensor, name)

    def spy(tensor, *args, **kwargs):
        calls[name] = calls.get(name, 0) + copies(tensor)
        return original(tensor, *args, **kwargs)
    patch.setattr(torch.Tensor, name, spy)


@pytest.mark.parametrize("img_size", [32, 40])  # 40: 5×5 patches, the CLS token at 12, an odd length
def test_the_fused_forward_computes_the_models_logits_without_flipped_or_transposed_copies(img_size):
    model = tiny(img_size=img_size, depth=3).to(DEVICE)
    fused = FusedVim(model, backend="triton").eval()
    x = images(model)
    calls, model_calls = {}, {}
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        counting(patch, model_calls, "flip")
        expected = model(x)
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        counting(patch, calls, "flip")
        counting(patch, calls, "contiguous", lambda tensor: not tensor.is_contiguous())
        got = fused(x)
    # the conv kernel and the scan sum in another order than cuDNN/PyTorch: fp32 rounding, no more
    assert torch.linalg.norm(got - expected) / torch.linalg.norm(expected) < FP32_TOLERANCE
    # the model flips xz and y_backward; the fused path reads the backward branch in reverse instead
    assert not calls.get("flip") and not calls.get("contiguous")
    assert model_calls["flip"] == 2 * model.cfg.depth
    assert fused.cfg is model.cfg


def test_half_precision_stays_close_to_the_model_in_fp32():
    model = tiny(depth=2).to(DEVICE)
    x = images(model)
    with torch.no_grad():
        expected = model(x)
        got = FusedVim(model, backend="triton").eval().to(torch.bfloat16)(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert torch.linalg.norm(got.float() - expected) / torch.linalg.norm(expected) < 3e-2


def test_without_kernels_observed_or_training_it_is_the_models_own_forward():
    model = tiny().to(DEVICE)
    x = images(model, 2)
    with torch.no_grad():
        expected = model(x)
        if DEVICE.type == "cpu":
            assert torch.equal(FusedVim(model).eval()(x), expected)  # 'auto' on the CPU: no kernels
        assert torch.equal(FusedVim(model, backend="reference").eval()(x), expected)
        fused = FusedVim(model, backend="triton").eval()
        with intercepting(model, Recorder(names=["layers.1.bwd.delta_pre"])) as recorder:
            assert torch.equal(fused(x), expected)  # the sites are on the model's path: the recorder sees them
        assert recorder.tensors["layers.1.bwd.delta_pre"].shape == (2, model.cfg.seq_len, model.cfg.d_inner)
        fused.train()
        assert torch.equal(fused(x), model(x))  # eval-mode dropout is off anyway: the same path's values
        assert model.training  # the wrapper trains the model it wraps, it does not copy it


def test_scan_parameters_are_derived_once_per_placement():
    model = tiny().to(DEVICE)
    fused = FusedVim(model, backend="triton").eval()
    with torch.no_grad():
        fused(images(model, 1))
        cached = fused._scan_parameters[(0, "bwd")]
        assert torch.equal(cached[0], -torch.exp(model.layers[0].mixer.A_b_log.float()))
        fused(images(model, 1))
        assert fused._scan_parameters[(0, "bwd")] is cached
        fused.double()
        assert not fused._scan_parameters  # moved: derived again from the moved weights on the next call


def test_an_unknown_backend_is_one_line():
    with pytest.raises(StudioError, match="backend must be one of auto, triton, reference, not 'cuda'"):
        FusedVim(tiny(), backend="cuda")


@real_shapes
def test_vim_small_in_fp16_on_cuda_agrees_with_the_models_forward():
    torch.manual_seed(0)
    model = create_vim(VIM_S).eval().to(DEVICE, torch.float16)
    x = images(model, 4).half()
    with torch.no_grad():
        expected, got = model(x).float(), FusedVim(model).eval()(x).float()
    assert torch.linalg.norm(got - expected) / torch.linalg.norm(expected) < 1e-2


@real_shapes
def test_the_backward_branches_on_a_side_stream_agree_with_one_stream_eagerly_and_as_a_cuda_graph():
    """Vim-S in fp16: the backward branches beside the forward ones (the default on CUDA) against one stream.
    cuBLAS keeps a workspace per stream and may then reduce in another order, so close, not bit for bit (the
    packed model, all Triton, is compared bit for bit in tests/test_packed.py)."""
    torch.manual_seed(0)
    model = create_vim(VIM_S).eval().to(DEVICE, torch.float16)
    x = images(model, 4).half()
    with torch.no_grad():
        expected = FusedVim(model, concurrent_directions=False).eval()(x).float()
        concurrent = FusedVim(model).eval()
        eager, graphed = concurrent(x).float(), capture_cuda_graph(concurrent, x)().float()
    for logits in (eager, graphed):
        assert torch.linalg.norm(logits - expected) / torch.linalg.norm(expected) < 1e-3
