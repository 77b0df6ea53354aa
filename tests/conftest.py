"""Shared test fixtures: tiny hand-made cohorts that do not depend on the simulators."""

from __future__ import annotations

import numpy as np
import pytest

from twin.data import cohort


def tiny_cohort(subjects=("a", "b", "c"), *, seed: int = 0, visits: int = 4, shape=(6, 5), biomarkers: bool = True):
    """S subjects with ragged histories (the last has two visits), one image channel, 2 biomarkers."""
    rng = np.random.default_rng(seed)
    n = len(subjects)
    time = np.full((n, visits), np.nan)
    for s in range(n):
        k = visits if s < n - 1 else 2
        time[s, :k] = np.concatenate([[0.0], np.cumsum(rng.uniform(0.3, 1.2, k - 1))])
    image = rng.random((n, visits, 1, *shape)).astype(np.float32)
    image[~np.isfinite(time)] = np.nan
    bio = rng.normal(size=(n, visits, 2))
    bio[~np.isfinite(time)] = np.nan
    events = [[(0.2, "dmt", 10.0), (0.5, "dmt", 10.0)]] + [[] for _ in range(n - 1)]
    return cohort(subject=list(subjects), time=time, image=image, channel=["t1"],
                  affine=np.diag([2.0, 2.0, 2.0, 1.0]),
                  biomarkers=bio if biomarkers else None, biomarker=["volume", "score"], biomarker_units=["mL", "points"],
                  covariates=rng.normal(size=(n, 2)), covariate=["age", "sex"], events=events,
                  baseline_time=rng.uniform(60, 80, n), clock="age (years)")


@pytest.fixture
def small():
    return tiny_cohort()


@pytest.fixture
def one_thread():
    """Tiny convolutions gain nothing from a second thread, and lose much when another process holds a core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
