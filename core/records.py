"""Plain records: dataclass configs ↔ dicts (JSON) with one clear line for unknown fields, and provenance."""

from __future__ import annotations

import platform
from dataclasses import fields
from datetime import UTC, datetime

import torch

from core.errors import StudioError


def checked_fields(cls: type, values: dict, label: str) -> dict:
    """``values`` after checking that every key is a field of the dataclass ``cls``."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise StudioError(f"unknown {label} fields {unknown}; known fields: {sorted(known)}")
    return dict(values)


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__}


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def provenance() -> dict:
    """What every saved result carries besides its config: software versions and the date (UTC)."""
    return {"versions": versions(), "date": utc_now()}
