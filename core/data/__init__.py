"""Datasets: Fashion-MNIST (the default model's data) and ImageFolder directories (ImageNet val layout)."""

from core.data.calibration import BUILTIN_SOURCES, calibration_images
from core.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    LabelledImages,
    find_fashion_mnist,
    load_fashion_mnist,
    load_validation,
)
from core.data.image_folder import (
    MAX_FOLDER_IMAGES,
    VIM_EVAL_MEAN,
    VIM_EVAL_STD,
    input_normalization,
    load_image_folder,
    load_labelled_archive,
    load_labelled_folder,
    pixel_transform,
    vim_eval_transform,
)

__all__ = [
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "LabelledImages",
    "find_fashion_mnist", "load_fashion_mnist", "load_validation",
    "BUILTIN_SOURCES", "calibration_images", "input_normalization",
    "MAX_FOLDER_IMAGES", "VIM_EVAL_MEAN", "VIM_EVAL_STD", "load_image_folder", "load_labelled_archive",
    "load_labelled_folder",
    "pixel_transform", "vim_eval_transform",
]
