"""The Vim model: official names, shapes and parameter counts; forward semantics; checkpoint loading."""

import io
import math
import os
import stat
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import core.models  # noqa: F401 - registers the Vim variants with timm
from core.errors import StudioError
from core.models import VimConfig, VisionMamba, create_vim, infer_config, load_checkpoint, save_safetensors

VIM_T = "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
VIM_T_PLUS = "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
VIM_S = "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
VIM_B = "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2"


def tiny(**overrides) -> VisionMamba:
    """A small Vim with the official structure (mid CLS, both directions) for fast tests."""
    cfg = dict(img_size=32, patch_size=8, stride=8, in_chans=3, num_classes=7, embed_dim=16, depth=2)
    return VisionMamba(VimConfig(**{**cfg, **overrides})).eval()


def test_vim_tiny_has_official_keys_shapes_and_parameter_count():
    model = timm.create_model(VIM_T)
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 7_148_008
    expected = {
        "patch_embed.proj.weight": (192, 3, 16, 16), "patch_embed.proj.bias": (192,),
        "cls_token": (1, 1, 192), "pos_embed": (1, 197, 192), "norm_f.weight": (192,),
        "head.weight": (1000, 192), "head.bias": (1000,),
    }
    per_layer = {
        "norm.weight": (192,), "mixer.in_proj.weight": (768, 192), "mixer.out_proj.weight": (192, 384),
        "mixer.conv1d.weight": (384, 1, 4), "mixer.conv1d.bias": (384,), "mixer.x_proj.weight": (44, 384),
        "mixer.dt_proj.weight": (384, 12), "mixer.dt_proj.bias": (384,), "mixer.A_log": (384, 16),
        "mixer.D": (384,), "mixer.conv1d_b.weight": (384, 1, 4), "mixer.conv1d_b.bias": (384,),
        "mixer.x_proj_b.weight": (44, 384), "mixer.dt_proj_b.weight": (384, 12), "mixer.dt_proj_b.bias": (384,),
        "mixer.A_b_log": (384, 16), "mixer.D_b": (384,),
    }
    expected.update({f"layers.{i}.{k}": v for i in range(24) for k, v in per_layer.items()})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


@pytest.mark.parametrize("name, params, tokens", [
    (VIM_T_PLUS, 7_250_344, 730), (VIM_S, 25_796_584, 197), (VIM_B, 97_598_440, 197),
])
def test_registered_variants(name, params, tokens):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.cfg.seq_len == tokens and model.cfg.cls_position == (tokens - 1) // 2


def test_timm_pretrained_download_is_refused_with_a_pointer():
    with pytest.raises(StudioError, match="load_checkpoint"):
        timm.create_model(VIM_T, pretrained=True)


# ---- forward semantics against an independent float64 implementation of the official forward ----

def official_forward(sd: dict, cfg: VimConfig, img: torch.Tensor) -> torch.Tensor:
    """Written from vim-reference.md, step by step, sharing no code with core.models.vim."""
    sd = {k: v.double() for k, v in sd.items()}
    img = img.double()

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=cfg.stride)
    x = x.flatten(2).transpose(1, 2)
    pos = x.shape[1] // 2
    x = torch.cat([x[:, :pos], sd["cls_token"].expand(len(x), -1, -1), x[:, pos:]], 1) + sd["pos_embed"]
    residual, hidden = None, x
    for i in range(cfg.depth):
        p = f"layers.{i}."
        residual = hidden if residual is None else residual + hidden
        h = rms(residual, sd[p + "norm.weight"])
        xz = (h @ sd[p + "mixer.in_proj.weight"].T).transpose(1, 2)  # (B, 2E, L)
        outs = []
        for sfx, a_name, d_name, seq in (("", "A_log", "D", xz), ("_b", "A_b_log", "D_b", xz.flip(-1))):
            xs, z = seq.chunk(2, dim=1)
            length = xs.shape[-1]
            u = F.silu(F.conv1d(xs, sd[p + f"mixer.conv1d{sfx}.weight"], sd[p + f"mixer.conv1d{sfx}.bias"],
                                padding=3, groups=xs.shape[1])[..., :length])
            dbc = u.transpose(1, 2) @ sd[p + f"mixer.x_proj{sfx}.weight"].T
            rank = sd[p + f"mixer.dt_proj{sfx}.weight"].shape[1]
            dt, Bm, Cm = dbc.split([rank, 16, 16], dim=-1)
            delta = F.softplus(dt @ sd[p + f"mixer.dt_proj{sfx}.weight"].T + sd[p + f"mixer.dt_proj{sfx}.bias"])
            A = -torch.exp(sd[p + f"mixer.{a_name}"])
            state = torch.zeros(len(u), u.shape[1], 16, dtype=torch.float64)
            ys = []
            for t in range(length):
                dA = torch.exp(delta[:, t, :, None] * A)
                state = dA * state + delta[:, t, :, None] * Bm[:, t, None, :] * u[:, :, t, None]
                ys.append((state * Cm[:, t, None, :]).sum(-1) + sd[p + f"mixer.{d_name}"] * u[:, :, t])
            y = torch.stack(ys, -1) * F.silu(z)
            outs.append(y if sfx == "" else y.flip(-1))
        hidden = ((outs[0] + outs[1]) / 2).transpose(1, 2) @ sd[p + "mixer.out_proj.weight"].T
    feats = rms(residual + hidden, sd["norm_f.weight"])[:, pos]
    return feats @ sd["head.weight"].T + sd["head.bias"]


def test_forward_matches_independent_official_semantics():
    torch.manual_seed(0)
    model = tiny(img_size=40, stride=8)  # 5×5 grid: CLS at 12, odd length
    with torch.no_grad():  # break the init's symmetries so every path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    img = torch.randn(2, 3, 40, 40)
    expected = official_forward(model.state_dict(), model.cfg, img)
    with torch.no_grad():
        assert torch.allclose(model.double()(img.double()), expected, atol=1e-10)
        assert torch.allclose(model.float()(img), expected.float(), atol=1e-4)


def test_cls_is_in_the_middle_of_the_sequence():
    assert VimConfig().cls_position == 98 and VimConfig(stride=8).cls_position == 364
    assert VimConfig(img_size=28, patch_size=4, stride=4).cls_position == 24


# ---- checkpoints ----

def test_official_pth_round_trip(tmp_path: Path):
    model = tiny()
    path = tmp_path / "vim_official.pth"
    torch.save({"model": model.state_dict(), "epoch": 3, "args": None}, path)
    loaded = load_checkpoint(path, model=tiny())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_official_vim_tiny_checkpoint_loads_strictly_with_inferred_architecture(tmp_path: Path):
    model = timm.create_model(VIM_T)
    path = tmp_path / "vim_t_midclstok_76p1acc.pth"
    torch.save({"model": model.state_dict()}, path)
    loaded = load_checkpoint(path)
    assert loaded.cfg == model.cfg
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                 strict=True))


def test_stride8_architecture_is_inferred_from_730_tokens():
    with torch.device("meta"):
        sd = timm.create_model(VIM_T_PLUS).state_dict()
    cfg = infer_config(sd)
    assert (cfg.stride, cfg.seq_len, cfg.embed_dim, cfg.depth) == (8, 730, 192, 24)


def test_plain_state_dict_and_safetensors_round_trip(tmp_path: Path):
    model = tiny()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    save_safetensors(model, tmp_path / "m.safetensors")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for name in ("plain.pt", "m.safetensors"):
            loaded = load_checkpoint(tmp_path / name)  # architecture inferred / read from metadata
            assert loaded.cfg.num_classes == 7
            assert torch.equal(loaded(x), model(x)), name


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_saved_safetensors_file_has_the_permissions_the_umask_gives(tmp_path: Path, umask: int):
    """safetensors writes owner-only files (0600): a model saved for a team's shared folder was unreadable there,
    unlike every other file the studio writes. A crashed save's leftover does not pass its mode on."""
    (tmp_path / ".m.safetensors.partial").touch(mode=0o600)
    previous = os.umask(umask)
    try:
        path = save_safetensors(tiny(), tmp_path / "m.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask and not (tmp_path / ".m.safetensors.partial").exists()


def test_other_image_size_resamples_position_embedding(tmp_path: Path):
    model = tiny()
    save_safetensors(model, tmp_path / "m.safetensors")
    bigger = load_checkpoint(tmp_path / "m.safetensors", img_size=48)
    assert bigger.cfg.seq_len == 37 and bigger.pos_embed.shape == (1, 37, 16)
    cls = 16 // 2
    assert torch.equal(bigger.pos_embed[0, 36 // 2], model.pos_embed[0, cls])  # CLS entry kept, moved to middle
    with torch.no_grad():
        assert bigger(torch.randn(1, 3, 48, 48)).shape == (1, 7)
    with pytest.raises(StudioError, match="does not tile"):
        load_checkpoint(tmp_path / "m.safetensors", img_size=50)


def test_wrong_input_size_is_one_clear_line():
    with pytest.raises(StudioError, match=r"3×32×32 images, got 3×64×64.*img_size=64"):
        tiny()(torch.randn(1, 3, 64, 64))
    with pytest.raises(StudioError, match="1×32×32"):
        tiny(in_chans=1)(torch.randn(1, 3, 32, 32))


def test_checkpoint_of_another_architecture(tmp_path: Path):
    resnet_like = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
                   "fc.weight": torch.zeros(10, 64)}
    torch.save({"model": resnet_like}, tmp_path / "resnet.pth")
    with pytest.raises(StudioError, match="not a Vision Mamba checkpoint.*conv1.weight"):
        load_checkpoint(tmp_path / "resnet.pth")


def test_checkpoint_for_other_vim_names_mismatched_keys(tmp_path: Path):
    torch.save({"model": tiny(embed_dim=32).state_dict()}, tmp_path / "wider.pth")
    with pytest.raises(StudioError, match=r"mis-shaped \(file vs model\): .*\(32") as err:
        load_checkpoint(tmp_path / "wider.pth", model=tiny())
    assert "\n" not in str(err.value)
    sd = tiny().state_dict()
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(StudioError, match=r"1 missing: head.bias; 1 unexpected: extra.weight"):
        load_checkpoint(tmp_path / "odd.pth", model=tiny())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_checkpoint(tmp_path: Path, suffix: str):
    path = tmp_path / f"m{suffix}"
    if suffix == ".pth":
        torch.save({"model": tiny().state_dict()}, path)
    else:
        save_safetensors(tiny(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StudioError, match="truncated"):
        load_checkpoint(path)


def test_non_checkpoint_files(tmp_path: Path):
    (tmp_path / "notes.pth").write_text("this is not a checkpoint\n")
    with pytest.raises(StudioError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "notes.pth")
    for name, content in (("passwd", "root:x:0:0:root:/root:/bin/bash\n"), ("image.png", "\x89PNG\r\n\x1a\n")):
        (tmp_path / name).write_text(content)  # the unpickler's own words ('list index out of range', '101') stay out
        with pytest.raises(StudioError, match=r"is not a readable checkpoint: neither safetensors nor a PyTorch file, "
                                              r"or truncated \(re-save or re-download it\)$"):
            load_checkpoint(tmp_path / name)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(StudioError, match="empty"):
        load_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(StudioError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_pickle_that_wants_to_run_code_is_refused(tmp_path: Path):
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(1)}, "evil": Payload()}, buffer)
    (tmp_path / "evil.pth").write_bytes(buffer.getvalue())
    with pytest.raises(StudioError, match="wants to run code"):
        load_checkpoint(tmp_path / "evil.pth")


def test_config_round_trips_through_dict():
    cfg = VimConfig(img_size=28, patch_size=4, stride=4, in_chans=1, num_classes=10, embed_dim=64, depth=4)
    assert VimConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.rank == math.ceil(64 / 16) and cfg.d_inner == 128
    with pytest.raises(StudioError, match="unknown Vim config fields"):
        VimConfig.from_dict({"embed_dims": 3})
    with pytest.raises(StudioError, match="unknown Vim variant"):
        create_vim("vim_huge")
