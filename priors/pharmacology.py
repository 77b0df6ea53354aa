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

    F(t1) - F(t0) with F the cumulative effect (`cumulative_effect`); t1 < t0 gives minus the
    integral over [t1, t0].
    """
    dose_time, dose = sorted_events(dose_time, dose, what="dose_time and dose")
    B = dose.shape[0]
    t0, shape0 = as_batch_times(t0, B, dose)
    t1, shape1 = as_batch_times(t1, B, dose)
    shape = shape1 if len(shape1) == 2 else shape0  # (B, T) if either is, else (B,)
    t0, t1 = torch.broadcast_tensors(t0, t1)
    both = torch.cat([t0, t1], dim=1)
    f = _cumulative(both, dose_time, dose, k, volume, emax, ec50)
    total = f[:, t0.shape[1]:] - f[:, : t0.shape[1]]
    return total.reshape(shape)


def cumulative_effect(t: Tensor | float, dose_time: Tensor, dose: Tensor, k: float | Tensor, volume: float | Tensor = 1.0,
                      *, emax: float | Tensor, ec50: float | Tensor) -> Tensor:
    """F(t) = int_{-inf}^t E(C(s)) ds (0 before the first dose); t () | (B,) | (B, T) -> (B,) | (B, T)."""
    dose_time, dose = sorted_events(dose_time, dose, what="dose_time and dose")
    grid, shape = as_batch_times(t, dose.shape[0], dose)
    return _cumulative(grid, dose_time, dose, k, volume, emax, ec50).reshape(shape)


def _cumulative(t: Tensor, dose_time: Tensor, dose: Tensor, k, volume, emax, ec50) -> Tensor:
    """F at t (B, T) for sorted doses (B, E) (padding at +inf, amount 0).

    The concentration just after dose i, C_i = sum_{j <= i} d_j / V exp(-k (t_i - t_j)), comes
    from one (B, E, E) matrix; the effect over each dose-to-dose piece has the closed form of
    the module docstring; their prefix sums give F at every dose, and a query adds the partial
    piece since its last dose: O(E^2 + T E) per patient instead of O(T E^2).
    """
    B, E = dose.shape
    k_e, vol_e = per_patient(k, dose), per_patient(volume, dose)
    real = torch.isfinite(dose_time)
    safe_time = torch.where(real, dose_time, torch.zeros_like(dose_time))
    lag = safe_time[:, :, None] - safe_time[:, None, :]  # (B, i, j): t_i - t_j
    earlier = (lag >= 0) & real[:, None, :] & torch.tril(torch.ones(E, E, dtype=torch.bool, device=dose.device))
    k_ij = k_e[..., None] if isinstance(k_e, Tensor) and k_e.dim() == 2 else k_e
    decay = torch.exp(-k_ij * torch.where(earlier, lag, torch.zeros_like(lag)))
    c_after = torch.where(earlier, decay * (dose / vol_e)[:, None, :], torch.zeros_like(lag)).sum(-1)  # (B, E)

    def piece(c_a, dt, k_, emax_, ec50_):  # int over dt after a point where C = c_a, no dose inside
        ratio = c_a * -torch.expm1(-k_ * dt) / (ec50_ + c_a * torch.exp(-k_ * dt))
        return emax_ / k_ * torch.log1p(ratio)

    # pieces between consecutive real doses, and their exclusive prefix sums: F at each dose
    gap = torch.where(real[:, 1:], safe_time[:, 1:] - safe_time[:, :-1], torch.zeros_like(safe_time[:, 1:]))
    pieces = piece(c_after[:, :-1], gap, k_e, per_patient(emax, dose), per_patient(ec50, dose)) if E > 1 \
        else dose.new_zeros(B, 0)
    f_at_dose = torch.cat([dose.new_zeros(B, 1), torch.cumsum(pieces, dim=1)], dim=1)  # (B, E)

    # each query: its last dose at or before t (right-continuous), then the partial piece
    finite_t = torch.isfinite(t)
    safe_t = torch.where(finite_t, t, torch.zeros_like(t))
    n_before = torch.searchsorted(dose_time.contiguous(), safe_t.contiguous(), right=True)  # (B, T)
    last = (n_before - 1).clamp(min=0)
    c_last = torch.gather(c_after, 1, last)
    since = (safe_t - torch.gather(safe_time, 1, last)).clamp(min=0)
    partial = piece(c_last, since, per_patient(k, t), per_patient(emax, t), per_patient(ec50, t))
    f = torch.gather(f_at_dose, 1, last) + partial
    f = torch.where(n_before > 0, f, torch.zeros_like(f))
    return torch.where(finite_t, f, torch.full_like(f, float("nan")))
