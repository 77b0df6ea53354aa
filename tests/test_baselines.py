"""Baselines: hand-made exact answers, per-subject reference paths, and an LME checked against
dense closed forms and against data simulated from the model itself."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from twin.baselines import MixedEffects, cohort_arrays, copy_last, interpolate, linear
from twin.errors import InputError

NAN = np.nan


def _hand():
    """Subject 0: b0 at t=0 (1) and t=2 (3), b1 never; subject 1: b1 at t=0 (5) and t=1 (7)."""
    times = np.array([[0.0, 1.0, 2.0, NAN], [0.0, 1.0, NAN, NAN]])
    values = np.full((2, 4, 2), NAN)
    values[0, 0, 0], values[0, 2, 0] = 1.0, 3.0
    values[0, 1, 1] = NAN  # visit took place, biomarker not measured
    values[1, 0, 1], values[1, 1, 1] = 5.0, 7.0
    at = np.array([[-0.5, 0.0, 0.5, 1.5, 2.0, 10.0, NAN]] * 2)
    return times, values, at


def test_baselines_on_hand_made_history():
    times, values, at = _hand()
    expect = {
        copy_last: [1, 1, 1, 1, 3, 3, NAN],
        interpolate: [1, 1, 1.5, 2.5, 3, 3, NAN],
        linear: [0.5, 1, 1.5, 2.5, 3, 11, NAN],
    }
    for f, b0 in expect.items():
        pred = f(times, values, at)
        assert pred.shape == (2, 7, 2)
        np.testing.assert_allclose(pred[0, :, 0], b0, err_msg=f.__name__)
        # Never measured: the population mean of b1 (6), NaN for the NaN query.
        np.testing.assert_allclose(pred[0, :, 1], [6, 6, 6, 6, 6, 6, NAN], err_msg=f.__name__)
        # Subject 1 never had b0: the mean of subject 0's b0 measurements, 2.
        np.testing.assert_allclose(pred[1, :6, 0], 2.0, err_msg=f.__name__)


def test_a_biomarker_nobody_has_is_nan():
    times, values, at = _hand()
    values[..., 1] = NAN
    for f in (copy_last, interpolate, linear):
        assert np.isnan(f(times, values, at)[..., 1]).all()


def _random_history(seed=0, S=6, V=5, B=3):
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(0, 4, (S, V)), axis=1)
    times[0, 3:] = NAN                                      # padding
    values = rng.normal(size=(S, V, B))
    values[rng.random((S, V, B)) < 0.3] = NAN               # unmeasured
    values[1, :, 0] = NAN
    values[1, 2, 0] = 0.7                                   # a single measurement
    at = rng.uniform(-1, 6, (S, 7))
    return times, values, at


def test_linear_and_interpolate_match_per_subject_references():
    times, values, at = _random_history()
    lin, interp = linear(times, values, at), interpolate(times, values, at)
    for s in range(times.shape[0]):
        for b in range(values.shape[2]):
            ok = np.isfinite(times[s]) & np.isfinite(values[s, :, b])
            t, y = times[s, ok], values[s, ok, b]
            if ok.sum() >= 2:
                slope, intercept = np.polyfit(t, y, 1)
                np.testing.assert_allclose(lin[s, :, b], intercept + slope * at[s], rtol=1e-9, atol=1e-9)
            elif ok.sum() == 1:
                np.testing.assert_allclose(lin[s, :, b], y[0])
            if ok.sum():
                np.testing.assert_allclose(interp[s, :, b], np.interp(at[s], t, y), rtol=1e-12)


def test_copy_last_matches_loop():
    times, values, at = _random_history(seed=3)
    pred = copy_last(times, values, at)
    for s in range(times.shape[0]):
        for b in range(values.shape[2]):
            ok = np.isfinite(times[s]) & np.isfinite(values[s, :, b])
            t, y = times[s, ok], values[s, ok, b]
            if not ok.any():
                continue
            for q, a in enumerate(at[s]):
                before = t <= a
                want = y[before][np.argmax(t[before])] if before.any() else y[np.argmin(t)]
                assert pred[s, q, b] == want


def test_visit_order_does_not_matter():
    times, values, at = _random_history(seed=5)
    perm = np.random.default_rng(1).permutation(times.shape[1])
    for f in (copy_last, interpolate, linear):
        np.testing.assert_allclose(f(times[:, perm], values[:, perm], at), f(times, values, at), rtol=1e-12)


def test_shape_errors_name_the_field():
    times, values, at = _hand()
    with pytest.raises(InputError, match=r"^copy_last: values: expected \(subject, visit, biomarker\)"):
        copy_last(times, values[..., 0], at)
    with pytest.raises(InputError, match=r"^linear: at: expected \(subject, query\) times with 2 subjects"):
        linear(times, values, at[:1])


# --------------------------------------------------------------------------- mixed effects

BETA = np.array([2.0, -0.5, 0.8])                        # intercept, slope, baseline-age effect
G_TRUE = np.array([[1.0, 0.09], [0.09, 0.09]])           # sd 1 and 0.3, correlation 0.3
SIGMA2 = 0.04


def _simulate(S, seed, beta=BETA, G=G_TRUE, sigma2=SIGMA2, V=8):
    """Irregular visits over 5 years, 20% missed; age-like covariate; one biomarker."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, 5, (S, V)), axis=1)
    t[:, 0] = 0.0
    missed = rng.random((S, V)) < 0.2
    missed[:, 0] = False
    t[missed] = NAN
    x = rng.normal(0, 1, (S, len(beta) - 2))
    b = rng.multivariate_normal([0, 0], G, S)
    y = beta[0] + beta[1] * t + x @ beta[2:, None] + b[:, :1] + b[:, 1:] * t
    y = y + rng.normal(0, np.sqrt(sigma2), (S, V))
    return t, y[..., None], x


def _dense_loglik(model, times, values, x, reml=False):
    """Reference: the marginal (restricted) log-likelihood with explicit per-subject matrices."""
    beta, G, s2 = model.beta[0], model.G[0], model.sigma2[0]
    total, XtVX, n = 0.0, 0.0, 0
    for s in range(times.shape[0]):
        ok = np.isfinite(times[s]) & np.isfinite(values[s, :, 0])
        t, y = times[s, ok], values[s, ok, 0]
        Z = np.column_stack([np.ones_like(t), t])
        X = np.column_stack([Z, np.repeat(x[s:s + 1], len(t), axis=0)])
        V = Z @ G @ Z.T + s2 * np.eye(len(t))
        total += stats.multivariate_normal(X @ beta, V).logpdf(y)
        XtVX = XtVX + X.T @ np.linalg.solve(V, X)
        n += len(t)
    if reml:
        p = len(beta)
        total += 0.5 * p * np.log(2 * np.pi) - 0.5 * np.linalg.slogdet(XtVX)[1]
    return total


@pytest.mark.parametrize("method", ["ml", "reml"])
def test_mixed_effects_recovers_simulated_parameters(method):
    t, y, x = _simulate(300, seed=1)
    m = MixedEffects.fit(t, y, x, method=method)
    se = np.sqrt(np.diag(m.beta_cov[0]))
    assert np.all(np.abs(m.beta[0] - BETA) < 4 * se), (m.beta, se)
    # Variance components: SE of a variance from 300 subjects is ~10-15%; sigma2 from ~2000 obs ~3%.
    assert abs(m.sigma2[0] / SIGMA2 - 1) < 0.12
    assert abs(m.G[0, 0, 0] / G_TRUE[0, 0] - 1) < 0.3
    assert abs(m.G[0, 1, 1] / G_TRUE[1, 1] - 1) < 0.3
    assert abs(m.G[0, 0, 1] - G_TRUE[0, 1]) < 0.06
    # The maximised likelihood is the dense marginal likelihood at the estimates.
    np.testing.assert_allclose(m.loglik[0], _dense_loglik(m, t, y, x, reml=method == "reml"), rtol=1e-9)


def test_fit_does_not_depend_on_the_time_origin():
    """On an age clock (t + 70) the fit is the same model: same likelihood, same forecasts."""
    t, y, x = _simulate(80, seed=3)
    m, m_age = MixedEffects.fit(t, y, x), MixedEffects.fit(t + 70, y, x)
    np.testing.assert_allclose(m_age.loglik, m.loglik, rtol=1e-7)
    at = np.tile([1.0, 6.0], (80, 1))
    np.testing.assert_allclose(m_age.predictive(t + 70, y, at + 70, x), m.predictive(t, y, at, x), rtol=1e-3)


def test_ml_is_a_maximum():
    t, y, x = _simulate(80, seed=2)
    m = MixedEffects.fit(t, y, x)
    for G in (m.G[0] * 1.2, m.G[0] * 0.8, m.G[0] + np.diag([0, 0.01])):
        other = MixedEffects(beta=m.beta, G=G[None], sigma2=m.sigma2, covariate_mean=m.covariate_mean)
        assert _dense_loglik(other, t, y, x) < m.loglik[0]


def test_a_zero_random_slope_is_reachable():
    G = np.array([[0.5, 0.0], [0.0, 0.0]])
    t, y, _ = _simulate(200, seed=4, beta=BETA[:2], G=G)
    m = MixedEffects.fit(t, y)
    assert m.G[0, 1, 1] < 0.002 and abs(m.G[0, 0, 0] / 0.5 - 1) < 0.3


def _dense_blup(beta, G, s2, t_hist, y_hist, x, t_new):
    """Reference: E and Var of a new measurement given the history, by joint-Gaussian conditioning."""
    z_new = np.column_stack([np.ones_like(t_new), t_new])
    x_new = np.column_stack([z_new, np.repeat(x[None], len(t_new), 0)])
    prior_var = z_new @ G @ z_new.T + s2 * np.eye(len(t_new))
    if len(t_hist) == 0:
        return x_new @ beta, np.sqrt(np.diag(prior_var))
    Z = np.column_stack([np.ones_like(t_hist), t_hist])
    X = np.column_stack([Z, np.repeat(x[None], len(t_hist), 0)])
    V = Z @ G @ Z.T + s2 * np.eye(len(t_hist))
    C = z_new @ G @ Z.T
    mean = x_new @ beta + C @ np.linalg.solve(V, y_hist - X @ beta)
    var = prior_var - C @ np.linalg.solve(V, C.T)
    return mean, np.sqrt(np.diag(var))


@pytest.mark.parametrize("G", [G_TRUE, np.array([[0.5, 0.0], [0.0, 0.0]])], ids=["full", "singular"])
def test_blup_matches_dense_conditioning(G):
    t, y, x = _simulate(12, seed=6, G=G)
    y[3, :, 0] = NAN                                     # no history at all: the prior
    y[4, 2:, 0] = NAN                                    # only early visits
    model = MixedEffects(beta=BETA, G=G, sigma2=[SIGMA2], covariate_mean=[0.0])
    at = np.tile(np.array([0.5, 3.0, 7.0, NAN]), (12, 1))
    mean, sd = model.predictive(t, y, at, x)
    for s in range(12):
        ok = np.isfinite(t[s]) & np.isfinite(y[s, :, 0])
        m_ref, sd_ref = _dense_blup(BETA, G, SIGMA2, t[s, ok], y[s, ok, 0], x[s], at[s, :3])
        np.testing.assert_allclose(mean[s, :3, 0], m_ref, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(sd[s, :3, 0], sd_ref, rtol=1e-9)
    assert np.isnan(mean[:, 3]).all() and np.isnan(sd[:, 3]).all()


def test_no_history_predicts_population_mean_and_quantiles_are_gaussian():
    model = MixedEffects(beta=BETA, G=G_TRUE, sigma2=[SIGMA2], covariate_mean=[0.0])
    times = np.array([[NAN, NAN]])
    values = np.full((1, 2, 1), NAN)
    at = np.array([[0.0, 2.0]])
    mean, q = model.predict(times, values, at, covariates=[[1.5]], quantiles=(0.05, 0.5, 0.95))
    np.testing.assert_allclose(mean[0, :, 0], BETA[0] + BETA[1] * at[0] + BETA[2] * 1.5)
    sd = np.sqrt(G_TRUE[0, 0] + 2 * G_TRUE[0, 1] * at[0] + G_TRUE[1, 1] * at[0] ** 2 + SIGMA2)
    np.testing.assert_allclose(q[:, 0, :, 0], mean[0, :, 0] + np.outer(stats.norm.ppf([0.05, 0.5, 0.95]), sd),
                               rtol=1e-12)


def test_predictive_bands_cover_fresh_subjects():
    """With the true parameters, 90% bands for the later half of each history cover ~90%."""
    t, y, x = _simulate(400, seed=7)
    model = MixedEffects(beta=BETA, G=G_TRUE, sigma2=[SIGMA2], covariate_mean=[0.0])
    hist_t, hist_y = t.copy(), y.copy()
    hist_t[:, 4:], hist_y[:, 4:] = NAN, NAN
    _, q = model.predict(hist_t, hist_y, t[:, 4:], x, quantiles=(0.05, 0.95))
    truth = y[:, 4:, 0]
    ok = np.isfinite(truth)
    inside = (q[0, ..., 0] <= truth) & (truth <= q[1, ..., 0])
    assert 0.87 < inside[ok].mean() < 0.93


def test_missing_covariate_is_imputed_with_training_mean():
    t, y, x = _simulate(60, seed=8)
    m = MixedEffects.fit(t, y, x)
    np.testing.assert_allclose(m.covariate_mean, x.mean(axis=0))
    x_missing = x.copy()
    x_missing[0] = NAN
    x_filled = x.copy()
    x_filled[0] = m.covariate_mean
    np.testing.assert_allclose(m.predictive(t, y, t, x_missing)[0], m.predictive(t, y, t, x_filled)[0])


def test_mixed_effects_input_errors():
    t, y, x = _simulate(30, seed=9)
    m = MixedEffects.fit(t, y, x)
    with pytest.raises(InputError, match=r"^MixedEffects.predict: covariates: the model was fitted with 1 covariate"):
        m.predict(t, y, t)
    with pytest.raises(InputError, match=r"^MixedEffects.fit: values: biomarker 0: 3 measurements cannot identify"):
        MixedEffects.fit(t[:3, :1], y[:3, :1])
    with pytest.raises(InputError, match=r"^MixedEffects: sigma2: expected 1 positive"):
        MixedEffects(beta=BETA[:2], G=G_TRUE, sigma2=[0.0])


def test_several_biomarkers_are_fitted_independently():
    t, y1, _ = _simulate(60, seed=10, beta=BETA[:2])
    _, y2, _ = _simulate(60, seed=11, beta=np.array([-1.0, 0.3]))
    y2[::3, 2:5] = NAN                                   # its own missingness
    both = MixedEffects.fit(t, np.concatenate([y1, y2], axis=2))
    np.testing.assert_allclose(both.beta[0], MixedEffects.fit(t, y1).beta[0], rtol=1e-6)
    np.testing.assert_allclose(both.beta[1], MixedEffects.fit(t, y2).beta[0], rtol=1e-6)


def test_cohort_arrays_reads_times_values_and_baseline_age(small):
    ds = small
    times, values, x = cohort_arrays(ds, ["sex"], baseline_time=True)
    assert times.shape == (3, 4) and values.shape == (3, 4, 2) and x.shape == (3, 2)
    np.testing.assert_array_equal(x[:, 1], ds["baseline_time"].values)
    np.testing.assert_array_equal(x[:, 0], ds["covariates"].sel(covariate="sex").values)
    assert np.isnan(times[2, 2:]).all()
    with pytest.raises(InputError, match=r"^cohort_arrays: covariates: no covariate\(s\) \['bmi'\]"):
        cohort_arrays(ds, ["bmi"])
