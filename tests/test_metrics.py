"""Metrics: exact answers on hand-made arrays, closed forms, brute-force references, and
split-conformal coverage on exchangeable synthetic data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import integrate, stats

from twin.errors import InputError
from twin.metrics import (ConformalCalibration, MondrianCalibration, history_groups, pooled_edges, bin_labels, by_horizon, conformal_scale, conformal_scores,
                          chance_outside, clustered_proportion,
                          coverage, coverage_by_horizon, crps_from_quantiles, crps_from_samples, crps_gaussian,
                          holdout_arrays, holdout_last, holdout_subjects, horizon_bins, horizon_from_history,
                          interval_score, mae_by_horizon)

NAN = np.nan
LABELS = ("[0, 0.5)", "[0.5, 1)", "[1, 2)", "[2, 3)", "[3, inf)")


def test_horizon_bins_are_half_open_and_labelled():
    labels, index = horizon_bins([0.0, 0.49, 0.5, 1.0, 2.5, 3.0, 40.0, -0.1, NAN])
    assert labels == LABELS == bin_labels()
    np.testing.assert_array_equal(index, [0, 0, 1, 2, 3, 4, 4, -1, -1])
    with pytest.raises(InputError, match=r"^horizon_bins: edges: edges must be at least two increasing"):
        horizon_bins([1.0], edges=(0, 2, 1))


def test_mae_by_horizon_exact_and_nan_truth_ignored():
    pred = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    truth = np.array([[2.0, NAN, 0.0], [1.0, 4.0, 5.0]])
    horizon = np.array([[0.2, 0.7, 1.5], [0.3, 0.6, 10.0]])
    out = mae_by_horizon(pred, truth, horizon)
    assert list(out) == list(LABELS)
    assert out["[0, 0.5)"] == (1.0, 2)          # |1-2|, |0-1|
    assert out["[0.5, 1)"] == (4.0, 1)          # |0-4|; the NaN truth is ignored
    assert out["[1, 2)"] == (3.0, 1)
    assert math.isnan(out["[2, 3)"][0]) and out["[2, 3)"][1] == 0
    assert out["[3, inf)"] == (0.0, 1)
    # A missing prediction of a real truth is not silently dropped.
    pred[0, 0] = NAN
    assert math.isnan(mae_by_horizon(pred, truth, horizon)["[0, 0.5)"][0])


def test_horizon_broadcasts_over_trailing_axes_only():
    rng = np.random.default_rng(0)
    pred, truth = rng.normal(size=(2, 3, 3)), rng.normal(size=(2, 3, 3))
    horizon = np.array([[0.1, 0.7, 1.5], [0.2, 2.5, 3.5]])
    out = mae_by_horizon(pred, truth, horizon)
    expect = np.abs(pred - truth)[horizon < 0.5].mean()   # rows (s, q) in bin 0, all biomarkers
    assert out["[0, 0.5)"] == (pytest.approx(expect), 6)
    with pytest.raises(InputError, match=r"^metrics: horizon: expected horizon of shape \(2, 3, 3\) or a leading"):
        mae_by_horizon(pred, truth, horizon.T)


def test_coverage_and_interval_score_exact():
    lower = np.array([0.0, 0.0, 0.0, 0.0, 0.0])
    upper = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
    truth = np.array([0.5, 1.0, 2.0, -1.0, NAN])
    assert coverage(lower, upper, truth) == 0.5          # 0.5 and the edge 1.0 inside, of 4
    by = coverage_by_horizon(lower, upper, truth, np.array([0.1, 0.1, 0.1, 5.0, 5.0]))
    assert by["[0, 0.5)"] == (pytest.approx(2 / 3), 3) and by["[3, inf)"] == (0.0, 1)
    score = interval_score(lower, upper, truth, level=0.8)   # 2 / alpha = 10
    np.testing.assert_allclose(score, [1.0, 1.0, 11.0, 11.0, NAN])
    assert math.isnan(coverage(lower, upper, np.full(5, NAN)))


def test_clustered_proportion_exact():
    # subject 0: 2 of 2 cases hit, subject 1: 1 of 3 (one more hit, not seen), subject 2: no case
    hit = np.array([[1, 1, 0], [1, 0, 1], [1, 1, 1]], dtype=bool)
    seen = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=bool)
    hit[1, 2], seen[1, 2] = False, True
    p, se, m = clustered_proportion(hit, seen)
    assert (p, m) == (pytest.approx(3 / 5), 2)
    # residuals a_i - p n_i: 2 - 1.2 = 0.8, 1 - 1.8 = -0.8; se^2 = 2 * 1.28 / 25
    assert se == pytest.approx(math.sqrt(2 * 1.28) / 5)
    assert all(math.isnan(v) for v in clustered_proportion(hit, np.zeros_like(seen))[:2])
    with pytest.raises(InputError, match="shape"):
        clustered_proportion(hit, seen[:2])


def test_clustered_proportion_error_is_the_spread_over_new_subjects():
    # alike cases: each subject's 10 cases hit with its own probability, so the proportion over
    # 40 subjects spreads far more than 400 independent cases would (binomial 0.015)
    rng = np.random.default_rng(0)
    ps, ses = [], []
    for _ in range(400):
        q = rng.beta(2.0, 0.25, size=40)[:, None]
        p, se, _ = clustered_proportion(rng.random((40, 10)) < q, np.ones((40, 10), dtype=bool))
        ps.append(p), ses.append(se)
    spread = np.std(ps)
    assert spread > 2 * math.sqrt(0.9 * 0.1 / 400)
    assert np.mean(ses) == pytest.approx(spread, rel=0.15)


def test_by_horizon_averages_any_score():
    out = by_horizon(np.array([1.0, 3.0, NAN, 10.0]), np.array([0.1, 0.2, 0.3, 2.0]))
    assert out["[0, 0.5)"] == (2.0, 2) and out["[2, 3)"] == (10.0, 1)


# --------------------------------------------------------------------------- CRPS

def _crps_integral(cdf, y, lo, hi):
    """Reference: CRPS = int (F(x) - 1{x >= y})^2 dx, numerically."""
    left = integrate.quad(lambda v: cdf(v) ** 2, lo, y, limit=200)[0]
    right = integrate.quad(lambda v: (1 - cdf(v)) ** 2, y, hi, limit=200)[0]
    return left + right


@pytest.mark.parametrize("mu,sd,y", [(0.0, 1.0, 0.3), (2.0, 0.5, -1.0), (-1.0, 3.0, 4.0)])
def test_crps_gaussian_matches_the_defining_integral(mu, sd, y):
    ref = _crps_integral(lambda v: stats.norm.cdf(v, mu, sd), y, mu - 12 * sd, mu + 12 * sd)
    assert crps_gaussian(mu, sd, y) == pytest.approx(ref, rel=1e-7)


def test_crps_of_a_point_mass_is_the_absolute_error():
    truth = np.array([0.0, 1.5, -2.0])
    x = np.array([1.0, 1.0, 1.0])
    np.testing.assert_allclose(crps_gaussian(x, 0.0, truth), [1.0, 0.5, 3.0])
    samples = np.broadcast_to(x, (7, 3))
    for fair in (True, False):
        np.testing.assert_allclose(crps_from_samples(samples, truth, fair=fair), [1.0, 0.5, 3.0])
    levels = (0.05, 0.25, 0.5, 0.75, 0.95)
    np.testing.assert_allclose(crps_from_quantiles(np.broadcast_to(x, (5, 3)), levels, truth), [1.0, 0.5, 3.0])


def test_crps_from_samples_matches_brute_force_pairs():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(9, 4, 2)), rng.normal(size=(4, 2))
    pairs = np.abs(x[:, None] - x[None]).sum(axis=(0, 1))
    term1 = np.abs(x - y).mean(axis=0)
    np.testing.assert_allclose(crps_from_samples(x, y, fair=False), term1 - pairs / (2 * 81))
    np.testing.assert_allclose(crps_from_samples(x, y, fair=True), term1 - pairs / (2 * 72))


def test_sample_and_quantile_crps_converge_to_the_gaussian_closed_form():
    rng = np.random.default_rng(2)
    mu, sd = rng.normal(size=20), rng.uniform(0.5, 2.0, 20)
    y = mu + sd * rng.normal(size=20) * 1.5
    exact = crps_gaussian(mu, sd, y)
    samples = mu + sd * rng.normal(size=(20000, 20))
    np.testing.assert_allclose(crps_from_samples(samples, y), exact, rtol=0.03)
    levels = np.arange(1, 200) / 200
    qs = mu + sd * stats.norm.ppf(levels)[:, None]
    np.testing.assert_allclose(crps_from_quantiles(qs, levels, y), exact, rtol=0.02)


def test_crps_input_errors():
    with pytest.raises(InputError, match=r"^crps_from_samples: samples: expected samples \(K, \*\(3,\)\)"):
        crps_from_samples(np.zeros((5, 4)), np.zeros(3))
    with pytest.raises(InputError, match=r"^crps_from_quantiles: levels: levels must increase"):
        crps_from_quantiles(np.zeros((2, 3)), (0.9, 0.1), np.zeros(3))


# --------------------------------------------------------------------------- conformal

def test_conformal_scale_is_the_finite_sample_quantile():
    scores = np.arange(9, 0, -1.0)                  # 9 scores, 1..9, unsorted
    assert conformal_scale(scores, 0.9) == 9.0      # ceil(10 * 0.9) = 9th smallest
    assert conformal_scale(scores, 0.5) == 5.0      # ceil(5) = 5th
    assert conformal_scale(scores[:5], 0.9) == math.inf   # ceil(5.4) = 6 > 5
    assert conformal_scale(np.append(scores, NAN), 0.5) == 5.0
    assert conformal_scale([], 0.5) == math.inf


def test_scores_equal_the_factor_that_just_covers():
    rng = np.random.default_rng(3)
    m = rng.normal(size=500)
    lo, hi = m - rng.uniform(0.1, 2, 500), m + rng.uniform(0.1, 2, 500)   # asymmetric bands
    y = m + rng.normal(size=500)
    s = conformal_scores(m, lo, hi, y)
    for f in (0.5, 1.0, 1.7):
        inside = (m - f * (m - lo) <= y) & (y <= m + f * (hi - m))
        np.testing.assert_array_equal(inside, s <= f)


def _forecasts(n, rng, scale):
    """Exchangeable cases: heteroscedastic truth, bands of the right shape but wrong width per bin."""
    horizon = rng.choice([0.25, 1.5, 4.0], size=n)
    sd = rng.uniform(0.5, 2.0, n) * (1 + horizon / 4)
    median = rng.normal(size=n)
    truth = median + sd * rng.normal(size=n)
    levels = (0.5, 0.9)
    z = stats.norm.ppf([0.75, 0.95])[:, None] * scale[np.searchsorted([1, 2], horizon)]
    return median, median - z * sd, median + z * sd, truth, horizon, levels


def test_calibrated_bands_cover_fresh_data_at_the_nominal_level():
    rng = np.random.default_rng(4)
    scale = np.array([0.6, 1.5, 1.0])               # too narrow, too wide, right
    cal = ConformalCalibration.fit(*_forecasts(6000, rng, scale))
    assert sum(cal.counts) == 6000 and cal.counts[1] == 0 and cal.factors[1] == (math.inf, math.inf)
    median, lower, upper, truth, horizon, levels = _forecasts(30000, rng, scale)
    raw = coverage_by_horizon(lower[1], upper[1], truth, horizon)
    assert raw["[0, 0.5)"][0] < 0.8                 # the uncalibrated 90% band misses
    lo, hi = cal.apply(median, lower, upper, horizon)
    for i, level in enumerate(levels):
        for label, (cov, n) in coverage_by_horizon(lo[i], hi[i], truth, horizon).items():
            if n:
                assert abs(cov - level) < 0.03, (label, level, cov)


def test_calibration_round_trips_through_strict_json():
    rng = np.random.default_rng(5)
    cal = ConformalCalibration.fit(*_forecasts(300, rng, np.ones(3)))
    text = json.dumps(cal.to_dict(), allow_nan=False)
    back = ConformalCalibration.from_dict(json.loads(text))
    assert back == cal and back.edges[-1] == math.inf
    with pytest.raises(InputError, match=r"^ConformalCalibration: keys: expected keys"):
        ConformalCalibration.from_dict({**cal.to_dict(), "extra": 1})
    with pytest.raises(InputError, match=r"^ConformalCalibration: factors: expected factors for 5 bins x 2 levels"):
        ConformalCalibration(edges=cal.edges, levels=cal.levels, factors=cal.factors[:2], counts=cal.counts)


def test_apply_scales_about_the_median():
    cal = ConformalCalibration(edges=(0, 1, math.inf), levels=(0.9,), factors=((2.0,), (0.5,)), counts=(10, 10))
    lo, hi = cal.apply(np.array([1.0, 1.0, 1.0]), np.array([[0.0, 0.0, 0.0]]), np.array([[4.0, 4.0, 4.0]]),
                       np.array([0.5, 3.0, -1.0]))
    np.testing.assert_allclose(lo, [[-1.0, 0.5, NAN]])
    np.testing.assert_allclose(hi, [[7.0, 2.5, NAN]])


def test_history_groups_give_long_histories_their_own_factors():
    # the same bands everywhere, but errors twice as large after 8+ visits (a posterior that
    # narrowed onto the wrong course): one factor per horizon would under-cover long histories
    rng = np.random.default_rng(6)

    def cases(n):
        median, lower, upper, truth, horizon, levels = _forecasts(n, rng, np.ones(3))
        visits = rng.choice([1, 3, 9], size=n)
        truth = np.where(visits >= 8, median + 2 * (truth - median), truth)
        return median, lower, upper, truth, horizon, visits, levels

    cal = MondrianCalibration.fit(*cases(9000))
    assert cal.visits == (1.0, 2.0, 8.0, math.inf)  # no cases at 4-7 nor 16+: pooled with their neighbours
    median, lower, upper, truth, horizon, visits, levels = cases(30000)
    lo, hi = cal.apply(median, lower, upper, horizon, visits)
    pooled_lo, pooled_hi = ConformalCalibration.fit(median, lower, upper, truth, horizon, levels).apply(
        median, lower, upper, horizon)
    long = visits >= 8
    inside = lambda a, b: ((a[1] <= truth) & (truth <= b[1]))  # noqa: E731  the 90% band
    assert abs(inside(lo, hi)[long].mean() - 0.9) < 0.02 and abs(inside(lo, hi)[~long].mean() - 0.9) < 0.02
    assert inside(pooled_lo, pooled_hi)[long].mean() < 0.8


def test_mondrian_calibration_round_trips_and_reads_a_single_calibration():
    rng = np.random.default_rng(7)
    median, lower, upper, truth, horizon, levels = _forecasts(600, rng, np.ones(3))
    cal = MondrianCalibration.fit(median, lower, upper, truth, horizon, rng.choice([1, 5], 600), levels)
    back = MondrianCalibration.from_dict(json.loads(json.dumps(cal.to_dict(), allow_nan=False)))
    assert back == cal and cal.visits == (1.0, 4.0, math.inf)  # the empty 2-3 merged into the group before
    single = ConformalCalibration.fit(median, lower, upper, truth, horizon, levels)
    old = MondrianCalibration.from_dict(single.to_dict())  # a model saved before history groups
    assert old.groups == (single,) and old.visits == (1.0, math.inf)
    with pytest.raises(InputError, match=r"^MondrianCalibration: keys"):
        MondrianCalibration.from_dict({**cal.to_dict(), "extra": 1})
    with pytest.raises(InputError, match=r"^MondrianCalibration: groups: expected 2"):
        MondrianCalibration(visits=(1, 2, math.inf), groups=cal.groups[:1])


def test_pooling_and_groups_at_the_edges():
    assert pooled_edges(np.array([0.1] * 40 + [0.7] * 5 + [1.5] * 40), (0, 0.5, 1, 2), 30) == (0.0, 1.0, 2.0)
    assert pooled_edges(np.array([0.1] * 5 + [1.5] * 40), (0, 0.5, 1, 2), 30) == (0.0, 2.0)  # the first into the next
    np.testing.assert_array_equal(history_groups([0, 1, 3, 4, 100], (1, 4, math.inf)), [0, 0, 0, 1, 1])


# --------------------------------------------------------------------------- splits

def test_holdout_last_k_ignores_storage_order_and_missed_visits():
    times = np.array([[0.0, 2.0, 1.0, 3.0, NAN],
                      [0.0, 1.0, NAN, NAN, NAN],
                      [0.0, 0.5, 1.0, 1.5, 2.0]])
    observed = np.isfinite(times)
    observed[2, 4] = False                            # planned but missed
    history, target = holdout_last(times, observed, k=1)
    np.testing.assert_array_equal(target, [[0, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 0]])
    np.testing.assert_array_equal(history, observed & ~target)
    history, target = holdout_last(times, observed, k=2)
    np.testing.assert_array_equal(target, [[0, 1, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 1, 1, 0]])
    np.testing.assert_array_equal(history[1], [1, 1, 0, 0, 0])   # two visits: all history, no target


def test_holdout_last_min_horizon():
    times = np.array([[0.0, 0.5, 1.0, 1.2, 2.6, NAN],
                      [0.0, 0.4, 0.8, NAN, NAN, NAN]])
    history, target = holdout_last(times, k=None, min_horizon=1.5)
    # Subject 0: the latest visit with one >= 1.5 y later is t = 1.0 (2.6 - 1.0 = 1.6); 1.2 is
    # neither. Subject 1: no pair 1.5 y apart.
    np.testing.assert_array_equal(history, [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(target, [[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]])
    with pytest.raises(InputError, match=r"^holdout_last: k: give exactly one of k and min_horizon"):
        holdout_last(times, k=1, min_horizon=1.0)


def test_holdout_arrays_and_horizon():
    times = np.array([[0.0, 1.0, 2.5]])
    values = np.arange(6.0).reshape(1, 3, 2)
    history, target = holdout_last(times, k=1)
    h_t, h_v, at, truth = holdout_arrays(times, values, history, target)
    np.testing.assert_array_equal(h_t, [[0.0, 1.0, NAN]])
    assert np.isnan(h_v[0, 2]).all() and np.isnan(truth[0, :2]).all()
    np.testing.assert_array_equal(truth[0, 2], [4.0, 5.0])
    np.testing.assert_allclose(horizon_from_history(h_t, at), [[NAN, NAN, 1.5]])


def test_holdout_subjects_is_deterministic_and_order_free():
    ids = [f"sub-{i:03d}" for i in range(50)]
    held = holdout_subjects(ids, 0.2, seed=7)
    assert held.sum() == 10
    np.testing.assert_array_equal(held, holdout_subjects(ids, 0.2, seed=7))
    reversed_held = holdout_subjects(ids[::-1], 0.2, seed=7)[::-1]
    np.testing.assert_array_equal(held, reversed_held)
    assert not np.array_equal(held, holdout_subjects(ids, 0.2, seed=8))
    with pytest.raises(InputError, match=r"^holdout_subjects: subject_ids: subject ids must be unique"):
        holdout_subjects(["a", "a"], 0.5)


def test_chance_outside_matches_simulated_estimates():
    # estimates N(0.9, 0.03): the share outside 85-95% is the formula's, and a wider window or a
    # smaller error makes it smaller
    rng = np.random.default_rng(0)
    draws = rng.normal(0.9, 0.03, 200_000)
    share = float(((draws < 0.85) | (draws > 0.95)).mean())
    assert chance_outside(0.9, 0.03, 0.85, 0.95) == pytest.approx(share, abs=0.003)
    assert chance_outside(0.9, 0.03, 0.85, 0.95) == pytest.approx(2 * stats.norm.cdf(-0.05 / 0.03))
    base = chance_outside(0.9, 0.03, 0.85, 0.95)
    assert chance_outside(0.9, 0.01, 0.85, 0.95) < base and chance_outside(0.9, 0.03, 0.8, 1.0) < base
    assert chance_outside(0.9, 0.0, 0.85, 0.95) == 0.0 and chance_outside(0.97, 0.0, 0.85, 0.95) == 1.0
    with pytest.raises(InputError, match="se"):
        chance_outside(0.9, float("nan"), 0.85, 0.95)
