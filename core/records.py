"""Dataclass configs ↔ plain dicts (JSON), with one clear line for unknown fields."""

from __future__ import annotations

from dataclasses import fields

from core.errors import StudioError


def checked_fields(cls: type, values: dict, label: str) -> dict:
    """``values`` after checking that every key is a field of the dataclass ``cls``."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise StudioError(f"unknown {label} fields {unknown}; known fields: {sorted(known)}")
    return dict(values)
