"""Vim's forward through the fused Triton producers: one skeleton for the float model and the packed one.

:class:`FusedForward` is Vim's forward with each branch's causal conv1d + SiLU as one kernel (``conv_silu``,
the backward branch read in reverse) and the scan reading the backward branch's gate backwards (``z_reversed``),
so neither branch makes a flipped or transposed copy. What feeds in_proj, the projections, the scan's inputs and
the merge before out_proj are hooks: here the float model's operations, with the block entry (residual add +
RMSNorm) and the merge of the two directions as one kernel each (:class:`FusedVim`, the GPU speed baseline); in
:mod:`core.quant.packed` the same producers quantizing what they make, and integer GEMMs. The two differ in
nothing else, so timing one against the other measures what the integer kernels buy and nothing more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import StudioError, expect
from core.intercept import BACKWARD, FORWARD
from core.models.vim import BiMambaMixer, Block, VimConfig, VisionMamba
from core.ssm import selective_scan
from kernels.conv_silu import conv_silu
from kernels.merge_detect_quant import merge_directions
from kernels.norm_detect_quant import add_rms_norm

BACKENDS = ("auto", "triton", "reference")


def uses_kernels(backend: str, x: torch.Tensor) -> bool:
    """Whether ``backend`` runs the Triton kernels for an input like ``x`` ('auto': on CUDA tensors)."""
    return backend == "triton" or (backend == "auto" and x.is_cuda)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise StudioError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    return backend


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream the backward branches of ``device`` run on, made once."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class FusedForward:
    """One forward of ``model`` (eval mode: no dropout, no drop-path) through the fused producers; the hooks
    are the float model's operations, which a subclass replaces. ``scan_impl`` overrides the mixers' own
    choice of scan (``core.ssm.selective_scan``'s ``impl``); ``concurrent_directions``: see ``branches``."""

    def __init__(self, model: VisionMamba, scan_impl: str | None = None, concurrent_directions: bool = True):
        self.model, self.scan_impl, self.concurrent_directions = model, scan_impl, concurrent_directions

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        hidden, residual = model.embed(images), None
        for block in model.layers:
            x, z, residual = self.mix_in(block, hidden, residual)
            y_forward, y_backward = self.branches(block.mixer, x, z)
            hidden = self.mix_out(block.mixer, y_forward, y_backward)
        cls = model.cfg.cls_position  # the head reads the CLS token only: the last add and norm on it alone
        return model.head(model.norm_f(residual[:, cls] + hidden[:, cls].float()).to(images.dtype))

    def branches(self, mixer: BiMambaMixer, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both scan directions' y. They are independent until the merge, so on CUDA (with
        ``concurrent_directions``) the backward branch runs on a side stream beside the forward one: at small
        batches each branch's kernels leave most of the GPU idle (a detection has one program per sample and
        window, 20 for one Vim image). The side stream waits for everything enqueued before it, and the merge
        for the side stream; the caching allocator needs nothing more, because the side stream's next work (the
        next block's branch) again waits for the merge, the last reader of what it made. CUDA graphs capture
        the fork and the join. Without CUDA, or with it off, one branch after the other: the same values."""
        if not (self.concurrent_directions and x.is_cuda):
            return self.branch(mixer, x, z, FORWARD), self.branch(mixer, x, z, BACKWARD)
        main, side = torch.cuda.current_stream(x.device), side_stream(x.device)
        side.wait_stream(main)
        y_forward = self.branch(mixer, x, z, FORWARD)
        with torch.cuda.stream(side):
            y_backward = self.branch(mixer, x, z, BACKWARD)
        main.wait_stream(side)
        return y_forward, y_backward

    def branch(self, mixer: BiMambaMixer, x: torch.Tensor, z: torch.Tensor, direction: str) -> torch.Tensor:
        """One scan direction, y in that direction's time order (``mix_out`` reads the backward one flipped)."""
        backward = direction == BACKWARD
        conv1d, _, dt_proj, _, _ = mixer.direction_params(direction)
        u = conv_silu(x, conv1d.weight, conv1d.bias, reverse=backward)
        x_dbl = self.project(mixer, "x_proj", direction, u, None)
        n_state = self.model.cfg.d_state
        dt, B, C = torch.split(x_dbl, [dt_proj.in_features, n_state, n_state], dim=-1)
        delta_pre = self.project(mixer, "dt_proj", direction, dt, dt_proj.bias)
        delta_pre, B, C = self.scan_inputs(mixer, direction, delta_pre, B, C)
        A, D = self.scan_parameters(mixer, direction)
        return selective_scan(u, delta_pre, A, B, C, D, z, delta_softplus=True, impl=self.scan_impl or mixer.scan_impl,
                              z_reversed=backward)

    def mix_in(self, block: Block, hidden: torch.Tensor,
               residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, z, the new fp32 residual): residual add + RMSNorm in one kernel, in_proj."""
        x, residual = add_rms_norm(hidden, residual, block.norm.weight, block.norm.eps)
        return (*F.linear(x, block.mixer.in_proj.weight).chunk(2, dim=-1), residual)

    def project(self, mixer: BiMambaMixer, name: str, direction: str, x: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        """A branch's projection (``"x_proj"`` or ``"dt_proj"``) with the bias given."""
        return F.linear(x, mixer.projection(name, direction).weight, bias)

    def scan_inputs(self, mixer: BiMambaMixer, direction: str, delta_pre: torch.Tensor, B: torch.Tensor,
                    C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return delta_pre, B, C

    def scan_parameters(self, mixer: BiMambaMixer, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, D) in fp32 as the scan takes them."""
        _, _, _, a_log, d_skip = mixer.direction_params(direction)
        return -torch.exp(a_log.float()), d_skip.float()

    def mix_out(self, mixer: BiMambaMixer, y_forward: torch.Tensor, y_backward: torch.Tensor) -> torch.Tensor:
        """out_proj of the two directions' mean, the backward one read in forward time (one kernel, no flipped
        copy)."""
        return F.linear(merge_directions(y_forward, y_backward), mixer.out_proj.weight)


class _CachedScanParameters(FusedForward):
    """The float hooks with A and D computed once per model placement (they do not depend on the input)."""

    def __init__(self, model: VisionMamba, scan_impl: str | None, cache: dict, concurrent_directions: bool):
        super().__init__(model, scan_impl, concurrent_directions)
        self.cache = cache

    def scan_parameters(self, mixer: BiMambaMixer, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = (mixer.layer_idx, direction)
        if key not in self.cache:
            self.cache[key] = super().scan_parameters(mixer, direction)
        return self.cache[key]


class FusedVim(nn.Module):
    """A float Vim for inference that runs :class:`FusedForward` where the kernels run: the FP16 model the
    packed integer model is timed against (``bench/bench_e2e.py``'s ``fp16 fused``, the app's GPU timing).

    ``backend``: ``"auto"`` runs the kernels on CUDA tensors and the model's own forward elsewhere;
    ``"triton"`` always runs them, the Triton scan included (on the CPU only under ``TRITON_INTERPRET=1``);
    ``"reference"`` never. ``concurrent_directions``: the backward branches on a side stream (``FusedForward.branches``;
    False for one stream, which ``bench/bench_e2e.py`` compares).
    A and D are derived from the weights once per placement (``.to()`` derives them again), so change the
    weights through a new wrapper. Wraps ``model`` without copying it. The model's own forward runs instead in
    training mode (dropout, drop-path) and while an interceptor is plugged into it (a recorder, a quantizer:
    the interception sites are on that path).
    """

    def __init__(self, model: VisionMamba, backend: str = "auto", concurrent_directions: bool = True):
        super().__init__()
        expect(model, VisionMamba, "FusedVim's model (a float Vim; a quantized one packs with core.quant.packed)")
        self.model, self.backend = model, check_backend(backend)
        self.concurrent_directions = concurrent_directions
        self._scan_parameters: dict = {}

    @property
    def cfg(self) -> VimConfig:
        return self.model.cfg

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        self._scan_parameters = {}
        return super()._apply(fn, recurse)

    def check_input(self, x: torch.Tensor) -> None:
        self.model.check_input(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        observed = any(block.mixer.interceptor is not None for block in self.model.layers)
        if self.training or observed or not uses_kernels(self.backend, images):
            return self.model(images)
        scan_impl = "triton" if self.backend == "triton" else None
        return _CachedScanParameters(self.model, scan_impl, self._scan_parameters, self.concurrent_directions)(images)
