"""Launch options timed on the GPU, once per shape, for launchers whose options never change a value.

The detecting kernels' warps and rows per round and the GEMM's tiles change how fast they run, never what they
write (tested). Which is fastest depends on the GPU and on the data (how often an outlier set grows, how many
channels a row block's outliers touch), so a fixed rule cannot know it. Like ``triton.autotune``, a
:class:`LaunchTuner` times every candidate at the first call of each key and keeps the fastest for the process;
unlike it, the launcher lists its own candidates (those that build without spills), the first being its fixed
rule, which is what runs where nothing is timed: on the CPU (the interpreter's timings mean nothing), during CUDA
graph capture (nothing may be timed there), or when the caller did not ask for tuning. ``choices()`` says what
was picked, so a benchmark can report it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch
from triton.testing import do_bench

Option = TypeVar("Option")
WARMUP_MS, REPEAT_MS = 5, 20  # per candidate (triton.testing.do_bench): a few ms a shape, once per process


def gpu_milliseconds(launch: Callable[[], object]) -> float:
    """Median milliseconds of ``launch`` on the current CUDA device."""
    return do_bench(launch, warmup=WARMUP_MS, rep=REPEAT_MS, return_mode="median")


class LaunchTuner:
    """Keeps, per key, the fastest of a launcher's candidates. ``timer`` and ``devices`` are there for tests:
    timing is meaningful on CUDA only."""

    def __init__(self, timer: Callable[[Callable[[], object]], float] = gpu_milliseconds,
                 devices: tuple[str, ...] = ("cuda",)):
        self.timer, self.devices = timer, devices
        self._chosen: dict[Hashable, object] = {}
        self._timings: dict[Hashable, list[tuple[object, float]]] = {}

    def pick(self, key: Hashable, candidates: Sequence[Option], launch: Callable[[Option], object],
             device: torch.device) -> Option:
        """The candidate to launch with. ``launch(candidate)`` runs the kernel with it; it must be repeatable
        (nothing updated in place), since timing runs it several times."""
        if len(candidates) == 1:
            return candidates[0]
        if key in self._chosen:
            return self._chosen[key]
        if device.type not in self.devices or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return candidates[0]
        timings = [(candidate, self.timer(lambda candidate=candidate: launch(candidate))) for candidate in candidates]
        self._timings[key] = timings
        self._chosen[key] = min(timings, key=lambda timing: timing[1])[0]
        return self._chosen[key]

    def launch(self, key: Hashable, candidates: Sequence[Option], launch: Callable[[Option], object],
               device: torch.device) -> None:
        """``launch`` with the picked candidate (a single candidate: launched as it is, nothing timed)."""
        launch(self.pick(key, candidates, launch, device))

    def choices(self) -> dict[Hashable, list[tuple[object, float]]]:
        """Every key timed so far, with each candidate's time (ms), in the order tried (the first: the rule)."""
        return dict(self._timings)

    def forget(self) -> None:
        """Drop every choice: the next call of each key is timed again (a benchmark isolating one shape)."""
        self._chosen.clear()
        self._timings.clear()


TUNER = LaunchTuner()  # the process's choices, shared by every launcher that asks for tuning
