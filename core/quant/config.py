"""QuantConfig: everything that defines a quantization run; serialised with every result for provenance."""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from core.errors import StudioError, check_seed, is_whole
from core.records import check_types, checked_fields

METHODS = {
    "ouromamba": "OuroMamba: per-time-step dynamic outlier channels at high precision, static per-token inliers",
    "static_outliers": "OuroMamba with a static outlier list: channels chosen once at calibration",
    "ptq4vm": "PTQ4VM-style: static per-token activation scales, per-channel weights",
    "ptq4vm_smooth": "PTQ4VM-style with a SmoothQuant-style smoothing scale (α) on linear inputs",
    "dynamic_per_token": "dynamic per-token activation scales, no outlier handling",
    "per_tensor": "static per-tensor min-max (weights and activations)",
}
SETTINGS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A8": (4, 8), "W4A4": (4, 4)}
OUTLIER_METHODS = ("ouromamba", "static_outliers")  # the methods with the k·σ rule and an outlier path
OVERRIDE_FIELDS = {"w_bits", "a_bits", "o_bits", "k", "k_delta", "n_refresh", "skip"}
ACTIVATION_FIELDS = {"a_bits", "o_bits", "k", "k_delta", "n_refresh"}  # what an override changes at non-weight sites
# progress(stage, done, total, loss): stage "calibrate" counts sites, "reconstruct" counts blocks (with loss)
Progress = Callable[[str, int, int, float | None], None]


@dataclass(frozen=True)
class ReconstructionConfig:
    """Block-wise reconstruction after the static calibration (defaults: the release's, §7.7). ``epochs`` 0
    keeps the clip-searched scales. ``max_learned_bits`` b: only the scales of grids of at most b bits learn,
    finer grids keep their calibrated scales (None, the default: every scale learns, as in the release). AdamW
    moves a scale by about lr a step whatever its size, so an 8-bit scale, ~18× smaller than a 4-bit one, moves
    far (x_proj's 8-bit weights fell from 44 to 8–15 dB SQNR), yet on held-out images that never cost top-1
    beyond the noise, and it rescued badly calibrated grids: kept at 4, static-outlier W8A8 on noise lost 2.4 points
    (docs/method-decisions.md, results/quant/fine_grid_reconstruction.md). ``reflect_scales``: a scale that a step
    takes below zero becomes |s| (in a quantizer without a floor, s and −s make the same grid, so it would keep
    learning); off (the default, and every committed result), it stays under the fake quantizer's floor, where it
    gets no gradient, and its channel rounds to zero for good (docs/method-decisions.md, "Scales that cross
    zero")."""

    epochs: int = 10
    lr: float = 5e-4
    weight_decay: float = 1e-5
    batch_size: int = 32
    grad_clip: float = 2.0
    seed: int = 0
    max_learned_bits: int | None = None
    reflect_scales: bool = False

    def __post_init__(self) -> None:
        check_types(self, "ReconstructionConfig")
        if self.epochs < 0 or self.batch_size < 1 or not (_is_number(self.lr) and self.lr > 0):
            raise StudioError(f"reconstruction needs epochs ≥ 0, batch_size ≥ 1 and a finite lr > 0 (got epochs="
                              f"{self.epochs}, batch_size={self.batch_size}, lr={self.lr})")
        if not (_is_number(self.weight_decay) and self.weight_decay >= 0
                and _is_number(self.grad_clip) and self.grad_clip > 0):
            raise StudioError(f"reconstruction needs a finite weight_decay ≥ 0 and grad_clip > 0 (got "
                              f"weight_decay={self.weight_decay}, grad_clip={self.grad_clip})")
        check_seed(self.seed)


@dataclass(frozen=True)
class QuantConfig:
    """A quantization run: method, bit-widths, outlier rule and per-site overrides.

    ``release_compatible`` reproduces the released code: a batch-wide outlier trigger, mean/std over all
    channels, and S6 quantizers (Δ, A, B, C, D) shared by both scan directions (calibrated by the backward
    pass, which runs second). ``o_bits`` 16 keeps outlier channels in floating point (the release's W4A8
    "O16" setting). ``overrides`` maps site-name patterns (fnmatch, e.g. ``"layers.0.*"`` or
    ``"*.out_proj.*"``) to field changes (``w_bits``, ``a_bits``, ``o_bits``, and the outlier rule's ``k``,
    ``k_delta``, ``n_refresh``: per-site thresholds) or ``{"skip": True}`` to keep those sites in floating point.
    """

    method: str = "ouromamba"
    w_bits: int = 4
    a_bits: int = 4
    o_bits: int = 8
    k: float = 3.0
    k_delta: float = 4.0
    n_refresh: int = 10
    weight_group_size: int = 0  # 0: one scale per output channel; g > 0: per channel and group of g inputs
    clip_p: float = 2.4
    smoothing_alpha: float = 0.5
    release_compatible: bool = False
    quantize_state: bool = False  # h inside the recurrence, a_bits, static per-step scale (off: as the release)
    overrides: dict[str, dict] = field(default_factory=dict)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)

    def __post_init__(self) -> None:
        check_types(self, "QuantConfig")
        if self.method not in METHODS:
            raise StudioError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("w_bits", "a_bits"):
            _check_bits(name, getattr(self, name))
        _check_bits("o_bits", self.o_bits, allow_float=True)
        if not (_is_number(self.k) and _is_number(self.k_delta) and self.k >= 0 and self.k_delta >= 0):
            raise StudioError(f"k must be a finite number ≥ 0 (got k={self.k}, k_delta={self.k_delta})")
        if self.n_refresh < 1:
            raise StudioError(f"n_refresh must be at least 1 time-step (got {self.n_refresh})")
        if self.weight_group_size < 0:
            raise StudioError(f"weight_group_size must be 0 (per channel) or positive (got {self.weight_group_size})")
        if not 0 <= self.smoothing_alpha <= 1:
            raise StudioError(f"smoothing_alpha must be in [0, 1] (got {self.smoothing_alpha})")
        if not (_is_number(self.clip_p) and self.clip_p > 0):
            raise StudioError(f"clip_p, the clip search's error norm, must be a finite number > 0 (got {self.clip_p})")
        if not isinstance(self.reconstruction, ReconstructionConfig):
            raise StudioError(f"reconstruction must be a ReconstructionConfig, got {self.reconstruction!r}")
        for pattern, change in self.overrides.items():
            if not isinstance(change, dict):
                raise StudioError(f"override {pattern!r} must map to fields, e.g. {{\"a_bits\": 8}}, got {change!r}")
            unknown = set(change) - OVERRIDE_FIELDS
            if unknown:
                raise StudioError(f"override {pattern!r} sets unknown fields {sorted(unknown)}; "
                                  f"allowed: {sorted(OVERRIDE_FIELDS)}")
            for name in ("w_bits", "a_bits"):
                if name in change:
                    _check_bits(f"{pattern}: {name}", change[name])
            if "o_bits" in change:
                _check_bits(f"{pattern}: o_bits", change["o_bits"], allow_float=True)
            for name in ("k", "k_delta"):
                if name in change and not (_is_number(change[name]) and change[name] >= 0):
                    raise StudioError(f"{pattern}: {name} must be a number ≥ 0, got {change[name]!r}")
            if not isinstance(change.get("skip", False), bool):
                raise StudioError(f"{pattern}: skip must be true or false, got {change['skip']!r}")
            refresh = change.get("n_refresh", 1)
            if not (is_whole(refresh, plain=True) and refresh >= 1):
                raise StudioError(f"{pattern}: n_refresh must be a whole number of time-steps ≥ 1, got {refresh!r}")

    @property
    def label(self) -> str:
        return f"{self.method} {self.setting}"

    @property
    def setting(self) -> str:
        """'W4A4O8': the bit-widths, and the outliers' where the method has an outlier path."""
        outliers = f"O{self.o_bits}" if self.method in OUTLIER_METHODS else ""
        return f"W{self.w_bits}A{self.a_bits}{outliers}"

    def for_site(self, name: str) -> QuantConfig | None:
        """The config as it applies to one site after overrides (in order), or None if the site is skipped."""
        config = self
        for pattern, change in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                if change.get("skip"):
                    return None
                config = replace(config, **{k: v for k, v in change.items() if k != "skip"})
        return config

    def check_overrides(self, site_names: list[str]) -> None:
        """Every override pattern must match at least one site of the model."""
        if unmatched := unmatched_patterns(self.overrides, site_names):
            example = site_names[0] if site_names else "?"
            raise StudioError(f"override {unmatched[0]!r} matches no site of this model (site names look like "
                              f"{example!r})")
        for pattern, change in self.overrides.items():
            matched = fnmatch.filter(site_names, pattern)
            weights = any(name.endswith(".weight") for name in matched)
            activations = any(not name.endswith(".weight") for name in matched)
            if not change:
                raise StudioError(f'override {pattern!r} sets no field: e.g. {{"a_bits": 8}} or {{"skip": true}}')
            if not (change.get("skip") or ("w_bits" in change and weights)
                    or (set(change) & ACTIVATION_FIELDS and activations)):
                kind, other = ("weights", "w_bits") if not activations else ("activations", "a_bits, o_bits, k, "
                                                                                             "k_delta, n_refresh")
                raise StudioError(f"override {pattern!r} changes nothing: its sites are {kind}, and it sets "
                                  f"{', '.join(sorted(change))} (only {other} apply to them)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> QuantConfig:
        values = checked_fields(cls, values, "QuantConfig")
        if isinstance(values.get("reconstruction"), dict):
            values["reconstruction"] = ReconstructionConfig(**values["reconstruction"])
        return cls(**values)


def parse_overrides(text: str) -> dict[str, dict]:
    """``QuantConfig.overrides`` from JSON text as a person types it (empty: none), e.g.
    ``{"layers.0.*": {"w_bits": 8}}``; field names and values are checked by :class:`QuantConfig`."""
    if not text.strip():
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as err:
        raise StudioError(f"overrides are not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                          'example: {"layers.0.*": {"w_bits": 8}}') from None
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise StudioError('overrides must map site patterns to field changes, e.g. {"layers.0.*": {"w_bits": 8}} '
                          'or {"*.out_proj.*": {"skip": true}}')
    return overrides


def unmatched_patterns(overrides: dict[str, dict], site_names: list[str]) -> list[str]:
    """The override patterns that match none of ``site_names``, in their order."""
    return [pattern for pattern in overrides if not fnmatch.filter(site_names, pattern)]


def set_override(overrides: dict[str, dict], pattern: str, change: dict) -> dict[str, dict]:
    """``overrides`` with ``pattern`` → ``change`` applied last (overrides apply in order, so it wins over the
    broader patterns before it): a skip replaces the pattern's settings, other changes merge into them and end
    an earlier skip."""
    earlier = {} if change.get("skip") else {k: v for k, v in overrides.get(pattern, {}).items() if k != "skip"}
    others = {key: value for key, value in overrides.items() if key != pattern}
    return {**others, pattern: {**earlier, **change}}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_bits(name: str, bits: int, allow_float: bool = False) -> None:
    allowed = set(range(2, 9)) | ({16} if allow_float else set())
    if bits not in allowed:
        extra = " or 16 (floating point)" if allow_float else ""
        raise StudioError(f"{name} must be an integer from 2 to 8{extra}, got {bits!r}")
