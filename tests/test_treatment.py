"""The simulator's treatment physics against closed forms: PK decay, superposition, Emax, LQ, schedules."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

from twin.data import treatment as tx
from twin.errors import InputError

PK = tx.OneCompartment.from_half_life(0.01, volume=20.0)  # years, L


def test_half_life_decay():
    c = tx.concentration([0.0, 0.01, 0.02, 0.05], [0.0], [100.0], PK)
    np.testing.assert_allclose(c, 100.0 / 20.0 * 0.5 ** np.array([0, 1, 2, 5]), rtol=1e-12)
    assert PK.half_life == pytest.approx(0.01)


def test_superposition_and_right_continuity():
    t = np.linspace(-0.01, 0.1, 57)
    both = tx.concentration(t, [0.0, 0.03], [100.0, 50.0], PK)
    one = tx.concentration(t, [0.0], [100.0], PK) + tx.concentration(t, [0.03], [50.0], PK)
    np.testing.assert_allclose(both, one, rtol=1e-12)
    assert tx.concentration(-1e-9, [0.0], [100.0], PK) == 0.0
    assert tx.concentration(0.0, [0.0], [100.0], PK) == pytest.approx(5.0)  # includes the dose at its time


def test_emax_half_effect_at_ec50_and_saturation():
    assert tx.emax_effect(3.0, emax=0.8, ec50=3.0) == pytest.approx(0.4)
    e = tx.emax_effect(np.array([0.0, 1.0, 10.0, 1e9]), emax=0.8, ec50=3.0)
    assert e[0] == 0.0 and np.all(np.diff(e) > 0) and e[-1] == pytest.approx(0.8)


def test_lq_survival_closed_form_and_fractionation_sparing():
    alpha, beta = 0.03, 0.003
    assert tx.lq_survival(2.0, alpha, beta) == pytest.approx(np.exp(-alpha * 2 - beta * 4))
    # two fractions of 2 Gy spare more than one of 4 Gy when beta > 0
    assert tx.lq_survival(2.0, alpha, beta) ** 2 > tx.lq_survival(4.0, alpha, beta)
    assert tx.lq_survival(0.0, alpha, beta) == 1.0


def test_concentration_integral_exact_vs_numeric():
    times, amounts = [0.0, 0.015, 0.04], [100.0, 40.0, 70.0]
    a, b = 0.005, 0.06
    exact = tx.concentration_integral(a, b, times, amounts, PK)
    numeric, _ = integrate.quad(lambda s: tx.concentration(s, times, amounts, PK), a, b,
                                points=times[1:], epsabs=1e-12, epsrel=1e-12, limit=200)
    assert exact == pytest.approx(numeric, rel=1e-9)
    # the whole exposure of one bolus is the dose over clearance: d / (V k)
    assert tx.concentration_integral(0.0, 10.0, [0.0], [100.0], PK) == pytest.approx(100.0 / (20.0 * PK.k), rel=1e-12)


def test_effect_integral_exact_vs_numeric():
    times, amounts = [0.0, 0.015, 0.04], [100.0, 40.0, 70.0]
    exact = tx.effect_integral(0.0, 0.07, times, amounts, PK, emax=0.9, ec50=2.0)
    numeric, _ = integrate.quad(lambda s: tx.emax_effect(tx.concentration(s, times, amounts, PK), 0.9, 2.0),
                                0.0, 0.07, points=times[1:], epsabs=1e-12, epsrel=1e-12, limit=200)
    assert exact == pytest.approx(numeric, rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(a=st.floats(0.0, 0.05), m=st.floats(0.0, 1.0), span=st.floats(0.0, 0.05))
def test_effect_integral_additive_over_intervals(a, m, span):
    times, amounts = [0.0, 0.02, 0.021, 0.05], [100.0, 10.0, 80.0, 30.0]
    b, mid = a + span, a + m * span
    whole = tx.effect_integral(a, b, times, amounts, PK, 1.0, 3.0)
    parts = tx.effect_integral(a, mid, times, amounts, PK, 1.0, 3.0) + tx.effect_integral(mid, b, times, amounts, PK, 1.0, 3.0)
    assert whole == pytest.approx(parts, rel=1e-9, abs=1e-15)
    assert whole >= 0.0


def test_course_times_and_doses():
    ev = tx.course(0.1, 28 * tx.DAY, 6, 300.0, tx.TEMOZOLOMIDE)
    assert len(ev) == 30 and all(a == tx.TEMOZOLOMIDE and d == 300.0 for _, a, d in ev)
    t = np.array([e[0] for e in ev])
    np.testing.assert_allclose(t[:5], 0.1 + np.arange(5) * tx.DAY)
    np.testing.assert_allclose(t[5] - t[0], 28 * tx.DAY)
    np.testing.assert_allclose(t[-1], 0.1 + (5 * 28 + 4) * tx.DAY)


def test_radiotherapy_weekdays_only():
    ev = tx.radiotherapy(0.0)
    days = np.round(np.array([e[0] for e in ev]) / tx.DAY).astype(int)
    assert len(ev) == 30 and sum(e[2] for e in ev) == pytest.approx(60.0)
    assert set(days % 7) == {0, 1, 2, 3, 4} and days[-1] == 5 * 7 + 4  # six weeks, Mon-Fri
    assert len(tx.radiotherapy(0.0, fractions=3, days=[2])) == 3


def test_stupp_protocol():
    ev = tx.stupp(0.1)
    t = [e[0] for e in ev]
    assert t == sorted(t)
    rt = [e for e in ev if e[1] == tx.RADIOTHERAPY]
    tmz_t, tmz_d = tx.doses(ev, tx.TEMOZOLOMIDE)
    assert len(rt) == 30 and rt[0][0] == 0.1
    concomitant = tmz_d == 135.0
    assert concomitant.sum() == 40 and (tmz_d == 300.0).sum() == 30  # daily through RT, then 6 x 5 days
    assert tmz_t[~concomitant].min() == pytest.approx(0.1 + (40 + 28) * tx.DAY)
    assert all(e[1] == tx.RADIOTHERAPY for e in tx.stupp(0.0, chemo=False))


def test_bad_input_raises():
    with pytest.raises(InputError):
        tx.OneCompartment(k=-1.0, volume=1.0)
    with pytest.raises(InputError):
        tx.course(0.0, 0.0, 3, 1.0, "x")
    with pytest.raises(InputError):
        tx.radiotherapy(0.0, days=[7])
    with pytest.raises(InputError):
        tx.effect_integral(1.0, 0.0, [], [], PK, 1.0, 1.0)
