"""The biomarker twin's public API on a cohort drawn from the model itself: shapes, bands, seeds,
fill, scenarios with common random numbers, request errors, and results on disk."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import xarray as xr

from twin import BiomarkerTwin, InputError, TwinConfig, export_result_table, open_result, write_result
from twin.data import cohort
from twin.model import Batch, DiseaseCourse
from twin.scenarios import Arm, Dose, ScenarioSet

SCALE, CENTRE = np.array([10.0, 2.0]), np.array([100.0, 20.0])
DOSES = 12


def synthetic_cohort(n: int = 40, *, seed: int = 0, treated: bool = True) -> xr.Dataset:
    """Subjects drawn from a DiseaseCourse with known parameters: 2 biomarkers (one rising, one
    falling), 5 visits over ~2 years, every 4th subject missing its 4th visit, and (if `treated`)
    half the subjects on 'dmt' every four months from 0.5 y to 4.2 y. Small noise, so a fit
    should track the data."""
    rng = np.random.default_rng(seed)
    time = np.sort(rng.uniform(0.0, 2.2, (n, 5)), axis=1)
    time[:, 0] = 0.0
    events = [[(0.5 + k / 3, "dmt", 10.0) for k in range(DOSES)] if treated and i % 2 else [] for i in range(n)]
    model = DiseaseCourse(2, 1, 1, hidden=0, dose_scale=(10.0,))
    with torch.no_grad():
        model.a.copy_(torch.tensor([1.5, -1.5]))
        model.g.copy_(torch.tensor([0.0, 0.5]))
        model.log_k.fill_(math.log(6.0))
        model.mu_zeta.fill_(1.0)
        eta = torch.as_tensor(rng.normal(size=(n, model.n_effects)), dtype=torch.float32)
        pad = [ev + [(math.nan, "", math.nan)] * (DOSES - len(ev)) for ev in events]
        doses = ((torch.tensor([[e[0] for e in ev] for ev in pad]), torch.tensor([[e[2] for e in ev] for ev in pad])),)
        x = torch.zeros(n, 1)
        y = model.predict(eta, Batch(torch.as_tensor(time, dtype=torch.float32), torch.zeros(n, 5, 2), x, doses)).numpy()
    y = (y + 0.05 * rng.normal(size=y.shape)) * SCALE + CENTRE
    observed = np.ones((n, 5), dtype=bool)
    observed[::4, 3] = False
    y[~observed] = np.nan
    return cohort(subject=[f"s{i:02d}" for i in range(n)], time=time, observed=observed, biomarkers=y,
                  biomarker=["volume", "score"], biomarker_units=["mL", "points"], events=events,
                  baseline_time=rng.uniform(60, 80, n), clock="age (years)")


FAST = TwinConfig(iterations=100, prior_steps=50, prior_draws=16, n_samples=64, calibration_fraction=0.25)


@pytest.fixture(scope="module")
def ds():
    return synthetic_cohort()


@pytest.fixture(scope="module")
def twin(ds):
    return BiomarkerTwin.fit(ds, FAST, progress=False)


def test_forecast_shapes_coords_and_ordered_quantiles(twin, ds):
    r = twin.forecast(ds, ["s03", "s01"], horizons=[1.0, 0.5])
    assert dict(r.sizes) == {"subject": 2, "request": 2, "biomarker": 2, "quantile": 9, "check": 5}
    assert list(r["subject"].values) == ["s01", "s03"]  # cohort order, not request order
    assert list(r["quantile"].values) == [0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.975]
    assert list(r["biomarker"].values) == ["volume", "score"] and list(r["biomarker_unit"].values) == ["mL", "points"]
    one = ds.sel(subject="s01")
    last = float(one["time"].where(one["observed"]).max())
    np.testing.assert_allclose(r["time"].sel(subject="s01").values, float(one["baseline_time"]) + last + np.array([0.5, 1.0]))
    np.testing.assert_allclose(r["horizon"].sel(subject="s01").values, [0.5, 1.0])
    assert r["mean"].dims == ("subject", "request", "biomarker") and np.isfinite(r["mean"]).all()
    assert r["quantiles"].dims == ("quantile", "subject", "request", "biomarker")
    assert (r["quantiles"].diff("quantile") >= 0).all()
    assert r.attrs["kind"] == "forecast" and r.attrs["clock"] == "age (years)" and r.attrs["seed"] == 0
    assert "samples" not in r
    r = twin.forecast(ds, ["s01"], horizons=[1.0], samples=True, n_samples=7)
    assert r["samples"].dims == ("sample", "subject", "request", "biomarker") and r.sizes["sample"] == 7


def test_forecast_at_observed_visits_tracks_the_data(twin, ds):
    at = {s: list(ds["baseline_time"].values[i] + ds["time"].values[i][ds["observed"].values[i]])
          for i, s in enumerate(ds["subject"].values)}
    r = twin.forecast(ds, at=at)
    y = np.stack([ds["biomarkers"].values[i][ds["observed"].values[i]] for i in range(len(at)) if len(at[ds["subject"].values[i]]) == 5])
    mean = r["mean"].values[[len(v) == 5 for v in at.values()]]
    error = np.abs(mean - y) / SCALE  # in units of the biomarker's scale; the noise is 0.05
    assert np.median(error) < 0.1
    lo, hi = r["quantiles"].sel(quantile=0.05).values, r["quantiles"].sel(quantile=0.95).values
    inside = (lo[[len(v) == 5 for v in at.values()]] <= y) & (y <= hi[[len(v) == 5 for v in at.values()]])
    assert inside.mean() > 0.8


def test_same_seed_same_answer_other_seed_other_draws(twin, ds):
    a = twin.forecast(ds, ["s00", "s05"], horizons=[1, 2], samples=True)
    b = twin.forecast(ds, ["s00", "s05"], horizons=[1, 2], samples=True)
    c = twin.forecast(ds, ["s00", "s05"], horizons=[1, 2], samples=True, seed=1)
    xr.testing.assert_identical(a, b)
    assert c.attrs["seed"] == 1 and not np.allclose(a["samples"], c["samples"])
    refit = BiomarkerTwin.fit(ds, FAST, progress=False)
    xr.testing.assert_identical(refit.forecast(ds, ["s00"], horizons=[1]), twin.forecast(ds, ["s00"], horizons=[1]))


def test_fill_defaults_to_missed_visits(twin, ds):
    r = twin.fill(ds)
    missed = [s for i, s in enumerate(ds["subject"].values) if not ds["observed"].values[i].all()]
    assert list(r["subject"].values) == missed and r.sizes["request"] == 1 and r.attrs["kind"] == "fill"
    for s in missed:
        one = ds.sel(subject=s)
        t = float(one["baseline_time"]) + float(one["time"].values[~one["observed"].values][0])
        assert float(r["time"].sel(subject=s, request=0)) == pytest.approx(t)
        assert float(r["horizon"].sel(subject=s, request=0)) < 0  # between visits: a fill, not a forecast
    # the missed value lies between the neighbouring visits' values for a monotone course
    one = ds.sel(subject=missed[1])
    y = one["biomarkers"].values
    lo, hi = np.minimum(y[2], y[4]), np.maximum(y[2], y[4])
    assert np.all((r["mean"].sel(subject=missed[1]).values[0] > lo - 0.3 * SCALE) &
                  (r["mean"].sel(subject=missed[1]).values[0] < hi + 0.3 * SCALE))


def scenarios() -> ScenarioSet:
    return ScenarioSet("test", (Arm("stop", ()), Arm("double", (Dose(0.0, "dmt", 20.0), Dose(1 / 12, "dmt", 20.0)))))


def test_scenario_factual_is_the_forecast_and_effects_are_paired_differences(twin, ds):
    subjects = ["s01", "s02", "s03"]
    r = twin.simulate(ds, scenarios(), subjects, horizons=[0.5, 1.0], samples=True)
    f = twin.forecast(ds, subjects, horizons=[0.5, 1.0], samples=True)
    assert list(r["arm"].values) == ["factual", "stop", "double"] and r.attrs["kind"] == "scenario"
    assert r["mean"].dims == ("arm", "subject", "request", "biomarker")
    for name in ("mean", "quantiles", "samples", "flags"):
        np.testing.assert_array_equal(r[name].sel(arm="factual").values, f[name].values)
    np.testing.assert_allclose(r["effect_mean"].values, r["mean"].values - r["mean"].sel(arm="factual").values, atol=1e-9)
    assert np.all(r["effect_mean"].sel(arm="factual").values == 0)
    assert np.all(r["effect_quantiles"].sel(arm="factual").values == 0)  # the same draws: no noise in an effect
    # s01 is treated: stopping changes its course; s02 is untreated: stopping changes nothing
    assert np.abs(r["effect_mean"].sel(arm="stop", subject="s01").values).max() > 1e-3
    np.testing.assert_allclose(r["effect_mean"].sel(arm="stop", subject="s02").values, 0, atol=1e-5)
    assert json.loads(r.attrs["scenario"])["name"] == "test"


def test_unknown_agent_and_bad_requests_are_input_errors(ds, twin):
    untreated = synthetic_cohort(12, treated=False)
    plain = BiomarkerTwin.fit(untreated, TwinConfig(iterations=5, prior_steps=5, n_samples=8, calibration_fraction=0.0), progress=False)
    with pytest.raises(InputError, match=r"test: arms.double: the model knows no effect of agent 'dmt' \(it was trained on: none\)"):
        plain.simulate(untreated, scenarios())
    with pytest.raises(InputError, match=r"cohort: subject: unknown subject\(s\) \['nobody'\]"):
        twin.forecast(ds, ["nobody"], horizons=[1])
    with pytest.raises(InputError, match="exactly one of horizons"):
        twin.forecast(ds, horizons=[1], at={"s00": [70.0]})
    base = float(ds["baseline_time"].sel(subject="s00"))
    with pytest.raises(InputError, match="requests: time: subject s00: time .* is before the subject's baseline"):
        twin.forecast(ds, at={"s00": [base - 1]})
    with pytest.raises(InputError, match="expected finite times"):
        twin.forecast(ds, at={"s00": [float("nan")]})


def test_config_is_strict():
    assert TwinConfig.from_dict(TwinConfig(seed=3).to_dict()) == TwinConfig(seed=3)
    with pytest.raises(InputError, match=r"TwinConfig: iteration: unknown setting\(s\) \['iteration'\]"):
        TwinConfig.from_dict({"iteration": 10})
    with pytest.raises(InputError, match="quantiles: expected increasing levels .* symmetric"):
        TwinConfig(quantiles=(0.1, 0.5, 0.8))
    with pytest.raises(InputError, match="calibration_fraction"):
        TwinConfig(calibration_fraction=1.0)
    with pytest.raises(InputError, match=r"extrapolation_quantile: expected a number in \[0, 1\)"):
        TwinConfig(extrapolation_quantile=-0.1)
    assert TwinConfig().band_levels == (0.95, 0.9, 0.8, 0.5)


def test_requests_past_the_follow_up_take_the_rehearsals_factors(twin, ds, tmp_path):
    times = np.where(ds["observed"].values, ds["time"].values, np.nan)
    # the latest visit fitted on (calibration subjects' visits are not), past the rehearsal's cut
    assert np.nanquantile(times, 0.8) < twin.fitted_until <= np.nanmax(times)
    assert twin.past is not None and twin.past.levels == twin.calibration.levels
    subjects = ["s00", "s01", "s02"]
    since = {s: float(np.nanmax(times[i])) for i, s in enumerate(ds["subject"].values) if s in subjects}
    # one request inside the fitted follow-up, one past it; both after each subject's last visit
    inside = {s: max(t, twin.fitted_until - 0.01) for s, t in since.items()}
    at = {s: [float(ds["baseline_time"].sel(subject=s)) + t for t in (inside[s], twin.fitted_until + 0.5)]
          for s in subjects}
    answer = twin.forecast(ds, subjects, at=at)
    plain = BiomarkerTwin(twin.model, twin.standardiser, twin.config, twin.calibration, twin.limits)
    ordinary = plain.forecast(ds, subjects, at=at)
    xr.testing.assert_identical(answer["mean"], ordinary["mean"])  # the same draws
    np.testing.assert_array_equal(answer["quantiles"].values[:, :, 0], ordinary["quantiles"].values[:, :, 0])
    assert not np.allclose(answer["quantiles"].values[:, :, 1], ordinary["quantiles"].values[:, :, 1])
    assert json.loads(answer.attrs["calibration_past"]) == twin.past.to_dict()
    # they travel with the model directory
    twin.save(tmp_path / "model")
    again = BiomarkerTwin.load(tmp_path / "model")
    assert again.fitted_until == twin.fitted_until and again.past.to_dict() == twin.past.to_dict()
    # without the rehearsal, every request takes the ordinary factors
    assert BiomarkerTwin.fit(ds, replace(FAST, extrapolation_quantile=0.0), progress=False).past is None


def test_readings_at_a_scores_ceiling_lie_inside_bands_that_reach_it(ds, tmp_path):
    # a score topping out at its 70th percentile: 30% of readings sit on the ceiling, which the
    # model keeps standardised in float32; draws and bands must come back at the ceiling itself
    y = ds["biomarkers"].values.copy()
    top = float(np.nanquantile(y[..., 1], 0.7))
    y[..., 1] = np.minimum(y[..., 1], top)
    capped = ds.assign(biomarkers=(ds["biomarkers"].dims, y))
    twin = BiomarkerTwin.fit(capped, replace(FAST, extrapolation_quantile=0.0), progress=False)
    # the volume has no instrument: no ceiling, and no floor (its log scale once turned -inf into
    # its lowest training reading, a floor under every band)
    assert twin.ends[1, 1] == top and twin.ends[1, 0] == math.inf and twin.ends[0, 0] == -math.inf
    r = twin.forecast(capped, horizons=[0.5, 1.0], samples=True)
    score = r.sel(biomarker="score")
    assert (score["samples"] == top).any() and (score["samples"] <= top).all()
    q95 = score["quantiles"].sel(quantile=0.95)
    assert (q95 == top).any() and (q95 <= top).all()  # reaching the ceiling, never past it
    twin.save(tmp_path / "model")
    assert np.array_equal(BiomarkerTwin.load(tmp_path / "model").ends, twin.ends)
    # a model saved before that fix kept the volume's floor; loading drops it
    meta = json.loads((tmp_path / "model" / "config.json").read_text())
    meta["instrument_ends"][0][0] = float(np.nanmin(y[..., 0]))
    (tmp_path / "model" / "config.json").write_text(json.dumps(meta))
    assert np.array_equal(BiomarkerTwin.load(tmp_path / "model").ends, twin.ends)


def test_result_round_trip_and_table(twin, ds, tmp_path):
    r = twin.forecast(ds, ["s00", "s01"], horizons=[1, 2])
    path = write_result(r, tmp_path / "r.zarr")
    back = open_result(path)
    xr.testing.assert_identical(back, r)
    with pytest.raises(InputError, match="already exists"):
        write_result(r, path)
    rows = list(csv.reader(open(export_result_table(back, tmp_path / "r.csv"))))
    assert rows[0] == ["subject", "time", "biomarker", "mean", "q2.5", "q05", "q10", "q25", "q50", "q75", "q90", "q95", "q97.5"]
    assert len(rows) == 1 + 2 * 2 * 2
    assert rows[1][:3] == ["s00", repr(float(r["time"].values[0, 0])), "volume"]
    assert float(rows[1][3]) == float(r["mean"].values[0, 0, 0])
    s = twin.simulate(ds, scenarios(), ["s01"], horizons=[1])
    rows = list(csv.reader(open(export_result_table(s, tmp_path / "s.csv"))))
    assert rows[0][:4] == ["subject", "arm", "time", "biomarker"] and rows[0][-1] == "effect_q97.5"
    assert [row[1] for row in rows[1:]] == ["factual", "factual", "stop", "stop", "double", "double"]


def own_events(ds: xr.Dataset, subjects) -> dict[str, list]:
    """Each subject's received schedule as an explicit event list (cohort padding included)."""
    one = ds.sel(subject=list(subjects))
    return {str(s): list(zip(one["event_time"].values[i], one["event_agent"].values[i], one["event_dose"].values[i]))
            for i, s in enumerate(one["subject"].values)}


def test_explicit_schedules_replay_own_events_and_match_scenario_arms(twin, ds):
    subjects = ["s01", "s02", "s03"]
    at = {s: [float(ds["baseline_time"].sel(subject=s)) + h for h in (0.5, 1.5, 3.0)] for s in subjects}
    f = twin.forecast(ds, subjects, at=at)
    r = twin.simulate(ds, {"own": own_events(ds, subjects), "none": {s: [] for s in subjects}}, subjects, at=at)
    assert list(r["arm"].values) == ["factual", "own", "none"]
    # the factual arm given explicitly is the plain forecast, draw for draw
    np.testing.assert_allclose(r["mean"].sel(arm="own").values, f["mean"].values, rtol=1e-6)
    np.testing.assert_allclose(r["effect_mean"].sel(arm="own").values, 0, atol=1e-5)
    # no events from baseline is a scenario-file arm anchored at baseline without history
    stop = ScenarioSet("t", (Arm("stop", (), anchor="baseline", keep_history=False),))
    s = twin.simulate(ds, stop, subjects, at=at)
    np.testing.assert_array_equal(r["mean"].sel(arm="none").values, s["mean"].sel(arm="stop").values)
    # s01 is treated (stopping it changes its course), s02 is not
    assert np.abs(r["effect_mean"].sel(arm="none", subject="s01").values).max() > 1e-3
    np.testing.assert_allclose(r["effect_mean"].sel(arm="none", subject="s02").values, 0, atol=1e-5)
    assert json.loads(r.attrs["scenario"])["events"]["none"] == {"s01": [], "s02": [], "s03": []}


def test_explicit_schedules_are_checked(twin, ds):
    with pytest.raises(InputError, match=r"scenario: late: no schedule for subject\(s\) \['s02'\]"):
        twin.simulate(ds, {"late": {"s01": []}}, ["s01", "s02"], horizons=[1])
    with pytest.raises(InputError, match=r"scenario: agent: the model knows agents \['dmt'\], the scenario gives \['x'\]"):
        twin.simulate(ds, {"other": {"s01": [(1.0, "x", 1.0)]}}, ["s01"], horizons=[1])
    with pytest.raises(InputError, match=r"scenario: bad: subject s01: expected a time >= 0 years since baseline"):
        twin.simulate(ds, {"bad": {"s01": [(-1.0, "dmt", 10.0)]}}, ["s01"], horizons=[1])
    with pytest.raises(InputError, match="scenario: factual: arm names are letters"):
        twin.simulate(ds, {"factual": {"s01": []}}, ["s01"], horizons=[1])


def test_amortised_inference_reads_histories_with_the_mamba_encoder(ds, tmp_path):
    config = replace(FAST, inference="amortised", amortiser_steps=40)
    twin = BiomarkerTwin.fit(ds, config, progress=False)
    assert twin.amortiser is not None
    answer = twin.forecast(ds, horizons=[0.5, 1.0])
    assert np.isfinite(answer["mean"].values).all()
    q = answer["quantiles"].values
    assert (np.diff(q, axis=0) >= 0).all()
    # the encoder's posterior, not the Laplace one: the answers differ, yet stay near each other
    laplace = BiomarkerTwin.fit(ds, FAST, progress=False).forecast(ds, horizons=[0.5, 1.0])
    assert not np.allclose(answer["mean"].values, laplace["mean"].values)
    spread = np.nanstd(laplace["mean"].values)
    assert np.nanmean(np.abs(answer["mean"].values - laplace["mean"].values)) < spread
    # the encoder travels with the model directory and answers the same after loading
    twin.save(tmp_path / "model")
    again = BiomarkerTwin.load(tmp_path / "model")
    xr.testing.assert_allclose(again.forecast(ds, horizons=[0.5, 1.0]), answer)
    with pytest.raises(InputError, match="inference"):
        TwinConfig(inference="guess")


def test_a_score_at_its_instruments_ceiling_is_never_forecast_past_it(tmp_path):
    ds = synthetic_cohort(seed=4)
    score = ds["biomarkers"].values[..., 1]
    ceiling = float(np.round(np.nanquantile(score, 0.8)))  # a fifth of the readings pile up there
    clipped = ds.copy(deep=True)
    clipped["biomarkers"].values[..., 1] = np.where(np.isfinite(score), np.minimum(np.round(score), ceiling), np.nan)
    twin = BiomarkerTwin.fit(clipped, FAST, progress=False)
    ids = [str(s) for s in clipped["subject"].values[:10]]
    result = twin.forecast(clipped, ids, horizons=[0.5, 2.0], samples=True)
    drawn = result["samples"].sel(biomarker="score").values
    assert np.nanmax(drawn) <= ceiling + 1e-6 and (np.abs(drawn - ceiling) < 1e-6).mean() > 0.05
    assert np.nanmax(result["quantiles"].sel(biomarker="score").values) <= ceiling + 1e-6
    again = BiomarkerTwin.load(twin.save(tmp_path / "model")).forecast(clipped, ids, horizons=[0.5, 2.0], samples=True)
    np.testing.assert_array_equal(again["samples"].values, result["samples"].values)
    # the volume has no instrument's range: its draws are not clipped
    assert torch.isinf(twin.model.upper_cut[0]) and torch.isinf(twin.model.lower_cut[0])
