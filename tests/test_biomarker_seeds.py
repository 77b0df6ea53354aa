"""bench/biomarker_seeds.py: the benchmark's runs over seeds pooled into one set of held-out data."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from twin.metrics import clustered_proportion

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def seeds():
    spec = importlib.util.spec_from_file_location("biomarker_seeds", BENCH / "biomarker_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(hit, seen, errors):
    p, se, m = clustered_proportion(hit, seen)
    return {"n": len(errors), "n_obs": int(seen.sum()), "n_subjects": m, "mae_subjects": m, "cov90": p,
            "cov90_se": se, **dict.fromkeys(("twin", "copy_last", "linear", "LME"), float(np.mean(errors)))}


def test_pooled_bin_is_one_run_of_all_the_subjects(seeds):
    # two runs of independent subjects pool into the coverage and error of all of them at once
    rng = np.random.default_rng(0)
    hit = [rng.random((n, 4)) < 0.9 for n in (12, 30)]
    seen = [rng.random((n, 4)) < 0.8 for n in (12, 30)]
    errors = [rng.random(7), rng.random(19)]
    pooled = seeds.pool_bin([_row(h, s, e) for h, s, e in zip(hit, seen, errors)])
    p, se, m = clustered_proportion(np.concatenate(hit), np.concatenate(seen))
    assert pooled["cov90"] == pytest.approx(p) and pooled["n_subjects"] == m == 42
    assert pooled["n_obs"] == sum(int(s.sum()) for s in seen) and pooled["n"] == 26
    assert pooled["twin"] == pytest.approx(np.concatenate(errors).mean())
    # the error: each run's hit total varies on its own; close to the one from all subjects
    # (which centres on the pooled p rather than each run's own)
    assert pooled["cov90_se"] == pytest.approx(se, rel=0.1)
    assert pooled["cov90_se"] < min(_row(h, s, e)["cov90_se"] for h, s, e in zip(hit, seen, errors))


def test_a_run_with_nothing_in_a_bin_adds_nothing(seeds):
    empty = {"n": 0, "n_obs": 0, "n_subjects": 0, "mae_subjects": 0, "cov90": math.nan, "cov90_se": math.nan,
             "twin": math.nan, "copy_last": math.nan, "linear": math.nan, "LME": math.nan}
    full = _row(np.ones((5, 2), bool), np.ones((5, 2), bool), np.ones(3))
    pooled = seeds.pool_bin([empty, full])
    assert pooled["cov90"] == 1.0 and pooled["twin"] == 1.0 and pooled["n_subjects"] == 5


def test_runs_of_one_table_count_its_subjects_once(seeds):
    # the same subjects scored twice: pooling must not claim twice the evidence
    rng = np.random.default_rng(1)
    hit, seen = rng.random((20, 3)) < 0.9, np.ones((20, 3), bool)
    row = _row(hit, seen, np.ones(4))
    pooled = seeds.pool_bin([row, row], shared=True)
    assert pooled["n_subjects"] == 20 and pooled["cov90_se"] == pytest.approx(row["cov90_se"])
    assert seeds.pool_bin([row, row])["cov90_se"] == pytest.approx(row["cov90_se"] / math.sqrt(2))
