"""`twin evaluate`: the held-out tasks, the corruptions and checks, and metrics that agree with a
computation of the same numbers by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from twin import BiomarkerTwin, InputError, ScanConfig, ScanTwin, TwinConfig
from twin.data import cohort
from twin.evaluation import evaluate
from twin.hallucination import CORRUPTIONS, corrupt, jacobian_extent, off_prediction, tissue_intensity
from twin.holdout_tasks import conditioned, make_task
from twin.metrics import holdout_subjects
from twin.scan_checks import FITTED, fit_thresholds
from twin.scan_decoder import DecoderConfig

TINY = ScanConfig(n_samples=4, registration_iterations=10, state_draws=4,
                  dynamics=TwinConfig(iterations=40, prior_steps=10, prior_draws=8, n_samples=20, posterior_steps=20),
                  decoder=DecoderConfig(basis_iterations=15, iterations=15, width=8, basis_width=8, batch=16,
                                        sampler_steps=5))
LEASPY = Path(__file__).parent / "data" / "leaspy" / "alzheimer.csv"


# ---- tasks ----------------------------------------------------------------------------------------


def test_tasks_hide_the_last_half_for_forecasts_and_odd_inner_visits_for_fills():
    t = np.array([[0.0, 1, 2, 3, 4.5], [0, 0.5, 1, np.nan, np.nan], [0, 2, 3, 4, np.nan], [0, 1, np.nan, np.nan, np.nan]])
    observed = np.isfinite(t)
    observed[2, 1] = False  # a missed visit is never a target
    y = np.where(observed, t, np.nan)[..., None]
    ds = cohort(subject=["a", "b", "c", "d"], time=t, observed=observed, biomarkers=y, biomarker=["v"])
    f = make_task(ds, "forecast")
    assert f.subjects == ["a", "b", "c", "d"]
    assert f.history[0].tolist() == [True, True, True, False, False]  # ceil(5 / 2) = 3 kept
    assert f.visit[0].tolist() == [3, 4] and np.allclose(f.horizon[0], [1.0, 2.5])
    assert f.reference[0].tolist() == [2, 2]
    assert f.visit[2].tolist() == [3, -1] and np.allclose(f.horizon[2, 0], 1.0)  # keeps visits 0 and 2 of 0, 3, 4
    assert f.visit[3].tolist() == [1, -1]
    hidden = f.cohort["biomarkers"].values[0, 3:, 0]
    assert np.isnan(hidden).all() and not f.cohort["observed"].values[0, 3:].any()
    assert np.array_equal(f.cohort["time"].values, ds["time"].values, equal_nan=True)  # planned times stay
    g = make_task(ds, "fill")
    assert g.subjects == ["a", "b", "c"]
    assert g.visit[0].tolist() == [1, 3] and np.allclose(g.horizon[0], [1.0, 1.0])
    assert g.reference[0].tolist() == [0, 2]  # the nearest history visit, the earlier of two as near
    assert g.visit[1].tolist() == [1, -1] and g.reference[1, 0] == 0
    assert g.visit[2].tolist() == [2, -1] and np.allclose(g.horizon[2, 0], 1.0)  # observed 0, 3, 4: hides 3
    assert g.reference[2, 0] == 3  # nearer after than before


# ---- corruptions and their statistics ---------------------------------------------------------------


def _phantom(n: int = 48):
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - n / 2, xx - n / 2)
    mask = r < 0.42 * n
    scan = np.where(mask, 0.8 + 0.2 * np.sin(xx / 3.0) * np.cos(yy / 4.0), 0.0)[None]
    return scan.astype(np.float32), mask


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corruptions_change_the_brain_only_and_as_much_as_they_say(kind):
    scan, mask = _phantom()
    rng = np.random.default_rng(0)
    out = corrupt(scan, mask, kind, rng)
    assert out.shape == scan.shape and np.array_equal(out[:, ~mask], scan[:, ~mask])
    changed = np.abs(out - scan)[0] > 1e-3
    assert changed.any()
    if kind == "inserted_lesion":
        assert (out >= scan - 1e-6).all()  # it only brightens
        extent = 0.84 * 48  # the mask's bounding box
        assert 0.5 * math.pi * (0.08 * extent) ** 2 < changed.sum() < 2.5 * math.pi * (0.08 * extent) ** 2
    if kind == "flipped_region":
        assert np.allclose(np.sort(out[0][changed]), np.sort(scan[0][changed]))  # the same values, moved
    if kind == "implausible_shrinkage":
        # tissue moves towards the centre: a bright disc about it, as warped, holds less area
        yy, xx = np.mgrid[:48, :48]
        where = np.argwhere(mask)
        c = where[np.random.default_rng(0).integers(len(where))]
        disc = (np.hypot(yy - c[0], xx - c[1]) < 4).astype(np.float32)[None]
        shrunk = corrupt(disc, mask, kind, np.random.default_rng(0))  # the same centre
        assert shrunk.sum() < 0.8 * disc.sum()


def test_statistics_measure_regions_intensities_and_folds():
    scan, mask = _phantom()
    centre, spread = scan[None].copy(), np.full((1, *scan.shape), 0.01, np.float32)
    x = centre.copy()
    x[0, 0, 10:13, 20:24] += 0.5  # a 12-voxel region far beyond 4 spreads
    x[0, 0, 30, 30] += 0.5  # and a lone voxel
    assert off_prediction(x, centre, spread, mask[None], floor=0.01).tolist() == [12]
    assert off_prediction(centre, centre, spread, mask[None], floor=0.01).tolist() == [0]
    assert tissue_intensity(x, mask[None], [0.0], [1.05]).tolist() == [13]
    det = np.ones((2, 48, 48))
    det[0, 20, 20] = 0.5
    det[1, 20, 20] = -0.1
    assert np.allclose(jacobian_extent(det, mask[None]), [math.log(2), math.inf])


def test_thresholds_are_split_conformal_quantiles():
    stats = {name: np.arange(1.0, 201.0) for name in FITTED}
    assert fit_thresholds(stats, 0.01)["jacobian"] == 199.0  # ceil(201 * 0.99) = 199th smallest
    few = {name: np.arange(1.0, 11.0) for name in stats}
    assert fit_thresholds(few, 0.01)["off_prediction"] == 10.0  # too few for 1%: the largest
    assert fit_thresholds({k: np.array([np.inf]) for k in stats})["jacobian"] is None


# ---- the scan twin, end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def glioma():
    from twin.data.simulate import simulate_cohort

    ds = simulate_cohort("glioma", 10, 2, seed=2, progress=False)
    held = holdout_subjects([str(s) for s in ds["subject"].values], 0.3, 0)
    twin = ScanTwin.fit(ds.isel(subject=np.flatnonzero(~held)), TINY, progress=False)
    return ds, held, twin, evaluate(twin, ds, seed=5, progress=False)


def test_scan_metrics_have_every_documented_key(glioma):
    ds, held, twin, ev = glioma
    m = ev.metrics
    json.dumps(m, allow_nan=False)  # plain JSON
    assert m["subjects"] == int(held.sum()) and m["split"] == "test" and not m["in_sample"] and m["target"] == "truth"
    for task in ("forecast", "fill"):
        assert m[task], task
        for key, cell in m[task].items():
            assert float(key) > 0 and cell["n"] >= 1
            for method in ("twin", "copy_last", "linear"):
                assert {"mse", "psnr", "ssim", "change_rmse", "volume_mae", "biomarker_mae", "dice"} <= set(cell[method])
            assert 0 <= cell["twin"]["coverage_90"] <= 1 and "biomarker_mae" in cell["mixed_effects"]
    cal = m["calibration"]
    assert cal["values"] == "voxel" and cal["coverage_90"] == cal["voxel"]["coverage_90"]
    assert cal["coverage_50"] <= cal["coverage_80"] <= cal["coverage_90"] <= cal["coverage_95"]
    assert {"voxel", "biomarker", "volume"} <= set(cal) and "against_truth" in cal["voxel"]
    assert {"frechet", "kid", "ms_ssim_diversity"} <= set(m["feature"]) and 0 < m["feature"]["ms_ssim_diversity"] <= 1
    h = m["hallucination"]
    assert 0 <= h["detection_rate"] <= 1 and 0 <= h["false_alarm_rate"] <= 1
    assert set(h["by_corruption"]) == set(CORRUPTIONS)
    assert h["detection_rate"] == pytest.approx(np.mean(list(h["by_corruption"].values())))
    s = m["scenario"]
    assert s["effect_error"] >= 0 and s["effect_error_ignore_treatment"] > 0 and "scan_effect_rmse" in s


def test_scan_metrics_agree_with_a_computation_by_hand(glioma):
    """Forecast scores recomputed from the twin's own answer and the cohort, without evaluate's plumbing."""
    from twin.image_metrics import ssim

    ds, held, twin, ev = glioma
    one = ds.isel(subject=np.flatnonzero(held))
    times, observed = one["time"].values, one["observed"].values
    truth = one["truth_image"].sel(scenario="factual").values
    image, masks = one["image"].values, one["mask"].values.astype(bool)
    R = ev.metrics["data_range"]
    keep = observed.copy()
    at, targets = {}, []
    for s, subject in enumerate(map(str, one["subject"].values)):
        v = np.flatnonzero(observed[s])
        keep[s, v[math.ceil(v.size / 2):]] = False
        later = v[math.ceil(v.size / 2):]
        at[subject] = [float(one["baseline_time"].values[s] + times[s, x]) for x in later]
        targets += [(s, r, x, v[math.ceil(v.size / 2) - 1]) for r, x in enumerate(later)]
    answer = twin.forecast(conditioned(one, keep), list(at), at=at, seed=5)
    by_bin: dict[str, list] = {}
    for s, r, v, ref in targets:
        a = list(answer["subject"].values).index(one["subject"].values[s])
        pred = answer["scan_mean"].values[a, r]
        inside = np.broadcast_to(masks[s], pred.shape)
        change = (pred - image[s, ref]) - (truth[s, v] - truth[s, ref])
        copy_change = truth[s, v] - truth[s, ref]  # copy-last predicts the reference scan itself
        lo = answer["scan_quantiles"].sel(quantile=0.05).values[a, r]
        hi = answer["scan_quantiles"].sel(quantile=0.95).values[a, r]
        h = times[s, v] - times[s, ref]
        key = next(f"{e:g}" for e in (0.25, 0.5, 1, 2, 3, 5, math.inf) if h <= e)
        by_bin.setdefault(key, []).append({
            "twin_change": np.sqrt(np.mean(change[inside] ** 2)),
            "copy_change": np.sqrt(np.mean(copy_change[inside] ** 2)),
            "twin_mse": np.mean((pred - truth[s, v])[inside] ** 2),
            "copy_psnr": np.mean([10 * np.log10(R ** 2 / np.mean((image[s, ref, c] - truth[s, v, c])[masks[s]] ** 2))
                                  for c in range(pred.shape[0])]),
            "twin_ssim": float(np.mean(ssim(pred, truth[s, v], R, spatial_dims=2, mask=inside))),
            "coverage": np.mean(((lo <= truth[s, v]) & (truth[s, v] <= hi))[inside]),
            "copy_bio": np.abs(one["biomarkers"].values[s, ref] - one["truth_biomarkers"].sel(scenario="factual")
                               .transpose("subject", "visit", "biomarker").values[s, v]),
        })
    m = ev.metrics["forecast"]
    assert set(m) == set(by_bin)
    names = [str(b) for b in one["biomarker"].values]
    for key, rows in by_bin.items():
        cell = m[key]
        assert cell["n"] == len(rows)
        assert cell["twin"]["change_rmse"] == pytest.approx(np.mean([x["twin_change"] for x in rows]), rel=1e-5)
        assert cell["copy_last"]["change_rmse"] == pytest.approx(np.mean([x["copy_change"] for x in rows]), rel=1e-5)
        assert cell["twin"]["mse"] == pytest.approx(np.mean([x["twin_mse"] for x in rows]), rel=1e-5)
        assert cell["copy_last"]["psnr"] == pytest.approx(np.mean([x["copy_psnr"] for x in rows]), rel=1e-5)
        assert cell["twin"]["ssim"] == pytest.approx(np.mean([x["twin_ssim"] for x in rows]), rel=1e-5)
        assert cell["twin"]["coverage_90"] == pytest.approx(np.mean([x["coverage"] for x in rows]), rel=1e-5)
        bio = np.mean([x["copy_bio"] for x in rows], axis=0)
        assert [cell["copy_last"]["biomarker_mae"][n] for n in names] == pytest.approx(bio.tolist(), rel=1e-6)


def test_an_imported_scan_cohort_is_scored_against_its_observations(glioma):
    """No truth, no mask (as from `twin import bids`): targets are the acquired scans, the mask is derived."""
    ds, held, twin, _ = glioma
    imported = ds.drop_vars([v for v in ds.data_vars if str(v).startswith(("truth", "alternative")) or v == "mask"])
    imported = imported.isel(subject=np.flatnonzero(held)[:2])
    m = evaluate(twin, imported, seed=1, progress=False).metrics
    assert m["target"] == "observed" and m["scenario"] is None
    assert "against_truth" not in m["calibration"]["voxel"] and "dice" not in next(iter(m["forecast"].values()))["twin"]
    assert 0 < m["calibration"]["coverage_90"] <= 1


def test_a_model_trained_on_every_subject_has_nothing_held_out(glioma):
    ds, held, twin, _ = glioma
    train = ds.isel(subject=np.flatnonzero(~held))
    with pytest.raises(InputError, match="fitted on every subject"):
        evaluate(twin, train, progress=False)
    with pytest.raises(InputError, match="split"):
        evaluate(twin, ds, split="validation", progress=False)


# ---- the biomarker twin on an imported table ------------------------------------------------------


@pytest.fixture(scope="module")
def alzheimer():
    from twin.data import import_table

    ds = import_table(LEASPY)
    ds = ds.isel(subject=np.arange(60))
    held = holdout_subjects([str(s) for s in ds["subject"].values], 0.25, 0)
    twin = BiomarkerTwin.fit(ds.isel(subject=np.flatnonzero(~held)), TwinConfig(iterations=60, prior_steps=20, prior_draws=16,
                                                                               n_samples=50, posterior_steps=20), progress=False)
    return ds, held, twin


def test_biomarker_evaluation_on_an_imported_table(alzheimer):
    from twin.baselines import copy_last

    ds, held, twin = alzheimer
    ev = evaluate(twin, ds, seed=3, progress=False)
    m = ev.metrics
    assert m["target"] == "observed" and "feature" not in m and "hallucination" not in m and m["scenario"] is None
    assert m["calibration"]["values"] == "biomarker" and "crps" in m["calibration"]
    # copy-last MAE by hand, per horizon bin, on the forecast task
    one = ds.isel(subject=np.flatnonzero(held))
    t = np.where(one["observed"].values, one["time"].values, np.nan)
    y = np.where(one["observed"].values[..., None], one["biomarkers"].values, np.nan)
    errors: dict[str, list] = {}
    for s in range(len(t)):
        v = np.flatnonzero(np.isfinite(t[s]))
        if v.size < 2:
            continue
        k = math.ceil(v.size / 2)
        hist_t, hist_y = np.where(np.isin(np.arange(t.shape[1]), v[:k]), t[s], np.nan), y[s].copy()
        hist_y[~np.isin(np.arange(t.shape[1]), v[:k])] = np.nan
        pred = copy_last(hist_t[None], hist_y[None], t[s, v[k:]][None])[0]
        for r, x in enumerate(v[k:]):
            key = next(f"{e:g}" for e in (0.25, 0.5, 1, 2, 3, 5, math.inf) if t[s, x] - t[s, v[k - 1]] <= e)
            errors.setdefault(key, []).append(np.abs(pred[r] - y[s, x]))
    names = [str(b) for b in ds["biomarker"].values]
    for key, e in errors.items():
        got = m["forecast"][key]["copy_last"]["biomarker_mae"]
        assert [got[n] for n in names] == pytest.approx(np.nanmean(e, axis=0).tolist(), rel=1e-6)
        assert {"twin", "copy_last", "linear", "mixed_effects"} <= set(m["forecast"][key])
    # the same seed gives the same numbers
    assert evaluate(twin, ds, seed=3, progress=False).metrics == m


def test_cli_train_holdout_then_evaluate_writes_metrics_and_report(alzheimer, tmp_path):
    from twin.cli import main

    ds, _, _ = alzheimer
    from twin.data import write_cohort

    write_cohort(ds, tmp_path / "c.zarr", progress=False)
    (tmp_path / "cfg.json").write_text(json.dumps({"iterations": 40, "prior_steps": 10, "prior_draws": 8, "n_samples": 40,
                                                   "posterior_steps": 15}))
    assert main(["train", str(tmp_path / "c.zarr"), "--holdout", "0.25", "--config", str(tmp_path / "cfg.json"),
                 "-o", str(tmp_path / "m"), "-q"]) == 0
    model = BiomarkerTwin.load(tmp_path / "m")
    held = holdout_subjects([str(s) for s in ds["subject"].values], 0.25, 0)
    assert set(model.subjects) == {str(s) for s in ds["subject"].values[~held]}
    assert main(["evaluate", str(tmp_path / "m"), str(tmp_path / "c.zarr"), "-o", str(tmp_path / "ev"), "-q"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["subjects"] == int(held.sum()) and m["forecast"]
    page = (tmp_path / "ev" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "Calibration" in page
    assert sorted(p.name for p in (tmp_path / "ev" / "figures").iterdir())
    # an existing output is kept unless overwritten
    assert main(["evaluate", str(tmp_path / "m"), str(tmp_path / "c.zarr"), "-o", str(tmp_path / "ev"), "-q"]) == 2
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == m
