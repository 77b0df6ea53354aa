"""Linear-quadratic cell kill of radiotherapy, as a jump of the tumour-burden state at each fraction.

    S(d) = exp(-alpha d - beta d^2)          surviving fraction after one fraction of d Gy

A fraction is instantaneous on the scale of growth (minutes against months), so it enters the
ODE as a state jump, N <- S N (or log N <- log N - alpha d - beta d^2 for a state on the log
scale), applied by `dynamics.ode.solve` through `StateJumps`:

    StateJumps(time=fraction_time, amount=dose_gy, apply=functools.partial(lq_jump, alpha=a, beta=b))

alpha (1/Gy) and beta (1/Gy^2) are numbers, (B,) tensors, or (B, D) tensors; giving a component
alpha = beta = 0 leaves it untouched (a state that holds more than the tumour burden). The
solver sums the doses of fractions given at exactly the same time, and S of the sum is not
the product of the S's: give simultaneous fractions distinct times.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._batch import per_patient


def lq_log_kill(dose_gy: Tensor | float, alpha: float | Tensor, beta: float | Tensor) -> Tensor:
    """-ln S = alpha d + beta d^2, elementwise (plain broadcasting)."""
    return alpha * dose_gy + beta * dose_gy * dose_gy


def lq_survival(dose_gy: Tensor | float, alpha: float | Tensor, beta: float | Tensor) -> Tensor:
    """Surviving fraction S = exp(-alpha d - beta d^2), elementwise (plain broadcasting)."""
    return torch.exp(-torch.as_tensor(lq_log_kill(dose_gy, alpha, beta)))


def lq_jump(d: Tensor, dose_gy: Tensor, alpha: float | Tensor, beta: float | Tensor, *, log_state: bool = False) -> Tensor:
    """The state after a fraction of dose_gy (B,) Gy: d (B, D) -> S d, or d - (alpha d + beta d^2) with log_state.

    A dose of 0 leaves the state as it is (the solver passes 0 to patients without a fraction).
    """
    if dose_gy.shape != d.shape[:1]:
        raise ValueError(f"lq_jump expects one dose per patient, (B,) = ({d.shape[0]},), got {tuple(dose_gy.shape)}")
    kill = lq_log_kill(dose_gy[:, None], per_patient(alpha, d), per_patient(beta, d))
    return d - kill if log_state else d * torch.exp(-kill)
