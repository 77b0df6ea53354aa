"""The scan twin end to end on a tiny simulated cohort: shapes, structure, seeds, checkpoints, errors, CLI."""

from __future__ import annotations

import numpy as np
import pytest

from twin import InputError, ScanConfig, ScanTwin, TwinConfig
from twin.scan_decoder import DecoderConfig
from twin.scan_twin import SCAN_CHECKS

TINY = ScanConfig(n_samples=4, registration_iterations=10, state_draws=4,
                  dynamics=TwinConfig(iterations=40, prior_steps=10, prior_draws=8, n_samples=20, posterior_steps=20),
                  decoder=DecoderConfig(basis_iterations=15, iterations=15, width=8, basis_width=8, batch=16,
                                        sampler_steps=5))


@pytest.fixture(scope="module")
def cohort():
    from twin.data.simulate import simulate_cohort

    return simulate_cohort("glioma", 8, 2, seed=4, progress=False)


@pytest.fixture(scope="module")
def fitted(cohort, tmp_path_factory):
    path = tmp_path_factory.mktemp("scan-model")
    return ScanTwin.fit(cohort, TINY, checkpoint_dir=path, progress=False), path


def test_forecast_has_scans_bands_and_volumes(cohort, fitted):
    twin, _ = fitted
    subjects = [str(s) for s in cohort["subject"].values[:3]]
    r = twin.forecast(cohort, subjects, horizons=[0.5, 1.0])
    S, R, C = 3, 2, cohort.sizes["channel"]
    space = cohort["image"].shape[-2:]
    assert r["scan_mean"].shape == (S, R, C, *space)
    Q = len(twin.dynamics.config.quantiles)
    assert r["scan_quantiles"].shape == (Q, S, R, C, *space)
    q = r["scan_quantiles"].values
    assert np.all(np.diff(q, axis=0) >= -1e-6)  # bands nest
    assert r["volume_mean"].shape == (S, R, len(twin.structures))
    step = np.diff(r["volume_quantiles"].values, axis=0)  # NaN between two unbounded (inf) band edges
    assert np.all((step >= -1e-9) | (np.isnan(step) & np.isinf(r["volume_quantiles"].values[1:])))
    assert r["scan_flags"].dtype == bool and r["scan_flags"].shape == (len(SCAN_CHECKS), S, R)
    # a forecast starts from each subject's last observed scan, and nothing changes outside the brain
    ref = r["reference_scan"].values
    mask = cohort["mask"].values[:3].astype(bool)
    outside = ~mask[:, None, None]
    assert np.array_equal(np.broadcast_to(outside, ref.shape), np.broadcast_to(outside, ref.shape))
    assert np.array_equal(r["scan_mean"].values[np.broadcast_to(outside, ref.shape)],
                          ref[np.broadcast_to(outside, ref.shape)])
    last = np.nanmax(np.where(cohort["observed"].values[:3], cohort["time"].values[:3], np.nan), axis=1)
    assert np.allclose(r["reference_time"].values, (cohort["baseline_time"].values[:3] + last)[:, None])
    # the biomarker part is the dynamics' own answer
    assert r["mean"].shape == (S, R, cohort.sizes["biomarker"])


def test_same_seed_same_scans_other_seed_other_scans(cohort, fitted):
    twin, _ = fitted
    a = twin.forecast(cohort, ["sim-0001"], horizons=[1.0], seed=3, samples=True)
    b = twin.forecast(cohort, ["sim-0001"], horizons=[1.0], seed=3, samples=True)
    c = twin.forecast(cohort, ["sim-0001"], horizons=[1.0], seed=4, samples=True)
    assert np.array_equal(a["scan_samples"].values, b["scan_samples"].values)
    assert not np.array_equal(a["scan_samples"].values, c["scan_samples"].values)
    assert a["scan_samples"].shape[0] == TINY.n_samples


def test_checkpoint_round_trip_and_reuse(cohort, fitted):
    twin, path = fitted
    loaded = ScanTwin.load(path)
    assert loaded.fingerprint == twin.fingerprint
    a = twin.forecast(cohort, ["sim-0002"], horizons=[1.0])
    b = loaded.forecast(cohort, ["sim-0002"], horizons=[1.0])
    assert np.array_equal(a["scan_mean"].values, b["scan_mean"].values)
    # fitting the same cohort and config into the same directory loads the finished twin
    again = ScanTwin.fit(cohort, TINY, checkpoint_dir=path, progress=False)
    assert again.fingerprint == twin.fingerprint
    with pytest.raises(InputError, match="another cohort or config"):
        ScanTwin.fit(cohort.isel(subject=slice(0, 7)), TINY, checkpoint_dir=path, progress=False)


def test_scenario_arms_share_draws(cohort, fitted):
    twin, _ = fitted
    subject = "sim-0003"
    i = [str(s) for s in cohort["subject"].values].index(subject)
    alt = [(float(t), str(a), float(d)) for t, a, d in zip(cohort["alternative_event_time"].values[i],
                                                           cohort["alternative_event_agent"].values[i],
                                                           cohort["alternative_event_dose"].values[i]) if np.isfinite(t)]
    r = twin.simulate(cohort, {"alternative": {subject: alt}}, [subject], horizons=[1.0])
    assert list(r["arm"].values) == ["factual", "alternative"]
    assert r["scan_mean"].shape[0] == 2
    assert np.all(r["scan_effect_mean"].values[0] == 0)
    effect = r["scan_mean"].values[1] - r["scan_mean"].values[0]
    assert np.allclose(r["scan_effect_mean"].values[1], effect, atol=1e-5)


def test_fill_starts_from_the_nearest_scan(cohort, fitted):
    twin, _ = fitted
    i = 0
    t = cohort["time"].values[i]
    obs = cohort["observed"].values[i]
    inner = float(np.mean(t[obs][:2]))  # between the first two observed visits
    base = float(cohort["baseline_time"].values[i])
    r = twin.fill(cohort, ["sim-0001"], at={"sim-0001": [base + inner]})
    nearest = t[obs][np.argmin(np.abs(t[obs] - inner))]
    assert np.isclose(float(r["reference_time"].values[0, 0]), base + nearest)


def test_image_only_cohort_uses_measured_volumes(cohort):
    bare = cohort.drop_vars(["biomarkers", "biomarker", "biomarker_unit"])
    twin = ScanTwin.fit(bare, TINY, progress=False)
    assert twin.derived_biomarkers
    r = twin.forecast(bare, ["sim-0001"], horizons=[1.0])
    assert [str(b) for b in r["biomarker"].values] == list(twin.structures)


def test_errors_name_the_field(cohort, fitted):
    twin, _ = fitted
    with pytest.raises(InputError, match="image"):
        ScanTwin.fit(cohort.drop_vars(["image"]), TINY, progress=False)
    with pytest.raises(InputError, match="channel"):
        twin.forecast(cohort.isel(channel=[0]), ["sim-0001"], horizons=[1.0])
    with pytest.raises(InputError, match="unknown setting"):
        ScanConfig.from_dict({"n_sample": 3})
    with pytest.raises(InputError, match="n_samples"):
        twin.forecast(cohort, ["sim-0001"], horizons=[1.0], n_samples=1)


def test_cli_train_forecast_export(cohort, tmp_path, capsys):
    import json

    from twin.cli import main
    from twin.data import write_cohort

    store = write_cohort(cohort, tmp_path / "c.zarr")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY.to_dict()))
    assert main(["train", str(store), "--config", str(config), "-o", str(tmp_path / "m"), "-q"]) == 0
    assert (tmp_path / "m" / "decoder" / "model.safetensors").exists()
    assert main(["forecast", str(tmp_path / "m"), str(store), "--times", "1", "--subjects", "sim-0001",
                 "-o", str(tmp_path / "r.zarr"), "-q"]) == 0
    from twin import open_result

    r = open_result(tmp_path / "r.zarr")
    assert "scan_mean" in r and r["scan_mean"].shape[0] == 1
    assert main(["export", "nifti", str(tmp_path / "r.zarr"), "-o", str(tmp_path / "nii"), "-q"]) == 0
    assert list((tmp_path / "nii").rglob("*_mean.nii.gz"))
    assert "scan twin" in capsys.readouterr().out


def test_3d_cohort_end_to_end():
    from twin.data.simulate import simulate_cohort

    ds = simulate_cohort("atrophy", 4, 3, seed=1, size=32, progress=False)
    twin = ScanTwin.fit(ds, TINY, progress=False)
    r = twin.forecast(ds, ["sim-0001"], horizons=[1.0])
    assert r["scan_mean"].dims[-3:] == ("z", "y", "x") and r["scan_mean"].shape == (1, 1, 1, 32, 32, 32)
    outside = ~ds["mask"].values[0].astype(bool)
    assert np.array_equal(r["scan_mean"].values[0, 0, 0][outside], r["reference_scan"].values[0, 0, 0][outside])


def test_a_subject_without_scans_is_refused_by_name(cohort, fitted):
    twin, _ = fitted
    blank = cohort.copy(deep=True)
    image = blank["image"].values
    image[1] = np.nan  # sim-0002 lost every scan (its biomarkers stay)
    blank["image"] = (blank["image"].dims, image)
    with pytest.raises(InputError, match="sim-0002.*no observed scan"):
        twin.forecast(blank, ["sim-0002"], horizons=[1.0])


def test_the_shrinkage_is_the_smallest_within_one_standard_error_of_the_best():
    from twin.scan_twin import _one_se_choice

    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(10), 4)
    noise = rng.normal(0, 1, 40)
    # a learned change that helps clearly: errors fall steeply towards 1
    clear = {k: (1 - k) ** 2 * 5 + 0.1 * noise + 3 for k in (0.0, 0.5, 1.0)}
    assert _one_se_choice(clear, group) == 1.0
    # one whose gain is below the scatter of the paired differences: no evidence for it, keep copy-last
    base = rng.normal(3, 1, 40)
    weak = {k: base - 0.02 * k + 0.3 * rng.normal(0, 1, 40) for k in (0.0, 0.5, 1.0)}
    best = min(weak, key=lambda k: weak[k].mean())
    assert best != 0.0 and _one_se_choice(weak, group) == 0.0
    # the best itself always qualifies
    assert _one_se_choice({0.3: np.ones(4)}, np.zeros(4)) == 0.3
