"""Implicit attention of the selective scan, plain and "enhanced" by spatial neighbourhoods (OuroMamba-Gen).

Unrolling the recurrence h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t gives y_t = Σ_{τ≤t} α(t, τ) u_τ with, per channel e,

    α_e(t, τ) = Σ_n C_t,n · exp(A_e,n · Σ_{j=τ+1..t} Δ_j,e) · Δ_τ,e B_τ,n          (the implicit attention).

OuroMamba replaces h_t by the *patched* state h_p(t) = Σ_{k∈N(t)} w_k h_k, the states of the p×p patch-grid
neighbourhood N(t) of token t weighted by w_k ∝ mean_e Δ_k,e (normalised to sum to 1 over N(t), per image), so

    α_p,e(t, τ) = Σ_{k∈N(t), k≥τ} w_k · Σ_n C_t,n exp(A_e,n Σ_{j=τ+1..k} Δ_j,e) Δ_τ,e B_τ,n,

and the patch feature of token t is y_p(t) = C_t · h_p(t) = Σ_τ α_p(t, τ) u_τ — the enhanced attention applied to
the input, computed from the states without ever forming the L×L matrix (:func:`patch_features`).
Rows of α and α_p for one query token (:func:`attention_rows`) are what the app draws.

Token order: the backward branch scans the flipped sequence; everything here is returned in token order (the
order of the patch grid with the CLS token at its middle position), and the CLS token is dropped before any
grid operation. The CLS token has no place on the grid, so its neighbourhood is itself (α_p = α for its row).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.errors import StudioError, is_whole
from core.intercept import BACKWARD, DIRECTIONS, Interceptor, Site, intercepting
from core.models import VisionMamba

_SCAN_INPUTS = {"x_proj.input": "u", "delta_pre": "delta_pre", "A": "A", "B": "B", "C": "C"}


@dataclass
class ScanTrace:
    """The inputs of one scan (one layer, one direction), in scan order, keeping their autograd history."""

    layer: int
    direction: str
    u: torch.Tensor  # (batch, L, E)
    delta_pre: torch.Tensor  # (batch, L, E), before softplus
    A: torch.Tensor  # (E, N)
    B: torch.Tensor  # (batch, L, N)
    C: torch.Tensor  # (batch, L, N)
    states: torch.Tensor  # (batch, L, E, N): every h_t

    @property
    def delta(self) -> torch.Tensor:
        return F.softplus(self.delta_pre.float())

    def token_order(self, x: torch.Tensor) -> torch.Tensor:
        """A (batch, L, ...) tensor of this scan, put back in token order."""
        return x.flip(1) if self.direction == BACKWARD else x


class ScanRecorder(Interceptor):
    """Keeps the scan inputs and states of the chosen layers (both directions) without detaching them."""

    collects_states = True

    def __init__(self, layers: list[int]):
        self.layers = set(layers)
        self._inputs: dict[tuple[int, str], dict[str, torch.Tensor]] = defaultdict(dict)

    def intercept(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        if site.layer in self.layers and site.tensor in _SCAN_INPUTS:
            self._inputs[site.layer, site.direction][_SCAN_INPUTS[site.tensor]] = x
        return x

    def collect_states(self, site: Site, states: torch.Tensor) -> None:
        if site.layer in self.layers:
            self._inputs[site.layer, site.direction]["states"] = states

    def traces(self) -> list[ScanTrace]:
        return [ScanTrace(layer, direction, **tensors) for (layer, direction), tensors in sorted(self._inputs.items())]


def check_layers(model: VisionMamba, layers: list[int] | tuple[int, ...] | None) -> list[int]:
    """The chosen layer indices (all when None), validated with a one-line message."""
    depth = model.cfg.depth
    chosen = list(range(depth)) if layers is None else list(layers)
    bad = [layer for layer in chosen if not is_whole(layer) or not 0 <= layer < depth]
    if bad or not chosen:
        raise StudioError(f"layers must be indices in 0..{depth - 1} (the model has {depth}), got {list(chosen)}")
    return [int(layer) for layer in chosen]


def trace_scans(model: VisionMamba, images: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, list[ScanTrace]]:
    """Run ``model`` on ``images`` and return the logits and the scan traces of ``layers`` (both directions)."""
    with intercepting(model, ScanRecorder(layers)) as recorder:
        logits = model(images)
    return logits, recorder.traces()


def drop_cls(x: torch.Tensor, cls_position: int) -> torch.Tensor:
    """The patch tokens of a (batch, L, ...) token-ordered tensor (the CLS token removed from its position)."""
    return torch.cat([x[:, :cls_position], x[:, cls_position + 1:]], dim=1)


def check_neighbourhood(size: int) -> None:
    if not is_whole(size) or size < 1 or size % 2 == 0:
        raise StudioError(f"the neighbourhood must be an odd size ≥ 1 (1, 3, 5, …), got {size}")


def neighbourhood_matrix(grid: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(P, P) boolean: patch k is in the size×size grid neighbourhood of patch t (borders: the cells that exist)."""
    index = torch.arange(grid * grid, device=device)
    rows, cols = index.div(grid, rounding_mode="floor"), index % grid
    half = size // 2
    return ((rows[:, None] - rows[None, :]).abs() <= half) & ((cols[:, None] - cols[None, :]).abs() <= half)


def neighbourhood_mean(values: torch.Tensor, weights: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """Σ_{k∈N(t)} w_k v_k / Σ_{k∈N(t)} w_k for every patch t, as one (P×P)·(P×F) matmul per image (forward +
    backward 5× faster than pooling the weighted values on the grid). values (batch, P, F), weights (batch, P) > 0."""
    mixing = neighbourhood_matrix(grid, size, weights.device).to(weights.dtype) * weights.unsqueeze(1)  # (b, P, P)
    return torch.bmm(mixing / mixing.sum(-1, keepdim=True), values.to(weights.dtype))


def patch_features(trace: ScanTrace, cls_position: int, grid: int, neighbourhood: int) -> torch.Tensor:
    """y_p(t) = C_t · h_p(t) for every patch token t: (batch, P, E), token order, differentiable.

    ``neighbourhood`` 1 gives the plain scan output without the D skip (C_t · h_t)."""
    check_neighbourhood(neighbourhood)
    states = drop_cls(trace.token_order(trace.states), cls_position)  # (batch, P, E, N)
    C = drop_cls(trace.token_order(trace.C.float()), cls_position)  # (batch, P, N)
    batch, patches, channels, n_state = states.shape
    if neighbourhood > 1:
        weights = drop_cls(trace.token_order(trace.delta.mean(-1)), cls_position)
        states = neighbourhood_mean(states.reshape(batch, patches, -1), weights, grid, neighbourhood)
        states = states.reshape(batch, patches, channels, n_state)
    return torch.einsum("bpen,bpn->bpe", states, C)


def neighbour_tokens(patch: int, grid: int, size: int, cls_position: int) -> list[int]:
    """Token indices of the patches in the size×size neighbourhood of patch ``patch`` (row-major grid index)."""
    row, col = divmod(patch, grid)
    half = size // 2
    cells = [r * grid + c for r in range(max(0, row - half), min(grid, row + half + 1))
             for c in range(max(0, col - half), min(grid, col + half + 1))]
    return [cell + (cell >= cls_position) for cell in cells]


def _rows_to(ends: torch.Tensor, query_step: int, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor) -> torch.Tensor:
    """Σ_n C_q,n exp(A_e,n Σ_{j=τ+1..k} Δ_j,e) Δ_τ,e B_τ,n for each end step k in ``ends`` and every τ ≤ k
    (0 for τ > k): (len(ends), L, E). One sample, scan order; C from the query step q."""
    cumulative = delta.cumsum(0)  # (L, E)
    steps = torch.arange(delta.shape[0])
    decay_log = (cumulative[ends].unsqueeze(1) - cumulative.unsqueeze(0)).unsqueeze(-1) * A  # (K, L, E, N)
    causal = (steps.unsqueeze(0) <= ends.unsqueeze(1))[..., None, None]
    decay = torch.where(causal, torch.exp(decay_log.clamp_max(0)), torch.zeros((), dtype=delta.dtype))
    return torch.einsum("kten,tn,n->kte", decay, B, C[query_step]) * delta


def attention_rows(trace: ScanTrace, query: int | str, cls_position: int, grid: int,
                   neighbourhood: int, sample: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain and the enhanced implicit-attention rows of one query token, per channel: two (L, E) tensors
    in token order (column τ: how much input token τ contributes to the query's output).

    ``query`` is "cls" or a patch index on the row-major grid."""
    check_neighbourhood(neighbourhood)
    length = trace.u.shape[1]
    if query == "cls":
        tokens = [cls_position]
    elif is_whole(query) and 0 <= query < grid * grid:
        query = int(query)
        tokens = neighbour_tokens(query, grid, neighbourhood, cls_position)
    else:
        raise StudioError(f"the query must be 'cls' or a patch index in 0..{grid * grid - 1}, got {query!r}")
    query_token = cls_position if query == "cls" else query + (query >= cls_position)
    to_step = (lambda token: length - 1 - token) if trace.direction == BACKWARD else (lambda token: token)  # noqa: E731
    with torch.no_grad():
        delta = trace.delta[sample].double()
        A, B, C = trace.A.double(), trace.B[sample].double(), trace.C[sample].double()
        ends = torch.tensor([to_step(token) for token in tokens])
        rows = _rows_to(ends, to_step(query_token), delta, A, B, C)
        weights = delta.mean(-1)[ends]
        enhanced = (rows * (weights / weights.sum())[:, None, None]).sum(0)
        plain = rows[tokens.index(query_token)]
        if trace.direction == BACKWARD:
            plain, enhanced = plain.flip(0), enhanced.flip(0)
    return plain.float(), enhanced.float()


@contextmanager
def frozen(model: VisionMamba) -> Iterator[VisionMamba]:
    """Eval mode and no parameter gradients while images are optimised; the model comes back as it was."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.train(training)


def attention_maps(model: VisionMamba, image: torch.Tensor, layer: int, direction: str, query: int | str = "cls",
                   neighbourhood: int = 5) -> dict[str, torch.Tensor]:
    """Plain and enhanced implicit-attention maps of one image: the query's row, mean |α| over channels,
    on the (grid, grid) patch grid (the CLS column dropped). ``image`` is (C, H, W), normalised."""
    if direction not in DIRECTIONS:
        raise StudioError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    (layer,) = check_layers(model, [layer])
    cfg = model.cfg
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise StudioError(f"attention_maps takes one image shaped (channels, height, width), got {shape}: pass "
                          "images[i] of a batch")
    model.check_input(image.unsqueeze(0))
    with frozen(model), torch.no_grad():
        _, traces = trace_scans(model, image.unsqueeze(0), [layer])
    trace = next(t for t in traces if t.direction == direction)
    maps = {}
    rows = attention_rows(trace, query, cfg.cls_position, cfg.grid_size, neighbourhood)
    for name, row in zip(("plain", "enhanced"), rows, strict=True):
        patch_row = drop_cls(row.abs().mean(-1).reshape(1, -1), cfg.cls_position)[0]
        maps[name] = patch_row.reshape(cfg.grid_size, cfg.grid_size)
    return maps
