"""Fused selective scan of Mamba-1 (S6), as Vim uses it, with fp32 state; optional int8 inputs with scales.

For each channel e and state n, with Δ = softplus(delta + delta_bias) when ``delta_softplus`` (else
delta + delta_bias):

    h_t = exp(Δ_t,e · A_e,n) · h_{t−1} + Δ_t,e · B_t,n · u_t,e          (h_{−1} = 0)
    y_t,e = Σ_n C_t,n · h_t,e,n + D_e · u_t,e,   then  y ⊙ SiLU(z)  when a gate z is given.

Layouts are time-major per sample: u, delta, z (batch, L, E); B, C (batch, L, N); A (E, N); D, delta_bias (E,);
any strides. u, delta, z, B, C are fp32, fp16 or bf16; u, B and C may instead be int8 codes with an fp32 scale
per (sample, time step), (batch, L), dequantized in registers (x = code · scale). Everything is computed in
fp32; y is (batch, L, E) in u's dtype (fp32 for int8 u) unless another output dtype is asked for.
softplus is PyTorch's: x above 20, log1p(exp(x)) otherwise.

Kernel: one program per (sample, block of E channels) walks the L steps in order with its state in registers,
laid out (N, BLOCK_E) so that each thread holds all N states of its channel: decay, update and the
C-contraction stay in the thread (no shuffles), and the per-step loads of u, delta, z and the store of y are
BLOCK_E consecutive elements when E is the contiguous dimension (coalesced). Other layouts (Vim's channel-first
conv output seen as (batch, L, E)) are read through their strides without a copy; each load then touches one
sector per channel, which later steps may find in cache (unmeasured). The inputs of step t + 1 are loaded
while step t computes (software pipelining by hand, one step deep).

Backward (``SelectiveScanFunction``, for float inputs under autograd or with ``return_states``): the same layout
walks the steps from L − 1 down to 0 over the stored or recomputed states; see its kernel's docstring.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.host import cdiv, next_power_of_2

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _softplus(x):
    """PyTorch's softplus: x above 20, else log1p(exp(x)), with log1p(e) by Kahan's trick, log(w)·e / (w − 1)
    for w = 1 + e (e itself when w rounds to 1): exact to a few ulps where log(1 + e) would lose e entirely."""
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    rounded_to_one = w == 1.0
    log1p_e = tl.where(rounded_to_one, e, tl.log(w) * e / tl.where(rounded_to_one, 1.0, w - 1.0))
    return tl.where(x > 20.0, x, log1p_e)


LOG2_E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x · log2 e)
LN_2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_state_rows(ptr, offs_e, e_ok, offs_n, stride_channel, stride_state, N_STATE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """An (E, N) parameter (A) as N rows of BLOCK_E channels, assembled from 1-D loads: a 2-D load would make the
    compiler lay the whole loop out for it (vectorised along N, each channel's states spread over several lanes,
    shuffles every step). Masked channels and states read 0."""
    rows = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for n in tl.static_range(N_STATE):
        row = tl.load(ptr + offs_e * stride_channel + n * stride_state, mask=e_ok, other=0.0)
        rows = tl.where(offs_n[:, None] == n, row[None, :], rows)
    return rows


@triton.jit
def _store_state_rows(ptr, rows, offs_e, e_ok, offs_n, stride_state, N_STATE: tl.constexpr):
    """The converse for a (N, E)-major buffer: N row stores of BLOCK_E consecutive channels, each row taken out of
    the thread's own registers (the selects fold away), so the compute layout needs no conversion through shared
    memory, as a single 2-D store would (the compiler picks another layout for it)."""
    for n in tl.static_range(N_STATE):
        row = tl.sum(tl.where(offs_n[:, None] == n, rows, 0.0), axis=0)
        tl.store(ptr + n * stride_state + offs_e, row, mask=e_ok)


@triton.jit
def _selective_scan_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, u_scale_ptr, B_scale_ptr,
        C_scale_ptr, y_ptr, states_ptr, length, channels,
        stride_u_batch, stride_u_time, stride_u_channel,
        stride_delta_batch, stride_delta_time, stride_delta_channel,
        stride_B_batch, stride_B_time, stride_B_state,
        stride_C_batch, stride_C_time, stride_C_state,
        stride_z_batch, stride_z_time, stride_z_channel,
        stride_y_batch, stride_y_time, stride_y_channel,
        stride_A_channel, stride_A_state,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
        U_SCALED: tl.constexpr, B_SCALED: tl.constexpr, C_SCALED: tl.constexpr, STORE_STATES: tl.constexpr,
        N_STATE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    sample = tl.program_id(0).to(tl.int64)  # whole-tensor offsets may pass 2^31; per-sample ones do not
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    e_ok = offs_e < channels
    n_ok = offs_n < N_STATE  # all true, and folded away, when N is a power of two

    # Masked channels and states get A = 0, u = 0, B = C = 0: their state stays 0 and adds nothing.
    A = _load_state_rows(A_ptr, offs_e, e_ok, offs_n, stride_A_channel, stride_A_state, N_STATE, BLOCK_N, BLOCK_E)
    A_log2 = A * LOG2_E  # exp(Δ·A) = exp2(Δ·A·log2 e): one multiply less per state and step
    if HAS_D:
        D = tl.load(D_ptr + offs_e, mask=e_ok, other=0.0)
    if HAS_DELTA_BIAS:
        delta_bias = tl.load(delta_bias_ptr + offs_e, mask=e_ok, other=0.0)

    u_ptr += sample * stride_u_batch + offs_e * stride_u_channel
    delta_ptr += sample * stride_delta_batch + offs_e * stride_delta_channel
    z_ptr += sample * stride_z_batch + offs_e * stride_z_channel
    y_ptr += sample * stride_y_batch + offs_e * stride_y_channel
    B_ptr += sample * stride_B_batch + offs_n * stride_B_state
    C_ptr += sample * stride_C_batch + offs_n * stride_C_state
    scale_row = sample * length  # the (batch, L) scales are contiguous
    # every h_t, when kept, into a contiguous (batch, L, N, E) fp32 buffer, row by row (coalesced along E)
    states_ptr += sample * length * N_STATE * channels

    # software pipelining by hand: the raw inputs of step t + 1 are loaded while step t computes (converted
    # only when used, so nothing waits on them early); works for every dtype, unlike cp.async (≥ 4 bytes)
    u_next = tl.load(u_ptr, mask=e_ok, other=0)
    delta_next = tl.load(delta_ptr, mask=e_ok, other=0)
    B_next = tl.load(B_ptr, mask=n_ok, other=0)
    C_next = tl.load(C_ptr, mask=n_ok, other=0)
    if HAS_Z:
        z_next = tl.load(z_ptr, mask=e_ok, other=0)
    if U_SCALED:
        u_scale_next = tl.load(u_scale_ptr + scale_row)
    if B_SCALED:
        B_scale_next = tl.load(B_scale_ptr + scale_row)
    if C_SCALED:
        C_scale_next = tl.load(C_scale_ptr + scale_row)

    h = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for t in range(length):
        u, delta = u_next.to(tl.float32), delta_next.to(tl.float32)
        B, C = B_next.to(tl.float32), C_next.to(tl.float32)  # codes when scaled: the scales act further down
        if HAS_Z:
            z = z_next.to(tl.float32)
        if U_SCALED:
            u *= u_scale_next
        if B_SCALED:  # the per-step scales of B and C act once per channel, not once per state
            B_scale = B_scale_next
        if C_SCALED:
            C_scale = C_scale_next
        ahead = tl.minimum(t + 1, length - 1)  # the last step reloads itself: in bounds, no mask per step
        u_next = tl.load(u_ptr + ahead * stride_u_time, mask=e_ok, other=0)
        delta_next = tl.load(delta_ptr + ahead * stride_delta_time, mask=e_ok, other=0)
        B_next = tl.load(B_ptr + ahead * stride_B_time, mask=n_ok, other=0)
        C_next = tl.load(C_ptr + ahead * stride_C_time, mask=n_ok, other=0)
        if HAS_Z:
            z_next = tl.load(z_ptr + ahead * stride_z_time, mask=e_ok, other=0)
        if U_SCALED:
            u_scale_next = tl.load(u_scale_ptr + scale_row + ahead)
        if B_SCALED:
            B_scale_next = tl.load(B_scale_ptr + scale_row + ahead)
        if C_SCALED:
            C_scale_next = tl.load(C_scale_ptr + scale_row + ahead)

        if HAS_DELTA_BIAS:
            delta += delta_bias
        if DELTA_SOFTPLUS:
            delta = _softplus(delta)
        delta_u = delta * u
        if B_SCALED:
            delta_u *= B_scale
        h = tl.exp2(delta[None, :] * A_log2) * h + B[:, None] * delta_u[None, :]
        if STORE_STATES:
            _store_state_rows(states_ptr + t * N_STATE * channels, h, offs_e, e_ok, offs_n, channels, N_STATE)
        y = tl.sum(C[:, None] * h, axis=0)
        if C_SCALED:
            y *= C_scale
        if HAS_D:
            y += D * u
        if HAS_Z:
            y *= z / (1.0 + tl.exp(-z))  # SiLU(z)
        tl.store(y_ptr + t * stride_y_time, y.to(y_ptr.dtype.element_ty), mask=e_ok)


def launch_config(batch: int, channels: int) -> tuple[int, int]:
    """(BLOCK_E, num_warps): one channel per thread, 32 channels per warp, 4 warps per program (BLOCK_E 128) when
    that still gives ≥ 256 programs (about two per SM of an H100), else 2 warps, else 1 warp (BLOCK_E 32).

    One channel per thread keeps the (N = 16) state and its decay rates in ~32 registers, leaving room for the
    pipelined loads and full occupancy. The work is batch · E sequential recurrences of L steps, so small batches
    cannot fill the GPU whatever the block; smaller programs at least spread them over more SMs (Vim-T at
    batch 1: 12 programs of 1 warp instead of 3 of 4). Fixed rules, no autotuning: the interpreter takes one
    configuration and compile time on the lent GPU is scarce."""
    for warps in (4, 2):
        if batch * cdiv(channels, 32 * warps) >= 256:
            return 32 * warps, warps
    return 32, 1


def _kernel_runs_on(device: torch.device) -> bool:
    """CUDA tensors, or CPU tensors when Triton interprets the kernels (TRITON_INTERPRET=1 at import)."""
    return device.type == "cuda" or (device.type == "cpu" and not isinstance(_selective_scan_kernel,
                                                                             triton.JITFunction))


def _check(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
           D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
           u_scale: torch.Tensor | None, B_scale: torch.Tensor | None, C_scale: torch.Tensor | None) -> None:
    """Shapes and dtypes, with the expected value in each message."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, L, E), got shape {tuple(u.shape)}")
    batch, length, channels = u.shape
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A must be (E, N) with E = {channels}, got shape {tuple(A.shape)}")
    n_state = A.shape[1]
    expected = {"delta": (delta, (batch, length, channels)), "B": (B, (batch, length, n_state)),
                "C": (C, (batch, length, n_state)), "z": (z, (batch, length, channels)), "D": (D, (channels,)),
                "delta_bias": (delta_bias, (channels,)), "u_scale": (u_scale, (batch, length)),
                "B_scale": (B_scale, (batch, length)), "C_scale": (C_scale, (batch, length))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (u is {tuple(u.shape)}, A {tuple(A.shape)}), "
                             f"got {tuple(tensor.shape)}")
    for name, tensor in {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias,
                         "u_scale": u_scale, "B_scale": B_scale, "C_scale": C_scale}.items():
        if tensor is not None and tensor.device != u.device:
            raise ValueError(f"{name} is on {tensor.device}, u on {u.device}: all inputs must be on one device")
    for name, tensor in {"delta": delta, "z": z}.items():
        if tensor is not None and tensor.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be fp32, fp16 or bf16, got {tensor.dtype}")
    for name, tensor, scale in (("u", u, u_scale), ("B", B, B_scale), ("C", C, C_scale)):
        if scale is None and tensor.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be fp32, fp16 or bf16 (or int8 codes with {name}_scale), "
                             f"got {tensor.dtype}")
        if scale is not None and tensor.dtype != torch.int8:
            raise ValueError(f"{name}_scale is given, so {name} must hold int8 codes, got {tensor.dtype}")
    for name, tensor in {"A": A, "D": D, "delta_bias": delta_bias}.items():
        if tensor is not None and not tensor.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def _launch_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, u_scale, B_scale, C_scale, y,
                    states, config, z_reversed=False):
    """One forward launch; y (and ``states``, a contiguous fp32 (batch, L, N, E) buffer, when given) filled in.
    A, D, delta_bias and the scales are already fp32 and contiguous where the kernel needs it."""
    batch, length, channels = u.shape
    n_state = A.shape[1]
    placeholder = A  # stands in for absent optional tensors: never read (the constexpr flags are off)
    z_or_u = u if z is None else z  # strides of the placeholder gate are never used either
    z_strides = z_or_u.stride()
    if z is not None and z_reversed:  # step t at z[:, L − 1 − t]: start at the last step, walk back
        z_or_u = z.select(1, length - 1)
        z_strides = (z.stride(0), -z.stride(1), z.stride(2))
    block_e, warps = config or launch_config(batch, channels)
    if block_e < 2 or block_e & (block_e - 1):
        raise ValueError(f"BLOCK_E must be a power of two ≥ 2, got {block_e}")
    grid = (batch, cdiv(channels, block_e))
    _selective_scan_kernel[grid](
        u, delta, A, B, C, placeholder if D is None else D, z_or_u, placeholder if delta_bias is None else delta_bias,
        placeholder if u_scale is None else u_scale, placeholder if B_scale is None else B_scale,
        placeholder if C_scale is None else C_scale, y, placeholder if states is None else states, length, channels,
        *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *z_strides, *y.stride(), *A.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=delta_softplus, U_SCALED=u_scale is not None, B_SCALED=B_scale is not None,
        C_SCALED=C_scale is not None, STORE_STATES=states is not None, N_STATE=n_state, BLOCK_E=block_e,
        BLOCK_N=max(next_power_of_2(n_state), 2), num_warps=warps)


def _as_fp32(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(torch.float32).contiguous() for t in tensors]


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = True,
                   u_scale: torch.Tensor | None = None, B_scale: torch.Tensor | None = None,
                   C_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                   out: torch.Tensor | None = None, config: tuple[int, int] | None = None,
                   return_states: bool = False,
                   z_reversed: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton: y (batch, L, E) of the selective scan, written to ``out`` (any strides) when given.

    u, delta, z, B, C are read through their strides (no copies); A, D, delta_bias are converted to fp32 and the
    (batch, L) scales made contiguous fp32 (small). ``out_dtype`` defaults to u's dtype, fp32 for int8 u.
    ``config`` = (BLOCK_E, num_warps) replaces :func:`launch_config`'s choice (the benchmark compares them).

    Differentiable for float inputs (see :class:`SelectiveScanFunction`): when autograd records, or when
    ``return_states`` asks for every h_t as well ((batch, L, E, N) fp32, a view of a (batch, L, N, E) buffer),
    the call goes through it; ``out``, ``out_dtype`` and int8 inputs are for inference only.

    ``z_reversed``: z is given in the opposite time order, step t's gate at z[:, L − 1 − t] (Vim's backward
    branch scans flipped time while its gate is the forward-time half of in_proj's output). The forward reads
    it backwards through its strides, no flipped copy; under autograd the flip is an ordinary op."""
    _check(u, delta, A, B, C, D, z, delta_bias, u_scale, B_scale, C_scale)
    if not _kernel_runs_on(u.device):
        raise ValueError(f"the Triton scan needs CUDA tensors (CPU tensors only with TRITON_INTERPRET=1 set "
                         f"before kernels are imported), got {u.device}")
    float_inputs = (u, delta, A, B, C, D, z, delta_bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in float_inputs)
    if needs_grad or return_states:
        if any(scale is not None for scale in (u_scale, B_scale, C_scale)) or out is not None or out_dtype:
            raise ValueError("gradients and return_states need float u, B, C and no out/out_dtype (y comes in "
                             "u's dtype); the int8 and out= paths are for inference")
        return SelectiveScanFunction.apply(u, delta, A, B, C, D, z.flip(1) if z_reversed and z is not None else z,
                                           delta_bias, delta_softplus, return_states, config)
    batch, length, channels = u.shape
    out_dtype = out_dtype or (out.dtype if out is not None else
                              torch.float32 if u.dtype == torch.int8 else u.dtype)
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"the output must be fp32, fp16 or bf16, got {out_dtype}")
    y = torch.empty(batch, length, channels, dtype=out_dtype, device=u.device) if out is None else out
    if tuple(y.shape) != (batch, length, channels) or y.dtype != out_dtype or y.device != u.device:
        raise ValueError(f"out must be {out_dtype} {(batch, length, channels)} on {u.device}, "
                         f"got {y.dtype} {tuple(y.shape)} on {y.device}")
    if y.numel():
        _launch_forward(u, delta, A.to(torch.float32), B, C, *_as_fp32(D), z, *_as_fp32(delta_bias), delta_softplus,
                        *_as_fp32(u_scale, B_scale, C_scale), y, None, config, z_reversed)
    return y


@triton.jit
def _selective_scan_backward_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, states_ptr, grad_y_ptr,
        grad_states_ptr, grad_u_ptr, grad_delta_ptr, grad_z_ptr, grad_B_ptr, grad_C_ptr, grad_A_ptr, grad_D_ptr,
        grad_delta_bias_ptr, batch, length, channels,
        stride_u_batch, stride_u_time, stride_u_channel,
        stride_delta_batch, stride_delta_time, stride_delta_channel,
        stride_B_batch, stride_B_time, stride_B_state,
        stride_C_batch, stride_C_time, stride_C_state,
        stride_z_batch, stride_z_time, stride_z_channel,
        stride_gy_batch, stride_gy_time, stride_gy_channel,
        stride_A_channel, stride_A_state,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
        HAS_GRAD_STATES: tl.constexpr, N_STATE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """The adjoint recurrence, from the last step to the first, over the forward's stored states.

    With g_t = ∂L/∂h_t = C_t ∂y0_t + g_{t+1} decay_{t+1} (+ ∂L/∂h_t from returned states), y0 = y before the gate:
    ∂C_t = Σ_e ∂y0_t h_t,  ∂B_t = Σ_e g_t Δ_t u_t,  ∂(Δu)_t = Σ_n g_t B_t,  and through decay_t = exp(Δ_t A) with
    q_t = g_t h_{t−1} decay_t: ∂Δ_t += Σ_n q_t A, ∂A += Σ_t q_t Δ_t. Per-sample/per-block partial sums of ∂A,
    ∂D, ∂delta_bias (over time) and of ∂B, ∂C (over this block's channels) are written, not atomically added:
    the launcher sums them, so results are deterministic. Gradients (batch, L, E) and the partials are
    contiguous fp32."""
    sample = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    offs_e = block * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    e_ok = offs_e < channels
    n_ok = offs_n < N_STATE
    # only A·log2 e is kept (16 registers fewer): Σ_n q A = ln 2 · Σ_n q (A log2 e)
    A_log2 = _load_state_rows(A_ptr, offs_e, e_ok, offs_n, stride_A_channel, stride_A_state, N_STATE, BLOCK_N,
                              BLOCK_E) * LOG2_E
    if HAS_D:
        D = tl.load(D_ptr + offs_e, mask=e_ok, other=0.0)
        grad_D = tl.zeros((BLOCK_E,), dtype=tl.float32)
    if HAS_DELTA_BIAS:
        delta_bias = tl.load(delta_bias_ptr + offs_e, mask=e_ok, other=0.0)
        grad_delta_bias = tl.zeros((BLOCK_E,), dtype=tl.float32)

    u_ptr += sample * stride_u_batch + offs_e * stride_u_channel
    delta_ptr += sample * stride_delta_batch + offs_e * stride_delta_channel
    z_ptr += sample * stride_z_batch + offs_e * stride_z_channel
    grad_y_ptr += sample * stride_gy_batch + offs_e * stride_gy_channel
    B_ptr += sample * stride_B_batch + offs_n * stride_B_state
    C_ptr += sample * stride_C_batch + offs_n * stride_C_state
    per_step = N_STATE * channels  # states and their gradient: (batch, L, N, E), read row by row
    states_ptr += sample * length * per_step
    grad_states_ptr += sample * length * per_step
    row = sample * length * channels + offs_e  # this block's channels in the contiguous (batch, L, E) gradients
    partial_row = (block * batch + sample) * length * N_STATE + offs_n  # (blocks, batch, L, N) partials

    h = _load_state_rows(states_ptr + (length - 1) * per_step, offs_e, e_ok, offs_n, 1, channels, N_STATE, BLOCK_N,
                         BLOCK_E)
    g_later = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)  # g_{t+1} · decay_{t+1}
    grad_A = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for step in range(length):
        t = length - 1 - step
        u = tl.load(u_ptr + t * stride_u_time, mask=e_ok, other=0).to(tl.float32)
        delta_in = tl.load(delta_ptr + t * stride_delta_time, mask=e_ok, other=0).to(tl.float32)
        B = tl.load(B_ptr + t * stride_B_time, mask=n_ok, other=0).to(tl.float32)
        C = tl.load(C_ptr + t * stride_C_time, mask=n_ok, other=0).to(tl.float32)
        grad_y = tl.load(grad_y_ptr + t * stride_gy_time, mask=e_ok, other=0).to(tl.float32)
        h_before = _load_state_rows(states_ptr + tl.maximum(t - 1, 0) * per_step, offs_e, e_ok & (t > 0), offs_n, 1,
                                    channels, N_STATE, BLOCK_N, BLOCK_E)  # h_{-1} = 0
        if HAS_DELTA_BIAS:
            delta_in += delta_bias
        delta = _softplus(delta_in) if DELTA_SOFTPLUS else delta_in

        grad_y0 = grad_y
        if HAS_Z:
            z = tl.load(z_ptr + t * stride_z_time, mask=e_ok, other=0).to(tl.float32)
            y0 = tl.sum(C[:, None] * h, axis=0)
            if HAS_D:
                y0 += D * u
            gate = 1.0 / (1.0 + tl.exp(-z))
            tl.store(grad_z_ptr + row + t * channels, grad_y * y0 * gate * (1.0 + z * (1.0 - gate)), mask=e_ok)
            grad_y0 = grad_y * z * gate
        grad_u = tl.zeros((BLOCK_E,), dtype=tl.float32)
        if HAS_D:
            grad_D += grad_y0 * u
            grad_u = grad_y0 * D
        g = g_later + C[:, None] * grad_y0[None, :]
        if HAS_GRAD_STATES:
            g += _load_state_rows(grad_states_ptr + t * per_step, offs_e, e_ok, offs_n, 1, channels, N_STATE, BLOCK_N,
                                  BLOCK_E)
        delta_u = delta * u
        tl.store(grad_C_ptr + partial_row + t * N_STATE, tl.sum(h * grad_y0[None, :], axis=1), mask=n_ok)
        tl.store(grad_B_ptr + partial_row + t * N_STATE, tl.sum(g * delta_u[None, :], axis=1), mask=n_ok)
        grad_delta_u = tl.sum(g * B[:, None], axis=0)
        decay = tl.exp2(delta[None, :] * A_log2)
        q = g * h_before * decay
        grad_delta = grad_delta_u * u + tl.sum(q * A_log2, axis=0) * LN_2
        grad_A += q * delta[None, :]
        grad_u += grad_delta_u * delta
        if DELTA_SOFTPLUS:  # softplus' = sigmoid (exactly 1 past the threshold, as PyTorch)
            grad_delta = tl.where(delta_in > 20.0, grad_delta, grad_delta / (1.0 + tl.exp(-delta_in)))
        if HAS_DELTA_BIAS:
            grad_delta_bias += grad_delta
        tl.store(grad_u_ptr + row + t * channels, grad_u, mask=e_ok)
        tl.store(grad_delta_ptr + row + t * channels, grad_delta, mask=e_ok)
        g_later = g * decay
        h = h_before

    _store_state_rows(grad_A_ptr + sample * per_step, grad_A, offs_e, e_ok, offs_n, channels, N_STATE)  # (batch, N, E)
    if HAS_D:
        tl.store(grad_D_ptr + sample * channels + offs_e, grad_D, mask=e_ok)  # (batch, E)
    if HAS_DELTA_BIAS:
        tl.store(grad_delta_bias_ptr + sample * channels + offs_e, grad_delta_bias, mask=e_ok)


class SelectiveScanFunction(torch.autograd.Function):
    """The Triton scan with a Triton backward (training and OuroMamba-Gen on the GPU: one launch per layer and
    direction each way instead of L small steps).

    Forward keeps the states only when they are returned; otherwise backward recomputes them with one more
    forward launch into a transient (batch, L, N, E) fp32 buffer, so autograd holds only the inputs between the
    passes (Vim-B at batch 64 would otherwise keep 1.2 GB per layer and direction). Gradients come back in
    each input's dtype, computed in fp32."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_states, config):
        batch, length, channels = u.shape
        A32, D32, bias32 = _as_fp32(A, D, delta_bias)
        y = torch.empty(batch, length, channels, dtype=u.dtype, device=u.device)
        states = u.new_empty(batch, length, A.shape[1], channels, dtype=torch.float32) if return_states else None
        if y.numel():
            _launch_forward(u, delta, A32, B, C, D32, z, bias32, delta_softplus, None, None, None, y, states, config)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.delta_softplus, ctx.config = delta_softplus, config
        return (y, states.transpose(2, 3)) if return_states else y

    @staticmethod
    def backward(ctx, grad_y, grad_states=None):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        batch, length, channels = u.shape
        n_state = A.shape[1]
        A32, D32, bias32 = _as_fp32(A, D, delta_bias)
        if states is None:  # recompute every h_t; y goes to a scratch buffer
            states = u.new_empty(batch, length, n_state, channels, dtype=torch.float32)
            if states.numel():
                _launch_forward(u, delta, A32, B, C, D32, z, bias32, ctx.delta_softplus, None, None, None,
                                torch.empty_like(u), states, ctx.config)
        grad_y = torch.zeros_like(u) if grad_y is None else grad_y
        grad_states = None if grad_states is None else grad_states.transpose(2, 3).contiguous()  # (b, L, N, E)
        block_e, warps = ctx.config or launch_config(batch, channels)
        blocks = cdiv(channels, block_e)
        # every element of these is written by the kernel (no memset); the optional ones only when used
        grads = {name: u.new_empty(batch, length, channels, dtype=torch.float32)
                 for name, tensor in (("u", u), ("delta", delta), ("z", z)) if tensor is not None}
        partial_B, partial_C = (u.new_empty(blocks, batch, length, n_state, dtype=torch.float32) for _ in "BC")
        partial_A = u.new_empty(batch, n_state, channels, dtype=torch.float32)
        partial_D, partial_bias = (None if t is None else u.new_empty(batch, channels, dtype=torch.float32)
                                   for t in (D, delta_bias))
        if states.numel():
            placeholder = A32
            z_or_u = u if z is None else z
            _selective_scan_backward_kernel[(batch, blocks)](
                u, delta, A32, B, C, placeholder if D32 is None else D32, z_or_u,
                placeholder if bias32 is None else bias32, states, grad_y,
                placeholder if grad_states is None else grad_states, grads["u"], grads["delta"],
                grads.get("z", placeholder), partial_B, partial_C, partial_A,
                placeholder if partial_D is None else partial_D, placeholder if partial_bias is None else partial_bias,
                batch, length, channels,
                *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *z_or_u.stride(), *grad_y.stride(),
                *A32.stride(), HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
                DELTA_SOFTPLUS=ctx.delta_softplus, HAS_GRAD_STATES=grad_states is not None, N_STATE=n_state,
                BLOCK_E=block_e, BLOCK_N=max(next_power_of_2(n_state), 2), num_warps=warps)
        grad_z = None if z is None else grads["z"].to(z.dtype)
        return (grads["u"].to(u.dtype), grads["delta"].to(delta.dtype), partial_A.sum(0).t().to(A.dtype),
                partial_B.sum(0).to(B.dtype), partial_C.sum(0).to(C.dtype),
                None if D is None else partial_D.sum(0).to(D.dtype), grad_z,
                None if delta_bias is None else partial_bias.sum(0).to(delta_bias.dtype), None, None, None)


def selective_scan_reference(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                             delta_bias: torch.Tensor | None = None, delta_softplus: bool = True,
                             u_scale: torch.Tensor | None = None, B_scale: torch.Tensor | None = None,
                             C_scale: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch: the same function step by step in float64 (returns float64 (batch, L, E)); int8 codes are
    dequantized first. Works on any device; the ground truth of the tests and of the benchmark's checks."""
    _check(u, delta, A, B, C, D, z, delta_bias, u_scale, B_scale, C_scale)

    def float64(x: torch.Tensor | None, scale: torch.Tensor | None = None) -> torch.Tensor | None:
        if x is None:
            return None
        return x.double() if scale is None else x.double() * scale.double()[..., None]

    u, B, C = float64(u, u_scale), float64(B, B_scale), float64(C, C_scale)
    delta, A, D, z, delta_bias = (float64(t) for t in (delta, A, D, z, delta_bias))
    if delta_bias is not None:
        delta = delta + delta_bias
    if delta_softplus:
        delta = torch.nn.functional.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        ys.append(torch.einsum("ben,bn->be", h, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(u.shape)
    if D is not None:
        y = y + u * D
    return y if z is None else y * torch.nn.functional.silu(z)

