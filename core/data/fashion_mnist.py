"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package or a directory the user names.

The whole set is 55 MB as uint8, so it is held in memory as tensors; batches are slices, which is faster
than a DataLoader for 28×28 images and makes every subset (``first n``) exactly reproducible.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from core.errors import StudioError

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Mean and std of the 60,000 training images' pixels in [0, 1].
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530

# The last 5,000 training images are held out for validation (model selection); training and calibration
# draw from the first 55,000 only.
VALIDATION_SIZE = 5000

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "FASHION_MNIST_DIR"
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_HOW_TO_GET = ("install it with `sudo apt-get install dataset-fashion-mnist`, or pass a directory holding "
               "train-images-idx3-ubyte.gz & co. (--data DIR or FASHION_MNIST_DIR)")


@dataclass(frozen=True)
class LabelledImages:
    """uint8 images, (n, H, W) for one channel or (n, C, H, W), and int64 labels (n,), with the class names,
    where they came from and the per-channel mean/std that turns them into model inputs (Fashion-MNIST's
    unless said otherwise). Kept as uint8: a quarter of the memory of the float inputs."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str
    mean: tuple[float, ...] = (FASHION_MNIST_MEAN,)
    std: tuple[float, ...] = (FASHION_MNIST_STD,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, count: int) -> LabelledImages:
        """The first ``count`` items (a fixed, reproducible subset)."""
        return replace(self, images=self.images[:count], labels=self.labels[:count])

    def select(self, indices: torch.Tensor) -> LabelledImages:
        return replace(self, images=self.images[indices], labels=self.labels[indices])

    def normalized(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Float model inputs (n, C, H, W) normalised with this set's mean/std."""
        x = self.images[start:stop].float().div_(255)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        mean, std = (torch.tensor(values).view(1, -1, 1, 1) for values in (self.mean, self.std))
        return (x - mean) / std


def find_fashion_mnist(root: str | Path | None = None) -> Path:
    """The directory to read: ``root``, else $FASHION_MNIST_DIR, else Debian's location."""
    candidates = [Path(root)] if root else []
    if not root and os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    if not root:
        candidates.append(DEBIAN_DIR)
    for directory in candidates:
        if all(_locate(directory, name) for pair in _FILES.values() for name in pair):
            return directory
    where = ", ".join(str(c) for c in candidates)
    raise StudioError(f"Fashion-MNIST not found in {where}: {_HOW_TO_GET}")


def _locate(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise StudioError(f"{path} is unreadable ({err}); reinstall the dataset: {_HOW_TO_GET}") from None
    header = np.frombuffer(data[:4], dtype=">u4")
    if len(data) < 8 or header[0] != magic:
        raise StudioError(f"{path} is not an IDX file of the expected kind; {_HOW_TO_GET}")
    n_dims = magic & 0xFF
    dims = np.frombuffer(data[4:4 + 4 * n_dims], dtype=">u4").astype(int)
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * n_dims)
    if body.size != int(np.prod(dims)):
        raise StudioError(f"{path} is truncated ({body.size} of {int(np.prod(dims))} bytes); {_HOW_TO_GET}")
    return body.reshape(dims)


def load_fashion_mnist(split: str = "test", root: str | Path | None = None) -> LabelledImages:
    """The ``train`` (60,000) or ``test`` (10,000) split."""
    if split not in _FILES:
        raise StudioError(f"split must be 'train' or 'test', not {split!r}")
    directory = find_fashion_mnist(root)
    image_file, label_file = (_locate(directory, name) for name in _FILES[split])
    images = _read_idx(image_file, 0x0803)
    labels = _read_idx(label_file, 0x0801)
    if len(images) != len(labels):
        raise StudioError(f"{directory}: {len(images)} images but {len(labels)} labels; {_HOW_TO_GET}")
    return LabelledImages(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)),
                          FASHION_MNIST_CLASSES, f"fashion-mnist/{split} ({directory})")


def split_validation(train: LabelledImages) -> tuple[LabelledImages, LabelledImages]:
    """The training split as (train[:55000], what training and calibration use; train[55000:], held out for
    validation)."""
    cut = len(train) - VALIDATION_SIZE

    def part(rows: slice, name: str) -> LabelledImages:
        return LabelledImages(train.images[rows], train.labels[rows], train.classes,
                              train.source.replace("fashion-mnist/train", f"fashion-mnist/train{name}"))

    return part(slice(None, cut), f"[:{cut}]"), part(slice(cut, None), f"[{cut}:], validation")


def load_validation(root: str | Path | None = None) -> LabelledImages:
    """train[55000:], the 5,000 training images held out from training and calibration: where a knob of the
    method may be chosen without touching the test set."""
    return split_validation(load_fashion_mnist("train", root))[1]
