"""ImageFolder directories (one sub-folder per class, the ImageNet val layout) with Vim's eval transform, and
the pixels of any image resized to what a model takes (1 channel: Fashion-MNIST style, 3: Vim's eval crop)."""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path, PurePosixPath

import torch
from PIL import UnidentifiedImageError
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from core.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, LabelledImages
from core.errors import StudioError

VIM_EVAL_MEAN = (0.485, 0.456, 0.406)
VIM_EVAL_STD = (0.229, 0.224, 0.225)
VIM_CROP_RATIO = 0.875
MAX_FOLDER_IMAGES = 1000  # 150 MB of uint8 at 224×224 RGB; on a CPU a Vim-T evaluates far fewer in a minute
MAX_ARCHIVE_BYTES = 2_000_000_000  # the images a .zip may unpack to: a zip bomb stops here, before the disk fills
MAX_ARCHIVE_IMAGES = 50_000  # files a .zip may unpack (at most MAX_FOLDER_IMAGES are read): no inode flood either


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


def _archive_members(archive: zipfile.ZipFile, shown: str) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The archive's image files with their paths (backslashes, which some Windows tools write, read as
    separators), refused as a whole when one would land outside the extraction folder, when there are more than
    ``MAX_ARCHIVE_IMAGES`` or when they would unpack to more than ``MAX_ARCHIVE_BYTES``. macOS' resource forks
    (``__MACOSX/``, ``._*``) are skipped: they carry image suffixes but no images."""
    members = []
    for member in archive.infolist():
        path = PurePosixPath(member.filename.replace("\\", "/"))
        if member.is_dir() or "__MACOSX" in path.parts or path.name.startswith("._"):
            continue
        if path.is_absolute() or ".." in path.parts:
            raise StudioError(f"'{shown}' holds a file outside its own folder ({member.filename!r}): refused")
        if path.suffix.lower() in IMG_EXTENSIONS:
            members.append((member, path))
    if len(members) > MAX_ARCHIVE_IMAGES:
        raise StudioError(f"'{shown}' holds {len(members):,} images, more than the {MAX_ARCHIVE_IMAGES:,} the studio "
                          f"unpacks (it reads at most {MAX_FOLDER_IMAGES:,}): zip fewer images")
    total = sum(member.file_size for member, _ in members)
    if total > MAX_ARCHIVE_BYTES:
        raise StudioError(f"'{shown}' would unpack to {total / 1e9:.1f} GB of images, more than the "
                          f"{MAX_ARCHIVE_BYTES / 1e9:g} GB the studio reads: zip fewer images")
    return members


def _extract(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, shown: str) -> None:
    """One member to ``target``, copied in chunks that may not exceed its declared size (a forged header is an
    error, not a full disk)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with archive.open(member) as source, target.open("wb") as sink:
        while chunk := source.read(1 << 20):
            written += len(chunk)
            if written > member.file_size:
                raise StudioError(f"'{shown}' is damaged: {member.filename!r} unpacks to more than its header says")
            sink.write(chunk)


def _class_root(folder: Path) -> Path:
    """Where the class sub-folders are: an archive of ``val/<class>/…`` has them one level down."""
    while True:
        entries = list(folder.iterdir())
        if len(entries) != 1 or not entries[0].is_dir():
            return folder
        folder = entries[0]


def load_labelled_archive(archive: str | Path, img_size: int, in_chans: int, limit: int = MAX_FOLDER_IMAGES,
                          progress: Callable[[int, int], None] | None = None,
                          shown_as: str | None = None) -> LabelledImages:
    """:func:`load_labelled_folder` for a .zip of such a folder (class sub-folders at its top, or under one
    folder): what a browser can upload. The images are unpacked to a temporary folder, read, and the folder
    removed; only image files are unpacked, and an archive that could escape its folder or unpack to more than
    ``MAX_ARCHIVE_BYTES`` is refused before anything is written. ``shown_as`` names it in messages."""
    shown = shown_as or str(archive)
    folder = Path(tempfile.mkdtemp(prefix="ouromamba-images-"))
    try:
        try:
            with zipfile.ZipFile(archive) as opened:
                members = _archive_members(opened, shown)
                if not members:
                    raise StudioError(f"'{shown}' holds no images: zip a folder with one sub-folder of images per "
                                      "class")
                for member, path in members:
                    _extract(opened, member, folder.joinpath(*path.parts), shown)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, RuntimeError, NotImplementedError) as err:
            raise StudioError(f"'{shown}' is not a readable .zip archive ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:80] if str(err) else 'no detail'})") from None
        root = _class_root(folder)
        try:
            data = load_labelled_folder(root, img_size, in_chans, limit, progress)
        except StudioError as err:
            raise StudioError(str(err).replace(str(root.resolve()), shown).replace(str(root), shown)) from None
        return replace(data, source=data.source.replace(f"image folder {root.resolve()}", f"image archive {shown}"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
