"""OuroMamba-Gen: calibration images from the full-precision model alone, and the baselines it is compared with.

Images start as Gaussian noise (in the model's normalised input space) and are themselves the optimised
variables: Adam on L = λ_C·L^C + λ_O·L^O (+ λ_PSE·L^PSE for the PSAQ-style baseline, + priors), with a random
shift and flip each iteration, pixels kept in the valid range. Sources:

* ``ouromamba`` — L^C on the enhanced patch features of every chosen layer and both directions, plus L^O;
* ``output_only`` — L^O alone;  ``psaq`` — PSAQ-ViT's patch-similarity entropy on the mixer outputs, plus L^O;
* ``noise`` — the Gaussian starting point itself;  ``real`` — real training images (data-driven reference).

Every result carries its config, seed and per-image target label and final FP confidence, and saves as PNGs plus
a manifest that :func:`core.data.calibration_images` reads back as a folder source.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from threading import Event

import numpy as np
import torch
from PIL import Image

from core.data import calibration_images, input_normalization
from core.errors import StudioError, check_seed, is_whole
from core.eval import Cancelled
from core.gen.attention import check_layers, check_neighbourhood, drop_cls, frozen, patch_features, trace_scans
from core.gen.losses import OUTPUT_LOSSES, output_loss, patch_contrastive_loss, similarity_entropy_loss, total_variation
from core.models import VisionMamba
from core.records import check_types, checked_fields, provenance

GEN_SOURCES = ("ouromamba", "output_only", "psaq", "noise", "real")
OPTIMISED_SOURCES = ("ouromamba", "output_only", "psaq")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class GenConfig:
    """How a calibration set is made. Defaults: the paper's where it says (5×5, top-12, 1000 iterations, 128
    images), ours where it is silent (docs/method-decisions.md)."""

    source: str = "ouromamba"
    count: int = 128
    iterations: int = 1000
    batch_size: int = 64
    lr: float = 0.1
    neighbourhood: int = 5
    top_k: int = 12
    temperature: float = 0.2
    contrastive_weight: float = 1.0
    output_weight: float = 1.0
    output_loss: str = "ce"
    pse_weight: float = 1.0
    tv_weight: float = 0.0
    l2_weight: float = 0.0
    layers: tuple[int, ...] | None = None
    max_shift: int = 2
    flip: bool = True
    seed: int = 0
    preview_every: int = 10

    def __post_init__(self):
        check_types(self, "GenConfig")
        if self.layers is not None and not all(is_whole(n, plain=True) for n in self.layers):
            raise StudioError(f"GenConfig: layers must be whole layer numbers, got {self.layers!r}")
        if self.source not in GEN_SOURCES:
            raise StudioError(f"unknown image source {self.source!r}; choose one of {', '.join(GEN_SOURCES)}")
        if self.output_loss not in OUTPUT_LOSSES:
            raise StudioError(f"output loss must be one of {OUTPUT_LOSSES}, got {self.output_loss!r}")
        check_neighbourhood(self.neighbourhood)
        problems = [f"{name} must be at least {low}, got {getattr(self, name)}" for name, low in (
            ("count", 1), ("iterations", 0), ("batch_size", 1), ("top_k", 1), ("max_shift", 0), ("preview_every", 1))
            if getattr(self, name) < low]
        problems += [f"{name} must be a finite number ≥ 0, got {getattr(self, name)}" for name in (
            "contrastive_weight", "output_weight", "pse_weight", "tv_weight", "l2_weight")
            if not 0 <= getattr(self, name) < math.inf]
        problems += [f"{name} must be a finite number > 0, got {getattr(self, name)}" for name in ("lr", "temperature")
                     if not 0 < getattr(self, name) < math.inf]
        if self.optimised and not self.weights:
            problems.append("every loss weight this source uses is 0, so there is nothing to optimise: give "
                            + ("λ output or λ contrastive" if self.source == "ouromamba" else "λ output")
                            + " a value above 0, or run 0 iterations")
        if problems:
            raise StudioError("; ".join(problems))
        check_seed(self.seed)

    @property
    def weights(self) -> dict[str, float]:
        """The loss weights this source really uses (the other terms are off)."""
        weights = {"output": self.output_weight, "tv": self.tv_weight, "l2": self.l2_weight}
        if self.source == "ouromamba":
            weights["contrastive"] = self.contrastive_weight
        elif self.source == "psaq":
            weights["pse"] = self.pse_weight
        return {name: w for name, w in weights.items() if w > 0}

    @property
    def optimised(self) -> bool:
        """Whether images are optimised at all (noise, real images and 0 iterations are taken as they are)."""
        return self.source in OPTIMISED_SOURCES and self.iterations > 0

    def to_dict(self) -> dict:
        values = asdict(self)
        values["layers"] = None if self.layers is None else list(self.layers)
        return values

    def shaping(self) -> dict:
        """The settings that shaped the images: what a manifest records and a set's name digests. Source, count
        and seed always; for an optimised set also the schedule, the augmentation and the settings of the loss
        terms its source uses. Never the preview rate (only the UI sees it), nor a setting that did nothing, so
        a noise set's manifest does not claim 1000 iterations at lr 0.1."""
        used = {"source", "count", "seed"} | ({"iterations"} if self.source in OPTIMISED_SOURCES else set())
        if self.optimised:
            used |= {"batch_size", "lr", "max_shift", "flip", "output_weight", "tv_weight", "l2_weight"}
            used |= {"output_loss"} if self.output_weight > 0 else set()
            if self.source == "ouromamba":
                used |= {"contrastive_weight", "neighbourhood", "top_k", "temperature", "layers"}
            elif self.source == "psaq":
                used |= {"pse_weight", "layers"}
        return {name: value for name, value in self.to_dict().items() if name in used}

    @classmethod
    def from_dict(cls, values: dict) -> GenConfig:
        values = checked_fields(cls, values, "Gen config")
        if values.get("layers") is not None:
            values["layers"] = tuple(values["layers"])
        return cls(**values)


INTERACTIVE_ITERATIONS = 20  # 128 images in under 120 s on the 2-core CPU (results/gen_cpu.md)
#: "fidelity" is the paper's schedule; "interactive" makes 128 images in under two minutes on the 2-core CPU
#: (without augmentation: with few iterations, shifts and flips slow the output loss down too much).
GEN_PRESETS = {
    "fidelity": GenConfig(),
    "interactive": GenConfig(iterations=INTERACTIVE_ITERATIONS, lr=0.2, max_shift=0, flip=False, preview_every=5),
}


@dataclass
class GenProgress:
    """What the UI shows while images are optimised: position, each weighted loss term, and sometimes a preview."""

    iteration: int
    iterations: int
    batch: int
    batches: int
    losses: dict[str, float]
    preview: torch.Tensor | None = None  # the current batch, normalised, every ``preview_every`` iterations

    @property
    def fraction(self) -> float:
        return ((self.batch * self.iterations) + self.iteration) / max(1, self.batches * self.iterations)


GenCallback = Callable[[GenProgress], None]


@dataclass
class GenResult:
    """Calibration images (normalised, like the model input) with how they were made."""

    images: torch.Tensor
    targets: list[int | None]
    predictions: list[int]
    confidences: list[float]  # FP softmax probability of the target (of the prediction when no target)
    config: GenConfig
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)  # per iteration, mean over batches
    provenance: dict = field(default_factory=dict)

    def file_names(self) -> list[str]:
        """PNG names of a saved set: index, and the target class when there is one (``00007_class3.png``)."""
        return [f"{index:05d}" + ("" if target is None else f"_class{target}") + ".png"
                for index, target in enumerate(self.targets)]

    def manifest(self) -> dict:
        files = self.file_names()
        return {
            "config": self.config.shaping(), "seconds": round(self.seconds, 2), **self.provenance,
            "images": [{"file": f, "target": t, "prediction": p, "confidence": round(c, 5)}
                       for f, t, p, c in zip(files, self.targets, self.predictions, self.confidences, strict=True)],
            "history": self.history,
        }


def class_balanced_targets(count: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Labels that cover the classes as evenly as ``count`` allows, in a seeded random order."""
    return (torch.arange(count) % num_classes)[torch.randperm(count, generator=generator)]


def _pixel_bounds(in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in input_normalization(in_chans))
    return (0 - mean) / std, (1 - mean) / std


def _augment(images: torch.Tensor, max_shift: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """A random circular shift of up to ``max_shift`` pixels and a random horizontal flip (one per iteration)."""
    if max_shift:
        dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
        images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
    if flip and torch.rand((), generator=generator) < 0.5:
        images = images.flip(3)
    return images


def _mixer_outputs(model: VisionMamba, layers: list[int]) -> tuple[list[torch.Tensor], list]:
    outputs: list[torch.Tensor] = []
    handles = [model.layers[i].mixer.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for i in layers]
    return outputs, handles


def gen_losses(model: VisionMamba, images: torch.Tensor, targets: torch.Tensor, config: GenConfig,
               layers: list[int]) -> dict[str, torch.Tensor]:
    """Every loss term the config's source uses, unweighted, for one batch of (augmented) images."""
    cfg, weights = model.cfg, config.weights
    mixer_outputs, handles = _mixer_outputs(model, layers if "pse" in weights else [])
    try:
        logits, traces = trace_scans(model, images, layers if "contrastive" in weights else [])
    finally:
        for handle in handles:
            handle.remove()
    terms = {}
    if "output" in weights:
        terms["output"] = output_loss(logits, targets, config.output_loss)
    if "contrastive" in weights:
        terms["contrastive"] = torch.stack([
            patch_contrastive_loss(patch_features(trace, cfg.cls_position, cfg.grid_size, config.neighbourhood),
                                   config.top_k, config.temperature) for trace in traces]).mean()
    if "pse" in weights:
        terms["pse"] = torch.stack([similarity_entropy_loss(drop_cls(out, cfg.cls_position))
                                    for out in mixer_outputs]).mean()
    if "tv" in weights:
        terms["tv"] = total_variation(images)
    if "l2" in weights:
        terms["l2"] = images.pow(2).mean()
    return terms


def _optimise_batch(model: VisionMamba, start: torch.Tensor, targets: torch.Tensor, config: GenConfig,
                    layers: list[int], bounds: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator,
                    report: Callable[[int, dict[str, float], torch.Tensor], None],
                    cancel: Event | None) -> torch.Tensor:
    images = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([images], lr=config.lr)
    low, high = bounds
    weights = config.weights
    for iteration in range(config.iterations):
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"image generation cancelled at iteration {iteration} of {config.iterations}")
        for group in optimizer.param_groups:  # cosine decay to zero over the schedule
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * iteration / config.iterations))
        terms = gen_losses(model, _augment(images, config.max_shift, config.flip, generator), targets, config,
                           layers)
        loss = sum(weights[name] * term for name, term in terms.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            images.copy_(torch.maximum(torch.minimum(images, high), low))
        report(iteration, {"total": loss.item(), **{name: term.item() for name, term in terms.items()}},
               images.detach())
    return images.detach()


def generate(model: VisionMamba, config: GenConfig, progress: GenCallback | None = None, cancel: Event | None = None,
             data_root: str | None = None) -> GenResult:
    """Make ``config.count`` calibration images for ``model`` (never modified). Seeded: the same config and model
    give the same images. Raises :class:`~core.eval.Cancelled` when ``cancel`` is set."""
    cfg = model.cfg
    layers = check_layers(model, config.layers) if config.optimised else []
    if "contrastive" in config.weights and config.optimised:
        if config.neighbourhood > cfg.grid_size:
            raise StudioError(f"the neighbourhood ({config.neighbourhood}×{config.neighbourhood}) is larger than "
                              f"the model's {cfg.grid_size}×{cfg.grid_size} patch grid")
        if config.top_k >= cfg.num_patches:
            raise StudioError(f"top-K ({config.top_k}) must be below the number of patches ({cfg.num_patches}): "
                              "the other patches of an image are the positives and negatives")
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    if config.source == "real":
        images = calibration_images("real", config.count, config.seed, cfg.img_size, cfg.in_chans, data_root)
        targets = None
    else:
        images = torch.randn(config.count, cfg.in_chans, cfg.img_size, cfg.img_size, generator=generator)
        optimised = config.source in OPTIMISED_SOURCES
        targets = class_balanced_targets(config.count, cfg.num_classes, generator) if optimised else None
    device = next(model.parameters()).device
    images = images.to(device)
    targets = None if targets is None else targets.to(device)
    history: list[dict[str, float]] = []
    if config.optimised:
        bounds = tuple(bound.to(device) for bound in _pixel_bounds(cfg.in_chans))
        images = torch.maximum(torch.minimum(images, bounds[1]), bounds[0])
        batches = math.ceil(config.count / config.batch_size)
        sums: list[dict[str, float]] = [{} for _ in range(config.iterations)]
        finished = []
        with frozen(model):
            for index in range(batches):
                rows = slice(index * config.batch_size, (index + 1) * config.batch_size)

                def report(iteration: int, losses: dict[str, float], current: torch.Tensor, index=index) -> None:
                    for name, value in losses.items():
                        sums[iteration][name] = sums[iteration].get(name, 0.0) + value / batches
                    if progress is not None:
                        last = iteration + 1 == config.iterations
                        show = last or iteration % config.preview_every == 0
                        progress(GenProgress(iteration + 1, config.iterations, index, batches, losses,
                                             current if show else None))

                finished.append(_optimise_batch(model, images[rows], targets[rows], config, layers, bounds,
                                                generator, report, cancel))
        images, history = torch.cat(finished), sums
    return _finish(model, images, targets, config, time.perf_counter() - started, history)


def _finish(model: VisionMamba, images: torch.Tensor, targets: torch.Tensor | None, config: GenConfig,
            seconds: float, history: list[dict[str, float]]) -> GenResult:
    with frozen(model), torch.no_grad():
        probabilities = model(images).float().softmax(-1)
    predictions = probabilities.argmax(-1)
    scored = predictions if targets is None else targets
    confidences = probabilities.gather(1, scored.unsqueeze(1)).squeeze(1)
    return GenResult(images=images.cpu(), targets=[None] * len(images) if targets is None else targets.tolist(),
                     predictions=predictions.tolist(), confidences=confidences.tolist(), config=config,
                     seconds=seconds, history=[{k: round(v, 6) for k, v in h.items()} for h in history],
                     provenance=provenance())


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Normalised model inputs → uint8 images (N, H, W) or (N, H, W, 3) for PNGs and galleries."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in input_normalization(images.shape[1]))
    pixels = ((images.detach().cpu().float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def save_generated(result: GenResult, folder: str | Path, replace: bool = False) -> Path:
    """PNG files (``00007_class3.png``) plus ``manifest.json`` (config, seed, versions, per-image target label,
    prediction and FP confidence, loss history). Returns the folder; the images in it are a calibration source.
    The folder must be new or empty: two sets in one folder would calibrate as one. ``replace``: a set saved
    there before is removed first (its PNGs and manifest; a folder holding anything else is still refused)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise StudioError(f"'{folder}' is a file: name a new folder for the set")
    old = list(folder.iterdir()) if folder.is_dir() else []
    if old and not replace:
        raise StudioError(f"'{folder}' already holds files: name a new or empty folder for the set (two sets in "
                          "one folder would calibrate as one), or replace=True to replace the set saved there")
    if old and not ((folder / MANIFEST).is_file() and all(p.name == MANIFEST or p.suffix == ".png" for p in old)):
        raise StudioError(f"'{folder}' holds files besides a saved set: only a set's PNGs and {MANIFEST} are "
                          "replaced; name a new folder")
    try:
        for path in old:
            path.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        for pixels, name in zip(to_pixels(result.images), result.file_names(), strict=True):
            Image.fromarray(pixels).save(folder / name)
        (folder / MANIFEST).write_text(json.dumps(result.manifest(), indent=1))
    except OSError as err:
        raise StudioError(f"cannot write the images to '{folder}': {err.strerror or err}") from None
    return folder


def saved_sets(*roots: str | Path) -> list[Path]:
    """Folders under ``roots`` (one level down) that hold a saved set (a manifest.json), sorted by name."""
    found = [p.parent for root in roots if Path(root).is_dir() for p in Path(root).glob(f"*/{MANIFEST}")]
    return sorted(found, key=lambda p: (p.parent.name, p.name))


def load_manifest(folder: str | Path) -> dict:
    """The manifest of a saved set, with its config checked."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise StudioError(f"'{folder}' has no {MANIFEST}: not a set saved by OuroMamba-Gen") from None
    except json.JSONDecodeError as err:
        raise StudioError(f"{path} is not valid JSON ({err})") from None
    GenConfig.from_dict(manifest.get("config", {}))
    return manifest
