"""Monotone neurodegeneration: a disease clock that only moves forward, slowed by a drug.

    dz/dt = r (1 - e(t))+,     r = exp(xi) or softplus(xi) >= 0,     e(t) in [0, 1]

z is a latent disease time (or the logit of a biomarker's progress), xi a per-patient real
parameter, e(t) the fraction of progression a treatment removes (e.g. sensitivity * Emax
effect of the drug concentration, see `pharmacology`). The rate is non-negative for any real
xi and any effect by construction: a drug may halt neurodegeneration but not reverse it, so
effects above 1 are clipped. Closed form whenever e <= 1:

    z(t) = z0 + r (t - int_0^t e(s) ds)

with int e in closed form for a drug (`pharmacology.effect_integral`) and for an effect that is
constant between change times (`piecewise_constant_integral`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._batch import as_batch_times, per_patient, sorted_events, trajectory_times

LINKS = ("exp", "softplus")


def nonnegative_rate(xi: float | Tensor, link: str = "exp") -> Tensor:
    """r = exp(xi) or softplus(xi): a rate >= 0 from an unconstrained parameter (same shape)."""
    xi = torch.as_tensor(xi)
    if link == "exp":
        return torch.exp(xi)
    if link == "softplus":
        return F.softplus(xi)
    raise ValueError(f"link must be one of {LINKS}, got {link!r}")


def progression(d: Tensor, rate: float | Tensor, effect: float | Tensor | None = None, *, link: str = "exp") -> Tensor:
    """dz/dt = link(rate) * max(0, 1 - effect) >= 0, shaped like d (B, D).

    rate: the unconstrained xi, a number, (B,) or (B, D). effect: None (no treatment), a number,
    (B,) or (B, D). The right-hand side does not depend on d: progression is a clock.
    """
    r = per_patient(nonnegative_rate(torch.as_tensor(rate, dtype=d.dtype, device=d.device), link), d)
    if effect is not None:
        r = r * torch.relu(1 - per_patient(effect, d))
    return torch.zeros_like(d) + r


def progression_solution(
    t: Tensor,
    d0: Tensor,
    rate: float | Tensor,
    effect_integral: Tensor | None = None,
    *,
    link: str = "exp",
) -> Tensor:
    """z(t) = z0 + r (t - int_0^t e) from z0 (B, D) after time t (B,) -> (B, D) or (B, T) -> (B, T, D).

    effect_integral: int_0^t e(s) ds shaped like t (the same effect for every component) or like
    the result (one per component); None for no treatment. Exact only while e <= 1.
    """
    t = torch.as_tensor(t, dtype=d0.dtype, device=d0.device)
    tt, z0, single = trajectory_times(t, d0)
    like = tt * z0
    r = per_patient(nonnegative_rate(torch.as_tensor(rate, dtype=d0.dtype, device=d0.device), link), like)
    exposure = tt
    if effect_integral is not None:
        integral = torch.as_tensor(effect_integral, dtype=d0.dtype, device=d0.device)
        if integral.shape == t.shape:
            integral = integral.reshape(t.shape[0], -1, 1)
        elif integral.shape == (*t.shape, d0.shape[1]):
            integral = integral.reshape(t.shape[0], -1, d0.shape[1])
        else:
            raise ValueError(f"effect_integral must be shaped like t {tuple(t.shape)} or t x D, got {tuple(integral.shape)}")
        exposure = tt - integral
    z = z0 + r * exposure
    return z[:, 0] if single else z


def piecewise_constant(t: Tensor | float, start: Tensor, value: Tensor) -> Tensor:
    """e(t) = value_j for start_j <= t < start_{j+1}, 0 before the first start; right-continuous.

    start, value: (B, E), NaN-padded (padding ignored; need not be sorted). t: () -> (B,),
    (B,) -> (B,), (B, T) -> (B, T).
    """
    start, value = sorted_events(start, value, what="start and value")
    grid, shape = as_batch_times(t, start.shape[0], start)
    begun = (start[:, None, :] <= grid[..., None]).sum(-1)  # (B, T'): periods started by t
    picked = torch.gather(value, 1, (begun - 1).clamp(min=0))
    return torch.where(begun > 0, picked, torch.zeros_like(picked)).reshape(shape)


def piecewise_constant_integral(t: Tensor | float, start: Tensor, value: Tensor) -> Tensor:
    """int_0^t e(s) ds for the piecewise-constant e of `piecewise_constant`, t >= 0; shapes as there."""
    start, value = sorted_events(start, value, what="start and value")
    grid, shape = as_batch_times(t, start.shape[0], start)
    end = torch.cat([start[:, 1:], torch.full_like(start[:, :1], float("inf"))], dim=1)
    lo = start.clamp(min=0)[:, None, :]  # (B, 1, E)
    hi = torch.minimum(end[:, None, :], grid[..., None])  # (B, T', E)
    # padded periods start at +inf: hi - lo = -inf, clamped to an empty overlap
    overlap = (hi - lo).clamp(min=0)
    return (overlap * value[:, None, :]).sum(-1).reshape(shape)
