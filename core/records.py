"""Plain records: dataclass configs ↔ dicts (JSON) with one clear line for unknown fields, and provenance."""

from __future__ import annotations

import csv
import io
import os
import platform
import threading
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

import torch

from core.errors import StudioError

PLAIN_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,),
               "list": (list,), "tuple": (list, tuple)}


def _fits(value: object, annotation: str) -> bool:
    """Whether a JSON value fits a field annotated ``annotation`` ('float', 'list[dict]', 'int | None', …);
    annotations of other kinds (a nested config) are left to that config's own checks."""
    kinds = [part.strip().split("[")[0] for part in annotation.split("|")]
    if value is None:
        return "None" in kinds or not all(kind in PLAIN_TYPES for kind in kinds if kind != "None")
    accepted = [PLAIN_TYPES.get(kind) for kind in kinds if kind != "None"]
    if any(kind is None for kind in accepted):
        return True
    return any(isinstance(value, kind) and not (isinstance(value, bool) and bool not in kind) for kind in accepted)


def checked_fields(cls: type, values: dict, label: str) -> dict:
    """``values`` after checking that every key is a field of the dataclass ``cls`` and every plain value has
    the field's type (a record edited by hand, or another program's JSON, fails here in one line instead of
    deep in a table)."""
    if not isinstance(values, dict):
        raise StudioError(f"a {label} must be a JSON object, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise StudioError(f"unknown {label} fields {unknown}; known fields: {sorted(known)}")
    _refuse_misfits(cls, values, label)
    return dict(values)


def check_types(config: object, label: str) -> None:
    """A one-line StudioError when a plain field of the dataclass instance ``config`` holds another type
    (``n_refresh=2.5``, ``release_compatible="no"``, ``overrides=None``): for the configs' ``__post_init__``,
    so that a wrong value fails where it is given, not as a TypeError deep in a run (or, for a truthy string,
    not at all)."""
    _refuse_misfits(type(config), {f.name: getattr(config, f.name) for f in fields(config)}, label)


def _refuse_misfits(cls: type, values: dict, label: str) -> None:
    known = {f.name: f for f in fields(cls)}
    wrong = [f"{name} = {value!r} (expected {known[name].type})" for name, value in values.items()
             if isinstance(known[name].type, str) and not _fits(value, known[name].type)]
    if wrong:
        raise StudioError(f"{label}: {wrong[0]}" + (f" and {len(wrong) - 1} more" if len(wrong) > 1 else ""))


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__}


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def provenance() -> dict:
    """What every saved result carries besides its config: software versions and the date (UTC)."""
    return {"versions": versions(), "date": utc_now()}


def write_replacing(path: Path, text: str) -> Path:
    """``text`` as the file ``path``, written beside it and then renamed over it: an interruption or a full disk
    leaves the previous file whole, and a reader (a page fetching it) never sees half of one. Each thread of each
    process writes its own partial file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def rows_csv(rows: list[dict]) -> str:
    """Rows of one shape as CSV text, their keys the header."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()
