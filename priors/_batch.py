"""How per-patient parameters meet batched states: the one broadcasting rule of the priors.

A parameter theta is a Python number or 0-d tensor (shared by everyone), a (B,) tensor (one
value per patient, the same for every state component) or a tensor with the state's own
trailing shape, e.g. (B, D) for a state (B, D). A (B,) parameter is read as (B, 1, ..., 1),
never as (D,): a value per component shared by all patients is written (1, D).
"""

from __future__ import annotations

import torch
from torch import Tensor


def per_patient(theta: float | Tensor, like: Tensor) -> float | Tensor:
    """theta reshaped to broadcast against `like` (B, ...): (B,) -> (B, 1, ..., 1); (B, D) -> (B, 1, .., D)."""
    if not isinstance(theta, Tensor) or theta.dim() == 0:
        return theta
    if theta.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"a per-patient parameter must have B={like.shape[0]} (or 1) rows, got shape {tuple(theta.shape)}")
    if theta.dim() == 1:
        return theta.reshape(-1, *([1] * (like.dim() - 1)))
    if theta.dim() < like.dim():  # (B, D) against (B, T, D): the parameter holds for every time
        return theta.reshape(theta.shape[0], *([1] * (like.dim() - theta.dim())), *theta.shape[1:])
    if theta.dim() == like.dim():
        return theta
    raise ValueError(f"parameter of shape {tuple(theta.shape)} has more axes than the value {tuple(like.shape)}")


def as_batch_times(t: Tensor | float, batch: int, like: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Times () | (B,) | (B, T) as (B, T') plus the shape to give results back in ((B,) or (B, T))."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        return t.expand(batch)[:, None], (batch,)
    if t.dim() == 1:
        return t[:, None], tuple(t.shape)
    if t.dim() == 2:
        return t, tuple(t.shape)
    raise ValueError(f"times must be a scalar, (B,) or (B, T), got shape {tuple(t.shape)}")


def trajectory_times(t: Tensor | float, d0: Tensor) -> tuple[Tensor, Tensor, bool]:
    """For closed-form solutions from d0 (B, D): times as (B, T', 1), d0 as (B, 1, D), and whether
    t was (B,) (then the caller returns (B, D) instead of (B, T, D))."""
    if d0.dim() != 2:
        raise ValueError(f"the initial state must be (B, D), got shape {tuple(d0.shape)}")
    t = torch.as_tensor(t, dtype=d0.dtype, device=d0.device)
    grid, _ = as_batch_times(t, d0.shape[0], d0)
    return grid[..., None], d0[:, None, :], t.dim() < 2


def sorted_events(time: Tensor, value: Tensor, *, what: str = "time and value") -> tuple[Tensor, Tensor]:
    """NaN-padded per-patient events (B, E) sorted by time, padding moved to time +inf with value 0.

    torch.where, not multiplication by a mask: a NaN value times 0 would poison the gradient.
    """
    if time.dim() != 2 or time.shape != value.shape:
        raise ValueError(f"{what} must both be (B, E), got {tuple(time.shape)} and {tuple(value.shape)}")
    given = torch.isfinite(time) & torch.isfinite(value)
    time = torch.where(given, time, torch.full_like(time, float("inf")))
    value = torch.where(given, value, torch.zeros_like(value))
    time, order = torch.sort(time, dim=1)
    return time, torch.gather(value, 1, order)
