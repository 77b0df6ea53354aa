"""The batched ODE solve against closed forms, across dose discontinuities and state jumps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from twin.dynamics.ode import Solver, StateJumps, solve



@pytest.fixture(autouse=True)
def float64():
    """Closed forms are checked to 1e-6 and better: float64 here, and only here (collection imports every module)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def test_exponential_decay_batched_with_ragged_times():
    k = torch.tensor([0.5, 2.0, 1.0])
    d0 = torch.tensor([[1.0], [3.0], [2.0]])
    times = torch.tensor([[0.0, 0.7, 2.0], [0.1, 1.5, float("nan")], [3.0, float("nan"), float("nan")]])
    out = solve(lambda t, d: -k[:, None] * d, d0, times, solver=Solver(rtol=1e-9, atol=1e-11))
    exact = d0[:, None, :] * torch.exp(-k[:, None, None] * times[..., None])
    torch.testing.assert_close(out, exact, rtol=1e-7, atol=1e-9, equal_nan=True)
    assert torch.isnan(out[1, 2]).all() and torch.isnan(out[2, 1:]).all()


def _bolus_field(dose_time, dose, k):
    """dd/dt = C(t), C a one-compartment bolus concentration: discontinuous at dose times."""
    def f(t, d):
        on = (t >= dose_time).to(d.dtype)
        return (on * dose * torch.exp(-k * (t - dose_time).clamp(min=0))).sum(-1, keepdim=True)
    return f


def _bolus_exact(t, dose_time, dose, k):
    dt = (t[..., None] - dose_time[:, None, :]).clamp(min=0)
    return (dose[:, None, :] / k * (1 - torch.exp(-k * dt))).sum(-1)


def test_dose_discontinuities_are_stepped_to_not_over():
    dose_time = torch.tensor([[0.3, 0.9], [0.5, 1.7]])
    dose, k = torch.tensor([[2.0, 1.0], [1.0, 3.0]]), 6.0
    times = torch.tensor([[0.2, 0.95, 2.0], [0.5, 1.0, 2.5]])
    f = _bolus_field(dose_time, dose, k)
    exact = _bolus_exact(times, dose_time, dose, k)
    tight = Solver(rtol=1e-8, atol=1e-10)
    out = solve(f, torch.zeros(2, 1), times, rhs_jumps=dose_time, solver=tight)[..., 0]
    torch.testing.assert_close(out, exact, rtol=1e-6, atol=1e-8)
    blind = solve(f, torch.zeros(2, 1), times, solver=Solver(rtol=1e-3, atol=1e-5))[..., 0]
    told = solve(f, torch.zeros(2, 1), times, rhs_jumps=dose_time, solver=Solver(rtol=1e-3, atol=1e-5))[..., 0]
    assert (told - exact).abs().max() < (blind - exact).abs().max(), "telling the solver about doses must help"


def test_state_jumps_apply_at_their_time_per_patient():
    """dd/dt = rho d with kills d <- d * S at per-patient fraction times (linear-quadratic style)."""
    rho = 1.2
    S = math.exp(-0.3 * 2 - 0.03 * 4)
    jumps = StateJumps(time=torch.tensor([[0.5, 1.0], [0.75, float("nan")]]),
                       amount=torch.tensor([[1.0, 1.0], [1.0, float("nan")]]),
                       apply=lambda d, n: d * S ** n[:, None])
    times = torch.tensor([[0.5, 0.9, 1.5], [0.7, 0.75, 2.0]])
    out = solve(lambda t, d: rho * d, torch.ones(2, 1), times, state_jumps=jumps, solver=Solver(rtol=1e-9, atol=1e-12))
    kills = torch.tensor([[1, 1, 2], [0, 1, 1]], dtype=torch.float64)
    exact = torch.exp(rho * times) * S ** kills
    torch.testing.assert_close(out[..., 0], exact, rtol=1e-6, atol=1e-9)


def test_gradients_reach_initial_state_and_parameters():
    k = torch.tensor([0.8], requires_grad=True)
    d0 = torch.tensor([[1.5]], requires_grad=True)
    out = solve(lambda t, d: -k * d, d0, torch.tensor([[1.0]]))
    out.sum().backward()
    torch.testing.assert_close(d0.grad, torch.exp(-k.detach())[None], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(k.grad, -1.5 * torch.exp(-k.detach()), rtol=1e-4, atol=1e-6)


def test_adjoint_matches_direct_gradients():
    class Decay(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor([0.7]))

        def forward(self, t, d):
            return -self.k * d * (1 + t)

    grads = []
    for adjoint in (False, True):
        f = Decay()
        solve(f, torch.ones(2, 1), torch.tensor([[0.5, 1.0], [1.0, 2.0]]),
              solver=Solver(rtol=1e-9, atol=1e-11, adjoint=adjoint)).sum().backward()
        grads.append(f.k.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def test_rk4_converges_at_fourth_order():
    """Fit the slope of log error against log step, as diffrax does for its solvers."""
    times = torch.tensor([[2.0]])
    exact = math.exp(-2.0 * 1.3)
    steps = [0.2, 0.1, 0.05]
    errors = [abs(float(solve(lambda t, d: -1.3 * d, torch.ones(1, 1), times, solver=Solver("rk4", step_size=h))) - exact)
              for h in steps]
    order = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert 3.7 < order < 4.3


def test_bad_requests_raise():
    with pytest.raises(ValueError, match="times must be >= 0"):
        solve(lambda t, d: d, torch.ones(1, 1), torch.tensor([[-1.0]]))
    with pytest.raises(ValueError, match="step_size"):
        Solver("rk4")
    with pytest.raises(ValueError, match="method"):
        Solver("magic")


def test_state_jump_at_baseline_applies_to_the_initial_state():
    # a fraction at t = 0 is part of d(0): right-continuous like every other jump
    d0 = torch.ones(2, 1, dtype=torch.float64)
    jumps = StateJumps(time=torch.tensor([[0.0, 0.5], [0.5, float("nan")]], dtype=torch.float64),
                       amount=torch.tensor([[1.0, 1.0], [1.0, float("nan")]], dtype=torch.float64),
                       apply=lambda d, a: d * torch.exp(-a).unsqueeze(-1))
    times = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    out = solve(lambda t, d: torch.zeros_like(d), d0, times, state_jumps=jumps)
    expected = torch.tensor([[math.exp(-1), math.exp(-2)], [1.0, math.exp(-1)]], dtype=torch.float64)
    torch.testing.assert_close(out[..., 0], expected)
