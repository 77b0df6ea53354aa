"""Settings read from JSON (a config file, a checkpoint): unknown keys are errors, never ignored."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

from .errors import InputError


def known_settings(cls, d, *, source: str) -> dict:
    """`d` as a plain dict after checking it is a mapping whose keys are all fields of the dataclass `cls`."""
    if not isinstance(d, Mapping):
        raise InputError(f"expected a mapping of settings, got {type(d).__name__}", source=source)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise InputError(f"unknown setting(s) {unknown}; expected some of {known}", source=source, field=unknown[0])
    return dict(d)
