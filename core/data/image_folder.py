"""ImageFolder directories (one sub-folder per class, the ImageNet val layout) with Vim's eval transform, and
the pixels of any image resized to what a model takes (1 channel: Fashion-MNIST style, 3: Vim's eval crop)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import UnidentifiedImageError
from torchvision import datasets, transforms

from core.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, LabelledImages
from core.errors import StudioError

VIM_EVAL_MEAN = (0.485, 0.456, 0.406)
VIM_EVAL_STD = (0.229, 0.224, 0.225)
VIM_CROP_RATIO = 0.875
MAX_FOLDER_IMAGES = 1000  # 150 MB of uint8 at 224×224 RGB; on a CPU a Vim-T evaluates far fewer in a minute


def input_normalization(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of the model input: Fashion-MNIST's for 1 channel, ImageNet's (Vim) for 3."""
    if in_chans == 1:
        return (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,)
    return VIM_EVAL_MEAN[:in_chans], VIM_EVAL_STD[:in_chans]


def _vim_resize_crop(img_size: int, crop_ratio: float = VIM_CROP_RATIO) -> list:
    return [transforms.Resize(int(img_size / crop_ratio), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(img_size)]


def vim_eval_transform(img_size: int = 224, crop_ratio: float = VIM_CROP_RATIO) -> transforms.Compose:
    """The official Vim evaluation: resize to img_size / 0.875 (256 for 224) bicubic, centre crop, ImageNet norm."""
    return transforms.Compose([*_vim_resize_crop(img_size, crop_ratio), transforms.ToTensor(),
                               transforms.Normalize(VIM_EVAL_MEAN, VIM_EVAL_STD)])


def pixel_transform(img_size: int, in_chans: int) -> transforms.Compose:
    """An image of any size and mode → uint8 pixels (in_chans, img_size, img_size) the model's way: grey and
    resized to the square for 1-channel (Fashion-MNIST-like) models, Vim's resize and centre crop for RGB ones."""
    if in_chans == 1:
        return transforms.Compose([transforms.Grayscale(), transforms.Resize(
            (img_size, img_size), interpolation=transforms.InterpolationMode.BICUBIC), transforms.PILToTensor()])
    if in_chans == 3:
        return transforms.Compose([transforms.Lambda(lambda image: image.convert("RGB")),
                                   *_vim_resize_crop(img_size), transforms.PILToTensor()])
    raise StudioError(f"images can feed 1- or 3-channel models only; this one takes {in_chans} channels")


def load_image_folder(root: str | Path, img_size: int = 224,
                      transform: Callable | None = None) -> datasets.ImageFolder:
    """An ImageFolder with ``transform`` (default: the Vim eval transform); a missing, empty or image-less
    folder is one clear line."""
    root = Path(root)
    if not root.is_dir():
        raise StudioError(f"image folder '{root}' does not exist")
    try:
        return datasets.ImageFolder(str(root), transform=transform or vim_eval_transform(img_size))
    except FileNotFoundError as err:
        raise StudioError(f"no images found under '{root}': expected one sub-folder per class holding "
                          f".jpg/.png files ({str(err).splitlines()[0][:100]})") from None


def load_labelled_folder(root: str | Path, img_size: int, in_chans: int, limit: int = MAX_FOLDER_IMAGES,
                         progress: Callable[[int, int], None] | None = None) -> LabelledImages:
    """Up to ``limit`` images of an ImageFolder as evaluation data, resized with :func:`pixel_transform`.

    Class ``i`` is the i-th sub-folder in sorted order (torchvision's rule, which matches ImageNet's synset
    order). Images are taken from each class in turn, so any first N cover the classes evenly.
    """
    folder = load_image_folder(root, transform=pixel_transform(img_size, in_chans))
    by_class: list[list[int]] = [[] for _ in folder.classes]
    for index, (_, label) in enumerate(folder.samples):
        by_class[label].append(index)
    order = [group[rank] for rank in range(max(map(len, by_class))) for group in by_class if rank < len(group)]
    chosen = order[:limit]
    images, labels = [], []
    for done, index in enumerate(chosen, start=1):
        try:
            pixels, label = folder[index]
        except (UnidentifiedImageError, OSError) as err:
            raise StudioError(f"'{folder.samples[index][0]}' is not a readable image ({type(err).__name__}); "
                              "remove it or fix it") from None
        images.append(pixels)
        labels.append(label)
        if progress is not None:
            progress(done, len(chosen))
    capped = "" if len(chosen) == len(order) else \
        f", the first {len(chosen):,} of {len(order):,} images, classes in turn"
    mean, std = input_normalization(in_chans)
    stacked = torch.stack(images)
    return LabelledImages(stacked[:, 0] if in_chans == 1 else stacked, torch.tensor(labels), tuple(folder.classes),
                          f"image folder {Path(root).resolve()} ({len(folder.classes)} classes{capped})", mean, std)
