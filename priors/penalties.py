"""Training penalties for violated physiological priors: zero when a prior holds, smooth when not.

Each penalty is the mean squared violation over the valid entries of trajectories y (B, T, D)
at times (B, T) (ascending along T, NaN-padded), so it is 0 exactly when every entry complies
and its gradient pushes the violating entries back:

    monotone   mean relu(-direction * (y_j - y_prev))^2     consecutive valid points
    bounds     mean relu(low - y)^2 + relu(y - high)^2
    rate       mean relu(|y_j - y_prev| / (t_j - t_prev) - max_rate)^2

Valid entries: finite time, finite y, and `mask` (B, T) or (B, T, D) where given. "Consecutive"
means the previous valid visit of the same patient and biomarker, so a missed visit in the
middle does not hide a decrease across it. Per-biomarker settings (low, high, direction,
max_rate) are numbers, sequences of length D or (D,) tensors; `Limits` of `plausibility` holds
them per biomarker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

PerBiomarker = float | Sequence[float] | Tensor | None


class Increments(NamedTuple):
    """Changes between consecutive valid points of y (B, T, D): dy, dt and where a pair exists (all (B, T, D))."""

    dy: Tensor
    dt: Tensor
    pair: Tensor


def valid_entries(y: Tensor, times: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B, T, D) bool: finite time, finite value, and inside `mask` ((B, T) or (B, T, D)) when given."""
    if y.dim() != 3 or times.shape != y.shape[:2]:
        raise ValueError(f"expected y (B, T, D) and times (B, T), got {tuple(y.shape)} and {tuple(times.shape)}")
    return _within(torch.isfinite(times)[..., None] & torch.isfinite(y), mask)


def increments(y: Tensor, times: Tensor, mask: Tensor | None = None) -> Increments:
    """dy = y_j - y_prev and dt = t_j - t_prev at each valid point j that has a previous valid one.

    Where there is no pair, dy = 0 and dt = 1 (so dy / dt is safe), with pair False.
    """
    valid = valid_entries(y, times, mask)
    T = y.shape[1]
    step = torch.arange(T, device=y.device).view(1, T, 1)
    last = torch.where(valid, step, torch.full_like(step, -1)).cummax(dim=1).values  # latest valid index <= j
    prev = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)  # latest valid index < j
    pair = valid & (prev >= 0)
    # padding is replaced before any arithmetic: NaN in an unused branch would still poison gradients
    y0 = torch.where(valid, y, torch.zeros_like(y))
    t0 = torch.where(valid, times[..., None].expand_as(y), torch.zeros_like(y))
    index = prev.clamp(min=0)
    dy = torch.where(pair, y0 - torch.gather(y0, 1, index), torch.zeros_like(y))
    dt = torch.where(pair, t0 - torch.gather(t0, 1, index), torch.ones_like(y))
    if (dt[pair] < 0).any():
        raise ValueError("times must be ascending along T for every patient")
    return Increments(dy, dt, pair)


def monotone_penalty(y: Tensor, times: Tensor, direction: PerBiomarker = 1, mask: Tensor | None = None) -> Tensor:
    """Mean squared change against `direction` (+1: must not decrease, -1: must not increase, 0: free).

    y (B, T, D), times (B, T); direction a number or per biomarker (D,). Returns a scalar >= 0.
    """
    step = increments(y, times, mask)
    sign = _per_biomarker(direction, y)
    violation = torch.relu(-sign * step.dy)
    return _mean(violation.square(), step.pair)


def bound_penalty(y: Tensor, low: PerBiomarker = None, high: PerBiomarker = None, mask: Tensor | None = None) -> Tensor:
    """Mean squared excursion of y (B, T, D) below `low` or above `high` (None or inf: unbounded).

    mask (B, T) or (B, T, D); non-finite y is ignored. Returns a scalar >= 0.
    """
    valid = _within(torch.isfinite(y), mask)
    y0 = torch.where(valid, y, torch.zeros_like(y))
    excess = torch.zeros_like(y)
    if low is not None:
        excess = excess + torch.relu(_per_biomarker(low, y) - y0).square()
    if high is not None:
        excess = excess + torch.relu(y0 - _per_biomarker(high, y)).square()
    return _mean(excess, valid)


def rate_penalty(y: Tensor, times: Tensor, max_rate: PerBiomarker, mask: Tensor | None = None) -> Tensor:
    """Mean squared excess of |dy/dt| over `max_rate` (per year; a number or per biomarker (D,)).

    y (B, T, D), times (B, T); pairs at the same time are skipped. Returns a scalar >= 0.
    """
    step = increments(y, times, mask)
    timed = step.pair & (step.dt > 0)
    rate = step.dy / torch.where(timed, step.dt, torch.ones_like(step.dt))
    excess = torch.relu(rate.abs() - _per_biomarker(max_rate, y))
    return _mean(excess.square(), timed)


def _within(valid: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return valid
    mask = mask.to(torch.bool)
    return valid & (mask[..., None] if mask.dim() == 2 else mask)


def _per_biomarker(value: PerBiomarker, y: Tensor) -> Tensor:
    value = torch.as_tensor(value, dtype=y.dtype, device=y.device)
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != y.shape[-1]):
        raise ValueError(f"a per-biomarker setting must be a number or have D={y.shape[-1]} entries, "
                         f"got shape {tuple(value.shape)}")
    return value


def _mean(values: Tensor, where: Tensor) -> Tensor:
    picked = torch.where(where, values, torch.zeros_like(values))
    return picked.sum() / where.sum().clamp(min=1)
