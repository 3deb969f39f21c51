"""Vision Mamba (Vim, Zhu et al., ICML 2024), the bidirectional "v2" model of the official release.

One file, timm style: blocks at the top, the model, the conversion of official checkpoints, then one
registered entry point per variant. Module and parameter names equal the official ones, so an official
``vim_{t,s,b}_midclstok_*.pth`` loads strictly (see :mod:`core.models.loading`).

Forward, as the official fast path computes it:
patch embed (row-major tokens) → CLS token inserted at M // 2 → + position embedding → per block
"add → RMSNorm → mixer" with the residual kept in fp32 → final add + RMSNorm → CLS token → head.
The mixer runs the same ``in_proj`` output through a forward and a sequence-flipped backward branch
(each with its own conv1d, x_proj, dt_proj, A, D), averages the two (``/2``) and applies ``out_proj``.
Every tensor OuroMamba-Quant touches passes through a named site (:mod:`core.intercept`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models import register_model
from torch import nn

from core.errors import StudioError
from core.intercept import BACKWARD, FORWARD, Tapped, layer_sites
from core.records import checked_fields
from core.ssm import SCAN_IMPLEMENTATIONS, selective_scan


@dataclass(frozen=True)
class VimConfig:
    """Everything that defines a Vim architecture; serialised into checkpoints and model cards."""

    img_size: int = 224
    patch_size: int = 16
    stride: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0 means ceil(embed_dim / 16), as the official "auto"
    norm_eps: float = 1e-5
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def rank(self) -> int:
        return self.dt_rank or math.ceil(self.embed_dim / 16)

    @property
    def grid_size(self) -> int:
        return (self.img_size - self.patch_size) // self.stride + 1

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def seq_len(self) -> int:
        return self.num_patches + 1

    @property
    def cls_position(self) -> int:
        """The official middle CLS token sits at num_patches // 2 (98 for 14×14, 364 for 27×27)."""
        return self.num_patches // 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> VimConfig:
        return cls(**checked_fields(cls, values, "Vim config"))


class RMSNorm(nn.Module):
    """RMSNorm with weight only; eps inside the square root, as the official Triton kernel."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class PatchEmbed(nn.Module):
    """Conv2d patchify (no norm), tokens in row-major order."""

    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class BiMambaMixer(Tapped):
    """Bidirectional Mamba mixer ("bimamba v2"): shared in_proj/out_proj, per-direction S6 branch."""

    def __init__(self, cfg: VimConfig, layer_idx: int):
        super().__init__()
        d_inner, rank, n_state = cfg.d_inner, cfg.rank, cfg.d_state
        self.layer_idx = layer_idx
        self.sites = layer_sites(layer_idx)
        self.in_proj = nn.Linear(cfg.embed_dim, 2 * d_inner, bias=False)
        for suffix in ("", "_b"):
            setattr(self, f"conv1d{suffix}", nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner,
                                                       padding=cfg.d_conv - 1))
            setattr(self, f"x_proj{suffix}", nn.Linear(d_inner, rank + 2 * n_state, bias=False))
            setattr(self, f"dt_proj{suffix}", nn.Linear(rank, d_inner, bias=True))
        a_log = torch.log(torch.arange(1, n_state + 1, dtype=torch.float32)).repeat(d_inner, 1)
        self.A_log = nn.Parameter(a_log.clone())
        self.D = nn.Parameter(torch.ones(d_inner))
        self.A_b_log = nn.Parameter(a_log.clone())
        self.D_b = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, cfg.embed_dim, bias=False)
        self.scan_impl = "auto"

    def direction_params(self, direction: str) -> tuple:
        """(conv1d, x_proj, dt_proj, A_log, D) of one scan direction."""
        if direction == FORWARD:
            return self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D
        return self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b

    def projection(self, name: str, direction: str | None) -> nn.Linear:
        """A projection by its site name: ``"in_proj"``, ``"out_proj"`` (shared), ``"x_proj"``, ``"dt_proj"``."""
        return getattr(self, name + ("_b" if direction == BACKWARD else ""))

    def _branch(self, xz: torch.Tensor, direction: str) -> torch.Tensor:
        """One scan direction over ``xz`` (batch, L, 2E) given in that direction's time order."""
        conv1d, x_proj, dt_proj, a_log, d_skip = self.direction_params(direction)
        site = self.sites
        length = xz.shape[1]
        x, z = xz.chunk(2, dim=-1)
        u = F.silu(conv1d(x.transpose(1, 2))[..., :length].transpose(1, 2))  # causal: first L outputs
        # the site is x_proj's input: what the interceptor returns feeds x_proj only, the scan keeps u
        x_dbl = self._linear("x_proj", direction, u, x_proj)
        rank, n_state = dt_proj.in_features, a_log.shape[1]
        dt, B, C = torch.split(x_dbl, [rank, n_state, n_state], dim=-1)
        delta_pre = self.tap(site["delta_pre", direction], self._linear("dt_proj", direction, dt, dt_proj))
        A = self.tap(site["A", direction], -torch.exp(a_log.float()))
        B = self.tap(site["B", direction], B)
        C = self.tap(site["C", direction], C)
        D = self.tap(site["D", direction], d_skip.float())
        interceptor, h_site = self.interceptor, site["h", direction]
        state_fn, collect = None, interceptor is not None and interceptor.collects_states
        if interceptor is not None and interceptor.wants_states:
            state_fn = lambda step, h: interceptor.intercept_state(h_site, step, h)  # noqa: E731
        out = selective_scan(u, delta_pre, A, B, C, D, z, delta_softplus=True, return_states=collect,
                             state_fn=state_fn, impl=self.scan_impl)
        if not collect:
            return out
        y, states = out
        interceptor.collect_states(h_site, states)
        return y

    def _linear(self, name: str, direction: str | None, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """A projection through its two sites (input and weight), or as the plugged-in interceptor runs it."""
        if self.interceptor is None:
            return F.linear(x, linear.weight, linear.bias)
        return self.interceptor.linear(self.sites[f"{name}.input", direction], self.sites[f"{name}.weight", direction],
                                       x, linear.weight, linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        xz = self._linear("in_proj", None, hidden, self.in_proj)
        y_forward = self._branch(xz, FORWARD)
        y_backward = self._branch(xz.flip(1), BACKWARD).flip(1)
        return self._linear("out_proj", None, (y_forward + y_backward) / 2, self.out_proj)


class Block(nn.Module):
    """Add → RMSNorm → mixer. Returns (mixer output, fp32 residual) like the official fused add-norm."""

    def __init__(self, cfg: VimConfig, layer_idx: int, drop_path: float):
        super().__init__()
        self.norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)
        self.mixer = BiMambaMixer(cfg, layer_idx)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden.float() if residual is None else residual + self.drop_path(hidden).float()
        return self.mixer(self.norm(residual).to(hidden.dtype)), residual


class VisionMamba(nn.Module):
    """Vim with a middle CLS token, learned absolute position embedding and logits from the CLS token."""

    def __init__(self, cfg: VimConfig):
        super().__init__()
        if cfg.grid_size < 1 or (cfg.img_size - cfg.patch_size) % cfg.stride:
            raise StudioError(f"image size {cfg.img_size} does not tile with patch {cfg.patch_size} "
                              f"and stride {cfg.stride}")
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_len, cfg.embed_dim))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = [cfg.drop_path_rate * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]  # linear, as Vim
        self.layers = nn.ModuleList(Block(cfg, i, rates[i]) for i in range(cfg.depth))
        self.norm_f = RMSNorm(cfg.embed_dim, cfg.norm_eps)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """Mamba's initialisation: small normal linears, Δ bias from a log-uniform dt in [1e-3, 1e-1],
        dt_proj weights ~ U(±rank^-0.5), out_proj rescaled by 1/sqrt(depth) for the pre-norm residual."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and "dt_proj" not in name:
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.layers:
            mixer = block.mixer
            nn.init.kaiming_uniform_(mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                mixer.out_proj.weight /= math.sqrt(self.cfg.depth)
            for dt_proj in (mixer.dt_proj, mixer.dt_proj_b):
                bound = dt_proj.in_features**-0.5
                nn.init.uniform_(dt_proj.weight, -bound, bound)
                dt = torch.exp(torch.rand(dt_proj.out_features) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
                dt = dt.clamp(min=1e-4)
                with torch.no_grad():
                    dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def set_scan_impl(self, impl: str) -> VisionMamba:
        """Every mixer's scan implementation (see :func:`core.ssm.scan.resolve_impl`); returns the model."""
        if impl not in SCAN_IMPLEMENTATIONS:
            raise ValueError(f"scan impl must be one of {SCAN_IMPLEMENTATIONS}, not {impl!r}")
        for module in self.modules():
            if isinstance(module, BiMambaMixer):
                module.scan_impl = impl
        return self

    def linear_at(self, weight_site: str) -> nn.Linear:
        """The nn.Linear of a weight site name such as ``layers.3.bwd.x_proj.weight`` or ``layers.0.in_proj.weight``."""
        parts = weight_site.split(".")
        return self.layers[int(parts[1])].mixer.projection(parts[-2], parts[2] if len(parts) == 5 else None)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "A_log", "A_b_log", "D", "D_b"}

    def check_input(self, x: torch.Tensor) -> None:
        cfg = self.cfg
        expected = (cfg.in_chans, cfg.img_size, cfg.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            got = "×".join(map(str, x.shape[1:])) if x.dim() == 4 else f"a {x.dim()}-D tensor"
            raise StudioError(f"the model takes batches of {'×'.join(map(str, expected))} images, got {got}; "
                              f"resize the images, or load the checkpoint with img_size={x.shape[-1]} "
                              "to resample its position embedding")
        weights = self.patch_embed.proj.weight.dtype
        if not x.is_floating_point():
            raise StudioError(f"the images are {x.dtype}: the model takes float images normalized as in training "
                              "(LabelledImages.normalized() makes them)")
        if x.dtype != weights and not torch.is_autocast_enabled(x.device.type):
            raise StudioError(f"the images are {x.dtype} and the model's weights {weights}: convert the images "
                              f"with .to({weights})")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The token sequence entering the first block: patches, the CLS token in the middle, positions."""
        self.check_input(x)
        tokens = self.patch_embed(x)
        cls = self.cfg.cls_position
        cls_token = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        tokens = torch.cat([tokens[:, :cls], cls_token, tokens[:, cls:]], dim=1)
        return self.pos_drop(tokens + self.pos_embed.to(tokens.dtype))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm features of the CLS token, (batch, embed_dim)."""
        hidden, residual = self.embed(x), None
        for block in self.layers:
            hidden, residual = block(hidden, residual)
        residual = residual + self.layers[-1].drop_path(hidden).float()
        return self.norm_f(residual)[:, self.cfg.cls_position].to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x)))


# --------------------------------------------------------------------------------------------------
# Official checkpoints → ours


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Bicubic resize of a mid-CLS position embedding (1, g·g + 1, D) to a new grid; the CLS entry
    is taken out at its middle position and put back at the middle of the new sequence."""
    num_patches = pos_embed.shape[1] - 1
    old_grid = math.isqrt(num_patches)
    if old_grid * old_grid != num_patches:
        raise StudioError(f"position embedding of {num_patches} patches is not a square grid; cannot resize it")
    if old_grid == new_grid:
        return pos_embed
    cls = num_patches // 2
    patches = torch.cat([pos_embed[:, :cls], pos_embed[:, cls + 1:]], dim=1)
    dim = patches.shape[-1]
    grid = patches.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    new_cls = new_grid * new_grid // 2
    return torch.cat([patches[:, :new_cls], pos_embed[:, cls:cls + 1], patches[:, new_cls:]], dim=1)


def checkpoint_filter_fn(state_dict: dict, model: VisionMamba) -> dict:
    """Unwrap an official ``{'model': state_dict}`` file and fit its position embedding to ``model``."""
    for wrapper in ("model", "state_dict", "model_ema"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    pos = state_dict.get("pos_embed")
    if isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape[1] != model.cfg.seq_len:
        state_dict["pos_embed"] = resample_pos_embed(pos, model.cfg.grid_size)
    return state_dict


# --------------------------------------------------------------------------------------------------
# Registry: official names and our default model


def _official(embed_dim: int, stride: int = 16) -> dict:
    return dict(img_size=224, patch_size=16, stride=stride, in_chans=3, num_classes=1000,
                embed_dim=embed_dim, depth=24)


MODEL_CONFIGS: dict[str, dict] = {
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": _official(192),
    "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": _official(192, 8),
    "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": _official(384),
    "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": _official(384, 8),
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": _official(768),
    # Our embedded default (assets/default_model): Fashion-MNIST, 28×28 grey, 7×7 patch grid + middle CLS.
    "vim_fmnist_patch4_28_midclstok": dict(img_size=28, patch_size=4, stride=4, in_chans=1, num_classes=10,
                                          embed_dim=64, depth=4),
}

_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "device", "dtype")


def create_vim(name: str, **overrides) -> VisionMamba:
    """Build a registered Vim variant with random weights; ``overrides`` change config fields."""
    if name not in MODEL_CONFIGS:
        raise StudioError(f"unknown Vim variant {name!r}; known: {', '.join(MODEL_CONFIGS)}")
    return VisionMamba(VimConfig.from_dict({**MODEL_CONFIGS[name], **overrides}))


def _entry(name: str):
    def entry(pretrained: bool = False, **kwargs) -> VisionMamba:
        if pretrained:
            raise StudioError("no weights are downloaded: build the model, then load a local file with "
                              "core.models.load_checkpoint(path)")
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        model = create_vim(name, **{k: v for k, v in kwargs.items() if k not in _TIMM_ONLY_KWARGS})
        return model.to(device=device, dtype=dtype) if device or dtype else model

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"Vim variant {name} (random weights; load checkpoints with core.models.load_checkpoint)."
    globals()[name] = register_model(entry)
    return entry


for _name in MODEL_CONFIGS:
    _entry(_name)
