"""Tumour growth laws, as right-hand sides for the patient-state ODE and as their closed forms.

    logistic:   dd/dt = rho d (1 - d / K)      d(t) = K d0 / (d0 + (K - d0) exp(-rho t))
    Gompertz:   dd/dt = rho d ln(K / d)        d(t) = K exp(ln(d0 / K) exp(-rho t))

d is a burden (cells, volume) with carrying capacity K; rho is a rate per year. The right-hand
sides take the state d (B, D) and per-patient parameters: a number, a (B,) tensor (read as
(B, 1): the same for every component) or a (B, D) tensor. The solutions take the time t since
d0 as (B,) or (B, T) and return (B, D) or (B, T, D).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._batch import per_patient, trajectory_times


def logistic(d: Tensor, rho: float | Tensor, K: float | Tensor = 1.0) -> Tensor:
    """Logistic growth rate rho d (1 - d / K): d (B, D) -> (B, D)."""
    return per_patient(rho, d) * d * (1 - d / per_patient(K, d))


def logistic_solution(t: Tensor, d0: Tensor, rho: float | Tensor, K: float | Tensor = 1.0) -> Tensor:
    """d(t) of logistic growth from d0 (B, D) after time t (B,) -> (B, D) or (B, T) -> (B, T, D)."""
    tt, d0, single = trajectory_times(t, d0)
    like = tt * d0
    rho, K = per_patient(rho, like), per_patient(K, like)
    # K d0 / (d0 + (K - d0) e^{-rho t}) rather than K / (1 + (K/d0 - 1) e^{-rho t}): finite at d0 = 0
    d = K * d0 / (d0 + (K - d0) * torch.exp(-rho * tt))
    return d[:, 0] if single else d


def gompertz(d: Tensor, rho: float | Tensor, K: float | Tensor = 1.0) -> Tensor:
    """Gompertz growth rate rho d ln(K / d): d (B, D) -> (B, D); tends to 0 as d -> 0+."""
    # d ln(K/d) -> 0 as d -> 0, but ln(d) is -inf at 0: clamp inside the log only, so the rate is
    # exactly 0 at d = 0 and its gradient stays finite there.
    tiny = torch.finfo(d.dtype).tiny
    K = per_patient(K, d)
    log_K = torch.log(K) if isinstance(K, Tensor) else math.log(K)
    log_ratio = log_K - torch.log(d.clamp(min=tiny))
    return per_patient(rho, d) * d * log_ratio


def gompertz_solution(t: Tensor, d0: Tensor, rho: float | Tensor, K: float | Tensor = 1.0) -> Tensor:
    """d(t) of Gompertz growth from d0 > 0 (B, D) after time t (B,) -> (B, D) or (B, T) -> (B, T, D)."""
    tt, d0, single = trajectory_times(t, d0)
    like = tt * d0
    rho, K = per_patient(rho, like), per_patient(K, like)
    d = K * torch.exp(torch.log(d0 / K) * torch.exp(-rho * tt))
    return d[:, 0] if single else d
