"""What the studio works on: one checkpoint's model and card, the labelled images it is evaluated on, and a
fingerprint of both that keys caches and names results.

The app keeps one workspace per browser session, so two sessions never mix models; the engine's functions
take its parts. A workspace is read-only once opened: sessions, caches and running jobs share one object.
"""

from __future__ import annotations

import functools
import hashlib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from core.data import (
    FASHION_MNIST_CLASSES,
    LabelledImages,
    calibration_images,
    load_fashion_mnist,
    load_labelled_archive,
    load_labelled_folder,
)
from core.default_model import CARD_FILE, DEFAULT_CHECKPOINT, load_card
from core.errors import StudioError
from core.models import VimConfig, VisionMamba, load_checkpoint

MAX_CHECKPOINT_BYTES = 2_000_000_000  # read whole into memory; Vim-B's official .pth is about 0.4 GB


def fits_fashion_mnist(cfg: VimConfig) -> bool:
    """Whether the model reads Fashion-MNIST as it is: 28×28, 1 channel, 10 classes."""
    return (cfg.img_size, cfg.in_chans, cfg.num_classes) == (28, 1, len(FASHION_MNIST_CLASSES))


def architecture(cfg: VimConfig) -> str:
    """The input and output a checkpoint expects, as people say it: '224×224, 3 channels, 1000 classes'."""
    channels = "1 channel" if cfg.in_chans == 1 else f"{cfg.in_chans} channels"
    return f"{cfg.img_size}×{cfg.img_size}, {channels}, {cfg.num_classes} classes"


@dataclass(frozen=True, eq=False)
class Workspace:
    """A loaded checkpoint and its evaluation data. ``data`` is None when there are no labelled images for
    this model, and ``no_data`` then says why; ``label`` names the checkpoint with its SHA-256 prefix."""

    checkpoint: Path
    label: str
    name: str
    model: VisionMamba
    card: dict | None
    data: LabelledImages | None
    no_data: str
    fingerprint: str

    def __deepcopy__(self, memo: dict) -> Workspace:
        """Itself: gradio deep-copies session state, and a copy per session would duplicate the model."""
        return self

    @property
    def is_default(self) -> bool:
        return self.checkpoint.resolve() == DEFAULT_CHECKPOINT.resolve()

    @property
    def data_label(self) -> str:
        return self.data.source if self.data is not None else f"none: {self.no_data}"

    def class_name(self, label: int) -> str:
        """The data's class name for an output index ('class 17' where the data names none)."""
        classes = self.data.classes if self.data is not None else \
            FASHION_MNIST_CLASSES if fits_fashion_mnist(self.model.cfg) else ()
        return classes[label] if 0 <= label < len(classes) else f"class {label}"

    def test_data(self, purpose: str) -> LabelledImages:
        """The labelled images, or one line saying why ``purpose`` (e.g. 'evaluating') cannot run without them."""
        if self.data is None:
            raise StudioError(f"{purpose} needs labelled test images, and there are none: {self.no_data}")
        return self.data

    def inspection_images(self, count: int, seed: int) -> tuple[torch.Tensor, str]:
        """Model inputs to look at activations on: the first ``count`` test images, or seeded N(0, 1) noise
        when there are none (seed + 1, so that they differ from a noise calibration set with ``seed``)."""
        if self.data is not None:
            count = min(count, len(self.data))
            return self.data.normalized(0, count), f"the first {count} test images"
        cfg = self.model.cfg
        images = calibration_images("noise", count, seed + 1, cfg.img_size, cfg.in_chans)
        return images, f"{count} N(0, 1) noise images (seed {seed + 1}; no test images: {self.no_data})"

    def provenance(self) -> dict:
        """What a result records about the model and data it came from."""
        return {"model": self.name, "checkpoint": self.label, "data": self.data_label,
                "fingerprint": self.fingerprint}


def _size(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 100_000_000 else f"{size / 1e6:.1f} MB"


def file_sha256(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def checkpoint_label(path: Path, shown: str | None = None, digest: str | None = None) -> str:
    """How records name a weights file: 'path (sha256 <first 12 hex digits>)', which ``core.reproduce`` checks
    before it runs a record again."""
    return f"{shown or path} (sha256 {(digest or file_sha256(path))[:12]})"


def _evaluation_data(cfg: VimConfig, data_folder: Path | None, progress: Callable[[int, int], None] | None,
                     shown_as: str | None = None) -> tuple[LabelledImages | None, str]:
    """The folder's (or .zip archive's) images when one is given, else Fashion-MNIST's test split when the model
    reads it."""
    if data_folder is not None:
        shown = shown_as or str(data_folder)
        if data_folder.is_file() and zipfile.is_zipfile(data_folder):
            data = load_labelled_archive(data_folder, cfg.img_size, cfg.in_chans, progress=progress, shown_as=shown)
        elif data_folder.is_file():
            raise StudioError(f"test images '{shown}' is a file but not a .zip archive: give a folder with one "
                              "sub-folder per class, or a .zip of one")
        else:
            data = load_labelled_folder(data_folder, cfg.img_size, cfg.in_chans, progress=progress)
        if len(data.classes) > cfg.num_classes:
            raise StudioError(f"'{shown}' has {len(data.classes)} class folders but the model predicts "
                              f"{cfg.num_classes} classes")
        return data, ""
    if not fits_fashion_mnist(cfg):
        return None, (f"this model ({architecture(cfg)}) is not a Fashion-MNIST one and no data folder was given "
                      "(one sub-folder per class)")
    try:
        return load_fashion_mnist("test"), ""
    except StudioError as err:
        return None, str(err)


def open_workspace(checkpoint: str | Path, data_folder: str | Path | None = None, shown_as: str | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   data_shown_as: str | None = None) -> Workspace:
    """Load a checkpoint (official Vim ``.pth``, plain state dict or safetensors) and its evaluation data.

    ``data_folder`` (ImageFolder layout, or a .zip of one) replaces Fashion-MNIST's test split, which is used
    only for models of its shape; its images are resized to the model's input (:func:`core.data.pixel_transform`).
    ``shown_as`` / ``data_shown_as`` are how messages and records name the checkpoint / the data when their path
    means nothing to the user (an upload's temporary copy). ``progress(done, total)`` follows the folder's
    images. Every problem is a :class:`StudioError` of one line.
    """
    path = Path(checkpoint)
    shown = shown_as or str(path)
    try:
        if path.is_dir():
            raise StudioError(f"checkpoint '{path}' is a folder: give the weights file in it (.pth or .safetensors)")
        if path.is_file() and path.stat().st_size > MAX_CHECKPOINT_BYTES:
            raise StudioError(f"checkpoint '{path}' is {_size(path.stat().st_size)}, more than the "
                              f"{_size(MAX_CHECKPOINT_BYTES)} the studio loads")
        model = load_checkpoint(path)
    except StudioError as err:
        raise StudioError(str(err).replace(str(path), shown)) from None
    cfg = model.cfg
    if cfg.num_classes < 1:
        raise StudioError(f"'{shown}' has no classification head (head.weight): the studio needs a classifier")
    folder = Path(data_folder) if data_folder else None
    data, no_data = _evaluation_data(cfg, folder, progress, data_shown_as)
    card = load_card(path.parent) if (path.parent / CARD_FILE).is_file() else None
    digest = file_sha256(path)
    fingerprint = hashlib.sha256(digest.encode())
    if data is not None:
        for part in (data.images, data.labels):
            fingerprint.update(part.numpy().tobytes())
        fingerprint.update("|".join(data.classes).encode())
    return Workspace(checkpoint=path, label=checkpoint_label(path, shown, digest),
                     name=path.parent.name if card is not None else Path(shown).name, model=model, card=card,
                     data=data, no_data=no_data, fingerprint=fingerprint.hexdigest()[:16])


@functools.cache
def default_workspace() -> Workspace:
    """The embedded default model on Fashion-MNIST's test split, opened once: every session starts on it."""
    return open_workspace(DEFAULT_CHECKPOINT)
