"""A Bayes-optimal forecast of the atrophy simulator's cognitive score from its history: a skyline for the twin.

It knows how the data were made. Each subject's onset, rate and drug response are drawn
from the simulator's own priors given its covariates (`twin.data.atrophy.AtrophyConfig`); the
exact course under the subject's own schedule gives the noise-free score 30 - 25 s^1.5 at
every visit; each draw is weighted by the likelihood of the history's scores under the
simulator's measurement model (N(0, 1) points, rounded, clipped to [0, 30]); the forecast is
the weighted median (the point that minimises the expected absolute error). No model that
reads the same score history can beat it on average; the twin also reads the volumes, which
carry the same disease stage, so it can (it does on some seeds), and the gap between them is a
lower bound on what the population model leaves on the table. Only the score has such a closed
form: the volumes depend on each subject's rendered anatomy.

For the volumes, `level_oracle` gives a bound instead: it is handed each subject's noise-free
course at every visit and only has to place it, from the history's measurements (volume x (1 +
1.5% noise)). It knows more than any forecaster can, so no method's error falls below its own,
and the part of a method's error it shares is the noise in the history, not the model.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit
from scipy.stats import norm

SCORE = "cognitive_score"


def score_oracle(ds, history: np.ndarray, at: np.ndarray, *, particles: int = 3000, seed: int = 0) -> np.ndarray:
    """Posterior-median noise-free scores (S, R) at `at` (S, R) years since baseline (NaN = none),
    each subject conditioned on the scores of its `history` (S, V) visits of `ds`."""
    from twin.data import atrophy, treatment

    cfg = atrophy.AtrophyConfig()
    rng = np.random.default_rng(seed)
    b = [str(v) for v in ds["biomarker"].values].index(SCORE)
    covariate = [str(c) for c in ds["covariate"].values]
    out = np.full(at.shape, np.nan)
    for i in range(ds.sizes["subject"]):
        x = dict(zip(covariate, ds["covariates"].values[i]))
        age, female, apoe4 = x["age"], x["sex"], x["apoe4"]
        events = [(float(t), str(a), float(d)) for t, a, d in zip(
            ds["event_time"].values[i], ds["event_agent"].values[i], ds["event_dose"].values[i]) if np.isfinite(t)]
        seen = history[i] & np.isfinite(ds["biomarkers"].values[i, :, b])
        t_hist, y_hist = ds["time"].values[i][seen], ds["biomarkers"].values[i, seen, b]
        t = np.concatenate([t_hist, at[i][np.isfinite(at[i])]])

        onset = (cfg.onset[0] + cfg.onset[1] * rng.normal(size=particles) - cfg.apoe4_onset_shift * apoe4
                 - cfg.female_onset_shift * female)
        rate = (cfg.rate * np.exp(cfg.rate_log_sd * rng.normal(size=particles)) * cfg.apoe4_rate_factor**apoe4
                * cfg.female_rate_factor**female)
        emax = rng.uniform(*cfg.emax, size=particles)
        ec50 = cfg.ec50 * np.exp(cfg.ec50_log_sd * rng.normal(size=particles))
        half_life = cfg.half_life * np.exp(cfg.half_life_log_sd * rng.normal(size=particles))
        exposure = np.zeros((particles, t.size))
        if events:
            for n in range(particles):
                pk = treatment.OneCompartment.from_half_life(half_life[n], cfg.pk_volume)
                exposure[n] = atrophy.exposure(t, events, atrophy.Response(pk, emax[n], ec50[n]))
        s = expit(rate[:, None] * (age + t[None] - onset[:, None]) - rate[:, None] * exposure)
        score = atrophy.cognitive_score(s, cfg.score_drop, cfg.score_power)

        # rounded and clipped: an observation o is N(score, 1) falling in [o - 1/2, o + 1/2) (open-ended at 0 and 30)
        high = np.where(y_hist >= 30, np.inf, y_hist + 0.5)
        low = np.where(y_hist <= 0, -np.inf, y_hist - 0.5)
        mu = score[:, :t_hist.size]
        log_w = np.log(np.clip(norm.cdf(high - mu) - norm.cdf(low - mu), 1e-300, None)).sum(1)
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
        for j, r in enumerate(np.flatnonzero(np.isfinite(at[i]))):
            order = np.argsort(score[:, t_hist.size + j])
            median = min(int(np.searchsorted(np.cumsum(w[order]), 0.5)), particles - 1)
            out[i, r] = score[order[median], t_hist.size + j]
    return out


def level_oracle(truth_history: np.ndarray, measured_history: np.ndarray, truth_at: np.ndarray) -> np.ndarray:
    """Forecasts (S, R, B) that know the noise-free course and estimate only its level.

    truth_history, measured_history (S, V, B): noise-free and measured values at the history's
    visits (NaN elsewhere); truth_at (S, R, B): the noise-free values asked for. Measurements are
    multiplicative (value x (1 + noise)), so the level is the geometric mean of measured / true.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        log_ratio = np.log(measured_history / truth_history)
    seen = np.isfinite(log_ratio)
    level = np.where(seen, log_ratio, 0.0).sum(1) / np.maximum(seen.sum(1), 1)
    return np.where(seen.any(1)[:, None, :], truth_at * np.exp(level)[:, None, :], np.nan)
