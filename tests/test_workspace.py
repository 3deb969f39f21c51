"""The workspace (a checkpoint, its model, card and test images, and their fingerprint) and labelled image folders:
what loads, how folder images are resized, and the one-line message for every bad input."""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import core.data.image_folder as image_folder_module
import core.workspace as workspace_module
from core.data import VIM_EVAL_MEAN, load_labelled_folder
from core.default_model import DEFAULT_CHECKPOINT
from core.errors import StudioError
from core.models import create_vim, save_safetensors
from core.workspace import default_workspace, open_workspace


def tiny_vim(**overrides) -> nn.Module:
    """A random 32×32 RGB Vim with 3 classes: another architecture than the default model, quick to run."""
    config = {"img_size": 32, "in_chans": 3, "num_classes": 3, "embed_dim": 16, "depth": 2, **overrides}
    return create_vim("vim_fmnist_patch4_28_midclstok", **config)


def image_folder(root: Path, classes: int = 3, per_class: int = 4, size: tuple[int, int] = (50, 40)) -> Path:
    """ImageFolder layout: one sub-folder per class, RGB PNGs of ``size`` (not the model's), a stray text file."""
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            Image.new("RGB", size, (40 * label, 10 * index, 200)).save(folder / f"{index}.png")
    (root / "class_0" / "notes.txt").write_text("not an image: ignored")
    return root


def test_default_workspace_is_the_embedded_model_on_fashion_mnist():
    ws = default_workspace()
    assert ws.is_default and ws.name == "default_model" and ws.card is not None
    assert ws.label.startswith(f"{DEFAULT_CHECKPOINT} (sha256 ") and len(ws.data) == 10_000
    assert ws.data.source.startswith("fashion-mnist/test") and ws.class_name(9) == "Ankle boot"
    assert default_workspace() is ws and open_workspace(DEFAULT_CHECKPOINT).fingerprint == ws.fingerprint
    assert ws.provenance()["checkpoint"] == ws.label


def test_other_architecture_without_data_has_none_and_says_why(tmp_path: Path):
    checkpoint = tmp_path / "tiny.pth"
    torch.save({"model": tiny_vim().state_dict()}, checkpoint)  # the official Vim layout
    ws = open_workspace(checkpoint)
    assert ws.data is None and ws.card is None and ws.name == "tiny.pth" and not ws.is_default
    assert "32×32, 3 channels, 3 classes" in ws.no_data and ws.class_name(1) == "class 1"
    with pytest.raises(StudioError, match="evaluating needs labelled test images, and there are none: this model"):
        ws.test_data("evaluating")
    images, described = ws.inspection_images(5, seed=0)
    assert images.shape == (5, 3, 32, 32) and "noise images (seed 1" in described


def test_data_folder_is_resized_and_interleaves_classes(tmp_path: Path):
    checkpoint = save_safetensors(tiny_vim(), tmp_path / "tiny.safetensors")
    folder = image_folder(tmp_path / "data")
    seen = []
    ws = open_workspace(checkpoint, folder, progress=lambda done, total: seen.append((done, total)))
    data = ws.data
    assert data.images.shape == (12, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.labels.tolist()[:6] == [0, 1, 2, 0, 1, 2] and data.classes == ("class_0", "class_1", "class_2")
    assert seen[-1] == (12, 12) and ws.class_name(2) == "class_2"
    red = data.normalized(1, 2)[0, 0, 0, 0]  # class 1: red 40 of 255, ImageNet's mean and std
    assert red == pytest.approx((40 / 255 - VIM_EVAL_MEAN[0]) / 0.229, abs=0.02)
    assert ws.fingerprint != open_workspace(checkpoint).fingerprint
    assert f"image folder {folder.resolve()} (3 classes)" == data.source


def test_fashion_mnist_model_on_a_folder_gets_grey_28px_images(tmp_path: Path):
    ws = open_workspace(DEFAULT_CHECKPOINT, image_folder(tmp_path / "data", classes=2, per_class=2))
    assert ws.data.images.shape == (4, 28, 28) and ws.data.normalized().shape == (4, 1, 28, 28)
    assert ws.is_default and ws.fingerprint != default_workspace().fingerprint


def test_folder_limit_takes_classes_in_turn(tmp_path: Path):
    data = load_labelled_folder(image_folder(tmp_path / "data", classes=3, per_class=3), 28, 1, limit=4)
    assert data.labels.tolist() == [0, 1, 2, 0]
    assert data.source.endswith("(3 classes, the first 4 of 9 images, classes in turn)")


def _junk(tmp_path: Path, kind: str) -> Path:
    """A file that is not a Vim checkpoint, of one kind."""
    if kind == "random bytes":
        path = tmp_path / "random.pth"
        path.write_bytes(bytes(range(256)) * 40)
    elif kind == "truncated safetensors":
        whole = save_safetensors(tiny_vim(), tmp_path / "whole.safetensors").read_bytes()
        path = tmp_path / "truncated.safetensors"
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "another architecture":
        path = tmp_path / "resnet.pth"
        torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, path)
    elif kind == "pickle that runs code":
        path = tmp_path / "module.pth"
        torch.save(nn.Linear(2, 2), path)  # a whole module: unpickling it imports and calls torch.nn code
    elif kind == "a folder":
        path = tmp_path / "folder.pth"
        path.mkdir()
    elif kind == "missing":
        path = tmp_path / "missing.pth"
    elif kind == "huge":
        path = tmp_path / "huge.pth"
        with path.open("wb") as f:
            f.truncate(3_000_000_000)  # sparse: no disk used, never read
    return path


BAD_CHECKPOINTS = {
    "random bytes": "is not a readable checkpoint", "truncated safetensors": "not a readable safetensors file",
    "another architecture": "not a Vision Mamba checkpoint: it lacks patch_embed.proj.weight",
    "pickle that runs code": "a pickle that wants to run code", "a folder": "is a folder: give the weights file",
    "missing": "does not exist", "huge": "is 3.0 GB, more than the 2.0 GB the studio loads",
}


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_one_line(tmp_path: Path, kind: str):
    with pytest.raises(StudioError, match=BAD_CHECKPOINTS[kind]) as caught:
        open_workspace(_junk(tmp_path, kind))
    assert "\n" not in str(caught.value)


def test_uploads_are_named_as_the_user_knows_them(tmp_path: Path, monkeypatch):
    junk = _junk(tmp_path, "random bytes")
    with pytest.raises(StudioError, match="'uploaded random.pth' is not a readable") as caught:
        open_workspace(junk, shown_as="uploaded random.pth")
    assert str(tmp_path) not in str(caught.value)
    monkeypatch.setattr(workspace_module, "MAX_CHECKPOINT_BYTES", 1000)
    with pytest.raises(StudioError, match=r"'uploaded big.pth' is 0.0 MB, more than the 0.0 MB"):
        open_workspace(junk, shown_as="uploaded big.pth")


def test_bad_data_folders_are_one_line(tmp_path: Path):
    empty = tmp_path / "empty"
    (empty / "class_0").mkdir(parents=True)
    (empty / "class_0" / "readme.txt").write_text("x")
    too_many = image_folder(tmp_path / "eleven", classes=11, per_class=1)
    broken = image_folder(tmp_path / "broken", classes=2, per_class=1)
    (broken / "class_1" / "bad.png").write_bytes(b"not a png")
    for folder, expected in ((tmp_path / "missing", "does not exist"), (empty, "no images found under"),
                             (too_many, "has 11 class folders but the model predicts 10 classes"),
                             (broken, "bad.png' is not a readable image")):
        with pytest.raises(StudioError, match=expected) as caught:
            open_workspace(DEFAULT_CHECKPOINT, folder)
        assert "\n" not in str(caught.value)


def test_headless_checkpoint_is_refused(tmp_path: Path):
    model = tiny_vim(num_classes=0)
    path = tmp_path / "headless.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(StudioError, match="no classification head"):
        open_workspace(path)


def test_copy_of_the_default_model_has_its_fingerprint_but_no_card(tmp_path: Path):
    copy = Path(shutil.copy(DEFAULT_CHECKPOINT, tmp_path / "mine.safetensors"))
    ws = open_workspace(copy)
    assert ws.fingerprint == default_workspace().fingerprint and ws.card is None and ws.name == "mine.safetensors"


def _zip_folder(folder: Path, archive: Path, under: str = "") -> Path:
    """``folder`` zipped with its files at ``under`` (a top folder, as zipping a folder by hand makes)."""
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zipped.write(path, f"{under}{path.relative_to(folder).as_posix()}")
    return archive


@pytest.mark.parametrize("under", ["", "val/"])
def test_a_zip_of_a_folder_gives_the_same_images_and_leaves_nothing_behind(tmp_path: Path, under: str):
    checkpoint = save_safetensors(tiny_vim(), tmp_path / "tiny.safetensors")
    folder = image_folder(tmp_path / "data")
    archive = _zip_folder(folder, tmp_path / "data.zip", under)
    with zipfile.ZipFile(archive, "a") as zipped:  # what macOS' Finder adds: skipped, not read as images
        zipped.writestr(f"__MACOSX/{under}class_0/._0.png", b"resource fork")
        zipped.writestr(f"{under}class_1/._1.png", b"resource fork")
    before = set(Path(tempfile.gettempdir()).glob("ouromamba-images-*"))
    from_folder = open_workspace(checkpoint, folder).data
    ws = open_workspace(checkpoint, archive, data_shown_as="uploaded data.zip")
    assert torch.equal(ws.data.images, from_folder.images) and torch.equal(ws.data.labels, from_folder.labels)
    assert ws.data.classes == from_folder.classes and ws.data.source == "image archive uploaded data.zip (3 classes)"
    assert set(Path(tempfile.gettempdir()).glob("ouromamba-images-*")) == before


def test_bad_archives_are_one_line_and_write_nothing_outside(tmp_path: Path, monkeypatch):
    escaping, bomb, text, empty, flood = (tmp_path / name for name in ("escaping.zip", "bomb.zip", "text.zip",
                                                                       "empty.zip", "flood.zip"))
    with zipfile.ZipFile(escaping, "w") as zipped:
        zipped.writestr("class_0/0.png", b"x")
        zipped.writestr("../../outside.png", b"x")
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("class_0/big.png", bytes(2_000_000))  # zeros: a few kB zipped
    with zipfile.ZipFile(empty, "w") as zipped:
        zipped.writestr("class_0/readme.txt", "no images")
    with zipfile.ZipFile(flood, "w") as zipped:
        for index in range(6):
            zipped.writestr(f"class_0/{index}.png", b"x")
    text.write_text("not a zip")
    monkeypatch.setattr(image_folder_module, "MAX_ARCHIVE_BYTES", 1_000_000)
    monkeypatch.setattr(image_folder_module, "MAX_ARCHIVE_IMAGES", 5)
    for archive, expected in ((escaping, "holds a file outside its own folder .'../../outside.png'.: refused"),
                              (bomb, "would unpack to 0.0 GB of images, more than the 0.001 GB"),
                              (empty, "holds no images: zip a folder"),
                              (flood, "holds 6 images, more than the 5 the studio unpacks"),
                              (text, "is a file but not a .zip archive")):
        with pytest.raises(StudioError, match=expected) as caught:
            open_workspace(DEFAULT_CHECKPOINT, archive)
        assert "\n" not in str(caught.value)
    assert not (tmp_path.parent.parent / "outside.png").exists()


def test_an_archive_whose_header_lies_about_its_size_is_refused(tmp_path: Path):
    """The size limit reads the headers; a forged one is caught while unpacking, not after the disk fills."""
    archive = tmp_path / "forged.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("class_0/0.png", bytes(5000))
    forged = archive.read_bytes().replace((5000).to_bytes(4, "little"), (50).to_bytes(4, "little"))
    archive.write_bytes(forged)
    with pytest.raises(StudioError, match="forged.zip' (is damaged|is not a readable .zip archive)"):
        open_workspace(DEFAULT_CHECKPOINT, archive)
