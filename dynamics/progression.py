"""Latent disease course under treatment: the controlled neural ODE of the biomarker twin.

Each patient has a scalar disease state z (a "disease time", or a log tumour burden),
advancing at a personal rate r, held back by every drug a in proportion to the patient's
sensitivity s_a and the drug's Emax effect at its one-compartment concentration C_a(t), and,
for tumours, knocked back by each radiotherapy fraction of d Gy by the linear-quadratic
log-kill alpha (d + d^2 / (alpha/beta)):

    dz/dt = r (1 + h(z)) - r sum_a s_a E_a(C_a(t)),        z(t_f+) = z(t_f-) - alpha (d_f + d_f^2 / ab)

f_prior is monotone neurodegeneration slowed by drugs, or exponential growth with chemo- and
radiotherapy kill (`twin.priors`); f_nn = r h(z) is a small network, |h| <= 1/2, that bends the
course where the cohort says it bends. E_a(C_a(t)) jumps at every dose, so the solver must not
step over dose times blindly. Rather than stopping the solver at each of hundreds of doses,
the drugs are integrated exactly: with the cumulative exposure X(t) = sum_a s_a int_0^t E_a
(closed form, `priors.pharmacology.effect_integral`; continuous, with kinks only at doses) and
the cumulative radiotherapy log-kill R(t) = alpha sum_{t_f <= t} (d_f + d_f^2 / ab), the
variable w = z + r X(t) + R(t) obeys

    dw/dt = r (1 + h(w - r X(t) - R(t)))

whose right-hand side is continuous except at fractions (passed to the solver as jump
times), so dopri5 keeps its accuracy. With h = 0 this is the closed form
z(t) = tau + r t - r X(t) - R(t), which `hidden=0` uses directly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from twin.priors.pharmacology import effect_integral

from .ode import Solver, solve


class Exposure:
    """Cumulative drug effect X(t) = sum_a s_a int_0^t E_a(C_a) of one batch of patients.

    doses: per agent (dose_time (B, E), dose (B, E)) NaN-padded; k, ec50: per agent, numbers
    or (B,) tensors (Emax is 1: the sensitivity s carries the size of the effect);
    sensitivity: (B, A). copies: the batch is that many stacked copies of its first B / copies
    patients, times and doses alike (as `Batch.repeat` makes for posterior draws): the
    integrals, which do not depend on a draw's sensitivity, are then computed once per patient.
    """

    def __init__(self, doses: list[tuple[Tensor, Tensor]], k: list, ec50: list, sensitivity: Tensor, copies: int = 1):
        self.doses, self.k, self.ec50, self.sensitivity, self.copies = doses, k, ec50, sensitivity, copies

    def integral(self, a: int, t: Tensor) -> Tensor:
        """int_0^t E_a(C_a) at t: () -> (B,), (B, T) -> (B, T)."""
        dose_time, dose = self.doses[a]
        k, ec50 = self.k[a], self.ec50[a]
        if self.copies == 1:
            return effect_integral(0.0, t, dose_time, dose, k, emax=1.0, ec50=ec50)
        S = dose_time.shape[0] // self.copies
        first = lambda v: v[:S] if torch.is_tensor(v) and v.dim() > 0 else v  # noqa: E731  the first copy's rows
        x = effect_integral(0.0, first(t), first(dose_time), first(dose), first(k), emax=1.0, ec50=first(ec50))
        return x.repeat(self.copies, *[1] * (x.dim() - 1))

    def __call__(self, t: Tensor) -> Tensor:
        """X at t: () -> (B,), (B, T) -> (B, T)."""
        total = 0.0
        for a in range(len(self.doses)):
            x = self.integral(a, t)
            s = self.sensitivity[:, a]
            total = total + (s if x.dim() == 1 else s[:, None]) * x
        if isinstance(total, float):  # no drugs at all
            n = self.sensitivity.shape[0]
            return torch.zeros(n, dtype=self.sensitivity.dtype) if t.dim() == 0 else torch.zeros_like(t)
        return total


class Radiotherapy:
    """Cumulative linear-quadratic dose R(t)/alpha = sum_{t_f <= t} (d_f + d_f^2 / ab) of fractions (B, F) NaN-padded."""

    def __init__(self, time: Tensor, dose: Tensor, alpha_beta: float = 10.0):
        given = torch.isfinite(time) & torch.isfinite(dose)
        self.time = torch.where(given, time, torch.full_like(time, float("inf")))
        self.effective = torch.where(given, dose + dose.square() / alpha_beta, torch.zeros_like(dose))

    @property
    def jump_times(self) -> Tensor:
        return self.time[torch.isfinite(self.time)]

    def __call__(self, t: Tensor) -> Tensor:
        """At t: () -> (B,), (B, T) -> (B, T); right-continuous (a fraction at t counts)."""
        if t.dim() == 0:
            return ((self.time <= t) * self.effective).sum(-1)
        return ((self.time[:, None, :] <= t[..., None]) * self.effective[:, None, :]).sum(-1)


class Progression(nn.Module):
    """z(t) for a batch of patients: `forward(tau (B,), rate (B,), exposure, times (B, T)) -> (B, T)`.

    Optional `radiotherapy` with per-patient `alpha` (B,) (log-kill per effective Gy).
    hidden: width of h's network (0: h = 0 and the closed form). times are years since
    baseline, >= 0, NaN-padded (NaN in, NaN out).
    """

    def __init__(self, hidden: int = 16, solver: Solver = Solver(rtol=1e-4, atol=1e-5)):
        super().__init__()
        self.hidden, self.solver = hidden, solver
        if hidden:
            self.h_net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            nn.init.zeros_(self.h_net[-1].weight)  # start from the prior alone: h = 0
            nn.init.zeros_(self.h_net[-1].bias)

    def h(self, z: Tensor) -> Tensor:
        """The learned bend of the course, (B, 1) -> (B, 1), within [-1/2, 1/2] so untreated z never stalls."""
        return 0.5 * torch.tanh(self.h_net(z))

    def forward(self, tau: Tensor, rate: Tensor, exposure: Exposure, times: Tensor,
                radiotherapy: Radiotherapy | None = None, alpha: Tensor | None = None) -> Tensor:
        given = torch.isfinite(times)

        def lost(t: Tensor) -> Tensor:  # r X(t) + R(t): progress taken away by treatment by time t
            r = rate if t.dim() == 0 else rate[:, None]
            out = r * exposure(t)
            if radiotherapy is not None:
                out = out + (alpha if t.dim() == 0 else alpha[:, None]) * radiotherapy(t)
            return out

        # NaN padding must stay out of the arithmetic: even masked afterwards, its gradient is NaN
        safe = torch.where(given, times, torch.zeros_like(times))
        loss = lost(safe)
        if not self.hidden:
            z = tau[:, None] + rate[:, None] * safe - loss
            return torch.where(given, z, times)

        def field(t: Tensor, w: Tensor) -> Tensor:  # w (B, 1)
            z = w - lost(t)[:, None]
            return rate[:, None] * (1.0 + self.h(z))

        jumps = radiotherapy.jump_times if radiotherapy is not None else None
        w = solve(field, tau[:, None], times, rhs_jumps=jumps, solver=self.solver)[..., 0]  # NaN where times are
        return w - loss
