"""A real quantized Vim: integer weight codes that run the kernels, converted from a calibrated simulation.

:func:`pack` turns a fake-quantized :class:`QuantizedVim` (OuroMamba, 4/8-bit weights and inliers, 8-bit
outliers, one weight scale per output channel) into a :class:`PackedVim` whose four projections keep only
integer weight codes (int8, or int4 two per byte) with their per-output-channel scales, and compute

    x → ``detect_quant`` (per-time-step outlier detection, inliers with the calibrated S^I(t), outliers int8)
      → ``mixed_gemm`` (integer products, int32 accumulation, scales applied in the epilogue, + bias)

with the Triton kernels on CUDA and with the kernels' PyTorch references elsewhere (the same integers,
multiplied in float64: for checking, not for speed). The S6 tensors enter the scan dequantized: Δ before
softplus, B and C per time-step as the model runs, through ``detect_fake_quant`` when the kernels run (one
launch per tensor) and through the simulation's own quantizers elsewhere; A and D once, here (they do not
depend on the input). The float parts (patch embed, conv1d, norms, the head) stay as they are.

:func:`save_packed` / :func:`load_packed`: one safetensors file holding the codes, the scales, the float
tensors and, as metadata, the Vim config, the QuantConfig and the provenance of the calibration.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from core.errors import StudioError, expect
from core.intercept import Interceptor, Site, set_interceptor
from core.models import VimConfig, VisionMamba
from core.models.fused import FusedForward, check_backend, uses_kernels
from core.models.loading import (
    CONFIG_METADATA_KEY,
    PACKED_FORMAT_PREFIX,
    load_state_dict_strict,
    refuse_nonfinite,
    write_safetensors,
)
from core.quant.config import QuantConfig
from core.quant.fake import MIN_SCALE
from core.quant.model import QuantizedVim
from core.quant.quantize import LINEARS, SHARED_LINEARS, activation_quantizer, quantized_sites
from core.quant.quantizers import OutlierAwareQuantizer, WeightQuantizer
from kernels.detect_fake_quant import detect_fake_quant
from kernels.detect_quant import DetectQuantOutput, detect_quant, detect_quant_reference, window_rows
from kernels.merge_detect_quant import merge_detect_quant
from kernels.mixed_gemm import GATHER_MIN_K, OUTPUT_DTYPES, mixed_gemm, mixed_gemm_reference, quantize_weight
from kernels.norm_detect_quant import norm_detect_quant
from kernels.packing import unpack_int4

FORMAT = PACKED_FORMAT_PREFIX + "1"
KERNEL_BITS = (4, 8)  # what detect_quant and mixed_gemm take for weights and inliers
DYNAMIC_S6 = ("delta_pre", "B", "C")  # quantized as the model runs
STATIC_S6 = ("A", "D")  # quantized once, at packing
LINEAR_SITES = len(SHARED_LINEARS) + 2 * (len(LINEARS) - len(SHARED_LINEARS))  # packed projections per layer
# Where the outlier set seldom grows inside a window, detection runs in rounds over the window instead of step by
# step (the kernels' ``rows_per_round``, ``window_rows``; the same values). Measured on the default model
# (results/quant/outlier_growth.md): Δ's and dt_proj's input sets never grow after the refresh, B's and C's grow
# once in 13 % / 35 % of windows; the inputs of in_proj, x_proj and out_proj grow at 4.0, 8.3 and 7.0 steps of
# 10, where rounds would redo work for few fewer rounds, so those stay step by step.
WINDOW_ROUND_TENSORS = ("dt_proj", "delta_pre", "B", "C")


def detection_rows(tensor: str, channels: int, n_refresh: int) -> int:
    """``rows_per_round`` of the detection at a site's tensor (``"dt_proj"`` for its input, ``"B"``, …)."""
    return window_rows(channels, n_refresh) if tensor in WINDOW_ROUND_TENSORS else 1


def _key(name: str) -> str:
    return name.replace(".", ":")  # module and buffer names cannot hold dots


class PackedLinear(nn.Module):
    """One projection as integers: weight codes (N, K) int8 or (N, K/2) packed int4, a scale per output
    channel, and the input's outlier-aware quantizer (static per-time-step inlier scale, k, n_refresh).

    The kernels compute 4-bit weights and inliers in int8 (values in ±7): Hopper has no int4 MMA, and the
    measured packed-nibble GEMM ran at half the int8 one (unpacking in the K loop; kernels/README.md). The
    integers, hence the results, are the same; storage and the saved file stay packed, and an int8 copy of the
    weight (not saved) is the GEMM's operand. From K = ``GATHER_MIN_K`` on, the GEMM also keeps the
    weight's int8 transpose (not saved) and multiplies outliers over each row block's outlier channels only
    (``mixed_gemm``'s gathered path: the same integers)."""

    def __init__(self, weight_codes: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
                 a_bits: int, k: float, n_refresh: int):
        super().__init__()
        self.register_buffer("weight_codes", weight_codes)
        self.register_buffer("unpacked_weight", unpack_int4(weight_codes) if weight_codes.dtype == torch.uint8
                             else None, persistent=False)
        self.register_buffer("outlier_weight_t", self.int8_weight.t().contiguous()
                             if self.int8_weight.shape[1] >= GATHER_MIN_K else None, persistent=False)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("input_scale", input_scale)
        self.a_bits, self.k, self.n_refresh = a_bits, k, n_refresh

    @classmethod
    def from_simulation(cls, weight: torch.Tensor, weight_quantizer: WeightQuantizer,
                        input_quantizer: OutlierAwareQuantizer, w_bits: int, a_bits: int) -> PackedLinear:
        scale = weight_quantizer.scale.detach().reshape(-1).float().clamp(min=MIN_SCALE)
        codes = quantize_weight(weight.detach(), scale, w_bits)
        input_scale = input_quantizer.scale.detach().float().clone()
        return cls(codes, scale, input_scale, a_bits, input_quantizer.k, input_quantizer.n_refresh)

    @property
    def int8_weight(self) -> torch.Tensor:
        """The GEMM's weight operand: the codes in int8 (unpacked once for 4-bit weights)."""
        return self.weight_codes if self.unpacked_weight is None else self.unpacked_weight

    @property
    def w_bits(self) -> int:
        return 4 if self.weight_codes.dtype == torch.uint8 else 8

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, use_kernels: bool,
                rows_per_round: int = 1, tune: bool = False) -> torch.Tensor:
        if x.shape[1] != self.input_scale.numel():
            raise StudioError(f"this model was calibrated for {self.input_scale.numel()} time-steps, got {x.shape[1]}")
        args = (x, self.input_scale, self.k, self.n_refresh, self.a_bits)
        codes = detect_quant(*args, lean=True, rows_per_round=rows_per_round, tune=tune) if use_kernels \
            else detect_quant_reference(*args)
        return self.gemm(codes, bias, x.dtype, use_kernels, tune)

    def gemm(self, codes: DetectQuantOutput, bias: torch.Tensor | None, dtype: torch.dtype,
             use_kernels: bool, tune: bool = False) -> torch.Tensor:
        """(batch, L, N) in ``dtype`` from the input's codes, however they were made (``detect_quant`` or a
        fused producer such as ``norm_detect_quant``). The kernels multiply int8 codes (lean outputs); the
        reference path multiplies the packed ones, so the packed layout stays checked end to end."""
        batch, length, _ = codes.inlier_codes.shape
        rows = batch * length
        inliers = codes.inlier_codes if use_kernels or self.a_bits == 8 else codes.inlier_packed
        operands = (inliers.reshape(rows, inliers.shape[-1]), codes.inlier_scale.reshape(rows),
                    self.int8_weight if use_kernels else self.weight_codes, self.weight_scale,
                    codes.outlier_codes.reshape(rows, codes.outlier_codes.shape[-1]), codes.outlier_scale.reshape(rows),
                    bias)
        if use_kernels:
            y = mixed_gemm(*operands, out_dtype=dtype if dtype in OUTPUT_DTYPES else torch.float32,
                           outlier_weight_t=self.outlier_weight_t, tune=tune)
        else:
            y = mixed_gemm_reference(*operands)
        return y.to(dtype).reshape(batch, length, y.shape[-1])


class PackedInterceptor(Interceptor):
    """Projections as integer GEMMs on stored codes; Δ, B, C through their quantizers; A and D replaced by
    their stored quantized values. Sites a config skipped stay in floating point."""

    def __init__(self, linears: dict[str, PackedLinear], dynamic: dict[str, nn.Module],
                 static: dict[str, torch.Tensor], backend: str):
        self.linears, self.dynamic, self.static, self.backend = linears, dynamic, static, backend
        self.tune_launches = True  # kernel launches timed per shape on CUDA (kernels.tuning): no value changes

    def linear(self, input_site: Site, weight_site: Site, x: torch.Tensor, weight: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
        packed = self.linears.get(_key(weight_site.name))
        if packed is None:
            return F.linear(x, weight, bias)
        rows = detection_rows(input_site.tensor.split(".")[0], x.shape[-1], packed.n_refresh)
        return packed(x, bias, uses_kernels(self.backend, x), rows, self.tune_launches)

    def intercept(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        key = _key(site.name)
        if key in self.static:
            return self.static[key].to(x.dtype)
        quantizer = self.dynamic.get(key)
        if quantizer is None:
            return x
        if uses_kernels(self.backend, x) and _kernel_runs(quantizer):
            zero = quantizer.zero_point
            return detect_fake_quant(x, quantizer.scale.detach(), None if zero is None else zero.detach(),
                                     quantizer.k, quantizer.n_refresh, quantizer.qmax,
                                     0 if quantizer.outlier is None else quantizer.outlier.qmax,
                                     detection_rows(site.tensor, x.shape[-1], quantizer.n_refresh),
                                     self.tune_launches)
        # in fp32 as the kernel computes: in fp16 the scale floor (1e-8) rounds to 0 and a 0/0 gives NaN
        return quantizer(x.float()).to(x.dtype)


def _kernel_runs(quantizer: nn.Module) -> bool:
    """``detect_fake_quant`` computes OuroMamba's per-time-step quantizer, without smoothing (the S6 tensors
    have no weight to fold it into); anything else stays in PyTorch."""
    return isinstance(quantizer, OutlierAwareQuantizer) and quantizer.smoothing is None and \
        not quantizer.static_channels and not quantizer.release_compatible


class PackedVim(nn.Module):
    """A Vim whose quantized projections hold integer codes only (their float weights are gone).

    ``backend``: ``"auto"`` runs the Triton kernels on CUDA tensors and the PyTorch references elsewhere;
    ``"triton"`` always runs the kernels (on the CPU only under ``TRITON_INTERPRET=1``); ``"reference"`` never.
    """

    def __init__(self, model: VisionMamba, config: QuantConfig, linears: dict[str, PackedLinear],
                 dynamic: dict[str, nn.Module], static: dict[str, torch.Tensor], provenance: dict,
                 backend: str = "auto"):
        super().__init__()
        check_backend(backend)
        self.model, self.config, self.provenance = model, config, provenance
        self.fused = True  # the fused producer kernels when the kernels run (False: one kernel per operation)
        self.concurrent_directions = True  # fused on CUDA: the backward branches on a side stream (FusedForward)
        self.linears = nn.ModuleDict({_key(name): module for name, module in linears.items()})
        self.dynamic = nn.ModuleDict({_key(name): module for name, module in dynamic.items()})
        self.static = nn.Module()
        for name, value in static.items():
            self.static.register_buffer(_key(name), value)
        for name in linears:  # the float weight is not kept: only the codes exist
            model.linear_at(name).register_parameter("weight", None)
        self.interceptor = PackedInterceptor(dict(self.linears.items()), dict(self.dynamic.items()),
                                             dict(self.static.named_buffers()), backend)
        set_interceptor(self.model, self.interceptor)
        self.eval()

    @property
    def cfg(self) -> VimConfig:
        return self.model.cfg

    @property
    def backend(self) -> str:
        return self.interceptor.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.interceptor.backend = check_backend(value)

    @property
    def tune_launches(self) -> bool:
        """On CUDA, each detection's warps and rows per round and each GEMM's tiles are timed at the first call of
        each shape and the fastest kept (``kernels.tuning``); False runs the kernels' fixed rules. Never changes a
        value."""
        return self.interceptor.tune_launches

    @tune_launches.setter
    def tune_launches(self, value: bool) -> None:
        self.interceptor.tune_launches = value

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        """``.to()`` / ``.half()`` move every buffer; the interceptor then sees the moved tensors."""
        super()._apply(fn, recurse)
        self.interceptor.static = dict(self.static.named_buffers())
        return self

    def half_activations(self, dtype: torch.dtype = torch.float16) -> PackedVim:
        """Run the float parts in fp16 (the GPU path) or bf16; codes and every scale stay as calibrated (fp32),
        which ``.half()`` on the whole module would round."""
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"half activations are fp16 or bf16, not {dtype}")
        self.model.to(dtype)
        return self

    def check_input(self, x: torch.Tensor) -> None:
        self.model.check_input(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and self._can_fuse(x):
            return PackedFusedForward(self)(x)
        return self.model(x)

    def _can_fuse(self, x: torch.Tensor) -> bool:
        """Kernels in use, every projection packed, and nobody observing through the interception sites."""
        every = len(self.linears) == LINEAR_SITES * self.cfg.depth
        observed = any(block.mixer.interceptor is not self.interceptor for block in self.model.layers)
        return uses_kernels(self.backend, x) and every and not observed

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of the quantized projections' weights as stored (codes + scales) and as float32 would be."""
        stored = sum(m.weight_codes.numel() * m.weight_codes.element_size() + m.weight_scale.numel() * 4
                     for m in self.linears.values())
        float32 = sum(m.weight_codes.shape[0] * m.weight_codes.shape[1] * (2 if m.w_bits == 4 else 1) * 4
                      for m in self.linears.values())
        return {"packed": stored, "float32": float32}


class PackedFusedForward(FusedForward):
    """The packed model's fused forward: add + RMSNorm + detection/quantization of in_proj's input in one kernel,
    the merge of the two directions + detection/quantization of out_proj's input in one, every projection an
    integer GEMM, Δ/B/C through ``detect_fake_quant``, A and D as quantized at packing; the rest (conv1d + SiLU,
    the scan reading the backward gate in reverse) is :class:`FusedForward`'s. Same arithmetic as the unfused
    path up to the rounding of RMSNorm's square root (tested)."""

    def __init__(self, packed: PackedVim):
        super().__init__(packed.model, concurrent_directions=packed.concurrent_directions)
        self.linears, self.interceptor = packed.linears, packed.interceptor
        self.tune = packed.interceptor.tune_launches

    def mix_in(self, block: nn.Module, hidden: torch.Tensor,
               residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        in_proj = self.linears[_key(f"layers.{block.mixer.layer_idx}.in_proj.weight")]
        codes, residual = norm_detect_quant(hidden, residual, block.norm.weight, block.norm.eps, in_proj.input_scale,
                                            in_proj.k, in_proj.n_refresh, in_proj.a_bits, lean=True, tune=self.tune)
        return (*in_proj.gemm(codes, None, hidden.dtype, True, self.tune).chunk(2, dim=-1), residual)

    def project(self, mixer: nn.Module, name: str, direction: str, x: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        linear = self.linears[_key(f"layers.{mixer.layer_idx}.{direction}.{name}.weight")]
        return linear(x, bias, True, detection_rows(name, x.shape[-1], linear.n_refresh), self.tune)

    def scan_inputs(self, mixer: nn.Module, direction: str, delta_pre: torch.Tensor, B: torch.Tensor,
                    C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.interceptor.intercept(mixer.sites[name, direction], value)
                     for name, value in (("delta_pre", delta_pre), ("B", B), ("C", C)))

    def scan_parameters(self, mixer: nn.Module, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A and D as quantized at packing; where the config left them in floating point, the model's own
        (computed only then: a few launches a branch saved)."""
        a, d = (self.interceptor.static.get(_key(mixer.sites[name, direction].name)) for name in STATIC_S6)
        if a is None or d is None:
            float_a, float_d = super().scan_parameters(mixer, direction)
            a, d = float_a if a is None else a, float_d if d is None else d
        return a.float(), d.float()

    def mix_out(self, mixer: nn.Module, y_forward: torch.Tensor, y_backward: torch.Tensor) -> torch.Tensor:
        out_proj = self.linears[_key(f"layers.{mixer.layer_idx}.out_proj.weight")]
        codes = merge_detect_quant(y_forward, y_backward, out_proj.input_scale, out_proj.k, out_proj.n_refresh,
                                   out_proj.a_bits, lean=True, tune=self.tune)
        return out_proj.gemm(codes, None, y_forward.dtype, True, self.tune)


def _check_packable(config: QuantConfig) -> None:
    problems = []
    if config.method != "ouromamba":
        problems.append(f"method {config.method} (the kernels implement OuroMamba's per-time-step rule)")
    if config.release_compatible:
        problems.append("release_compatible (its batch-wide trigger is not what the kernels detect)")
    if config.weight_group_size:
        problems.append("weight groups (the GEMM has one scale per output channel)")
    if config.quantize_state:
        problems.append("a quantized scan state")
    if problems:
        raise StudioError("cannot pack this configuration into integer kernels: " + "; ".join(problems) +
                          " — it runs as the fake-quant simulation only")


def _projection_configs(config: QuantConfig, weight_site: str) -> tuple[QuantConfig, QuantConfig]:
    """The weight's and the input's configs of one projection after overrides, checked against what the
    kernels take (the weight's bits come from the weight site, the activation's from the input site)."""
    weight, activation = config.for_site(weight_site), config.for_site(weight_site.replace(".weight", ".input"))
    if weight is None or activation is None:
        raise StudioError(f"cannot pack {weight_site}: a config that keeps only its weight or only its input in "
                          "floating point has no integer GEMM; skip both or neither")
    if activation.o_bits != 8 or weight.w_bits not in KERNEL_BITS or activation.a_bits not in KERNEL_BITS:
        raise StudioError(f"cannot pack {weight_site}: the kernels take 4- or 8-bit weights and inliers with 8-bit "
                          f"outliers, it has W{weight.w_bits}A{activation.a_bits}O{activation.o_bits}")
    return weight, activation


def pack(qmodel: QuantizedVim, backend: str = "auto") -> PackedVim:
    """The integer model of a calibrated OuroMamba simulation (``qmodel`` itself is left untouched)."""
    expect(qmodel, QuantizedVim, "pack's model (what quantize() returns)")
    config = qmodel.config
    _check_packable(config)
    model = VisionMamba(qmodel.cfg).to(next(qmodel.model.parameters()).device)  # where the simulation lives
    model.load_state_dict(qmodel.model.state_dict())
    quantizers = {name.replace(":", "."): q for name, q in qmodel.quantizers.items()}
    linears, dynamic, static = {}, {}, {}
    for site in quantized_sites(model):
        quantizer = quantizers.get(site.name)
        if site.tensor.endswith(".weight"):
            if quantizer is None and site.name.replace(".weight", ".input") not in quantizers:
                continue  # the projection stays in floating point
            weight_config, input_config = _projection_configs(config, site.name)  # one of the two: refused
            input_quantizer = quantizers[site.name.replace(".weight", ".input")]
            weight = qmodel.model.linear_at(site.name).weight
            if 4 in (weight_config.w_bits, input_config.a_bits) and weight.shape[1] % 2:
                raise StudioError(f"cannot pack {site.name}: 4-bit codes go two per byte along its "
                                  f"{weight.shape[1]} inputs, an odd count; give it 8 bits with an override")
            linears[site.name] = PackedLinear.from_simulation(weight, quantizer, input_quantizer,
                                                              weight_config.w_bits, input_config.a_bits)
        elif quantizer is None:
            continue
        elif site.tensor in DYNAMIC_S6:
            dynamic[site.name] = quantizer
        elif site.tensor in STATIC_S6:
            mixer = model.layers[site.layer].mixer
            suffix = "_b" if site.direction == "bwd" else ""
            value = -torch.exp(getattr(mixer, f"A{suffix}_log").float()) if site.tensor == "A" \
                else getattr(mixer, f"D{suffix}").float()
            with torch.no_grad():
                static[site.name] = quantizer(value).detach().clone()
    provenance = {**qmodel.provenance, "packed_from": "fake-quant simulation", "format": FORMAT}
    return PackedVim(model, config, linears, dynamic, static, provenance, backend)


# --------------------------------------------------------------------------------------------------
# One safetensors file


def save_packed(packed: PackedVim, path: str | Path) -> Path:
    """Codes, scales, float tensors and (metadata) the configs and provenance, in one safetensors file."""
    expect(packed, PackedVim, "save_packed's model (what pack() makes)")
    tensors = {f"model.{k}": v for k, v in packed.model.state_dict().items()}
    for name, module in packed.linears.items():
        tensors.update({f"linears.{name}.{k}": v for k, v in module.state_dict().items()})
    for name, quantizer in packed.dynamic.items():
        tensors[f"dynamic.{name}.scale"] = quantizer.scale
        if quantizer.zero_point is not None:
            tensors[f"dynamic.{name}.zero_point"] = quantizer.zero_point
    tensors.update({f"static.{name}": v for name, v in packed.static.named_buffers()})
    metadata = {"format": FORMAT, CONFIG_METADATA_KEY: json.dumps(packed.cfg.to_dict()),
                "quant_config": json.dumps(packed.config.to_dict()),
                "provenance": json.dumps(packed.provenance, default=str)}
    return write_safetensors(tensors, path, metadata)


def _read_packed_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.is_dir():
        raise StudioError(f"packed model '{path}' is a folder: give the .safetensors file in it")
    if not path.is_file():
        raise StudioError(f"packed model '{path}' does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as err:
        raise StudioError(f"'{path}' is not a readable safetensors file (truncated or corrupt: "
                          f"{str(err)[:120]})") from None
    if metadata.get("format") != FORMAT:
        raise StudioError(f"'{path}' is not a packed OuroMamba model (format {metadata.get('format')!r}, expected "
                          f"{FORMAT!r}); float checkpoints load with core.models.load_checkpoint")
    return tensors, metadata


def _group(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """``prefix.<name>.<field>`` entries grouped as {name: {field: tensor}}."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            name, field = key[len(prefix) + 1:].rsplit(".", 1)
            groups.setdefault(name, {})[field] = value
    return groups


def load_packed(path: str | Path, backend: str = "auto") -> PackedVim:
    """A :class:`PackedVim` from :func:`save_packed`'s file, with a one-line message for anything else."""
    path = Path(path)
    tensors, metadata = _read_packed_file(path)
    refuse_nonfinite(tensors, path)
    try:
        return _packed_from(tensors, metadata, path, backend)
    except (KeyError, ValueError, TypeError, AttributeError) as err:  # json's errors are ValueErrors
        raise StudioError(f"'{path}' is a damaged packed model ({type(err).__name__}: {str(err)[:80]}); make it "
                          "again with core.quant.packed.save_packed") from None


def _packed_from(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path, backend: str) -> PackedVim:
    cfg = VimConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
    config = QuantConfig.from_dict(json.loads(metadata["quant_config"]))
    model = VisionMamba(cfg)
    linear_fields = _group(tensors, "linears")
    for key in linear_fields:  # their float weights were never saved
        model.linear_at(key.replace(":", ".")).register_parameter("weight", None)
    load_state_dict_strict(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    linears = {}
    for key, fields in linear_fields.items():
        name = key.replace(":", ".")
        _, activation = _projection_configs(config, name)
        linears[name] = PackedLinear(fields["weight_codes"], fields["weight_scale"], fields["input_scale"],
                                     activation.a_bits, activation.k, activation.n_refresh)
    dynamic = {}
    for key, fields in _group(tensors, "dynamic").items():
        name = key.replace(":", ".")
        parts = name.split(".")
        site = Site(int(parts[1]), parts[3], parts[2])
        quantizer = activation_quantizer(config.for_site(name), site)
        quantizer.restore(fields["scale"], fields.get("zero_point"))
        dynamic[name] = quantizer
    static = {k[len("static."):].replace(":", "."): v for k, v in tensors.items() if k.startswith("static.")}
    provenance = {**json.loads(metadata.get("provenance", "{}")), "loaded_from": str(path)}
    return PackedVim(model, config, linears, dynamic, static, provenance, backend)


# --------------------------------------------------------------------------------------------------
# Does the integer model compute what the simulation computed?


@dataclass(frozen=True)
class Agreement:
    """Top-1 agreement of two models on the same images, how far apart their logits are, and (with labels)
    the top-1 accuracy of each."""

    images: int
    agreement: float  # % of images with the same predicted class
    max_abs_logit_error: float
    relative_logit_error: float  # ‖a − b‖ / ‖b‖ over all logits (NaN when a logit is not finite)
    top1: float | None = None
    top1_reference: float | None = None
    nonfinite_images: int = 0  # images with a NaN or infinite logit in ``model``

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def agreement(model: nn.Module, reference: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None,
              batch_size: int = 250) -> Agreement:
    """Compare ``model`` (e.g. a PackedVim) with ``reference`` (its simulation) on normalized ``images``."""
    predictions, reference_predictions = [], []
    error_sq, reference_sq, max_error, nonfinite = 0.0, 0.0, 0.0, 0
    dtypes = [next(p.dtype for p in m.parameters() if p.is_floating_point()) for m in (model, reference)]
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]  # each model gets it in its own float dtype (fp16 runs)
        ours, theirs = model(batch.to(dtypes[0])).double(), reference(batch.to(dtypes[1])).double()
        predictions.append(ours.argmax(-1))
        reference_predictions.append(theirs.argmax(-1))
        error_sq += float(((ours - theirs) ** 2).sum())
        reference_sq += float((theirs**2).sum())
        max_error = float(torch.tensor(max_error).maximum((ours - theirs).abs().max().cpu()))  # NaN propagates
        nonfinite += int((~torch.isfinite(ours).all(-1)).sum())
    ours, theirs = torch.cat(predictions), torch.cat(reference_predictions)

    def top1(predicted: torch.Tensor) -> float | None:
        return None if labels is None else 100.0 * float((predicted == labels.to(predicted.device)).double().mean())

    return Agreement(len(images), 100.0 * float((ours == theirs).double().mean()), max_error,
                     (error_sq / max(reference_sq, 1e-30)) ** 0.5, top1(ours), top1(theirs), nonfinite)
