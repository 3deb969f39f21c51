"""The selective scan of Mamba-1 (S6), as Vim uses it.

For each channel e and state n, with Δ = softplus(delta) when ``delta_softplus``:

    h_t = exp(Δ_t,e · A_e,n) · h_{t−1} + Δ_t,e · B_t,n · u_t,e          (h_{−1} = 0)
    y_t,e = Σ_n C_t,n · h_t,e,n + D_e · u_t,e,   then  y ⊙ SiLU(z)  when a gate z is given.

Layouts are time-major per sample, the same as at the interception sites: u, delta, z are
(batch, L, E); B, C are (batch, L, N); A is (E, N); D is (E,). All implementations compute in at least
float32 (float64 stays float64) and return y in u's dtype.

* :func:`selective_scan_ref` — the recurrence step by step; returns the states and lets a callback
  replace h_t inside the recurrence (state quantization, observation). Use it in float64 as ground truth.
* :func:`selective_scan_fast` — the same recurrence, vectorised over samples, channels and states, stepping
  in place through cache-sized slabs of samples, with a hand-written backward. This is the CPU path (and
  CUDA's for float64, or where triton does not import).
* mamba-ssm's CUDA ``selective_scan_fn`` when it imports and the tensors are on CUDA.
* ``kernels.selective_scan``: our fused Triton scan (fp32 state) with a Triton backward, optionally returning
  the states: the CUDA path when mamba-ssm is absent, and whenever states are asked for. Imported lazily, so
  core works where triton does not; under ``TRITON_INTERPRET=1`` (the tests) ``impl='triton'`` also runs on
  CPU tensors, elsewhere it needs CUDA tensors.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

StateFn = Callable[[int, torch.Tensor], torch.Tensor]

SCAN_IMPLEMENTATIONS = ("auto", "ref", "fast", "cuda", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Elements of one (steps × batch-block × E × N) buffer in the fast scan; two such buffers live at once.
# State elements (samples × N × E) of one slab in the inference scan: 2**19 float32 = 2 MiB per buffer was
# the fastest of 2**17..2**20 on the 2-core CPU (bench/bench_foundation.py).
_SLAB_ELEMENTS = 2**19


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _finish(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * F.silu(z)
    return y


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_softplus: bool = True,
    return_states: bool = False,
    state_fn: StateFn | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Step-by-step scan. ``state_fn(t, h_t) -> h_t`` may replace each state inside the recurrence.

    Returns y (batch, L, E), and the states (batch, L, E, N) when ``return_states``.
    """
    dtype = _compute_dtype(u)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_softplus:
        delta = F.softplus(delta)
    batch, length, channels = u.shape
    h = u.new_zeros(batch, channels, A.shape[1])
    ys, states = [], []
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        if state_fn is not None:
            h = state_fn(t, h)
        if return_states:
            states.append(h)
        ys.append(torch.einsum("ben,bn->be", h, C[:, t]))
    y = _finish(torch.stack(ys, dim=1), u, None if D is None else D.to(dtype), None if z is None else z.to(dtype))
    y = y.to(u.dtype)
    return (y, torch.stack(states, dim=1)) if return_states else y


def selective_scan_fast(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_softplus: bool = True,
    return_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Vectorised scan; same contract as :func:`selective_scan_ref`.

    The state of a slab of samples is kept as (b, N, E): E innermost vectorises well, and the C-contraction
    is a (1×N)·(N×E) matmul per token, 2.5× faster than contracting an inner N. Each step works in place on a
    slab sized to stay in cache (decay = exp(Δ_t A), h = h·decay + Δ_t u_t B_t, y_t = C_t h): 1.9× faster than
    discretising all steps up front, whose full-size buffers spill to memory. Under autograd the same loop
    runs inside :class:`_SlabScan`, whose backward is the reverse recurrence.
    """
    out_dtype = u.dtype
    dtype = _compute_dtype(u)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_softplus:
        delta = F.softplus(delta)
    delta_u, A_t = delta * u, A.t()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (delta, delta_u, A_t, B, C)):
        y, states = _SlabScan.apply(delta, delta_u, A_t, B, C)
    else:
        y, states = _scan_in_slabs(delta, delta_u, A_t.contiguous(), B, C, return_states)
    y = _finish(y, u, None if D is None else D.to(dtype), None if z is None else z.to(dtype)).to(out_dtype)
    return (y, states.transpose(2, 3)) if return_states else y


def _slab_size(n_state: int, channels: int, batch: int) -> int:
    return max(1, min(batch, _SLAB_ELEMENTS // (n_state * channels)))


def _scan_in_slabs(delta: torch.Tensor, delta_u: torch.Tensor, A_t: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, keep_states: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The forward loop of :func:`selective_scan_fast`: in-place steps over cache-sized slabs of samples.

    Returns y without the D skip (batch, L, E) and, when ``keep_states``, every h_t as (batch, L, N, E).
    """
    batch, length, channels = delta.shape
    n_state = A_t.shape[0]
    y_tm = delta.new_empty(length, batch, channels)
    states = delta.new_empty(batch, length, n_state, channels) if keep_states else None
    slab = _slab_size(n_state, channels, batch)
    decay_buf = delta.new_empty(slab, n_state, channels)
    h_buf = delta.new_empty(slab, n_state, channels)
    for start in range(0, batch, slab):
        stop = min(start + slab, batch)
        decay, h = decay_buf[: stop - start], h_buf[: stop - start]
        h.zero_()
        for t in range(length):
            torch.mul(delta[start:stop, t].unsqueeze(1), A_t, out=decay).exp_()
            h.mul_(decay).addcmul_(delta_u[start:stop, t].unsqueeze(1), B[start:stop, t].unsqueeze(-1))
            torch.bmm(C[start:stop, t].unsqueeze(1), h, out=y_tm[t, start:stop].unsqueeze(1))
            if states is not None:
                states[start:stop, t] = h
    return y_tm.transpose(0, 1), states


class _SlabScan(torch.autograd.Function):
    """The slab loop with a hand-written backward: the adjoint recurrence run from the last step to the first.

    With g_t = ∂loss/∂h_t (from y_t, from the returned states, and g_{t+1}·decay_{t+1}):
    ∂Δu_t = Σ_n g_t B_t, ∂B_t = Σ_e g_t Δu_t, ∂C_t = Σ_e ∂y_t h_t, and through decay_t = exp(Δ_t A):
    ∂Δ_t = Σ_n q_t A, ∂A = Σ_{b,t} q_t Δ_t with q_t = g_t h_{t−1} decay_t. It keeps the (batch, L, N, E)
    states, recomputes decay step by step and works on cache-sized slabs like the forward (contracting the
    whole tensors after the loop instead was 2× slower). Forward + backward of the default model (batch 128,
    one thread) takes 2.75 s, against 6.0 s for autograd through a loop of per-step tensors.
    """

    @staticmethod
    def forward(ctx, delta, delta_u, A_t, B, C):
        ctx.set_materialize_grads(False)  # unused outputs (usually the states) get None, not zeros
        y, states = _scan_in_slabs(delta, delta_u, A_t.contiguous(), B, C, keep_states=True)
        ctx.save_for_backward(delta, delta_u, A_t, B, C, states)
        return y, states

    @staticmethod
    def backward(ctx, grad_y, grad_states):
        delta, delta_u, A_t, B, C, states = ctx.saved_tensors
        A_t = A_t.contiguous()
        batch, length, channels = delta.shape
        n_state = A_t.shape[0]
        grad_y = torch.zeros_like(delta) if grad_y is None else grad_y
        grad_delta, grad_delta_u, grad_B, grad_C = (torch.zeros_like(t) for t in (delta, delta_u, B, C))
        grad_A_t = torch.zeros_like(A_t)
        slab = _slab_size(n_state, channels, batch)
        for start in range(0, batch, slab):
            rows = slice(start, min(start + slab, batch))
            g = delta.new_zeros(rows.stop - start, n_state, channels)
            for t in reversed(range(length)):
                dy, h = grad_y[rows, t], states[rows, t]
                g.addcmul_(C[rows, t].unsqueeze(-1), dy.unsqueeze(1))
                if grad_states is not None:
                    g.add_(grad_states[rows, t])
                grad_C[rows, t] = torch.bmm(h, dy.unsqueeze(-1)).squeeze(-1)
                grad_delta_u[rows, t] = torch.bmm(B[rows, t].unsqueeze(1), g).squeeze(1)
                grad_B[rows, t] = torch.bmm(g, delta_u[rows, t].unsqueeze(-1)).squeeze(-1)
                decay = torch.exp(delta[rows, t].unsqueeze(1) * A_t)
                if t > 0:  # h_{-1} = 0: step 0 has no decay gradient
                    q = g * states[rows, t - 1] * decay
                    grad_delta[rows, t] = (q * A_t).sum(1)
                    grad_A_t += (q * delta[rows, t].unsqueeze(1)).sum(0)
                g.mul_(decay)
        return grad_delta, grad_delta_u, grad_A_t, grad_B, grad_C


@functools.cache
def _optional(module: str, name: str) -> Callable | None:
    """``module.name`` if it imports (a compiled extension, triton), else None; imported once, lazily."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def _mamba_ssm_scan() -> Callable | None:
    """mamba-ssm's CUDA scan if it imports (it needs its compiled extension)."""
    return _optional("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")


def _selective_scan_cuda(u, delta, A, B, C, D, z, delta_softplus):
    scan = _mamba_ssm_scan()
    channels_first = [None if t is None else t.transpose(1, 2).contiguous() for t in (u, delta, B, C, z)]
    u_cf, delta_cf, B_cf, C_cf, z_cf = channels_first
    y = scan(u_cf, delta_cf, A.float().contiguous(), B_cf, C_cf,
             None if D is None else D.float(), z_cf, delta_softplus=delta_softplus)
    return y.transpose(1, 2)


def _triton_scan() -> Callable | None:
    """kernels.selective_scan's launcher if triton and the kernel module import."""
    return _optional("kernels.selective_scan", "selective_scan")


def _selective_scan_triton(u, delta, A, B, C, D, z, delta_softplus, return_states, z_reversed):
    """The kernel takes core's (batch, L, ·) layouts and any strides (Vim's transposed conv output, the z and
    B/C slices of one projection) as they are, a time-reversed z included; it returns y in u's dtype (and fp32
    states (batch, L, E, N))."""
    return _triton_scan()(u, delta, A, B, C, D, z, delta_softplus=delta_softplus, return_states=return_states,
                          z_reversed=z_reversed)


def _triton_unusable(dtype: torch.dtype) -> str | None:
    """Why the Triton scan cannot serve a call, or None when it can."""
    if _triton_scan() is None:
        return "needs triton and kernels.selective_scan to import"
    if dtype not in TRITON_DTYPES:
        return f"takes fp32, fp16 or bf16 inputs, got {dtype}"
    return None


def resolve_impl(impl: str, on_cuda: bool, dtype: torch.dtype, return_states: bool, per_step_callback: bool) -> str:
    """The implementation a call runs: 'ref', 'fast', 'cuda' or 'triton'.

    'auto': a per-step callback needs the reference scan; CUDA tensors without states asked for use mamba-ssm's
    kernel when it imports, else (and with states) the Triton scan when it takes the dtype (fp32, fp16,
    bf16; gradients included); everything else the fast scan. An explicit 'cuda' or 'triton' that cannot serve the call
    raises RuntimeError saying why."""
    if impl not in SCAN_IMPLEMENTATIONS:
        raise ValueError(f"scan impl must be one of {SCAN_IMPLEMENTATIONS}, not {impl!r}")
    if per_step_callback or impl == "ref":
        return "ref"
    mamba_ok = on_cuda and not return_states and _mamba_ssm_scan() is not None
    if impl == "cuda":
        if not mamba_ok:
            raise RuntimeError("impl='cuda' needs CUDA tensors, mamba-ssm's compiled scan and return_states=False")
        return "cuda"
    if impl == "triton":
        problem = _triton_unusable(dtype)
        if problem:
            raise RuntimeError(f"impl='triton' {problem}")
        return "triton"
    if impl == "auto" and mamba_ok:
        return "cuda"
    if impl == "auto" and on_cuda and _triton_unusable(dtype) is None:
        return "triton"
    return "fast"


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_softplus: bool = True,
    return_states: bool = False,
    state_fn: StateFn | None = None,
    impl: str = "auto",
    z_reversed: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The dispatch point; :func:`resolve_impl` says which implementation runs. ``z_reversed``: z comes in the
    opposite time order (Vim's backward branch); the Triton scan reads it so, the others take a flipped copy."""
    chosen = resolve_impl(impl, u.is_cuda, u.dtype, return_states, state_fn is not None)
    if chosen == "triton":
        return _selective_scan_triton(u, delta, A, B, C, D, z, delta_softplus, return_states, z_reversed)
    if z_reversed and z is not None:
        z = z.flip(1)
    if chosen == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_softplus, return_states, state_fn)
    if chosen == "cuda":
        return _selective_scan_cuda(u, delta, A, B, C, D, z, delta_softplus)
    return selective_scan_fast(u, delta, A, B, C, D, z, delta_softplus, return_states)
