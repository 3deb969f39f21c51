"""Top-1 evaluation with progress and cancel, returning a plain record that carries its provenance."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from threading import Event

import torch
from torch import nn

from core.data import LabelledImages
from core.errors import StudioError

Progress = Callable[[int, int], None]
TOP_K = 5  # classes kept per image with their probabilities: what a side-by-side of two models shows


class Cancelled(StudioError):
    """The user cancelled; whatever was finished is kept by the caller."""


@dataclass
class EvalResult:
    top1: float
    correct: int
    total: int
    seconds: float
    device: str
    data: str
    predictions: list[int] = field(repr=False, default_factory=list)
    #: per image the TOP_K most probable classes (most probable first) and their softmax probabilities
    top_classes: torch.Tensor = field(repr=False, default_factory=lambda: torch.empty(0, TOP_K, dtype=torch.long))
    top_probabilities: torch.Tensor = field(repr=False, default_factory=lambda: torch.empty(0, TOP_K))

    def to_dict(self) -> dict:
        per_image = ("predictions", "top_classes", "top_probabilities")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in per_image}

    def top(self, index: int) -> list[tuple[int, float]]:
        """(class, probability) of image ``index``'s most probable classes, most probable first."""
        return list(zip(self.top_classes[index].tolist(), self.top_probabilities[index].tolist(), strict=True))


def hardware_label(device: torch.device) -> str:
    """Which hardware produced a timing, e.g. 'CPU (2 threads, x86_64)' or 'NVIDIA H100 80GB HBM3'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads, {platform.machine()})"


def capture_cuda_graph(model: nn.Module, images: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``model(images)`` recorded once as a CUDA graph: the returned function replays every kernel of the
    forward with no Python and no launch overhead (the way a latency-bound model is served), on the same
    input buffer. Warm-up runs on a side stream first, as capture requires (kernels compiled, allocator warm)."""
    device = images.device
    static = images.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            model(static)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = model(static)

    def replay() -> torch.Tensor:
        graph.replay()
        return output
    return replay


@torch.inference_mode()
def time_forward(model: nn.Module, images: torch.Tensor, repeats: int = 5,
                 cuda_graph: bool = False) -> tuple[float, int]:
    """(median seconds, peak bytes allocated) of ``model(images)`` over ``repeats`` passes after one warm-up
    (kernel compilation, allocator), synchronised on CUDA; peak memory is measured on CUDA only (0 elsewhere).
    ``cuda_graph``: time replays of the captured forward instead (CUDA only; capture errors propagate)."""
    device = images.device
    cuda = device.type == "cuda"
    if cuda_graph and not cuda:
        raise StudioError("CUDA graphs need a CUDA device")
    run = capture_cuda_graph(model, images) if cuda_graph else lambda: model(images)
    run()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated(device) if cuda else 0


def graph_latency(model: nn.Module, images: torch.Tensor, repeats: int = 5) -> float | str:
    """Median seconds of a replayed CUDA graph of ``model(images)``, or why it could not be captured (one line:
    the eager timing still stands)."""
    try:
        return time_forward(model, images, repeats, cuda_graph=True)[0]
    except RuntimeError as error:  # capture refused an operation, or out of memory
        torch.cuda.synchronize(images.device)
        return "CUDA graph capture failed: " + str(error).splitlines()[0][:120]


@dataclass
class Predictions:
    """Every image's predicted class (argmax of the logits) and its TOP_K classes with their probabilities."""

    classes: torch.Tensor
    top_classes: torch.Tensor
    top_probabilities: torch.Tensor


@torch.inference_mode()
def predict(model: nn.Module, data: LabelledImages, batch_size: int = 500, progress: Progress | None = None,
            cancel: Event | None = None, device: str | torch.device = "cpu") -> Predictions:
    """The predictions for every image, in order. Raises :class:`Cancelled` when ``cancel`` is set."""
    if batch_size < 1:
        raise StudioError(f"batch size must be at least 1, got {batch_size}")
    device = torch.device(device)
    model.eval().to(device)
    classes, top_classes, top_probabilities = [], [], []
    for start in range(0, len(data), batch_size):
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"evaluation cancelled after {start} of {len(data)} images")
        logits = model(data.normalized(start, start + batch_size).to(device)).float()
        probabilities, top = logits.softmax(-1).topk(min(TOP_K, logits.shape[-1]), dim=-1)
        classes.append(logits.argmax(-1).cpu())
        top_classes.append(top.cpu())
        top_probabilities.append(probabilities.cpu())
        if progress is not None:
            progress(min(start + batch_size, len(data)), len(data))
    if not classes:
        return Predictions(torch.empty(0, dtype=torch.long), torch.empty(0, TOP_K, dtype=torch.long),
                           torch.empty(0, TOP_K))
    return Predictions(torch.cat(classes), torch.cat(top_classes), torch.cat(top_probabilities))


def evaluate(model: nn.Module, data: LabelledImages, batch_size: int = 500, progress: Progress | None = None,
             cancel: Event | None = None, device: str | torch.device = "cpu") -> EvalResult:
    """Top-1 accuracy (%) of ``model`` on ``data``, with the time it took and on which hardware."""
    if len(data) == 0:
        raise StudioError("nothing to evaluate: the dataset is empty")
    start = time.perf_counter()
    predictions = predict(model, data, batch_size, progress, cancel, device)
    seconds = time.perf_counter() - start
    correct = int((predictions.classes == data.labels).sum())
    return EvalResult(top1=100.0 * correct / len(data), correct=correct, total=len(data), seconds=seconds,
                      device=hardware_label(torch.device(device)), data=data.source,
                      predictions=predictions.classes.tolist(), top_classes=predictions.top_classes,
                      top_probabilities=predictions.top_probabilities)
