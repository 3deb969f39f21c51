"""A logged run made again from its record alone: the same weights (checked by their SHA-256), the same test
images, calibration images, seed and configuration. What the app promises ("every number is reproducible"),
as a command: ``python -m core rerun runs.jsonl --run 3`` says whether top-1 came out the same.

A record names its inputs in words (``checkpoint``: 'path (sha256 prefix)'; ``data``: 'fashion-mnist/test
(root)', 'fashion-mnist/train[55000:], validation (root)' or 'image folder path (N classes)'), so this module
reads those words back; an uploaded archive is not kept after its session and cannot be read again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from core.data import LabelledImages, load_fashion_mnist, load_validation
from core.data.image_folder import load_labelled_folder
from core.errors import StudioError
from core.eval import evaluate
from core.experiments import QuantizationRun, RunRecord, quantize_and_evaluate
from core.models import VisionMamba, load_checkpoint
from core.quant import QuantConfig
from core.workspace import file_sha256

CHECKPOINT_LABEL = re.compile(r"(?P<path>.+) \(sha256 (?P<digest>[0-9a-f]+)\)")
FASHION_SPLITS = {"fashion-mnist/test": "test", "fashion-mnist/train[55000:], validation": "validation"}


@dataclass
class Rerun:
    """A record made again: the new record beside the old one, and the FP32 top-1 measured on the way."""

    recorded: RunRecord
    again: QuantizationRun
    fp_top1: float

    @property
    def same(self) -> bool:
        """Top-1 (and the FP reference it is compared with) exactly as recorded, to the record's 0.01 %."""
        return (self.again.record.top1, round(self.fp_top1, 2)) == (self.recorded.top1, self.recorded.fp_top1)


def recorded_model(record: RunRecord) -> VisionMamba:
    """The run's weights, refused when the file is gone or its SHA-256 is not the one the run recorded."""
    if not record.checkpoint:
        raise StudioError("the run does not name its checkpoint (a record from before checkpoints were recorded)")
    match = CHECKPOINT_LABEL.fullmatch(record.checkpoint)
    path = Path(match["path"] if match else record.checkpoint)
    if not path.is_file():
        raise StudioError(f"the run's checkpoint '{path}' is not there any more")
    if match and not (digest := file_sha256(path)).startswith(match["digest"]):
        raise StudioError(f"'{path}' changed since the run (sha256 {match['digest']} then, {digest[:12]} now)")
    return load_checkpoint(path)


def _described(data: str) -> tuple[str, str]:
    """'fashion-mnist/test (/usr/share/…)' → ('fashion-mnist/test', '/usr/share/…')."""
    kind, _, detail = data.rpartition(" (")
    return (kind, detail[:-1]) if kind and detail.endswith(")") else (data, "")


def fashion_root(record: RunRecord) -> str | None:
    """The Fashion-MNIST directory a run read (its test or validation images; real calibration images come
    from the same files), None when its images were not Fashion-MNIST's."""
    kind, root = _described(record.data or "fashion-mnist/test")
    return (root or None) if kind in FASHION_SPLITS else None


def recorded_images(record: RunRecord, model: VisionMamba) -> LabelledImages:
    """The images a run was scored on (its first ``test_images``), read again from where its record says."""
    kind, detail = _described(record.data or "fashion-mnist/test")  # records older than ``data``: the test split
    if kind in FASHION_SPLITS:
        root = detail or None
        images = load_fashion_mnist("test", root) if FASHION_SPLITS[kind] == "test" else load_validation(root)
    elif kind.startswith("image folder "):
        images = load_labelled_folder(kind.removeprefix("image folder "), model.cfg.img_size, model.cfg.in_chans)
    elif kind.startswith("image archive "):
        raise StudioError(f"the run's test images came from an archive ({kind.removeprefix('image archive ')}) "
                          "that is not kept after its session: load the same images from a folder and quantize "
                          "again")
    else:
        raise StudioError(f"the run's test images ({record.data!r}) are not a source the studio can read again")
    if len(images) < record.test_images:
        raise StudioError(f"{images.source} has {len(images):,} images now, the run used {record.test_images:,}")
    return images.subset(record.test_images)


def rerun(record: RunRecord, eval_batch_size: int = 500) -> Rerun:
    """Quantize and evaluate again exactly as ``record`` says (same per-site error images too)."""
    model = recorded_model(record)
    images = recorded_images(record, model)
    fp = evaluate(model, images, eval_batch_size)
    calibration = record.calibration
    again = quantize_and_evaluate(model, record.model, QuantConfig.from_dict(record.config), images, fp.top1,
                                  calibration["source"], calibration["images"], calibration["seed"],
                                  fashion_root(record), eval_batch_size=eval_batch_size,
                                  checkpoint=record.checkpoint, error_images=record.site_errors.get("images", 0))
    return Rerun(record, again, fp.top1)
