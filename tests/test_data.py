"""Datasets: Fashion-MNIST from Debian or a named directory, ImageFolder with Vim's eval transform, errors."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import FASHION_MNIST_MEAN, load_fashion_mnist, load_image_folder, vim_eval_transform
from core.data.fashion_mnist import DEBIAN_DIR
from core.errors import StudioError


def test_debian_fashion_mnist_loads_both_splits():
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.images.dtype == torch.uint8 and set(test.labels.unique().tolist()) == set(range(10))
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert abs(float(train.images.float().mean() / 255) - FASHION_MNIST_MEAN) < 1e-3
    x = test.normalized(0, 4)
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool = True) -> None:
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    (gzip.open if compress else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


def small_set(root: Path, n: int = 6, compress: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix in ("train", "t10k"):
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), 0x0803, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, (n,)), 0x0801, compress)


@pytest.mark.parametrize("compress", [True, False])
def test_user_directory(tmp_path: Path, compress: bool):
    small_set(tmp_path, compress=compress)
    data = load_fashion_mnist("test", tmp_path)
    assert len(data) == 6 and str(tmp_path) in data.source
    assert len(data.subset(2)) == 2


def test_missing_dataset_says_how_to_install(tmp_path: Path):
    with pytest.raises(StudioError, match=r"not found in .*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path / "nowhere")


def test_environment_variable_points_to_the_data(tmp_path: Path, monkeypatch):
    small_set(tmp_path)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    assert len(load_fashion_mnist("train")) == 6


def test_truncated_and_foreign_files(tmp_path: Path):
    for name in DEBIAN_DIR.iterdir():
        shutil.copy(name, tmp_path / name.name)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:5000]))
    with pytest.raises(StudioError, match="truncated"):
        load_fashion_mnist("test", tmp_path)
    labels.write_bytes(b"not gzip at all")
    with pytest.raises(StudioError, match="unreadable"):
        load_fashion_mnist("test", tmp_path)
    with pytest.raises(StudioError, match="split must be"):
        load_fashion_mnist("validation", tmp_path)


def test_image_folder_with_vim_eval_transform(tmp_path: Path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (320, 300), (10, 200, 30)).save(tmp_path / cls / "a.png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored: not an image")
    folder = load_image_folder(tmp_path)
    assert folder.classes == ["cat", "dog"] and len(folder) == 2
    x, label = folder[1]
    assert x.shape == (3, 224, 224) and label == 1
    # one colour, resized and cropped, stays that colour: ImageNet's normalization of (10, 200, 30) everywhere
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (torch.tensor([10.0, 200.0, 30.0]) / 255 - mean) / std
    assert torch.allclose(x, expected[:, None, None].expand_as(x), atol=1e-5)
    resize = vim_eval_transform().transforms[0]
    assert resize.size == 256 and resize.interpolation.value == "bicubic"


def test_image_folder_errors(tmp_path: Path):
    with pytest.raises(StudioError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(StudioError, match="no images found"):
        load_image_folder(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(StudioError, match="no images found"):
        load_image_folder(tmp_path)
