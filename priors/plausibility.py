"""Plausibility checks on model outputs: flags per subject, time and biomarker, never exceptions.

A forecast that breaks physiology (a volume below zero, a score above its maximum, a brain
that regrows, an atrophy rate no disease produces) is returned with flags that say so, for the
twin to attach to its result and the report to show. `check_trajectory` gives one (B, T, D)
boolean tensor per check, True where an output is implausible; `reasons` renders the flagged
items as sentences. The limits are the caller's, one entry per biomarker, in `Limits`.

Checks (on valid entries: finite time, inside `mask`):
    not_finite       the value is NaN or infinite
    below_low        y < low
    above_high       y > high
    wrong_direction  a change against the required direction since the previous valid point
    too_fast         |dy/dt| since the previous valid point beyond max_rate (per year)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from twin.errors import InputError

from .penalties import increments, valid_entries

CHECKS = ("not_finite", "below_low", "above_high", "wrong_direction", "too_fast")


@dataclass(frozen=True)
class Limits:
    """Physiological limits of D biomarkers, entry i for biomarker `names[i]` (y's last axis).

    low, high: bounds (-inf / inf: none); direction: +1 must not decrease, -1 must not
    increase, 0 free; max_rate: largest |dy/dt| per year (inf: none); units: for messages.
    A field left None means "no limit" for every biomarker.
    """

    names: tuple[str, ...]
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None
    direction: tuple[int, ...] | None = None
    max_rate: tuple[float, ...] | None = None
    units: tuple[str, ...] | None = None

    def __post_init__(self):
        names = tuple(str(n) for n in self.names)
        if not names or len(set(names)) != len(names):
            raise InputError(f"need distinct biomarker names, got {list(names)}", source="Limits", field="names")
        D = len(names)
        default = {"low": -math.inf, "high": math.inf, "direction": 0, "max_rate": math.inf, "units": ""}
        cast = {"low": float, "high": float, "direction": int, "max_rate": float, "units": str}
        object.__setattr__(self, "names", names)
        for key, fill in default.items():
            value = getattr(self, key)
            value = (fill,) * D if value is None else tuple(cast[key](v) for v in value)
            if len(value) != D:
                raise InputError(f"has {len(value)} entries for {D} biomarkers {list(names)}", source="Limits", field=key)
            object.__setattr__(self, key, value)
        for name, lo, hi, sign, rate in zip(names, self.low, self.high, self.direction, self.max_rate):
            if math.isnan(lo) or math.isnan(hi) or not lo <= hi:
                raise InputError(f"need low <= high (inf for none), got low={lo}, high={hi}", source="Limits", field=name)
            if sign not in (-1, 0, 1):
                raise InputError(f"direction must be -1, 0 or +1, got {sign}", source="Limits", field=name)
            if not rate > 0:
                raise InputError(f"max_rate must be > 0 (inf for none), got {rate}", source="Limits", field=name)

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Mapping[str, object]], *, source: str = "limits") -> Limits:
        """From {biomarker: {low, high, direction, max_rate, unit}} (e.g. parsed YAML); unknown keys raise."""
        allowed = {"low", "high", "direction", "max_rate", "unit"}
        for name, entry in spec.items():
            if not isinstance(entry, Mapping):
                raise InputError(f"expected a mapping of limits, got {entry!r}", source=source, field=str(name))
            unknown = sorted(set(entry) - allowed)
            if unknown:
                raise InputError(f"unknown key(s) {unknown}; expected some of {sorted(allowed)}", source=source, field=str(name))
        entries = list(spec.values())

        def column(key, fill):
            return tuple(e.get(key, fill) for e in entries)

        return cls(names=tuple(spec), low=column("low", -math.inf), high=column("high", math.inf),
                   direction=column("direction", 0), max_rate=column("max_rate", math.inf), units=column("unit", ""))


def check_trajectory(
    y: Tensor,
    times: Tensor,
    limits: Limits,
    *,
    mask: Tensor | None = None,
    atol: float = 0.0,
) -> dict[str, Tensor]:
    """Flags {check: (B, T, D) bool, True = implausible} for y (B, T, D) at times (B, T).

    mask (B, T) or (B, T, D): where an output is expected (default: finite times). Changes
    against the required direction no larger than `atol` (solver round-off) are not flagged.
    """
    y = y.detach()
    if y.dim() != 3 or y.shape[-1] != len(limits.names):
        raise ValueError(f"expected y (B, T, D) with D={len(limits.names)} biomarkers {list(limits.names)}, got {tuple(y.shape)}")
    expected = valid_entries(torch.zeros_like(y), times, mask)  # where a value is due, finite or not
    valid = expected & torch.isfinite(y)
    low, high, sign, max_rate = (torch.tensor(v, dtype=y.dtype, device=y.device)
                                 for v in (limits.low, limits.high, limits.direction, limits.max_rate))
    step = increments(y, times, mask)
    timed = step.pair & (step.dt > 0)
    rate = step.dy / torch.where(timed, step.dt, torch.ones_like(step.dt))
    return {
        "not_finite": expected & ~torch.isfinite(y),
        "below_low": valid & (y < low),
        "above_high": valid & (y > high),
        "wrong_direction": step.pair & (sign * step.dy < -atol),
        "too_fast": timed & (rate.abs() > max_rate),
    }


def reasons(
    flags: Mapping[str, Tensor],
    y: Tensor,
    times: Tensor,
    limits: Limits,
    *,
    mask: Tensor | None = None,
    subjects: Sequence[str] | None = None,
) -> list[str]:
    """One sentence per flagged (subject, time, biomarker, check), ordered by subject, time, biomarker.

    E.g. "subject 2, t = 1.5 y: ventricle_volume: decreases by 3.1 mL/y where it must not decrease".
    flags, y, times, mask as given to / returned by `check_trajectory`.
    """
    y = y.detach()
    step = increments(y, times, mask)
    unknown = sorted(set(flags) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; expected some of {list(CHECKS)}")
    found = [(b, j, i, order, check)
             for order, check in enumerate(CHECKS) if check in flags
             for b, j, i in flags[check].nonzero().tolist()]
    lines = []
    for b, j, i, _, check in sorted(found):
        label = subjects[b] if subjects is not None else f"subject {b}"
        value, dy, dt = float(y[b, j, i]), float(step.dy[b, j, i]), float(step.dt[b, j, i])
        text = _sentence(check, limits, i, value, dy, dt)
        lines.append(f"{label}, t = {float(times[b, j]):.3g} y: {limits.names[i]}: {text}")
    return lines


def _sentence(check: str, limits: Limits, i: int, value: float, dy: float, dt: float) -> str:
    unit = limits.units[i]
    after = f" {unit}" if unit else ""
    per_year = f" {unit}/y" if unit else " per year"
    if check == "not_finite":
        return f"value is {value} where a value is expected"
    if check == "below_low":
        return f"{value:.3g} below minimum {limits.low[i]:g}{after}"
    if check == "above_high":
        return f"{value:.3g} above maximum {limits.high[i]:g}{after}"
    if check == "wrong_direction":
        moves, forbidden = ("decreases", "decrease") if limits.direction[i] > 0 else ("increases", "increase")
        size = f"{abs(dy) / dt:.3g}{per_year}" if dt > 0 else f"{abs(dy):.3g}{after} at a single time"
        return f"{moves} by {size} where it must not {forbidden}"
    return f"changes at {dy / dt:+.3g}{per_year}, beyond the physiological maximum {limits.max_rate[i]:g}{per_year}"

