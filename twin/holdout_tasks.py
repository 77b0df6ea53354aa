"""The held-out tasks `twin evaluate` scores: which visits are hidden, and what is asked about them.

    forecast  each subject with 2+ observed visits keeps the first ceil(n / 2) of them (the
              history, as the twins' own calibration cuts) and is asked at every later observed
              visit: horizons from the last history visit, several per subject.
    fill      each subject with 3+ observed visits hides its inner visits of odd rank (the 2nd,
              4th, ... but never the last) and is asked there: every hidden visit has observed
              neighbours on both sides, and the horizon is the distance to the nearer one.

Only observed visits are targets, so a simulated and an imported cohort are asked the same
things (simulated ones are then scored against their noise-free truth there). The conditioned
cohort a twin sees has the hidden visits marked not observed, their scans and biomarkers NaN;
nothing else changes (planned times, treatments, covariates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import xarray as xr

TASKS = ("forecast", "fill")


@dataclass(frozen=True)
class Task:
    """One task on a cohort of S subjects and V visits.

    history (S, V): the visits the methods see; visit (S, R): each subject's target visits in
    time order, -1 padding; horizon (S, R) years (NaN padding); reference (S, R): the history
    visit change is measured from (a forecast's last visit; a fill's nearest, the earlier of two
    as near), -1 at padding; cohort: the cohort as conditioned on `history`; subjects: the ids
    with at least one target.
    """

    name: str
    history: np.ndarray
    visit: np.ndarray
    horizon: np.ndarray
    reference: np.ndarray
    cohort: xr.Dataset
    subjects: list

    @property
    def targets(self) -> np.ndarray:
        return self.visit >= 0

    def at(self, ds: xr.Dataset) -> dict[str, list[float]]:
        """The requests on the cohort's clock: {subject: [time, ...]} in `visit` order."""
        base, times = ds["baseline_time"].values, ds["time"].values
        ids = [str(s) for s in ds["subject"].values]
        return {ids[s]: [float(base[s] + times[s, v]) for v in self.visit[s] if v >= 0]
                for s in range(len(ids)) if (self.visit[s] >= 0).any()}


def make_task(ds: xr.Dataset, name: str) -> Task:
    """The `name` task (one of TASKS) on every subject of `ds` (subjects without targets keep all visits)."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    times = ds["time"].values
    observed = ds["observed"].values & np.isfinite(times)
    if "image" in ds:  # a visit counts as observed only with its scan
        observed &= np.isfinite(ds["image"].values).reshape(*times.shape, -1).all(-1)
    history = observed.copy()
    target = np.zeros_like(observed)
    for s in range(len(times)):
        v = np.flatnonzero(observed[s])
        v = v[np.argsort(times[s, v], kind="stable")]
        if name == "forecast" and v.size >= 2:
            hidden = v[math.ceil(v.size / 2):]
        elif name == "fill" and v.size >= 3:
            hidden = v[1:-1:2]
        else:
            continue
        history[s, hidden], target[s, hidden] = False, True
    R = max(int(target.sum(1).max()), 1)
    visit = np.full((len(times), R), -1)
    horizon = np.full((len(times), R), np.nan)
    reference = np.full((len(times), R), -1)
    for s in range(len(times)):
        v = np.flatnonzero(target[s])
        v = v[np.argsort(times[s, v], kind="stable")]
        visit[s, :v.size] = v
        h = np.flatnonzero(history[s])
        for r, t in enumerate(times[s, v]):
            if name == "forecast":
                reference[s, r] = h[np.argmax(times[s, h])]
                horizon[s, r] = t - times[s, h].max()
            else:  # the nearest visit, the earlier of two as near: where the twin's fill starts from
                distance = np.abs(times[s, h] - t) + 1e-9 * (times[s, h] > t)
                reference[s, r] = h[np.argmin(distance)]
                horizon[s, r] = np.min(np.abs(times[s, h] - t))
    ids = [str(x) for x, has in zip(ds["subject"].values, target.any(1)) if has]
    return Task(name, history, visit, horizon, reference, conditioned(ds, history), ids)


def conditioned(ds: xr.Dataset, keep: np.ndarray) -> xr.Dataset:
    """The cohort as if only the visits in `keep` (S, V) had been observed."""
    out = ds.assign(observed=(ds["observed"].dims, ds["observed"].values & keep, ds["observed"].attrs))
    for name in ("image", "biomarkers"):
        if name in ds:
            x = ds[name].values.copy()
            x[~keep] = np.nan
            out = out.assign({name: (ds[name].dims, x, ds[name].attrs)})
    return out


def at_targets(a: np.ndarray, visit: np.ndarray) -> np.ndarray:
    """(S, V, ...) per-visit values -> (S, R, ...) at the task's target visits; NaN at padding."""
    take = np.maximum(visit, 0).reshape(visit.shape + (1,) * (a.ndim - 2))
    picked = np.take_along_axis(a, take, axis=1).astype(np.float64)
    return np.where((visit < 0).reshape(visit.shape + (1,) * (a.ndim - 2)), np.nan, picked)
