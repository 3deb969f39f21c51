"""Calibration image sets: real training images, Gaussian noise, or a folder of images the user names.

Every set is reproducible from (source, count, seed) and comes back normalised like the model's input.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from core.data.fashion_mnist import VALIDATION_SIZE, load_fashion_mnist
from core.data.image_folder import input_normalization, pixel_transform
from core.errors import StudioError, check_seed, is_whole

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
BUILTIN_SOURCES = ("real", "noise")


MAX_CALIBRATION_BYTES = 2 << 30  # 680,000 Fashion-MNIST images, 3,500 at 224×224×3: a typo must not fill memory


def calibration_images(source: str | Path, count: int, seed: int, img_size: int = 28, in_chans: int = 1,
                       data_root: str | None = None) -> torch.Tensor:
    """``count`` images (count, in_chans, img_size, img_size) from ``source``: "real" (a seeded sample of
    Fashion-MNIST's training images, never the held-out validation or the test set), "noise" (N(0, 1) in
    the normalised input space) or a folder of images."""
    for what, value in (("at least 1 image (a whole number)", count), ("an img_size of 1 or more pixels", img_size),
                        ("in_chans of 1 or more", in_chans)):
        if not is_whole(value) or value < 1:
            raise StudioError(f"the calibration set needs {what}, got {value!r}")
    if not isinstance(source, str | Path):
        raise StudioError(f"the calibration source must be 'real', 'noise' or a folder, got {source!r}")
    source = str(source)
    if count * in_chans * img_size**2 * 4 > MAX_CALIBRATION_BYTES:
        fits = MAX_CALIBRATION_BYTES // (in_chans * img_size**2 * 4)
        raise StudioError(f"{count:,} calibration images of {in_chans}×{img_size}×{img_size} would take "
                          f"{count * in_chans * img_size**2 * 4 / 1e9:,.1f} GB: at most {fits:,} (the paper "
                          "calibrates on 128)")
    if not source.strip():
        raise StudioError("the calibration source is empty: give 'real', 'noise' or a folder of images")
    generator = torch.Generator().manual_seed(check_seed(seed))
    if source == "noise":
        return torch.randn(count, in_chans, img_size, img_size, generator=generator)
    if source == "real":
        if (img_size, in_chans) != (28, 1):
            raise StudioError("real calibration images are Fashion-MNIST (28×28, 1 channel); for other models "
                              "give a folder of images")
        train = load_fashion_mnist("train", data_root)
        pool = len(train) - VALIDATION_SIZE
        if count > pool:
            raise StudioError(f"at most {pool} real calibration images, asked for {count}")
        chosen = torch.randperm(pool, generator=generator)[:count]
        return train.select(chosen).normalized()
    return _folder_images(Path(source), count, generator, img_size, in_chans)


def folder_image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (any depth), in a fixed order: what a folder source draws from."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _folder_images(folder: Path, count: int, generator: torch.Generator, img_size: int,
                   in_chans: int) -> torch.Tensor:
    if not folder.is_dir():
        raise StudioError(f"calibration source {str(folder)!r} is neither 'real', 'noise' nor a folder")
    files = folder_image_files(folder)
    if not files:
        raise StudioError(f"no images (.png, .jpg, …) under '{folder}'")
    if len(files) < count:
        raise StudioError(f"'{folder}' holds {len(files)} images, fewer than the {count} asked for: calibrate on "
                          f"{len(files)} or fewer")
    transform = pixel_transform(img_size, in_chans)
    order = torch.randperm(len(files), generator=generator).tolist()
    images = []
    for index in order[:count]:
        try:
            with Image.open(files[index]) as image:
                images.append(transform(image))
        except (UnidentifiedImageError, OSError) as err:
            raise StudioError(f"'{files[index]}' is not a readable image ({err.__class__.__name__}); "
                              "remove it or fix it") from None
    mean, std = (torch.tensor(values).view(1, -1, 1, 1) for values in input_normalization(in_chans))
    return (torch.stack(images).float().div_(255) - mean) / std

