"""Physiological priors against their closed forms, the simulators' numpy physics, quadrature and
the batched ODE solve: growth laws, monotone progression, pharmacokinetics/Emax, LQ radiotherapy,
and the training penalties."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from twin.data import treatment as numpy_physics
from twin.dynamics.ode import Solver, StateJumps, solve
from twin.priors import growth, neurodegeneration, penalties, pharmacology, radiotherapy

F64 = torch.float64
NAN = float("nan")
TIGHT = Solver(rtol=1e-10, atol=1e-12)


def t64(x):
    return torch.tensor(x, dtype=F64)


# Three patients with their own visit times (NaN-padded) and doses (NaN-padded).
VISITS = t64([[0.0, 0.4, 1.1, 2.5], [0.3, 0.9, 3.0, NAN], [1.7, NAN, NAN, NAN]])
DOSE_TIME = t64([[0.2, 0.5, 0.9], [0.0, 1.0, NAN], [0.3, NAN, 1.5]])
DOSE = t64([[2.0, 1.0, 3.0], [1.5, 2.5, NAN], [1.0, NAN, 4.0]])
K_ELIM = t64([3.0, 1.5, 6.0])


def _numpy_doses(b):
    keep = np.isfinite(DOSE_TIME[b].numpy()) & np.isfinite(DOSE[b].numpy())
    return DOSE_TIME[b].numpy()[keep], DOSE[b].numpy()[keep]


# --- growth ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("law", ["logistic", "gompertz"])
def test_growth_solve_matches_closed_form_with_per_patient_parameters(law):
    rhs, exact = getattr(growth, law), getattr(growth, law + "_solution")
    rho = t64([0.8, 2.0, 1.3])  # (B,): one rate per patient, shared by both components
    K = t64([[1.0, 2.0], [3.0, 1.5], [0.5, 4.0]])  # (B, D)
    d0 = t64([[0.1, 0.5], [0.2, 1.4], [0.6, 0.01]])  # the last patient starts above K in one component
    out = solve(lambda t, d: rhs(d, rho, K), d0, VISITS, solver=TIGHT)
    ref = exact(VISITS, d0, rho, K)
    assert ref.shape == (3, 4, 2)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-10, equal_nan=True)


@pytest.mark.parametrize("law", ["logistic_solution", "gompertz_solution"])
def test_growth_solution_batched_equals_per_patient_and_time_vector(law):
    exact = getattr(growth, law)
    rho = t64([[0.8, 0.1], [2.0, 0.4], [1.3, 3.0]])  # (B, D)
    d0 = t64([[0.1, 0.5], [0.2, 0.9], [0.6, 0.01]])
    batched = exact(VISITS, d0, rho, 1.0)
    for b in range(3):
        alone = exact(VISITS[b:b + 1], d0[b:b + 1], rho[b:b + 1], 1.0)
        torch.testing.assert_close(alone[0], batched[b], equal_nan=True)
    at_one_time = exact(VISITS[:, 1], d0, rho, 1.0)  # t (B,) -> (B, D)
    torch.testing.assert_close(at_one_time, batched[:, 1], equal_nan=True)


def test_growth_rates_vanish_at_zero_and_capacity_with_finite_gradients():
    d = t64([[0.0, 1.0], [1e-300, 2.0]]).requires_grad_()
    K = t64([[1.0, 1.0], [1.0, 2.0]])
    for rhs in (growth.logistic, growth.gompertz):
        rate = rhs(d, 1.5, K)
        (grad,) = torch.autograd.grad(rate.sum(), d)
        assert torch.isfinite(grad).all()
        rate = rate.detach()
        assert torch.equal(rate[:, 1], torch.zeros(2, dtype=F64))
        assert float(rate[0, 0]) == 0.0 and abs(float(rate[1, 0])) < 1e-290


def test_logistic_solution_from_zero_stays_zero():
    out = growth.logistic_solution(t64([[0.0, 5.0]]), t64([[0.0]]), 2.0)
    assert torch.equal(out, torch.zeros(1, 2, 1, dtype=F64))


# --- neurodegeneration ----------------------------------------------------------------------------

@pytest.mark.parametrize("link", ["exp", "softplus"])
def test_progression_is_nonnegative_for_any_real_parameters(link):
    g = torch.Generator().manual_seed(0)
    d = torch.randn(200, 3, generator=g, dtype=F64)
    rate = 30 * torch.randn(200, 3, generator=g, dtype=F64)
    effect = 3 * torch.randn(200, generator=g, dtype=F64)  # effects outside [0, 1] too
    out = neurodegeneration.progression(d, rate, effect, link=link)
    assert out.shape == (200, 3) and (out >= 0).all()
    assert torch.equal(out[effect >= 1], torch.zeros_like(out[effect >= 1])), "a drug halts, never reverses"


def test_progression_link_is_checked():
    with pytest.raises(ValueError, match=r"link must be one of \('exp', 'softplus'\), got 'relu'"):
        neurodegeneration.progression(torch.zeros(1, 1), 0.0, link="relu")


def test_progression_constant_rate_closed_form():
    xi = t64([-1.0, 0.3, 1.2])
    z0 = t64([[0.0, -2.0], [1.0, 0.5], [0.2, 0.0]])
    out = solve(lambda t, d: neurodegeneration.progression(d, xi), z0, VISITS, solver=TIGHT)
    exact = neurodegeneration.progression_solution(VISITS, z0, xi)
    torch.testing.assert_close(exact, z0[:, None] + torch.exp(xi)[:, None, None] * VISITS[..., None], equal_nan=True)
    torch.testing.assert_close(out, exact, rtol=1e-9, atol=1e-10, equal_nan=True)


def test_progression_with_piecewise_constant_effect_matches_closed_form():
    start = t64([[0.5, 1.0, NAN], [NAN, 0.2, 2.0], [0.0, 1.0, 1.5]])  # unsorted with padding is fine
    value = t64([[0.6, 0.1, 0.9], [0.3, 0.8, 0.0], [0.4, 1.0, 0.2]])
    xi = t64([0.0, -0.5, 0.7])
    z0 = torch.zeros(3, 1, dtype=F64)

    def field(t, d):
        return neurodegeneration.progression(d, xi, neurodegeneration.piecewise_constant(t, start, value), link="softplus")

    out = solve(field, z0, VISITS, rhs_jumps=start, solver=TIGHT)
    integral = neurodegeneration.piecewise_constant_integral(VISITS, start, value)
    exact = neurodegeneration.progression_solution(VISITS, z0, xi, integral, link="softplus")
    torch.testing.assert_close(out, exact, rtol=1e-9, atol=1e-10, equal_nan=True)
    # by hand, patient 0 at t = 1.1: 0.6 * (1.0 - 0.5) + 0.1 * (1.1 - 1.0)
    assert math.isclose(float(integral[0, 2]), 0.6 * 0.5 + 0.1 * 0.1, rel_tol=1e-12)


def test_piecewise_constant_is_right_continuous_and_zero_before_first_start():
    start, value = t64([[0.5, 1.0]]), t64([[0.6, 0.1]])
    e = neurodegeneration.piecewise_constant(t64([[0.0, 0.5, 0.99, 1.0, 7.0]]), start, value)
    torch.testing.assert_close(e, t64([[0.0, 0.6, 0.6, 0.1, 0.1]]))


def test_neurodegeneration_slowed_by_a_drug_matches_effect_integral():
    """z' = r (1 - s E(C(t))) for 3 patients with their own doses: z = z0 + r t - r s int_0^t E."""
    xi, sens, ec50 = t64([0.2, -0.4, 1.0]), t64([0.9, 0.5, 0.7]), t64([0.5, 1.0, 2.0])
    z0 = t64([[0.0], [1.0], [-1.0]])

    def field(t, d):
        c = pharmacology.concentration(t, DOSE_TIME, DOSE, K_ELIM)  # (B,)
        return neurodegeneration.progression(d, xi, sens * pharmacology.emax(c, 1.0, ec50))

    out = solve(field, z0, VISITS, rhs_jumps=DOSE_TIME, solver=TIGHT)
    effect = sens[:, None] * pharmacology.effect_integral(0.0, VISITS, DOSE_TIME, DOSE, K_ELIM, emax=1.0, ec50=ec50)
    exact = neurodegeneration.progression_solution(VISITS, z0, xi, effect)
    torch.testing.assert_close(out, exact, rtol=1e-8, atol=1e-9, equal_nan=True)
    untreated = neurodegeneration.progression_solution(VISITS, z0, xi)
    later = torch.isfinite(VISITS) & (VISITS > 0.3)
    assert (exact[later] < untreated[later]).all(), "the drug slows progression once given"


# --- pharmacology ---------------------------------------------------------------------------------

def test_concentration_matches_numpy_physics_and_is_right_continuous():
    times = torch.cat([VISITS, DOSE_TIME], dim=1)  # includes every dose time exactly
    volume = t64([2.0, 0.5, 1.0])
    c = pharmacology.concentration(times, DOSE_TIME, DOSE, K_ELIM, volume)
    for b in range(3):
        pk = numpy_physics.OneCompartment(float(K_ELIM[b]), float(volume[b]))
        keep = np.isfinite(times[b].numpy())
        ref = numpy_physics.concentration(times[b].numpy()[keep], *_numpy_doses(b), pk)
        np.testing.assert_allclose(c[b].numpy()[keep], ref, rtol=1e-13, atol=1e-15)
        assert torch.isnan(c[b][~torch.from_numpy(keep)]).all()
    # at a dose time C already holds the dose: patient 0 at t = 0.2 gets its first 2.0 / V
    assert float(pharmacology.concentration(t64([0.2, 0.0, 0.0]), DOSE_TIME, DOSE, K_ELIM, volume)[0]) == 1.0


def test_concentration_scalar_time_and_half_life():
    k = pharmacology.half_life_to_k(t64([0.1, 0.25, 1.0]))
    dose_time, dose = torch.zeros(3, 1, dtype=F64), torch.ones(3, 1, dtype=F64)
    c = pharmacology.concentration(t64([0.1, 0.25, 1.0]), dose_time, dose, k)
    torch.testing.assert_close(c, torch.full((3,), 0.5, dtype=F64))
    assert pharmacology.concentration(t64(0.3), dose_time, dose, k).shape == (3,)


def test_padded_doses_add_nothing_to_values_or_gradients():
    dose = DOSE.clone().requires_grad_()
    more_time = torch.cat([DOSE_TIME, t64([[NAN], [0.4], [NAN]])], dim=1)  # NaN time, or NaN amount
    more_dose = torch.cat([dose, t64([[5.0], [NAN], [NAN]])], dim=1)
    c = pharmacology.concentration(VISITS, more_time, more_dose, K_ELIM)
    torch.testing.assert_close(c, pharmacology.concentration(VISITS, DOSE_TIME, DOSE, K_ELIM), equal_nan=True)
    e = pharmacology.effect_integral(0.0, VISITS, more_time, more_dose, K_ELIM, emax=1.0, ec50=0.5)
    torch.testing.assert_close(e, pharmacology.effect_integral(0.0, VISITS, DOSE_TIME, DOSE, K_ELIM, emax=1.0, ec50=0.5),
                               equal_nan=True)
    (grad,) = torch.autograd.grad(torch.nansum(c) + torch.nansum(e), dose)
    assert torch.isfinite(grad[torch.isfinite(DOSE)]).all()
    assert (grad[~torch.isfinite(DOSE)].nan_to_num(0.0) == 0).all()


def test_effect_integral_matches_numpy_physics_and_quadrature():
    volume, emax, ec50 = t64([1.0, 2.0, 0.5]), t64([1.0, 0.6, 0.9]), t64([0.5, 1.5, 3.0])
    t0 = t64([[0.0, 0.2, 0.5], [0.1, 0.0, 1.0], [0.3, 0.0, 2.0]])  # starts at doses too
    t1 = t64([[0.2, 0.95, 3.0], [1.0, 0.05, 2.5], [1.5, 0.3, 2.0]])
    out = pharmacology.effect_integral(t0, t1, DOSE_TIME, DOSE, K_ELIM, volume, emax=emax, ec50=ec50)
    for b in range(3):
        pk = numpy_physics.OneCompartment(float(K_ELIM[b]), float(volume[b]))
        dt, dd = _numpy_doses(b)
        for j in range(3):
            a, z = float(t0[b, j]), float(t1[b, j])
            ref = numpy_physics.effect_integral(a, z, dt, dd, pk, float(emax[b]), float(ec50[b]))
            assert math.isclose(float(out[b, j]), ref, rel_tol=1e-12, abs_tol=1e-15)
            def effect(s):
                return float(numpy_physics.emax_effect(numpy_physics.concentration(s, dt, dd, pk), float(emax[b]), float(ec50[b])))

            quad, _ = integrate.quad(effect, a, z, points=[p for p in dt if a < p < z] or None, epsabs=1e-13, epsrel=1e-12, limit=200)
            assert math.isclose(float(out[b, j]), quad, rel_tol=1e-9, abs_tol=1e-12)
    backwards = pharmacology.effect_integral(t1, t0, DOSE_TIME, DOSE, K_ELIM, volume, emax=emax, ec50=ec50)
    torch.testing.assert_close(backwards, -out)


def test_effect_integral_is_additive_and_accurate_for_slow_elimination():
    kw = dict(emax=0.8, ec50=t64([0.5, 1.0, 2.0]))
    whole = pharmacology.effect_integral(0.0, 3.0, DOSE_TIME, DOSE, K_ELIM, **kw)
    parts = (pharmacology.effect_integral(0.0, VISITS[:, 1].nan_to_num(1.0), DOSE_TIME, DOSE, K_ELIM, **kw)
             + pharmacology.effect_integral(VISITS[:, 1].nan_to_num(1.0), 3.0, DOSE_TIME, DOSE, K_ELIM, **kw))
    torch.testing.assert_close(parts, whole, rtol=1e-13, atol=1e-15)
    # k -> 0: C stays at d / V, so int_0^1 E = emax d / (ec50 + d); the naive log ratio loses it
    slow = pharmacology.effect_integral(0.0, 1.0, t64([[0.0]]), t64([[1.0]]), 1e-12, emax=1.0, ec50=1.0)
    assert math.isclose(float(slow), 0.5, rel_tol=1e-9)


def test_emax_matches_numpy_physics():
    c = t64([[0.0, 0.5, 2.0], [1.0, 3.0, 100.0]])
    out = pharmacology.emax(c, t64([1.0, 0.6]), t64([0.5, 3.0]))
    ref = np.stack([numpy_physics.emax_effect(c[0].numpy(), 1.0, 0.5), numpy_physics.emax_effect(c[1].numpy(), 0.6, 3.0)])
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-15)
    assert float(out[0, 1]) == 0.5 and float(out[1, 1]) == 0.3  # E(EC50) = Emax / 2


def test_solving_the_pk_ode_with_dose_jumps_equals_concentration():
    volume = t64([2.0, 1.0, 0.5])
    dose_time = DOSE_TIME  # doses at t = 0 too: solve applies a jump at baseline to d(0)
    jumps = StateJumps(time=dose_time, amount=DOSE, apply=lambda c, amount: c + (amount / volume)[:, None])
    times = torch.cat([VISITS, dose_time], dim=1)
    out = solve(lambda t, c: -K_ELIM[:, None] * c, torch.zeros(3, 1, dtype=F64), times, state_jumps=jumps, solver=TIGHT)[..., 0]
    exact = pharmacology.concentration(times, dose_time, DOSE, K_ELIM, volume)
    torch.testing.assert_close(out, exact, rtol=1e-8, atol=1e-10, equal_nan=True)


def test_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(1)
    dose_time = t64([[0.1, 0.4, NAN], [0.0, 0.2, 0.7]])
    dose = (torch.rand(2, 3, generator=g, dtype=F64) + 0.5).requires_grad_()
    k = t64([2.0, 5.0]).requires_grad_()
    volume = t64([1.0, 2.0]).requires_grad_()
    emax, ec50 = t64([0.9, 0.5]).requires_grad_(), t64([0.7, 1.2]).requires_grad_()
    t = t64([[0.05, 0.3, 0.9], [0.1, 0.5, 1.0]])
    torch.autograd.gradcheck(lambda d, k, v: pharmacology.concentration(t, dose_time, d, k, v), (dose, k, volume))
    torch.autograd.gradcheck(lambda d, k, e, c: pharmacology.effect_integral(0.0, t, dose_time, d, k, emax=e, ec50=c),
                             (dose, k, emax, ec50))
    c = (torch.rand(2, 3, generator=g, dtype=F64) + 0.1).requires_grad_()
    torch.autograd.gradcheck(pharmacology.emax, (c, emax, ec50))
    gy = (torch.rand(2, generator=g, dtype=F64) + 1).requires_grad_()
    alpha, beta = t64([0.3, 0.1]).requires_grad_(), t64([0.03, 0.05]).requires_grad_()
    torch.autograd.gradcheck(radiotherapy.lq_survival, (gy, alpha, beta))
    state = t64([[1.0, 2.0], [0.5, 0.1]]).requires_grad_()
    torch.autograd.gradcheck(lambda d, x, a, b: radiotherapy.lq_jump(d, x, a, b), (state, gy, alpha, beta))


# --- radiotherapy ---------------------------------------------------------------------------------

FRACTIONS = t64([[0.1, 0.2, 0.3, 0.4, NAN], [0.05, 0.15, NAN, NAN, NAN], [0.5, 0.6, 0.7, 0.8, 0.9]])
GRAY = torch.where(torch.isfinite(FRACTIONS), t64([[2.0], [3.0], [1.8]]).expand(3, 5), FRACTIONS)
ALPHA, BETA = t64([0.3, 0.15, 0.2]), t64([0.03, 0.05, 0.02])


@pytest.mark.parametrize("log_state", [False, True])
def test_course_of_fractions_kills_exp_n_alpha_d_beta_d2(log_state):
    jumps = StateJumps(FRACTIONS, GRAY, functools.partial(radiotherapy.lq_jump, alpha=ALPHA, beta=BETA, log_state=log_state))
    times = t64([[0.0, 0.25, 1.0], [0.1, 0.15, 1.0], [0.5, 0.85, 1.0]])
    d0 = torch.ones(3, 1, dtype=F64) * (0.0 if log_state else 1.0)
    out = solve(lambda t, d: torch.zeros_like(d), d0, times, state_jumps=jumps)[..., 0]
    n = (FRACTIONS[:, None, :] <= times[..., None]).sum(-1).to(F64)  # fractions given by then (right-continuous)
    per = radiotherapy.lq_log_kill(GRAY[:, 0], ALPHA, BETA)[:, None]
    torch.testing.assert_close(out, -n * per if log_state else torch.exp(-n * per), rtol=1e-14, atol=1e-14)
    ref = numpy_physics.lq_survival(GRAY[:, 0].numpy(), ALPHA.numpy(), BETA.numpy())
    np.testing.assert_allclose(radiotherapy.lq_survival(GRAY[:, 0], ALPHA, BETA).numpy(), ref, rtol=1e-15)


def test_logistic_growth_between_fractions_matches_piecewise_closed_form():
    rho, K = t64([3.0, 1.0, 5.0]), t64([1.0, 2.0, 1.0])
    d0 = t64([[0.2], [0.5], [0.05]])
    jumps = StateJumps(FRACTIONS, GRAY, functools.partial(radiotherapy.lq_jump, alpha=ALPHA, beta=BETA))
    times = t64([[0.35, 1.0], [0.15, 2.0], [0.75, 1.2]])
    out = solve(lambda t, d: growth.logistic(d, rho, K), d0, times, state_jumps=jumps, solver=TIGHT)
    for b in range(3):
        fractions = [float(x) for x in FRACTIONS[b] if math.isfinite(x)]
        survive = float(radiotherapy.lq_survival(GRAY[b, 0], ALPHA[b], BETA[b]))
        for j, t_end in enumerate(times[b].tolist()):
            d, now = d0[b:b + 1], 0.0
            for f in [f for f in fractions if f <= t_end]:
                d = growth.logistic_solution(t64([f - now]), d, rho[b:b + 1], K[b:b + 1]) * survive
                now = f
            d = growth.logistic_solution(t64([t_end - now]), d, rho[b:b + 1], K[b:b + 1])
            assert math.isclose(float(out[b, j, 0]), float(d), rel_tol=1e-8)


def test_lq_jump_zero_dose_and_untouched_components():
    d = t64([[1.0, 5.0], [2.0, 7.0]])
    alpha, beta = t64([[0.3, 0.0], [0.2, 0.0]]), t64([[0.03, 0.0], [0.02, 0.0]])  # component 1 is not tumour
    out = radiotherapy.lq_jump(d, t64([0.0, 2.0]), alpha, beta)
    assert torch.equal(out[0], d[0]) and torch.equal(out[:, 1], d[:, 1])
    assert math.isclose(float(out[1, 0]), 2.0 * math.exp(-0.4 - 0.08), rel_tol=1e-15)
    with pytest.raises(ValueError, match=r"one dose per patient, \(B,\) = \(2,\), got \(2, 1\)"):
        radiotherapy.lq_jump(d, t64([[2.0], [2.0]]), 0.3, 0.03)


def test_per_patient_parameter_shapes_are_checked():
    with pytest.raises(ValueError, match=r"B=2 \(or 1\) rows, got shape \(3,\)"):
        growth.logistic(torch.ones(2, 4, dtype=F64), t64([1.0, 2.0, 3.0]))


# --- penalties ------------------------------------------------------------------------------------

def _trajectories():
    times = t64([[0.0, 1.0, 2.0, 3.0], [0.0, 0.5, NAN, NAN]])
    y = t64([[[1.0, 5.0], [1.5, 4.0], [2.0, 3.5], [2.5, 3.0]],
             [[0.0, 1.0], [0.1, 0.9], [NAN, NAN], [NAN, NAN]]])
    return y, times


def test_penalties_are_zero_on_compliant_trajectories():
    y, times = _trajectories()
    assert float(penalties.monotone_penalty(y, times, direction=[1, -1])) == 0.0
    assert float(penalties.bound_penalty(y, low=0.0, high=[3.0, 5.0])) == 0.0
    assert float(penalties.rate_penalty(y, times, max_rate=[0.5, 1.0])) == 0.0


def test_penalties_are_exact_and_push_violations_back():
    y, times = _trajectories()
    y = y.clone()
    y[0, 2, 0] = 1.2  # first biomarker must not decrease: 1.5 -> 1.2 -> 2.5
    y = y.requires_grad_()
    mono = penalties.monotone_penalty(y, times, direction=t64([1, -1]))
    assert math.isclose(mono.item(), 0.3 ** 2 / 8, rel_tol=1e-12)  # 8 valid consecutive pairs (3 + 1, two biomarkers)
    (grad,) = torch.autograd.grad(mono, y)
    assert grad[0, 2, 0] < 0 and grad[0, 1, 0] > 0  # descent raises the dip and lowers the point before it
    assert torch.isfinite(grad).all() and int((grad != 0).sum()) == 2

    bound = penalties.bound_penalty(y, low=1.3, high=None)  # 1.0, 1.2, 0.0, 0.1, 1.0, 0.9 are below
    below = t64([0.3, 0.1, 1.3, 1.2, 0.3, 0.4])
    assert math.isclose(bound.item(), float((below ** 2).sum()) / 12, rel_tol=1e-12)

    rate = penalties.rate_penalty(y, times, max_rate=1.0)  # patient 1: 0.2 per year; patient 0: 1.3 per year
    assert math.isclose(rate.item(), 0.3 ** 2 / 8, rel_tol=1e-12)
    (grad,) = torch.autograd.grad(rate, y)
    assert grad[0, 3, 0] > 0 and grad[0, 2, 0] < 0  # the rise 1.2 -> 2.5 is too fast: descent narrows it


def test_penalties_respect_the_mask_and_look_across_missed_visits():
    y, times = _trajectories()
    y = y.clone()
    y[0, 2, 0] = 0.5  # a dip at visit 2
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 2] = False  # visit 2 not there: nothing is violated
    assert float(penalties.monotone_penalty(y, times, [1, 0], mask=mask[..., None].expand(-1, -1, 2))) == 0.0
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 1] = False  # visit 1 missed: the dip is measured against visit 0 (1.0 -> 0.5)
    assert math.isclose(float(penalties.monotone_penalty(y, times, [1, 0], mask=mask)), 0.5 ** 2 / 6, rel_tol=1e-12)


def test_penalties_check_time_order_and_shapes():
    y, times = _trajectories()
    with pytest.raises(ValueError, match="times must be ascending"):
        penalties.monotone_penalty(y, t64([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]]))
    with pytest.raises(ValueError, match=r"D=2 entries, got shape \(3,\)"):
        penalties.bound_penalty(y, low=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"expected y \(B, T, D\) and times \(B, T\), got \(2, 4, 2\) and \(2, 3\)"):
        penalties.rate_penalty(y, times[:, :3], 1.0)
