"""ImageFolder directories (one sub-folder per class, the ImageNet val layout) with Vim's eval transform."""

from __future__ import annotations

from pathlib import Path

from torchvision import datasets, transforms

from core.errors import StudioError

VIM_EVAL_MEAN = (0.485, 0.456, 0.406)
VIM_EVAL_STD = (0.229, 0.224, 0.225)


def vim_eval_transform(img_size: int = 224, crop_ratio: float = 0.875) -> transforms.Compose:
    """The official Vim evaluation: resize to img_size / 0.875 (256 for 224) bicubic, centre crop, ImageNet norm."""
    return transforms.Compose([
        transforms.Resize(int(img_size / crop_ratio), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(VIM_EVAL_MEAN, VIM_EVAL_STD),
    ])


def load_image_folder(root: str | Path, img_size: int = 224) -> datasets.ImageFolder:
    """An ImageFolder with the Vim eval transform; a missing, empty or image-less folder is one clear line."""
    root = Path(root)
    if not root.is_dir():
        raise StudioError(f"image folder '{root}' does not exist")
    try:
        return datasets.ImageFolder(str(root), transform=vim_eval_transform(img_size))
    except FileNotFoundError as err:
        raise StudioError(f"no images found under '{root}': expected one sub-folder per class holding "
                          f".jpg/.png files ({str(err).splitlines()[0][:100]})") from None
