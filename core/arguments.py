"""Command-line argument checking shared by the engine's CLI and the benchmarks: usage mistakes in one line,
numbers that must be whole or finite, lists whose items must be distinct. Plain argparse, nothing heavier, so
that the benchmarks import it on the GPU machine."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes in one line, like every other bad input (the full usage stays in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class Distinct(argparse.Action):
    """A list whose items are given once each: a method, setting, threshold, file or run named twice would be
    run or shown twice. ``key`` says when two items are the same (a file's real path)."""

    def __init__(self, *args, key: Callable[[object], object] = lambda value: value, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.key = key

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: list,
                 option_string: str | None = None) -> None:
        keys = [self.key(value) for value in values]
        for i, key in enumerate(keys):
            if key in keys[:i]:
                same, value = values[keys.index(key)], values[i]
                name = option_string or self.metavar or self.dest
                parser.error(f"argument {name}: {value} is given twice" if same == value
                             else f"argument {name}: {value} and {same} are the same")
        setattr(namespace, self.dest, values)


def whole(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number ≥ ``low`` (a count of -1 or 0 must not mean 'all but the last')."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number ≥ {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be a whole number ≥ {low}, got {value}")
        return value
    return parse


def finite(low: float, strict: bool) -> Callable[[str], float]:
    """An argparse type: a finite number above ``low`` (``strict``) or from it: a NaN k would switch the outlier
    rule off, an infinite weight would blacken every image, silently."""
    sign = ">" if strict else "≥"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {sign} {low:g}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be a finite number {sign} {low:g}, got {text}")
        return value
    return parse


positive, non_negative = finite(0, strict=True), finite(0, strict=False)
