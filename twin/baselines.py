"""Honest baselines for biomarker trajectories: what the Twin has to beat.

Four predictors of a biomarker at query times from each subject's own history, in numpy:

    copy_last     last observation carried forward (the first one before it)
    interpolate   linear between the neighbouring measurements, constant outside (the fill baseline)
    linear        per-subject least-squares line, extrapolated (the forecast baseline)
    MixedEffects  linear mixed-effects disease course, fitted by (RE)ML on training subjects,
                  predicting from each subject's BLUP posterior with Gaussian bands

Shapes throughout: history `times` (S, V), years, NaN-padded; `values` (S, V, B), NaN = not
measured; queries `at` (S, Q), NaN-padded; predictions (S, Q, B), NaN where the query is NaN.
A measurement is a finite value at a finite time. Each biomarker is handled on its own.

Fallback: a subject who never had biomarker b measured is predicted, by `copy_last`,
`interpolate` and `linear`, as the population mean of b, i.e. the mean of every measurement of b
in `values` (the histories handed in, so targets are never peeked at); if nobody has b, NaN.
`MixedEffects` needs no such rule: with no data the BLUP posterior is the prior, so the
prediction is the population mean x'beta with the population spread as its band.

`cohort_arrays` at the end is the one part that reads a cohort Dataset; the maths takes arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, special

from twin.errors import InputError

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _history(times, values, at, source: str):
    """Check shapes; return float arrays and the (S, V, B) mask of measurements."""
    times = np.asarray(times, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if times.ndim != 2:
        raise InputError(f"expected (subject, visit) times, got shape {times.shape}", source=source, field="times")
    if values.ndim != 3 or values.shape[:2] != times.shape:
        raise InputError(f"expected (subject, visit, biomarker) values with (S, V) = {times.shape}, got shape "
                         f"{values.shape} (one biomarker: pass values[..., None])", source=source, field="values")
    if at is not None:
        at = np.asarray(at, dtype=np.float64)
        if at.ndim != 2 or at.shape[0] != times.shape[0]:
            raise InputError(f"expected (subject, query) times with {times.shape[0]} subjects, got shape {at.shape}",
                             source=source, field="at")
    measured = np.isfinite(values) & np.isfinite(times)[..., None]
    return times, values, at, measured


def _population_mean(values: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """(B,) mean of every measurement of each biomarker; NaN for a biomarker nobody has."""
    n = measured.sum(axis=(0, 1))
    total = np.where(measured, values, 0.0).sum(axis=(0, 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def _neighbours(times, values, measured, at):
    """The measurements either side of each query, (S, Q, B) each.

    prev: the latest measurement at or before the query (ties: the later visit);
    next: the earliest at or after it (ties: the earlier visit). Missing ones have has_* False.
    """
    t = times[:, None, :, None]                              # (S, 1, V, 1)
    q = at[:, :, None, None]                                 # (S, Q, 1, 1)
    ok = measured[:, None, :, :]                             # (S, 1, V, B)
    before = ok & (t <= q)
    after = ok & (t >= q)
    n_visits = times.shape[1]
    # Reverse the visit axis so argmax (first hit) picks the later of equal times.
    key_prev = np.where(before, t, -np.inf)[:, :, ::-1]
    i_prev = n_visits - 1 - np.argmax(key_prev, axis=2)      # (S, Q, B)
    i_next = np.argmin(np.where(after, t, np.inf), axis=2)
    has_prev, has_next = before.any(axis=2), after.any(axis=2)

    def take(a, i):  # a (S, V, B) or (S, V, 1) at visit index i (S, Q, B)
        return np.take_along_axis(np.broadcast_to(a, values.shape), i, axis=1)

    t3 = times[..., None]
    return (take(t3, i_prev), take(values, i_prev), has_prev,
            take(t3, i_next), take(values, i_next), has_next)


def _finish(pred, values, measured, at):
    """Population-mean fallback for never-measured biomarkers; NaN for NaN queries."""
    never = ~measured.any(axis=1)                            # (S, B)
    pred = np.where(never[:, None, :], _population_mean(values, measured), pred)
    return np.where(np.isfinite(at)[..., None], pred, np.nan)


def copy_last(times, values, at) -> np.ndarray:
    """Last observation carried forward: (S, V), (S, V, B), (S, Q) -> (S, Q, B).

    The latest measurement of each biomarker at or before the query time; before the first
    measurement, the first one. Between visits this is last-observation-carried-forward.
    """
    times, values, at, measured = _history(times, values, at, "copy_last")
    _, y_prev, has_prev, _, y_next, _ = _neighbours(times, values, measured, at)
    # With nothing at or before the query, every measurement is after it: next is the first.
    return _finish(np.where(has_prev, y_prev, y_next), values, measured, at)


def interpolate(times, values, at) -> np.ndarray:
    """Linear interpolation between neighbouring measurements: (S, V), (S, V, B), (S, Q) -> (S, Q, B).

    Constant extrapolation outside the measured range (the nearest end value): the fill baseline.
    """
    times, values, at, measured = _history(times, values, at, "interpolate")
    t_prev, y_prev, has_prev, t_next, y_next, has_next = _neighbours(times, values, measured, at)
    gap = t_next - t_prev
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(has_prev & has_next & (gap > 0), (at[..., None] - t_prev) / gap, 0.0)
    between = y_prev + w * (np.where(has_next, y_next, 0.0) - y_prev)
    pred = np.where(has_prev & has_next, between, np.where(has_prev, y_prev, y_next))
    return _finish(pred, values, measured, at)


def linear(times, values, at) -> np.ndarray:
    """Per-subject least-squares line, evaluated (extrapolated) at the queries: -> (S, Q, B).

    y = a + c t fitted to each subject's measurements of each biomarker; with one measurement,
    or all at one time, the line is flat at their mean.
    """
    times, values, at, measured = _history(times, values, at, "linear")
    w = measured.astype(np.float64)
    t = np.where(measured, times[..., None], 0.0)
    y = np.where(measured, values, 0.0)
    n = w.sum(axis=1)                                        # (S, B)
    with np.errstate(invalid="ignore", divide="ignore"):
        t_bar = t.sum(axis=1) / n
        y_bar = y.sum(axis=1) / n
        dt = np.where(measured, times[..., None] - t_bar[:, None, :], 0.0)
        s_tt = (dt * dt).sum(axis=1)
        s_ty = (dt * np.where(measured, values - y_bar[:, None, :], 0.0)).sum(axis=1)
        # Relative threshold: times equal up to rounding give no slope, not a huge one.
        slope = np.where(s_tt > 1e-12 * np.maximum(1.0, (t * t).sum(axis=1)), s_ty / s_tt, 0.0)
    pred = y_bar[:, None, :] + slope[:, None, :] * (at[..., None] - t_bar[:, None, :])
    return _finish(pred, values, measured, at)


# ---------------------------------------------------------------------------------------------
# Linear mixed-effects model
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class MixedEffects:
    """Linear mixed-effects disease course, one independent model per biomarker.

        y_ij = x_ij' beta + z_ij' b_i + eps_ij,   b_i ~ N(0, G),   eps_ij ~ N(0, sigma2)
        x_ij = (1, t_ij, x_i1, ..., x_iK),        z_ij = (1, t_ij)

    so beta = (intercept, slope, covariate effects on the intercept) and b_i = (b0_i, b1_i) is the
    subject's random intercept and slope. On an age clock, baseline age is such a covariate
    (`cohort_arrays(ds, baseline_time=True)`).

    beta (B, 2 + K); G (B, 2, 2); sigma2 (B,); covariate_mean (K,) imputes missing covariates;
    method "ml" | "reml"; loglik (B,) the maximised (restricted) log-likelihood; beta_cov
    (B, 2 + K, 2 + K) the GLS covariance of beta at the fitted variances (for standard errors).
    Construct with known parameters directly, or fit with `MixedEffects.fit`.
    """

    beta: np.ndarray
    G: np.ndarray
    sigma2: np.ndarray
    covariate_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    method: str = "ml"
    loglik: np.ndarray | None = None
    beta_cov: np.ndarray | None = None

    def __post_init__(self):
        src = "MixedEffects"
        beta = np.atleast_2d(np.asarray(self.beta, dtype=np.float64))
        n_bio, p = beta.shape
        G = np.asarray(self.G, dtype=np.float64)
        if G.shape == (2, 2):
            G = G[None]
        if G.shape != (n_bio, 2, 2):
            raise InputError(f"expected G of shape ({n_bio}, 2, 2), got {np.shape(self.G)}", source=src, field="G")
        sigma2 = np.asarray(self.sigma2, dtype=np.float64).reshape(-1)
        if sigma2.shape != (n_bio,) or not np.all(sigma2 > 0):
            raise InputError(f"expected {n_bio} positive residual variances, got {self.sigma2!r}",
                             source=src, field="sigma2")
        mean = np.asarray(self.covariate_mean, dtype=np.float64).reshape(-1)
        if p < 2 or mean.shape != (p - 2,):
            raise InputError(f"beta has {p} columns, so expected {p - 2} covariate means, got {mean.shape[0]}",
                             source=src, field="covariate_mean")
        if self.method not in ("ml", "reml"):
            raise InputError(f"expected 'ml' or 'reml', got {self.method!r}", source=src, field="method")
        for name, value in (("beta", beta), ("G", G), ("sigma2", sigma2), ("covariate_mean", mean)):
            object.__setattr__(self, name, value)

    @property
    def n_covariates(self) -> int:
        return self.beta.shape[1] - 2

    @classmethod
    def fit(cls, times, values, covariates=None, *, method: str = "ml") -> MixedEffects:
        """Fit by maximum (or restricted maximum) likelihood on training subjects.

        times (S, V), values (S, V, B), covariates (S, K) or None; a missing covariate is imputed
        with its mean over subjects. beta and sigma2 are profiled out of the marginal likelihood
        (they have closed forms given G / sigma2), leaving three parameters per biomarker, the
        Cholesky factor of G / sigma2, optimised with L-BFGS-B (diagonal >= 0, so a zero random
        slope variance is reachable). Each likelihood evaluation is vectorised over subjects
        through their 2 x 2 sufficient statistics. Time is centred internally and the estimates
        mapped back, so the fit does not depend on the clock's origin (time since baseline or age).
        """
        if method not in ("ml", "reml"):
            raise InputError(f"expected 'ml' or 'reml', got {method!r}", source="MixedEffects.fit", field="method")
        times, values, _, measured = _history(times, values, None, "MixedEffects.fit")
        x, mean = _covariates(covariates, times.shape[0], None, "MixedEffects.fit")
        n_bio = values.shape[2]
        p = 2 + x.shape[1]
        out = {k: [] for k in ("beta", "G", "sigma2", "loglik", "beta_cov")}
        for b in range(n_bio):
            # Fit on time centred at the mean measurement time, then map back: the model is
            # invariant to the shift, and an intercept at t = 0 far from the data (an age clock)
            # would otherwise leave the variance optimisation badly conditioned.
            c = float(times[measured[..., b]].mean()) if measured[..., b].any() else 0.0
            stats = _sufficient_statistics(times - c, values[..., b], measured[..., b], x)
            if stats["n"].sum() <= p or np.linalg.matrix_rank(stats["XtX_sum"]) < p:
                raise InputError(f"biomarker {b}: {int(stats['n'].sum())} measurements cannot identify the {p} "
                                 f"fixed effects (intercept, slope, {p - 2} covariate(s)); need more data, "
                                 f"measurements at more than one time, and non-constant covariates",
                                 source="MixedEffects.fit", field="values")
            reml = method == "reml"
            # Two starts (large and small relative variances) guard against a flat start region.
            best = None
            for start in ([1.0, 0.0, 1.0], [0.1, 0.0, 0.1]):
                res = optimize.minimize(lambda th: _deviance(th, stats, reml)[0], np.asarray(start),
                                        method="L-BFGS-B", bounds=[(0.0, None), (None, None), (0.0, None)])
                if best is None or res.fun < best.fun:
                    best = res
            dev, beta, sigma2, A = _deviance(best.x, stats, reml)
            lam = _cholesky(best.x)
            # Back from centred time: b0 + b1 (t - c) = (b0 - c b1) + b1 t, for fixed and random effects.
            shift = np.eye(p)
            shift[0, 1] = -c
            out["beta"].append(shift @ beta)
            out["G"].append(shift[:2, :2] @ (sigma2 * lam @ lam.T) @ shift[:2, :2].T)
            out["sigma2"].append(sigma2)
            out["loglik"].append(-0.5 * dev)
            out["beta_cov"].append(shift @ (sigma2 * np.linalg.inv(A)) @ shift.T)
        return cls(beta=np.array(out["beta"]), G=np.array(out["G"]), sigma2=np.array(out["sigma2"]),
                   covariate_mean=mean, method=method, loglik=np.array(out["loglik"]),
                   beta_cov=np.array(out["beta_cov"]))

    def predictive(self, times, values, at, covariates=None) -> tuple[np.ndarray, np.ndarray]:
        """Gaussian predictive mean and sd of a new measurement at each query: -> (S, Q, B) twice.

        The random effects' posterior given the subject's own history (times (S, V), values
        (S, V, B)), with r_i = y_i - X_i beta and Z_i'Z_i summed over its measurements, is

            Cov(b_i | y_i) = sigma2 G (sigma2 I + Z_i'Z_i G)^-1,   E(b_i | y_i) = Cov Z_i' r_i / sigma2

        (the BLUP; this form needs no inverse of G, so a singular G is fine). A new measurement
        at t has mean x' beta + z' E(b_i | y_i) and variance z' Cov z + sigma2.
        """
        times, values, at, measured = _history(times, values, at, "MixedEffects.predict")
        if values.shape[2] != self.beta.shape[0]:
            raise InputError(f"model has {self.beta.shape[0]} biomarker(s), values have {values.shape[2]}",
                             source="MixedEffects.predict", field="values")
        x, _ = _covariates(covariates, times.shape[0], self.covariate_mean, "MixedEffects.predict")
        n_subjects, n_bio = times.shape[0], values.shape[2]
        mean = np.empty((n_subjects, at.shape[1], n_bio))
        sd = np.empty_like(mean)
        a = np.nan_to_num(at)
        for b in range(n_bio):
            stats = _sufficient_statistics(times, values[..., b], measured[..., b], x)
            beta, G, s2 = self.beta[b], self.G[b], self.sigma2[b]
            r_z = stats["Zty"] - stats["ZtX"] @ beta                         # Z_i' r_i (S, 2)
            inner = s2 * np.eye(2) + stats["ZtZ"] @ G                        # (S, 2, 2)
            cov = s2 * np.linalg.solve(inner.transpose(0, 2, 1), G.T).transpose(0, 2, 1)  # G inner^-1 s2
            b_hat = np.einsum("sij,sj->si", cov, r_z) / s2
            fixed = beta[0] + beta[1] * a + (x @ beta[2:])[:, None]           # (S, Q)
            mean[..., b] = fixed + b_hat[:, :1] + b_hat[:, 1:] * a
            var = cov[:, None, 0, 0] + 2 * cov[:, None, 0, 1] * a + cov[:, None, 1, 1] * a * a + s2
            sd[..., b] = np.sqrt(np.maximum(var, s2))
        nan = ~np.isfinite(at)[..., None]
        return np.where(nan, np.nan, mean), np.where(nan, np.nan, sd)

    def predict(self, times, values, at, covariates=None, quantiles: Sequence[float] = QUANTILES):
        """Predictive mean (S, Q, B) and quantiles (len(quantiles), S, Q, B) at the queries.

        The quantiles are those of the Gaussian predictive (`predictive`), which includes the
        measurement noise sigma2: bands are for a new observation, not for the latent curve.
        """
        levels = np.asarray(quantiles, dtype=np.float64).reshape(-1)
        if not np.all((levels > 0) & (levels < 1)):
            raise InputError(f"quantile levels must lie in (0, 1), got {tuple(quantiles)}",
                             source="MixedEffects.predict", field="quantiles")
        mean, sd = self.predictive(times, values, at, covariates)
        z = special.ndtri(levels)[:, None, None, None]
        return mean, mean[None] + z * sd[None]


def _cholesky(theta: np.ndarray) -> np.ndarray:
    """Lower-triangular relative factor Lambda, G / sigma2 = Lambda Lambda'."""
    return np.array([[theta[0], 0.0], [theta[1], theta[2]]])


def _covariates(covariates, n_subjects: int, mean, source: str):
    """(S, K) covariates with missing entries imputed by `mean` (default: their own column means)."""
    k_expected = None if mean is None else mean.shape[0]
    if covariates is None:
        if k_expected:
            raise InputError(f"the model was fitted with {k_expected} covariate(s); pass covariates (S, {k_expected})",
                             source=source, field="covariates")
        return np.zeros((n_subjects, 0)), np.zeros(0)
    x = np.asarray(covariates, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] != n_subjects or (k_expected is not None and x.shape[1] != k_expected):
        want = f"({n_subjects}, {'K' if k_expected is None else k_expected})"
        raise InputError(f"expected covariates of shape {want}, got {np.shape(covariates)}", source=source,
                         field="covariates")
    if mean is None:
        finite = np.isfinite(x)
        if not finite.any(axis=0).all():
            raise InputError("a covariate is missing for every subject", source=source, field="covariates")
        mean = np.where(finite, x, 0.0).sum(axis=0) / finite.sum(axis=0)
    return np.where(np.isfinite(x), x, mean), mean


def _sufficient_statistics(times, y, measured, x) -> dict:
    """Per-subject sums over measurements: Z'Z (S,2,2), Z'X (S,2,p), X'X (S,p,p), Z'y, X'y, y'y, n."""
    w = measured.astype(np.float64)                          # (S, V)
    t = np.where(measured, times, 0.0)
    y = np.where(measured, y, 0.0)
    Z = np.stack([w, t], axis=-1)                            # (S, V, 2), zero rows where unmeasured
    X = np.concatenate([Z, w[..., None] * x[:, None, :]], axis=-1)
    stats = {"ZtZ": np.einsum("svi,svj->sij", Z, Z), "ZtX": np.einsum("svi,svj->sij", Z, X),
            "XtX": np.einsum("svi,svj->sij", X, X), "Zty": np.einsum("svi,sv->si", Z, y),
            "Xty": np.einsum("svi,sv->si", X, y), "yty": (y * y).sum(axis=1), "n": w.sum(axis=1)}
    # Cohort totals, used by every likelihood evaluation.
    stats.update(XtX_sum=stats["XtX"].sum(0), Xty_sum=stats["Xty"].sum(0), yty_sum=stats["yty"].sum())
    return stats


def _deviance(theta, stats, reml: bool):
    """-2 log-likelihood with beta and sigma2 profiled out, given Lambda (G / sigma2 = Lambda Lambda').

    With M_i = I + Lambda' Z_i'Z_i Lambda, V_i = sigma2 (I + Z_i Lambda Lambda' Z_i'), Woodbury gives
    sigma2 X'V^-1 X = sum X_i'X_i - P_i' M_i^-1 P_i with P_i = Lambda' Z_i'X_i, log|V_i| =
    n_i log sigma2 + log|M_i|; beta is GLS, sigma2 = RSS / n (ML) or RSS / (n - p) (REML).
    Returns (deviance, beta, sigma2, A = sigma2 X'V^-1 X).
    """
    lam = _cholesky(theta)
    M = np.eye(2) + lam.T @ stats["ZtZ"] @ lam               # (S, 2, 2)
    det = M[:, 0, 0] * M[:, 1, 1] - M[:, 0, 1] * M[:, 1, 0]
    M_inv = np.empty_like(M)                                 # 2 x 2 inverses in closed form
    M_inv[:, 0, 0], M_inv[:, 1, 1] = M[:, 1, 1] / det, M[:, 0, 0] / det
    M_inv[:, 0, 1], M_inv[:, 1, 0] = -M[:, 0, 1] / det, -M[:, 1, 0] / det
    P = lam.T @ stats["ZtX"]                                 # (S, 2, p)
    Q = (stats["Zty"] @ lam)[..., None]                      # (S, 2, 1) = Lambda' Z'y
    MiP = M_inv @ P
    A = stats["XtX_sum"] - (P.transpose(0, 2, 1) @ MiP).sum(0)
    c = stats["Xty_sum"] - (MiP.transpose(0, 2, 1) @ Q).sum(0)[:, 0]
    beta = np.linalg.solve(A, c)
    u = Q - P @ beta[:, None]                                # Lambda' Z'(y - X beta), (S, 2, 1)
    rss = (stats["yty_sum"] - 2 * beta @ stats["Xty_sum"] + beta @ stats["XtX_sum"] @ beta
           - (u.transpose(0, 2, 1) @ M_inv @ u).sum())
    n, p = stats["n"].sum(), beta.shape[0]
    dof = n - p if reml else n
    rss = max(rss, 1e-300 * dof)  # rounding can take an exact fit a hair below zero
    sigma2 = rss / dof
    dev = np.log(det).sum() + dof * (1.0 + np.log(2 * np.pi * sigma2))
    if reml:
        dev += np.linalg.slogdet(A)[1]
    return dev, beta, sigma2, A


# ---------------------------------------------------------------------------------------------
# Cohort adapter: the only part that reads a cohort Dataset
# ---------------------------------------------------------------------------------------------

def cohort_arrays(ds, covariates: Sequence[str] = (), *, baseline_time: bool = False):
    """(times (S, V), values (S, V, B), x (S, K) or None) from a cohort Dataset.

    Times of visits that did not take place (`observed` False) become NaN. `covariates` names
    entries of the cohort's `covariate` dim; `baseline_time=True` appends the subject's baseline
    on the cohort's clock (age at baseline for an age clock) as the last covariate, so a
    `MixedEffects` fit can let the intercept depend on it.
    """
    if "biomarkers" not in ds:
        raise InputError("the cohort has no biomarkers", source="cohort_arrays", field="biomarkers")
    times = np.where(ds["observed"].values, ds["time"].values, np.nan)
    values = np.asarray(ds["biomarkers"].transpose("subject", "visit", "biomarker").values, dtype=np.float64)
    columns = []
    if covariates:
        have = [str(c) for c in ds["covariate"].values] if "covariates" in ds else []
        missing = [c for c in covariates if c not in have]
        if missing:
            raise InputError(f"no covariate(s) {missing}; the cohort has {have}", source="cohort_arrays",
                             field="covariates")
        columns.append(ds["covariates"].sel(covariate=list(covariates)).transpose("subject", "covariate").values)
    if baseline_time:
        columns.append(ds["baseline_time"].values[:, None])
    x = np.concatenate(columns, axis=1).astype(np.float64) if columns else None
    return times, values, x
