"""One-compartment pharmacokinetics of bolus doses and an Emax drug effect, batched over patients.

    C(t) = sum_{t_i <= t} d_i / V exp(-k (t - t_i))          k = ln 2 / half-life (per year)
    E(C) = Emax C / (EC50 + C)

C is right-continuous: at a dose time it already holds that dose, like the solver's state after
a jump. Between doses C decays exponentially, C(s) = C_a exp(-k (s - a)), so the effect has an
exact integral on each dose-to-dose piece [a, b]:

    int_a^b E(C(s)) ds = Emax / k ln((EC50 + C_a) / (EC50 + C_a exp(-k (b - a))))

which gives the closed form of any progression slowed by the drug (`neurodegeneration`).
Doses come per patient as (B, E) tensors of times and amounts, NaN-padded: padding gives nothing.
k, V, Emax, EC50 are numbers or (B,) tensors. Everything is differentiable in k, V, the doses
and the effect parameters.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._batch import as_batch_times, per_patient, sorted_events


def half_life_to_k(half_life: float | Tensor) -> float | Tensor:
    """Elimination rate k = ln 2 / half-life (same units inverted: half-life in years -> k per year)."""
    return math.log(2.0) / half_life


def concentration(t: Tensor | float, dose_time: Tensor, dose: Tensor, k: float | Tensor, volume: float | Tensor = 1.0) -> Tensor:
    """C(t) of bolus doses dose (B, E) given at dose_time (B, E), NaN-padded.

    t: () -> (B,) (the same time for every patient, as inside an ODE field), (B,) -> (B,),
    (B, T) -> (B, T); NaN times give NaN.
    """
    dose_time, dose = sorted_events(dose_time, dose, what="dose_time and dose")
    grid, shape = as_batch_times(t, dose.shape[0], dose)
    lag = grid[..., None] - dose_time[:, None, :]  # (B, T', E)
    given = lag >= 0  # right-continuous; padded doses sit at +inf and are never given
    k = per_patient(k, lag)
    # the lag of a future dose is replaced, not masked after the exp, so exp cannot overflow
    decay = torch.exp(-k * torch.where(given, lag, torch.zeros_like(lag)))
    c = torch.where(given, decay * dose[:, None, :], torch.zeros_like(lag)).sum(-1) / per_patient(volume, grid)
    c = torch.where(torch.isnan(grid), grid, c)
    return c.reshape(shape)


def emax(c: Tensor, emax: float | Tensor, ec50: float | Tensor) -> Tensor:
    """E(C) = emax C / (ec50 + C), shaped like c (B, ...); E(ec50) = emax / 2."""
    return per_patient(emax, c) * c / (per_patient(ec50, c) + c)


def effect_integral(
    t0: Tensor | float,
    t1: Tensor | float,
    dose_time: Tensor,
    dose: Tensor,
    k: float | Tensor,
    volume: float | Tensor = 1.0,
    *,
    emax: float | Tensor,
    ec50: float | Tensor,
) -> Tensor:
    """int_{t0}^{t1} E(C(s)) ds, exact; t0, t1 () | (B,) | (B, T) broadcast together -> (B,) | (B, T).

    The interval is cut at every dose inside it and the closed form is summed over the pieces;
    t1 < t0 gives minus the integral over [t1, t0].
    """
    dose_time, dose = sorted_events(dose_time, dose, what="dose_time and dose")
    B = dose.shape[0]
    t0, shape0 = as_batch_times(t0, B, dose)
    t1, shape1 = as_batch_times(t1, B, dose)
    shape = shape1 if len(shape1) == 2 else shape0  # (B, T) if either is, else (B,)
    t0, t1 = torch.broadcast_tensors(t0, t1)
    lo, hi = torch.minimum(t0, t1), torch.maximum(t0, t1)
    # Breakpoints lo <= clamp(t_1) <= ... <= clamp(t_E) <= hi (doses are sorted): E + 1 pieces,
    # those of doses outside [lo, hi] (and of padding at +inf) have zero length and add nothing.
    inner = torch.minimum(torch.maximum(dose_time[:, None, :], lo[..., None]), hi[..., None])  # (B, T', E)
    cuts = torch.cat([lo[..., None], inner, hi[..., None]], dim=-1)  # (B, T', E + 2)
    a, b = cuts[..., :-1], cuts[..., 1:]
    c_a = concentration(a.reshape(B, -1), dose_time, dose, k, volume).reshape(a.shape)
    k, e_max, ec50 = per_patient(k, a), per_patient(emax, a), per_patient(ec50, a)
    # ln((EC50 + C_a) / (EC50 + C_a e^{-k dt})) = ln1p(C_a (1 - e^{-k dt}) / (EC50 + C_a e^{-k dt})):
    # accurate when k dt is small, where the ratio form loses every digit to cancellation.
    dt = b - a
    ratio = c_a * -torch.expm1(-k * dt) / (ec50 + c_a * torch.exp(-k * dt))
    total = (e_max / k * torch.log1p(ratio)).sum(-1)
    total = torch.where(t1 < t0, -total, total)
    total = torch.where(torch.isnan(t0) | torch.isnan(t1), torch.full_like(total, float("nan")), total)
    return total.reshape(shape)
