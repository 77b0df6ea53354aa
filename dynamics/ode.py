"""Solving the patient-state ODE for a batch of patients with their own visit and dose times.

    dd/dt = f(t, d)          between events,         d(t_k+) = jump(d(t_k-), amount_k) at state jumps.

torchdiffeq integrates one time grid for the whole batch, so the grid is the union of every
patient's requested times; each patient's values are gathered back from it. Two kinds of
discontinuity are treated exactly rather than stepped over blindly:

- the right-hand side jumps (a bolus dose makes a drug concentration jump): their times are
  passed to the adaptive solver as `jump_t`, so it ends a step there and evaluates f on the
  correct side of the discontinuity;
- the state itself jumps (a radiotherapy fraction kills a fraction of cells): the solve is
  cut at those times and restarted from the jumped state.

Values at a time equal to a state-jump time are taken after the jump (right-continuous),
like the concentration of a drug at its dose time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Field = Callable[[Tensor, Tensor], Tensor]  # f(t scalar, d (B, D)) -> dd/dt (B, D)
JumpFn = Callable[[Tensor, Tensor], Tensor]  # jump(d (B, D), amount (B,)) -> d (B, D); amount 0 = no jump

ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


@dataclass(frozen=True)
class Solver:
    """How to integrate: a torchdiffeq method and its tolerances (or step for fixed-step methods)."""

    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-6
    step_size: float | None = None  # years; required by fixed-step methods such as "rk4"
    adjoint: bool = False  # O(1)-memory gradients through the solve (torchdiffeq.odeint_adjoint)

    def __post_init__(self):
        fixed = ("rk4", "euler", "midpoint", "explicit_adams", "implicit_adams")
        if self.method not in ADAPTIVE + fixed:
            raise ValueError(f"Solver.method must be one of {ADAPTIVE + fixed}, got {self.method!r}")
        if self.method in fixed and not (self.step_size and self.step_size > 0):
            raise ValueError(f"Solver.method={self.method!r} is fixed-step: give step_size > 0 (years)")


@dataclass(frozen=True)
class StateJumps:
    """Jumps of the state at per-patient times: time, amount (B, J), NaN-padded; `apply` maps the state."""

    time: Tensor
    amount: Tensor
    apply: JumpFn


def solve(
    field: Field | torch.nn.Module,
    d0: Tensor,
    times: Tensor,
    *,
    rhs_jumps: Tensor | None = None,
    state_jumps: StateJumps | None = None,
    solver: Solver = Solver(),
) -> Tensor:
    """Integrate from d(0) = d0 (B, D) and return d at `times` (B, T) as (B, T, D).

    times: years since baseline, >= 0, NaN-padded (NaN rows come back NaN). rhs_jumps: times
    (any shape, NaN ignored) where f is discontinuous, for any patient. Gradients flow to d0 and
    to the field's parameters.
    """
    import torchdiffeq

    if d0.dim() != 2 or times.dim() != 2 or times.shape[0] != d0.shape[0]:
        raise ValueError(f"solve expects d0 (B, D) and times (B, T) with the same B, got {tuple(d0.shape)} and {tuple(times.shape)}")
    finite = torch.isfinite(times)
    if (times[finite] < 0).any():
        raise ValueError("solve integrates forward from baseline: times must be >= 0")
    jump_times = _finite_unique(state_jumps.time) if state_jumps is not None else times.new_zeros(0)
    jump_times = jump_times[jump_times > 0]
    grid = torch.unique(torch.cat([times.new_zeros(1), times[finite], jump_times]))  # sorted
    rhs_grid = _finite_unique(rhs_jumps) if rhs_jumps is not None else times.new_zeros(0)

    odeint = torchdiffeq.odeint_adjoint if solver.adjoint else torchdiffeq.odeint
    extra = {"adjoint_params": tuple(field.parameters())} if solver.adjoint and isinstance(field, torch.nn.Module) else {}
    d = d0
    if state_jumps is not None and (state_jumps.time == 0).any():  # a fraction at baseline: d(0) is after it
        d = state_jumps.apply(d0, torch.where(state_jumps.time == 0, state_jumps.amount,
                                              torch.zeros_like(state_jumps.amount)).sum(-1))
    states = [d]  # state at each grid point
    # Segments end at state-jump times; inside a segment the solver sees RHS jumps as jump_t.
    cuts = [0.0, *jump_times.tolist()]
    if grid[-1] > cuts[-1]:
        cuts.append(float(grid[-1]))
    for a, b in zip(cuts[:-1], cuts[1:]):
        seg = grid[(grid >= a) & (grid <= b)]
        if len(seg) > 1:
            options = {}
            if solver.method in ADAPTIVE:
                inside = rhs_grid[(rhs_grid > a) & (rhs_grid < b)]
                if len(inside):
                    options["jump_t"] = inside
            else:
                options["step_size"] = solver.step_size
                options["perturb"] = True
            out = odeint(field, d, seg, method=solver.method, rtol=solver.rtol, atol=solver.atol, options=options, **extra)
            states.extend(out[1:])
            d = out[-1]
        if state_jumps is not None and b in jump_times:
            hit = state_jumps.time == b
            amount = torch.where(hit, state_jumps.amount, torch.zeros_like(state_jumps.amount)).sum(-1)
            d = state_jumps.apply(d, amount)
            states[-1] = d  # right-continuous: the value at a jump time is after the jump
    trajectory = torch.stack(states, dim=1)  # (B, G, D)
    index = torch.searchsorted(grid, torch.where(finite, times, grid[:1]).contiguous())
    out = torch.gather(trajectory, 1, index.unsqueeze(-1).expand(-1, -1, d0.shape[1]))
    return torch.where(finite.unsqueeze(-1), out, torch.full_like(out, float("nan")))


def _finite_unique(t: Tensor) -> Tensor:
    t = t.reshape(-1)
    return torch.unique(t[torch.isfinite(t)])
