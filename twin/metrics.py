"""Forecast metrics, split-conformal band calibration, and the held-out splits they are scored on.

Everything here takes numpy arrays of any matching shape (predictions and truth elementwise; a
NaN truth is a visit or biomarker with nothing to score and is ignored). The pieces:

    horizon bins      half-open [lo, hi) bins of years ahead; `horizon` = query - last history visit
    point error       mae_by_horizon
    bands             coverage, coverage_by_horizon, clustered_proportion (its error by subject),
                      chance_outside (what a window verdict is worth), interval_score
    distributions     crps_from_samples, crps_gaussian, crps_from_quantiles (elementwise)
    calibration       conformal_scores, conformal_scale, ConformalCalibration (per horizon bin)
    splits            holdout_last (visits), holdout_subjects (subjects), holdout_arrays

Horizon arrays broadcast against their data by leading axes: a horizon (S, Q) goes with data
(S, Q, B); NumPy's trailing-axis rule would silently pair the wrong axes when Q == B.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special

from twin.errors import InputError

HORIZON_EDGES = (0.0, 0.5, 1.0, 2.0, 3.0, math.inf)
HISTORY_EDGES = (1, 2, 4, 8, 16, math.inf)  # observed visits a forecast is conditioned on (doubling)
MIN_BIN_CASES = 30  # calibration cases per horizon bin; sparser bins are pooled with a neighbour
MIN_GROUP_CASES = 100  # ... per group of history sizes


# ---------------------------------------------------------------------------------------------
# Horizon bins
# ---------------------------------------------------------------------------------------------

def horizon_bins(horizon, edges: Sequence[float] = HORIZON_EDGES) -> tuple[tuple[str, ...], np.ndarray]:
    """Bin labels and each element's bin: (labels (N,), index with horizon's shape).

    Bins are [edges[i], edges[i+1]), labelled like "[0.5, 1)"; an element outside every bin
    (or NaN) has index -1.
    """
    edges = _edges(edges)
    h = np.asarray(horizon, dtype=np.float64)
    index = np.searchsorted(edges, h, side="right") - 1
    index = np.where(np.isfinite(h) & (index >= 0) & (index < len(edges) - 1), index, -1)
    return bin_labels(edges), index


def bin_labels(edges: Sequence[float] = HORIZON_EDGES) -> tuple[str, ...]:
    """The labels of the bins [edges[i], edges[i+1]): "[0, 0.5)", ..., "[3, inf)"."""
    edges = _edges(edges)
    return tuple(f"[{lo:g}, {hi:g})" for lo, hi in zip(edges[:-1], edges[1:]))


def horizon_from_history(times, at) -> np.ndarray:
    """Years from each subject's last history visit to each query: (S, V), (S, Q) -> (S, Q).

    Negative for a query before the last visit (a fill); NaN for a subject with no history.
    """
    times = np.asarray(times, dtype=np.float64)
    at = np.asarray(at, dtype=np.float64)
    last = np.max(np.where(np.isfinite(times), times, -np.inf), axis=1)
    return at - np.where(np.isfinite(last), last, np.nan)[:, None]


def by_horizon(score, horizon, edges: Sequence[float] = HORIZON_EDGES, *, valid=None) -> dict[str, tuple[float, int]]:
    """Mean of an elementwise score in each horizon bin: label -> (mean, count).

    `valid` (default: score is finite) picks the elements that count; a non-finite score among
    them makes its bin's mean NaN rather than being dropped. An empty bin is (nan, 0).
    """
    score = np.asarray(score, dtype=np.float64)
    valid = np.isfinite(score) if valid is None else np.broadcast_to(np.asarray(valid, dtype=bool), score.shape)
    labels, index = horizon_bins(_lead(horizon, score.shape, "horizon"), edges)
    out = {}
    for k, label in enumerate(labels):
        pick = valid & (index == k)
        n = int(pick.sum())
        out[label] = (float(score[pick].mean()) if n else math.nan, n)
    return out


# ---------------------------------------------------------------------------------------------
# Point error and bands
# ---------------------------------------------------------------------------------------------

def mae_by_horizon(pred, truth, horizon, edges: Sequence[float] = HORIZON_EDGES) -> dict[str, tuple[float, int]]:
    """Mean absolute error per horizon bin: label -> (mae, count). NaN truth is ignored.

    pred, truth (...) of one shape; horizon (...) or a leading part of it. A NaN prediction of a
    finite truth is an error, so it makes its bin's MAE NaN instead of vanishing.
    """
    pred, truth = _same(pred, truth, "pred", "truth")
    return by_horizon(np.abs(pred - truth), horizon, edges, valid=np.isfinite(truth))


def coverage(lower, upper, truth) -> float:
    """Fraction of finite truths with lower <= truth <= upper (NaN if there are none)."""
    inside = _inside(lower, upper, truth)
    finite = np.isfinite(inside)
    return float(inside[finite].mean()) if finite.any() else math.nan


def coverage_by_horizon(lower, upper, truth, horizon,
                        edges: Sequence[float] = HORIZON_EDGES) -> dict[str, tuple[float, int]]:
    """Coverage per horizon bin: label -> (fraction inside, count)."""
    return by_horizon(_inside(lower, upper, truth), horizon, edges)


def clustered_proportion(hit, seen) -> tuple[float, float, int]:
    """(p, standard error, subjects) of the proportion of hits among seen cases, counted by subject.

    hit, seen (S, ...) booleans, subjects along the first axis. A subject's cases are alike (its
    readings miss a band together when its course is off), so the error is the cluster-robust
    one of a ratio of sums, p = sum_i a_i / sum_i n_i over subjects i with a_i hits of n_i cases:

        se^2 = m / (m - 1) * sum_i (a_i - p n_i)^2 / (sum_i n_i)^2,   m subjects with a case

    (the linearised ratio estimator). It is the spread of p over new test subjects from the same
    answers; the randomness of the model and its calibration comes on top. NaN where there are no
    cases (se NaN also with one subject).
    """
    hit, seen = np.asarray(hit, dtype=bool), np.asarray(seen, dtype=bool)
    if hit.shape != seen.shape or hit.ndim == 0:
        raise InputError(f"hit {hit.shape} and seen {seen.shape} must have one shape with subjects first",
                         source="clustered_proportion", field="shape")
    a = (hit & seen).reshape(len(hit), -1).sum(1).astype(np.float64)
    n = seen.reshape(len(seen), -1).sum(1).astype(np.float64)
    a, n = a[n > 0], n[n > 0]
    m = len(n)
    if m == 0:
        return math.nan, math.nan, 0
    p = a.sum() / n.sum()
    se = math.sqrt(m / (m - 1) * np.sum((a - p * n) ** 2)) / n.sum() if m > 1 else math.nan
    return float(p), float(se), m


def chance_outside(p: float, se: float, lo: float, hi: float) -> float:
    """The chance that an estimate of a proportion whose true value is p, with standard error se,
    lands outside [lo, hi] (normal approximation):

        Phi((lo - p) / se) + 1 - Phi((hi - p) / se)

    What a verdict "coverage within 85-95%" is worth: a band holding exactly 90% fails it this
    often from the test cases alone (se from `clustered_proportion`). se 0 gives 0 or 1.
    """
    if not se >= 0:
        raise InputError(f"se must be a non-negative number, got {se}", source="chance_outside", field="se")
    if se == 0:
        return float(not lo <= p <= hi)
    return float(special.ndtr((lo - p) / se) + special.ndtr((p - hi) / se))


def interval_score(lower, upper, truth, level: float) -> np.ndarray:
    """Interval score of a central `level` band, elementwise (lower is better; NaN where truth is).

        IS = (u - l) + (2 / alpha) (l - y)_+ + (2 / alpha) (y - u)_+,   alpha = 1 - level

    (Gneiting & Raftery 2007): the width, plus a penalty for each miss scaled by how rare a miss
    should be.
    """
    if not 0 < level < 1:
        raise InputError(f"level must lie in (0, 1), got {level}", source="interval_score", field="level")
    lower, upper = _same(lower, upper, "lower", "upper")
    _, truth = _same(lower, truth, "lower", "truth")
    alpha = 1.0 - level
    return (upper - lower) + 2 / alpha * (np.maximum(lower - truth, 0) + np.maximum(truth - upper, 0))


def _inside(lower, upper, truth) -> np.ndarray:
    lower, upper = _same(lower, upper, "lower", "upper")
    _, truth = _same(lower, truth, "lower", "truth")
    return np.where(np.isfinite(truth), ((lower <= truth) & (truth <= upper)).astype(np.float64), np.nan)


# ---------------------------------------------------------------------------------------------
# CRPS
# ---------------------------------------------------------------------------------------------

def crps_from_samples(samples, truth, *, fair: bool = True) -> np.ndarray:
    """CRPS of an ensemble, energy form, elementwise: samples (K, ...), truth (...) -> (...).

        CRPS(F, y) = E|X - y| - 1/2 E|X - X'|,   X, X' ~ F independent

    with E|X - X'| estimated from the K members as sum_{k != l} |x_k - x_l| / (K (K - 1)) when
    `fair` (unbiased for the CRPS of the distribution the members are drawn from: a forecaster
    is not rewarded for a small ensemble), or / K^2 when not (the exact CRPS of the empirical
    distribution of the K members). Both equal |x - y| for a point mass. The pair sum takes
    O(K log K): for sorted x, sum_{k,l} |x_k - x_l| = 2 sum_k (2k - K + 1) x_(k), k from 0.
    NaN where the truth or any member is NaN.
    """
    x = np.asarray(samples, dtype=np.float64)
    y = np.asarray(truth, dtype=np.float64)
    if x.ndim < 1 or x.shape[1:] != y.shape:
        raise InputError(f"expected samples (K, *{y.shape}) for truth {y.shape}, got {x.shape}",
                         source="crps_from_samples", field="samples")
    n = x.shape[0]
    if n < (2 if fair else 1):
        raise InputError(f"need at least {2 if fair else 1} samples, got {n}", source="crps_from_samples",
                         field="samples")
    term1 = np.abs(x - y).mean(axis=0)
    xs = np.sort(x, axis=0)  # NaN sort last; they make the sum NaN, as they should
    weight = (2 * np.arange(n) - n + 1).reshape((n,) + (1,) * y.ndim)
    pair_sum = 2 * (weight * xs).sum(axis=0)
    term2 = pair_sum / (n * (n - 1) if fair else n * n)
    return term1 - 0.5 * term2


def crps_gaussian(mean, sd, truth) -> np.ndarray:
    """CRPS of N(mean, sd^2) at the truth, closed form, elementwise:

        CRPS = sd [z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi)],   z = (y - mean) / sd

    sd = 0 gives |y - mean| (a point mass).
    """
    mean = np.asarray(mean, dtype=np.float64)
    sd = np.asarray(sd, dtype=np.float64)
    y = np.asarray(truth, dtype=np.float64)
    if np.any(sd < 0):
        raise InputError("sd must be non-negative", source="crps_gaussian", field="sd")
    safe = np.where(sd > 0, sd, 1.0)
    z = (y - mean) / safe
    pdf = np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)
    value = safe * (z * (2 * special.ndtr(z) - 1) + 2 * pdf - 1 / np.sqrt(np.pi))
    return np.where(sd > 0, value, np.abs(y - mean))


def crps_from_quantiles(quantiles, levels: Sequence[float], truth) -> np.ndarray:
    """CRPS approximated from predictive quantiles, elementwise: (L, ...), (L,), (...) -> (...).

    CRPS(F, y) = 2 int_0^1 QS_tau(F^-1(tau), y) d tau, with the pinball (quantile) score
    QS_tau(q, y) = (1{y < q} - tau) (q - y). The integral is replaced by a midpoint rule over the
    given levels: level l stands for the cell between the midpoints to its neighbours, with 0 and
    1 as outer ends, so the weights sum to 1. With few levels (say 5) the tails beyond the
    outermost levels are represented only by those quantiles, and the result is an approximation
    best compared between forecasters scored on the same levels. It is exact for a point mass
    when the weighted mean level is 1/2 (symmetric levels).
    """
    q = np.asarray(quantiles, dtype=np.float64)
    tau = np.asarray(levels, dtype=np.float64).reshape(-1)
    y = np.asarray(truth, dtype=np.float64)
    if q.shape != (tau.shape[0], *y.shape):
        raise InputError(f"expected quantiles ({tau.shape[0]}, *{y.shape}), got {q.shape}",
                         source="crps_from_quantiles", field="quantiles")
    if not (np.all((tau > 0) & (tau < 1)) and np.all(np.diff(tau) > 0)):
        raise InputError(f"levels must increase within (0, 1), got {tuple(tau)}", source="crps_from_quantiles",
                         field="levels")
    cuts = np.concatenate([[0.0], (tau[1:] + tau[:-1]) / 2, [1.0]])
    w = np.diff(cuts).reshape((-1,) + (1,) * y.ndim)
    t = tau.reshape(w.shape)
    pinball = ((y < q).astype(np.float64) - t) * (q - y)
    return 2 * (w * pinball).sum(axis=0)


# ---------------------------------------------------------------------------------------------
# Split-conformal calibration of bands
# ---------------------------------------------------------------------------------------------

def conformal_scores(median, lower, upper, truth) -> np.ndarray:
    """Standardised nonconformity |y - median| / half-width, using the half of the band y lies on.

    The score is <= f exactly when y lies in the band widened by factor f about the median
    (median - f (median - lower), median + f (upper - median)), which is what makes the
    conformal quantile of the scores the right factor for asymmetric bands too. A zero
    half-width scores 0 if y is the median and inf otherwise; NaN truth gives NaN.
    """
    median, truth = _same(median, truth, "median", "truth")
    lower, upper = _same(lower, upper, "lower", "upper")
    _same(median, lower, "median", "lower")
    above = truth >= median
    half = np.where(above, upper - median, median - lower)
    dist = np.abs(truth - median)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(half > 0, dist / np.where(half > 0, half, 1.0), np.where(dist == 0, 0.0, np.inf))
    return np.where(np.isfinite(truth), score, np.nan)


def conformal_scale(scores, level: float) -> float:
    """The split-conformal band factor for `level` coverage from calibration scores.

    The ceil((n + 1) level)-th smallest of the n finite scores: on a fresh case exchangeable with
    the calibration set, the band scaled by it covers with probability >= level (and < level
    + 1 / (n + 1) for continuous scores). inf when n is too small for the level, i.e.
    (n + 1) level > n: no finite band can promise it.
    """
    if not 0 < level < 1:
        raise InputError(f"level must lie in (0, 1), got {level}", source="conformal_scale", field="level")
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    s = np.sort(s[~np.isnan(s)])
    rank = math.ceil((s.size + 1) * level - 1e-9)  # tolerance: (n + 1) level is often an integer in floats
    return float(s[rank - 1]) if rank <= s.size else math.inf


@dataclass(frozen=True)
class ConformalCalibration:
    """Band factors per horizon bin and level, from a calibration set; stored with a checkpoint.

    edges (N + 1,) horizon bin edges in years; levels (L,) nominal coverages; factors[i][l] the
    factor for bin i and level l (inf where the bin had too few calibration cases for that
    level); counts[i] the calibration cases in bin i. `apply` widens or narrows each band about
    its median by its bin's factor. A query whose horizon falls outside every bin gets NaN bands.
    """

    edges: tuple[float, ...]
    levels: tuple[float, ...]
    factors: tuple[tuple[float, ...], ...]
    counts: tuple[int, ...]

    def __post_init__(self):
        src = "ConformalCalibration"
        edges = tuple(float(e) for e in _edges(self.edges))
        levels = tuple(float(v) for v in self.levels)
        if not levels or not all(0 < v < 1 for v in levels):
            raise InputError(f"levels must lie in (0, 1), got {levels}", source=src, field="levels")
        factors = tuple(tuple(float(f) for f in row) for row in self.factors)
        if len(factors) != len(edges) - 1 or any(len(row) != len(levels) for row in factors):
            raise InputError(f"expected factors for {len(edges) - 1} bins x {len(levels)} levels, got "
                             f"{[len(r) for r in factors]}", source=src, field="factors")
        if any(not f >= 0 for row in factors for f in row):
            raise InputError("factors must be non-negative", source=src, field="factors")
        counts = tuple(int(c) for c in self.counts)
        if len(counts) != len(edges) - 1:
            raise InputError(f"expected {len(edges) - 1} counts, got {len(counts)}", source=src, field="counts")
        for name, value in (("edges", edges), ("levels", levels), ("factors", factors), ("counts", counts)):
            object.__setattr__(self, name, value)

    @classmethod
    def fit(cls, median, lower, upper, truth, horizon, levels: Sequence[float],
            edges: Sequence[float] = HORIZON_EDGES) -> ConformalCalibration:
        """From calibration forecasts: median (...), lower and upper (L, ...) one band per level,
        truth (...), horizon (...) or a leading part of it."""
        median, lower, upper = _bands(median, lower, upper, levels, "ConformalCalibration.fit")
        _, index = horizon_bins(_lead(horizon, median.shape, "horizon"), edges)
        factors, counts = [], []
        for k in range(len(_edges(edges)) - 1):
            row = []
            for i, level in enumerate(levels):
                s = conformal_scores(median, lower[i], upper[i], truth)[index == k]
                row.append(conformal_scale(s, level))
            factors.append(tuple(row))
            counts.append(int(np.isfinite(np.asarray(truth, dtype=np.float64))[index == k].sum()))
        return cls(edges=tuple(edges), levels=tuple(levels), factors=tuple(factors), counts=tuple(counts))

    def apply(self, median, lower, upper, horizon) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated bands: median (...), lower and upper (L, ...) for `levels` -> (lower, upper) (L, ...)."""
        median, lower, upper = _bands(median, lower, upper, self.levels, "ConformalCalibration.apply")
        _, index = horizon_bins(_lead(horizon, median.shape, "horizon"), self.edges)
        table = np.asarray(self.factors).T                   # (L, N)
        f = np.where(index >= 0, table[:, np.maximum(index, 0)], np.nan)  # (L, ...)
        with np.errstate(invalid="ignore"):  # inf * 0 (zero-width half band) is NaN; replaced just below
            lo = median - f * (median - lower)
            hi = median + f * (upper - median)
        lo = np.where(np.isinf(f), -np.inf, lo)
        hi = np.where(np.isinf(f), np.inf, hi)
        return lo, hi

    def to_dict(self) -> dict:
        """JSON-able: infinities become the string "inf" (JSON has no infinity)."""
        enc = lambda v: "inf" if v == math.inf else v  # noqa: E731
        return {"edges": [enc(e) for e in self.edges], "levels": list(self.levels),
                "factors": [[enc(f) for f in row] for row in self.factors], "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, d: Mapping) -> ConformalCalibration:
        """Inverse of `to_dict`; unknown or missing keys raise."""
        keys = {"edges", "levels", "factors", "counts"}
        if set(d) != keys:
            raise InputError(f"expected keys {sorted(keys)}, got {sorted(d)}", source="ConformalCalibration",
                             field="keys")
        return cls(edges=tuple(float(e) for e in d["edges"]), levels=tuple(d["levels"]),
                   factors=tuple(tuple(float(f) for f in row) for row in d["factors"]),
                   counts=tuple(d["counts"]))


def pooled_edges(values: np.ndarray, edges: Sequence[float], min_count: int) -> tuple[float, ...]:
    """`edges` with each bin holding fewer than `min_count` of `values` merged into the bin before it
    (the first bin into the next); the outer edges stay."""
    edges = [float(e) for e in edges]

    def count(i):
        return int(((values >= edges[i]) & (values < edges[i + 1])).sum())

    for i in range(len(edges) - 2, 0, -1):
        if count(i) < min_count:
            del edges[i]
    if len(edges) > 2 and count(0) < min_count:
        del edges[1]
    return tuple(edges)


def history_groups(visits, edges: Sequence[float]) -> np.ndarray:
    """Each history size's group [edges[g], edges[g + 1]); below the first edge the first, beyond the last the last."""
    index = np.searchsorted(_edges(edges), np.asarray(visits, dtype=np.float64), side="right") - 1
    return np.clip(index, 0, len(edges) - 2)


@dataclass(frozen=True)
class MondrianCalibration:
    """`ConformalCalibration` per group of history sizes (Mondrian split-conformal prediction).

    A patient's posterior narrows as its history grows; where the model has the shape of a
    course wrong, it narrows onto the wrong shape, and one factor per horizon, learned mostly
    from short histories, leaves long ones under-covered (glioma: a 90% band held 0.97 of
    calibration cases conditioned on 2 visits, 0.76 of those conditioned on 8). visits
    (G + 1,) edges on the number of observed visits a request is conditioned on; groups[g]
    calibrates the requests with visits in [visits[g], visits[g + 1]) (fewer than visits[0]:
    the first group, more than the last edge: the last).
    """

    visits: tuple[float, ...]
    groups: tuple[ConformalCalibration, ...]

    def __post_init__(self):
        visits = tuple(float(e) for e in _edges(self.visits))
        groups = tuple(self.groups)
        if len(groups) != len(visits) - 1 or not all(isinstance(g, ConformalCalibration) for g in groups):
            raise InputError(f"expected {len(visits) - 1} ConformalCalibration groups, got {len(groups)}",
                             source="MondrianCalibration", field="groups")
        if len({g.levels for g in groups}) != 1:
            raise InputError("every group must calibrate the same levels", source="MondrianCalibration", field="groups")
        object.__setattr__(self, "visits", visits)
        object.__setattr__(self, "groups", groups)

    @property
    def levels(self) -> tuple[float, ...]:
        return self.groups[0].levels

    @classmethod
    def fit(cls, median, lower, upper, truth, horizon, visits, levels: Sequence[float], *,
            visit_edges: Sequence[float] = HISTORY_EDGES, horizon_edges: Sequence[float] = HORIZON_EDGES,
            min_group: int = MIN_GROUP_CASES, min_bin: int = MIN_BIN_CASES) -> MondrianCalibration:
        """From calibration forecasts as `ConformalCalibration.fit`, with visits (N,) the history size
        of each of the N forecasts along median's first axis. A group of fewer than `min_group`
        cases is pooled with the one before it (the first with the next), a horizon bin of fewer
        than `min_bin` likewise within its group."""
        median, lower, upper = _bands(median, lower, upper, levels, "MondrianCalibration.fit")
        truth = np.asarray(truth, dtype=np.float64)
        visits = np.asarray(visits, dtype=np.float64)
        if visits.ndim != 1:
            raise InputError(f"expected one history size per forecast (N,), got shape {visits.shape}",
                             source="MondrianCalibration.fit", field="visits")
        cases = np.isfinite(truth)
        horizon = _lead(horizon, truth.shape, "horizon")
        edges = pooled_edges(_lead(visits, truth.shape, "visits")[cases], visit_edges, min_group)
        group = history_groups(visits, edges)
        groups = []
        for g in range(len(edges) - 1):
            pick = group == g
            bins = pooled_edges(horizon[pick][cases[pick]], horizon_edges, min_bin)
            groups.append(ConformalCalibration.fit(median[pick], lower[:, pick], upper[:, pick], truth[pick],
                                                   horizon[pick], levels, bins))
        return cls(edges, tuple(groups))

    def apply(self, median, lower, upper, horizon, visits) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated bands as `ConformalCalibration.apply`; visits (...) like median: history sizes."""
        g = history_groups(np.broadcast_to(visits, np.shape(median)), self.visits)
        lo, hi = np.full(np.shape(lower), np.nan), np.full(np.shape(upper), np.nan)
        for k in np.unique(g):
            group_lo, group_hi = self.groups[k].apply(median, lower, upper, horizon)
            lo, hi = np.where(g == k, group_lo, lo), np.where(g == k, group_hi, hi)
        return lo, hi

    def to_dict(self) -> dict:
        return {"visits": ["inf" if v == math.inf else v for v in self.visits],
                "groups": [g.to_dict() for g in self.groups]}

    @classmethod
    def from_dict(cls, d: Mapping) -> MondrianCalibration:
        """Inverse of `to_dict`; a plain `ConformalCalibration`'s dict (models before history groups)
        is one group for every history size. Unknown or missing keys raise."""
        if "groups" not in d and "visits" not in d:
            return cls(visits=(1.0, math.inf), groups=(ConformalCalibration.from_dict(d),))
        if set(d) != {"visits", "groups"}:
            raise InputError(f"expected keys ['groups', 'visits'], got {sorted(d)}", source="MondrianCalibration",
                             field="keys")
        return cls(visits=tuple(float(v) for v in d["visits"]),
                   groups=tuple(ConformalCalibration.from_dict(g) for g in d["groups"]))


def _bands(median, lower, upper, levels, source):
    median = np.asarray(median, dtype=np.float64)
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    want = (len(levels), *median.shape)
    for name, a in (("lower", lower), ("upper", upper)):
        if a.shape != want:
            raise InputError(f"expected {name} of shape {want} (one band per level), got {a.shape}",
                             source=source, field=name)
    return median, lower, upper


# ---------------------------------------------------------------------------------------------
# Held-out splits
# ---------------------------------------------------------------------------------------------

def holdout_last(times, observed=None, *, k: int | None = 1, min_horizon: float | None = None):
    """Split each subject's visits into a conditioning history and held-out later visits.

    times (S, V), observed (S, V) (default: time is finite) -> (history, target), (S, V) bool.
    Exactly one rule:

    - k: the last k observed visits are targets, the earlier observed ones the history. A
      subject with k or fewer observed visits keeps them all as history and has no target.
    - min_horizon=h (pass k=None): the history ends at the latest observed visit t_c that has a
      later observed visit at least h years after it; targets are the observed visits with
      time > t_c and time - t_c >= h; visits in between are neither. A subject with no such
      pair has no target. This scores forecasts at least h years ahead.
    """
    times = np.asarray(times, dtype=np.float64)
    obs = np.isfinite(times) if observed is None else np.asarray(observed, dtype=bool) & np.isfinite(times)
    if times.ndim != 2 or obs.shape != times.shape:
        raise InputError(f"expected times and observed of one (subject, visit) shape, got {times.shape} and "
                         f"{obs.shape}", source="holdout_last", field="observed")
    if (k is None) == (min_horizon is None):
        raise InputError(f"give exactly one of k and min_horizon, got k={k}, min_horizon={min_horizon}",
                         source="holdout_last", field="k")
    if k is not None:
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}", source="holdout_last", field="k")
        # Rank visits from the latest observed one (rank 0) by time, ties to the later visit, so
        # the rule does not depend on visits being stored in time order.
        key = np.where(obs, times, -np.inf)
        visit = np.broadcast_to(np.arange(times.shape[1]), times.shape)
        order = np.lexsort((-visit, -key), axis=1)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.ascontiguousarray(visit), axis=1)
        n_obs = obs.sum(axis=1, keepdims=True)
        target = obs & (rank < k) & (n_obs > k)
        return obs & ~target, target
    if not min_horizon >= 0:
        raise InputError(f"min_horizon must be >= 0 years, got {min_horizon}", source="holdout_last",
                         field="min_horizon")
    t = np.where(obs, times, np.nan)
    last = np.max(np.where(obs, times, -np.inf), axis=1, keepdims=True)
    # A visit can end the history if the last visit is strictly after it and >= h later.
    can_cut = obs & (times < last) & (last - times >= min_horizon)
    cut = np.max(np.where(can_cut, t, -np.inf), axis=1, keepdims=True)
    has = np.isfinite(cut)
    target = has & obs & (times > cut) & (times - cut >= min_horizon)
    history = obs & (~has | (times <= cut))
    return history, target


def holdout_subjects(subject_ids: Sequence[str], fraction: float, seed: int = 0) -> np.ndarray:
    """Deterministic held-out subjects: (S,) ids -> (S,) bool, True for round(fraction S) of them.

    Each id is ranked by a keyed hash (BLAKE2b of seed and id) and the lowest are held out, so the
    split depends only on the ids and the seed: not on their order, the Python version, or the
    process (unlike `hash`), and a subject keeps its side when others join the cohort, unless it
    sits at the boundary.
    """
    if not 0 <= fraction <= 1:
        raise InputError(f"fraction must lie in [0, 1], got {fraction}", source="holdout_subjects",
                         field="fraction")
    ids = [str(s) for s in subject_ids]
    if len(set(ids)) != len(ids):
        raise InputError("subject ids must be unique", source="holdout_subjects", field="subject_ids")
    keys = [hashlib.blake2b(s.encode(), key=str(int(seed)).encode(), digest_size=8).digest() for s in ids]
    order = sorted(range(len(ids)), key=lambda i: (keys[i], ids[i]))
    held = np.zeros(len(ids), dtype=bool)
    held[order[:round(fraction * len(ids))]] = True
    return held


def holdout_arrays(times, values, history, target):
    """Apply a `holdout_last` split: -> (history times (S, V), history values (S, V, B),
    queries at (S, V), truth (S, V, B)); everything outside its mask is NaN, and queries stay on
    the visit axis so predictions line up with `values`."""
    times = np.asarray(times, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    history = np.asarray(history, dtype=bool)
    target = np.asarray(target, dtype=bool)
    return (np.where(history, times, np.nan), np.where(history[..., None], values, np.nan),
            np.where(target, times, np.nan), np.where(target[..., None], values, np.nan))


# ---------------------------------------------------------------------------------------------

def _edges(edges) -> np.ndarray:
    e = np.asarray(edges, dtype=np.float64).reshape(-1)
    if e.size < 2 or np.isnan(e).any() or not np.all(np.diff(e) > 0):
        raise InputError(f"edges must be at least two increasing numbers, got {tuple(edges)}", source="horizon_bins",
                         field="edges")
    return e


def _same(a, b, name_a, name_b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"expected {name_b} of {name_a}'s shape {a.shape}, got {b.shape}", source="metrics",
                         field=name_b)
    return a, b


def _lead(horizon, shape, name):
    """Broadcast horizon over trailing axes of `shape` (leading-axis broadcasting)."""
    h = np.asarray(horizon, dtype=np.float64)
    if h.shape != tuple(shape[:h.ndim]):
        raise InputError(f"expected {name} of shape {tuple(shape)} or a leading part of it, got {h.shape}",
                         source="metrics", field=name)
    return np.broadcast_to(h.reshape(h.shape + (1,) * (len(shape) - h.ndim)), shape)
