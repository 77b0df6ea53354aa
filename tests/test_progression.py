"""The biomarker twin's latent course: exact about doses, equal to a plain ODE solve, monotone untreated."""

from __future__ import annotations

import math

import torch

from twin.dynamics.ode import Solver, solve
from twin.dynamics.progression import Exposure, Progression
from twin.priors.pharmacology import concentration, emax

F64 = torch.float64
NAN = float("nan")
TIGHT = Solver(rtol=1e-9, atol=1e-11)

# three patients: monthly doses from 0.3 y, none, two doses; visit times NaN-padded
DOSE_TIME = torch.tensor([[0.3 + i / 12 for i in range(12)],
                          [NAN] * 12,
                          [0.1, 0.9] + [NAN] * 10], dtype=F64)
DOSE = torch.where(torch.isfinite(DOSE_TIME), torch.full_like(DOSE_TIME, 10.0), DOSE_TIME)
TIMES = torch.tensor([[0.0, 0.5, 1.0, 1.7], [0.0, 0.8, 2.0, NAN], [0.0, 0.1, 0.95, 3.0]], dtype=F64)
TAU = torch.tensor([-1.0, 0.0, 0.5], dtype=F64)
RATE = torch.tensor([0.8, 0.3, 1.2], dtype=F64)
SENS = torch.tensor([[0.7], [0.5], [0.9]], dtype=F64)
K, EC50 = torch.tensor(9.0, dtype=F64), torch.tensor(3.0, dtype=F64)


def exposure():
    return Exposure([(DOSE_TIME, DOSE)], [K], [EC50], SENS)


def reference(h=None):
    """dz/dt = r (1 + h(z)) - r s E(C(t)) solved directly, the solver stopped at every dose (jump_t)."""
    def field(t, z):
        c = concentration(t, DOSE_TIME, DOSE, K)
        drive = 1.0 + (h(z) if h is not None else 0.0)
        return RATE[:, None] * (drive - SENS * emax(c, 1.0, EC50)[:, None])

    return solve(field, TAU[:, None], TIMES, rhs_jumps=DOSE_TIME, solver=TIGHT)[..., 0]


def test_closed_form_equals_the_ode_solved_through_every_dose():
    z = Progression(hidden=0)(TAU, RATE, exposure(), TIMES)
    torch.testing.assert_close(z, reference(), rtol=1e-7, atol=1e-8, equal_nan=True)
    # an untreated patient advances at exactly its rate
    torch.testing.assert_close(z[1, :3], TAU[1] + RATE[1] * TIMES[1, :3])


def test_neural_course_equals_the_plain_solve_without_any_jump_times():
    torch.manual_seed(0)
    course = Progression(hidden=8, solver=TIGHT).double()
    with torch.no_grad():  # a visible bend, not the zero-initialised one
        course.h_net[-1].weight.normal_(0.0, 1.0)
        course.h_net[-1].bias.fill_(0.3)
    z = course(TAU, RATE, exposure(), TIMES)
    expected = reference(lambda z: course.h(z))
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert torch.isnan(z[1, 3]) and torch.isfinite(z[[0, 2]]).all()


def test_zero_initialised_network_starts_at_the_prior():
    course = Progression(hidden=8).double()
    torch.testing.assert_close(course(TAU, RATE, exposure(), TIMES), Progression(0)(TAU, RATE, exposure(), TIMES),
                               rtol=1e-4, atol=1e-5, equal_nan=True)


def test_untreated_course_never_goes_back_and_treatment_only_slows_it():
    torch.manual_seed(1)
    course = Progression(hidden=8, solver=TIGHT).double()
    with torch.no_grad():
        course.h_net[-1].weight.normal_(0.0, 3.0)
    grid = torch.linspace(0, 3, 31, dtype=F64).expand(3, -1)
    none = Exposure([(DOSE_TIME, DOSE)], [K], [EC50], torch.zeros_like(SENS))
    untreated = course(TAU, RATE, none, grid)
    treated = course(TAU, RATE, exposure(), grid)
    assert (untreated.diff(dim=1) > 0).all()  # |h| <= 1/2: the untreated rate is at least r / 2
    assert (treated <= untreated + 1e-6).all()  # up to the solver tolerance
    assert (treated[0, grid[0] > 0.5] < untreated[0, grid[0] > 0.5] - 1e-3).all()


def test_gradients_reach_every_input():
    tau, rate, sens = TAU.clone().requires_grad_(), RATE.clone().requires_grad_(), SENS.clone().requires_grad_()
    k = K.clone().requires_grad_()
    z = Progression(0)(tau, rate, Exposure([(DOSE_TIME, DOSE)], [k], [EC50], sens), TIMES)
    z[torch.isfinite(z)].sum().backward()
    for g in (tau.grad, rate.grad, sens.grad, k.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert math.isclose(float(sens.grad[1, 0]), 0.0)  # an untreated patient's sensitivity is not seen
