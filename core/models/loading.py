"""Load and save Vim checkpoints: official ``.pth`` files, plain state dicts and safetensors.

Pickles are read with ``weights_only=True`` (no code from the file runs). Every failure is a
:class:`StudioError` with one line that names the problem: a missing or truncated file, a pickle that
wants to run code, another architecture, missing / unexpected / mis-shaped keys.
Our own safetensors files carry their :class:`VimConfig` as JSON metadata; for other files the
architecture is inferred from the tensor shapes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from core.errors import StudioError, is_whole
from core.models.vim import VimConfig, VisionMamba, checkpoint_filter_fn

CONFIG_METADATA_KEY = "vim_config"
MAX_IMG_SIZE = 2048  # 16,384 tokens at Vim's 16-pixel patches; beyond it a typo would fill the memory
PACKED_FORMAT_PREFIX = "ouromamba-packed/"  # core.quant.packed's files carry it in their metadata
UNREADABLE = ("{} is not a readable checkpoint: neither safetensors nor a PyTorch file, or truncated (re-save or "
              "re-download it)")


def _describe(path: Path) -> str:
    return f"'{path}'"


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], VimConfig | None]:
    """Tensors of a checkpoint file (unwrapped from ``{'model': ...}``) and its config if it carries one."""
    path = Path(path)
    if path.is_dir():
        raise StudioError(f"checkpoint {_describe(path)} is a folder: give the weights file in it (.pth or "
                          ".safetensors)")
    if not path.is_file():
        raise StudioError(f"checkpoint {_describe(path)} does not exist" if not path.exists() else
                          f"checkpoint {_describe(path)} is not a regular file")
    if path.stat().st_size == 0:
        raise StudioError(f"checkpoint {_describe(path)} is empty")
    with path.open("rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or (head[8:9] == b"{" and not zipfile.is_zipfile(path)):
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err) or "GLOBAL" in str(err):  # it names a callable to import
            raise StudioError(f"{_describe(path)} is a pickle that wants to run code, which we never do; "
                              "re-save it as a plain state dict or as safetensors") from None
        raise StudioError(UNREADABLE.format(_describe(path))) from None
    except Exception:  # noqa: BLE001 - on garbage the unpickler raises anything ('101', 'list index out of range')
        raise StudioError(UNREADABLE.format(_describe(path))) from None
    if not isinstance(obj, dict):
        raise StudioError(f"{_describe(path)} holds a {type(obj).__name__}, not a state dict")
    for wrapper in ("model", "state_dict", "model_ema"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    tensors = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise StudioError(f"{_describe(path)} holds no tensors")
    return tensors, None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], VimConfig | None]:
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise StudioError(f"{_describe(path)} is not a readable safetensors file (truncated or corrupt: "
                          f"{str(err)[:120]})") from None
    if metadata.get("format", "").startswith(PACKED_FORMAT_PREFIX):
        raise StudioError(f"{_describe(path)} is a packed (integer) OuroMamba model, not a float checkpoint: "
                          "quantizing and evaluating start from the float checkpoint it was made from (in Python, "
                          "core.quant.packed.load_packed reads packed files)")
    config = None
    if CONFIG_METADATA_KEY in metadata:
        try:
            values = json.loads(metadata[CONFIG_METADATA_KEY])
        except json.JSONDecodeError:
            raise StudioError(f"{_describe(path)} carries a {CONFIG_METADATA_KEY!r} entry that is not JSON: re-save "
                              "it with core.models.save_safetensors") from None
        if not isinstance(values, dict):
            raise StudioError(f"{_describe(path)}: its {CONFIG_METADATA_KEY!r} entry is not a config object")
        config = VimConfig.from_dict(values)
    return tensors, config


def infer_config(state_dict: dict[str, torch.Tensor], img_size: int | None = None) -> VimConfig:
    """Architecture from tensor shapes. The stride is not stored anywhere: it follows from the number of
    position-embedding tokens and the image size (224 for 16-pixel patches unless ``img_size`` says)."""
    required = ("patch_embed.proj.weight", "pos_embed", "layers.0.mixer.A_log", "layers.0.mixer.in_proj.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        sample = ", ".join(list(state_dict)[:4])
        raise StudioError(f"not a Vision Mamba checkpoint: it lacks {', '.join(missing)} (its first keys: {sample})")
    embed_dim, in_chans, patch, _ = state_dict["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("layers."))
    d_inner, d_state = state_dict["layers.0.mixer.A_log"].shape
    rank = state_dict["layers.0.mixer.dt_proj.weight"].shape[1]
    d_conv = state_dict["layers.0.mixer.conv1d.weight"].shape[-1]
    num_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0
    grid = math.isqrt(state_dict["pos_embed"].shape[1] - 1)
    size = img_size or (224 if patch == 16 else grid * patch)
    stride = (size - patch) // (grid - 1) if grid > 1 else patch
    if grid > 1 and (grid - 1) * stride + patch != size:
        raise StudioError(f"cannot tell the stride: {grid}×{grid} patches of {patch} px do not tile a {size}-px "
                          "image; pass img_size")
    return VimConfig(img_size=size, patch_size=patch, stride=stride, in_chans=in_chans, num_classes=num_classes,
                     embed_dim=embed_dim, depth=depth, d_state=d_state, d_conv=d_conv,
                     expand=d_inner // embed_dim, dt_rank=rank if rank != math.ceil(embed_dim / 16) else 0)


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """``load_state_dict(strict=True)`` that explains a mismatch in one line instead of a traceback."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
                 for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped (file vs model)", misshaped)):
        if items:
            shown = ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise StudioError("checkpoint does not fit the model — " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def refuse_nonfinite(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """A one-line StudioError when a float tensor of the file at ``path`` holds NaN or ±inf: such weights load
    without complaint and turn every output into NaN."""
    if broken := [name for name, tensor in tensors.items()
                  if tensor.is_floating_point() and not torch.isfinite(tensor).all()]:
        raise StudioError(f"'{path}' holds NaN or infinite values in {len(broken)} tensor(s) ({broken[0]}…): the "
                          "weights are broken, re-export them")


def load_checkpoint(path: str | Path, model: VisionMamba | None = None, img_size: int | None = None) -> VisionMamba:
    """Load a Vim checkpoint into ``model`` (or a model built from the file's config) and return it in eval mode.

    ``img_size`` other than the training size resamples the position embedding (bicubic, as timm does
    for ViTs); the patch grid must then still tile the image.
    """
    state_dict, config = read_state_dict(path)
    if img_size is not None and not (is_whole(img_size, plain=True) and 1 <= img_size <= MAX_IMG_SIZE):
        raise StudioError(f"the image size must be from 1 to {MAX_IMG_SIZE} pixels, got {img_size}")
    refuse_nonfinite(state_dict, path)
    if model is None:
        config = config or infer_config(state_dict)
        if img_size and img_size != config.img_size:
            config = VimConfig.from_dict({**config.to_dict(), "img_size": img_size})
        model = VisionMamba(config)
    load_state_dict_strict(model, checkpoint_filter_fn(state_dict, model))
    return model.eval()


def save_safetensors(model: VisionMamba, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save weights and the config (as JSON metadata) so that :func:`load_checkpoint` needs nothing else."""
    meta = {CONFIG_METADATA_KEY: json.dumps(model.cfg.to_dict()), **(metadata or {})}
    return write_safetensors(model.state_dict(), path, meta)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """One safetensors file at ``path`` (replacing a file there), written beside it first and then renamed: an
    interrupted or failed save leaves the old file whole. Its permissions follow the umask like every other file
    the studio writes (safetensors' own are owner-only). A folder or an unwritable place is one line."""
    path = Path(path)
    if path.is_dir():
        raise StudioError(f"'{path}' is a folder: give a file name in it")
    partial = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.unlink(missing_ok=True)  # a crashed save's leftover keeps its mode
        partial.touch()  # created as any file is, under the umask
        mode = partial.stat().st_mode
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(partial), metadata=metadata)
        partial.chmod(mode)
        os.replace(partial, path)
    except (OSError, SafetensorError) as err:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise StudioError(f"cannot write '{path}': {getattr(err, 'strerror', None) or err}") from None
    return path
