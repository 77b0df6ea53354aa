"""The atrophy simulator: the logistic stage and its exact treated solution against an ODE solver,
covariate effects, a diffeomorphic ventricular expansion, and whole subjects' invariants."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate
from scipy.special import expit

from twin.data import atrophy as at
from twin.data import treatment as tx
from twin.data.glioma import jacobian_determinant
from twin.errors import InputError

RESPONSE = at.Response(tx.OneCompartment.from_half_life(25 * tx.DAY, 0.07), emax=0.7, ec50=40.0)


def test_untreated_stage_is_the_logistic_sigmoid():
    t = np.linspace(0, 6, 25)
    s = at.stage(t, 70.0, 73.0, 0.6)
    np.testing.assert_array_equal(s, expit(0.6 * (70.0 + t - 73.0)))
    assert at.stage(3.0, 70.0, 73.0, 0.6)[0] == 0.5  # the onset age is the midpoint
    # and it solves ds/dt = r s (1 - s)
    ds = np.gradient(s, t, edge_order=2)
    np.testing.assert_allclose(ds[2:-2], 0.6 * s[2:-2] * (1 - s[2:-2]), rtol=2e-3)


def test_treated_stage_matches_the_integrated_ode():
    events = at.infusions(0.2, 1.5, 28 * tx.DAY, 10.0)
    dose_t, dose_d = tx.doses(events, at.DMT)
    age0, onset, rate = 74.0, 75.0, 0.8
    times = np.array([0.1, 0.2, 0.37, 0.81, 1.2, 1.6])

    def rhs(t, y):
        e = tx.emax_effect(tx.concentration(t, dose_t, dose_d, RESPONSE.pk), RESPONSE.emax, RESPONSE.ec50)
        return rate * y * (1 - y) * (1 - e)

    # integrate piece by piece between doses: C(t) jumps at each, which a solver must not step over
    cuts = np.unique(np.concatenate([[0.0], dose_t, [times.max()]]))
    y = expit(rate * (age0 - onset))
    numeric = np.empty_like(times)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        sol = integrate.solve_ivp(rhs, (lo, hi), [y], rtol=1e-11, atol=1e-13, max_step=2 * tx.DAY, dense_output=True)
        inside = (times >= lo) & (times <= hi)
        if inside.any():
            numeric[inside] = sol.sol(times[inside])[0]
        y = sol.y[0, -1]
    exact = at.stage(times, age0, onset, rate, events, RESPONSE)
    np.testing.assert_allclose(exact, numeric, atol=1e-7)
    assert exact[-1] < at.stage(times[-1], age0, onset, rate)[0] - 0.05  # and the effect is sizeable


def test_exposure_is_the_closed_form_effect_integral():
    events = at.infusions(0.0, 1.0, 28 * tx.DAY, 10.0)
    t = np.array([0.9, 0.0, 0.3, 0.3, 1.7])  # unsorted, repeated: each gets its own integral
    dose_t, dose_d = tx.doses(events, at.DMT)
    expected = [tx.effect_integral(0.0, x, dose_t, dose_d, RESPONSE.pk, 0.7, 40.0) for x in t]
    np.testing.assert_allclose(at.exposure(t, events, RESPONSE), expected, rtol=1e-12)
    assert at.exposure(t, [], None).tolist() == [0.0] * 5
    # a month of steady dosing is worth most of Emax: C stays well above EC50
    assert at.exposure([1.0], events, RESPONSE)[0] > 0.5 * 0.7


@settings(max_examples=40, deadline=None)
@given(onset=st.floats(60, 95), rate=st.floats(0.1, 2.0), start=st.floats(0.0, 3.0), emax=st.floats(0.0, 0.99),
       ec50=st.floats(1.0, 200.0))
def test_treatment_slows_only_after_it_starts(onset, rate, start, emax, ec50):
    response = at.Response(RESPONSE.pk, emax, ec50)
    events = at.infusions(start, 4.0, 28 * tx.DAY, 10.0)
    t = np.linspace(0.0, 4.0, 41)
    treated = at.stage(t, 72.0, onset, rate, events, response)
    untreated = at.stage(t, 72.0, onset, rate)
    before = t <= start  # the infusion at `start` enters C from then on; exposure at start is 0
    np.testing.assert_array_equal(treated[before], untreated[before])
    assert np.all(treated <= untreated) and np.all(np.diff(treated) >= 0)  # slower, never reversed
    if emax > 0.05 and start < 3.5:
        after = t > start + 0.2
        logit_gap = np.log(untreated / (1 - untreated)) - np.log(treated / (1 - treated))
        assert np.all(logit_gap[after] > 0)


def test_infusions_and_event_capacity():
    events = at.infusions(0.25, 1.0, 28 * tx.DAY, 10.0)
    times = np.array([e[0] for e in events])
    assert times[0] == 0.25 and times[-1] <= 1.0 < times[-1] + 28 * tx.DAY
    np.testing.assert_allclose(np.diff(times), 28 * tx.DAY, rtol=1e-12)
    assert {e[1] for e in events} == {at.DMT} and {e[2] for e in events} == {10.0}
    assert at.infusions(np.nan, 4.0, 0.1, 1.0) == [] and at.infusions(5.0, 4.0, 0.1, 1.0) == []
    cfg = at.AtrophyConfig()
    assert at.event_capacity(cfg) == len(at.infusions(0.0, 4.0, cfg.dose_every, cfg.dose)) == 53


def test_covariates_shift_onset_and_rate():
    cfg = at.AtrophyConfig(p_apoe4=0.5)
    draws = [at.draw(np.random.default_rng(i), cfg) for i in range(400)]
    apoe4 = np.array([d.apoe4 for d in draws], bool)
    female = np.array([d.sex for d in draws], bool)
    onset = np.array([d.onset for d in draws])
    rate = np.log([d.rate for d in draws])
    assert 3.5 < onset[~apoe4].mean() - onset[apoe4].mean() < 6.5  # 5 years earlier in carriers
    assert np.exp(rate[apoe4].mean() - rate[~apoe4].mean()) > 1.1  # and faster
    # the sex effect is small (1 year); check it in the onset after removing the apoe4 shift
    adjusted = onset + cfg.apoe4_onset_shift * apoe4
    assert 0.0 < adjusted[~female].mean() - adjusted[female].mean() < 2.0
    ages = np.array([d.age for d in draws])
    assert ages.min() >= 55 and ages.max() <= 90 and abs(ages.mean() - 72) < 1.0
    starts = np.array([d.treatment_start for d in draws])
    treated = np.isfinite(starts)
    later = starts[treated & (starts > 0)]
    assert 0.4 < treated.mean() < 0.6 and np.all((later >= 0.1) & (later <= 1.5))
    np.testing.assert_allclose(later / tx.DAY, np.round(later / tx.DAY), atol=1e-9)  # whole days
    alternative = np.array([d.alternative_start for d in draws])
    np.testing.assert_allclose(alternative[treated], starts[treated] + 1.0)
    assert np.all(alternative[~treated] == 0.0)


def test_draws_come_in_a_fixed_order():
    # whether a subject is treated or not, the draw consumes the same variates: nothing shifts
    ends = []
    for p in (0.0, 1.0):
        rng = np.random.default_rng(3)
        at.draw(rng, at.AtrophyConfig(p_treated=p))
        ends.append(rng.random())
    assert ends[0] == ends[1]


def test_config_rejects_bad_values_and_unknown_keys():
    with pytest.raises(InputError, match="AtrophyConfig: emax"):
        at.AtrophyConfig(emax=(0.5, 1.0))
    with pytest.raises(InputError, match="AtrophyConfig: visits"):
        at.AtrophyConfig(visits=(0.5, 1.0))
    with pytest.raises(InputError, match=r"unknown key\(s\) \['ratee'\]"):
        at.AtrophyConfig.from_dict({"rate": 0.4, "ratee": 0.5})
    assert at.AtrophyConfig.from_dict({"visits": [0, 1, 2], "emax": [0.2, 0.3]}).visits == (0, 1, 2)
    with pytest.raises(InputError, match="exposure: events"):
        at.exposure([1.0], [(0.5, "aspirin", 1.0)], RESPONSE)


# ---------------------------------------------------------------- anatomy at stage s


@pytest.fixture(scope="module")
def base2d():
    pytest.importorskip("twin.data.acquisition")
    return pytest.importorskip("twin.data.anatomy").template(2)


def _brain(base, seed):
    from twin.data.anatomy import subject_anatomy

    rng = np.random.default_rng(seed)
    anatomy = subject_anatomy(base, rng)
    return anatomy, at.brain_of(anatomy, at.draw(rng), at.AtrophyConfig())


def test_expansion_is_diffeomorphic_and_zero_outside_the_brain(base2d):
    anatomy, brain = _brain(base2d, 0)
    assert np.all(brain.v1[:, ~brain.mask] == 0)
    for s in (0.5, 1.0):
        assert jacobian_determinant(s * brain.v1).min() > 0
    # an absurd amplitude is capped back to a diffeomorphism
    v = at.expansion(brain.ventricle, brain.mask, anatomy.spacing, 1e4)
    assert jacobian_determinant(v).min() > 0 and np.all(v[:, ~brain.mask] == 0)
    # it points away from the ventricles: the ventricular CSF grows under the warp
    ring = brain.mask & (at.render(brain, 1.0)["ventricle"] > brain.ventricle + 0.05)
    assert ring.sum() >= 3


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_volumes_are_monotone_in_the_stage_and_the_outside_is_untouched(base2d, seed):
    anatomy, brain = _brain(base2d, seed)
    stages = np.linspace(0.0, 1.0, 11)
    rendered = [at.render(brain, s) for s in stages]
    vols = np.array([at.volumes(m, brain, s) for m, s in zip(rendered, stages)])  # (11, 4)
    d = np.diff(vols, axis=0)
    assert np.all(d[:, 0] > 0) and np.all(d[:, 1] < 0) and np.all(d[:, 2] < 0) and np.all(d[:, 3] < 0)
    assert vols[-1, 0] > 1.1 * vols[0, 0] and vols[-1, 2] < 0.9 * vols[0, 2]  # visible over the course
    for m in rendered:
        for name, ref in (("t1", anatomy.t1), ("gm", anatomy.gm), ("csf", anatomy.csf)):
            np.testing.assert_array_equal(m[name][~brain.mask], np.asarray(ref, np.float64)[~brain.mask])
        total = m["gm"] + m["wm"] + m["csf"]
        np.testing.assert_allclose(total[brain.mask], 1.0, atol=1e-5)  # grey matter becomes CSF, no more


# ---------------------------------------------------------------- whole subjects on real anatomy


CFG = at.AtrophyConfig(p_missed=0.3)


def _subject(base, seed, cfg=CFG):
    from twin.data.anatomy import subject_anatomy

    rng = np.random.default_rng(seed)
    return at.atrophy_subject(subject_anatomy(base, rng), rng, cfg)


@pytest.fixture(scope="module")
def subjects(base2d):
    return [_subject(base2d, seed) for seed in range(12)]


def test_subject_matches_the_contract(base2d, subjects):
    for s in subjects:
        V = len(s.time)
        space = s.mask.shape
        assert V == 6 and s.time[0] == 0 and np.all(np.diff(s.time) > 0) and s.observed[0]
        assert s.image.shape == (V, 1, *space) and s.truth_image.shape == (3, V, 1, *space)
        assert s.image.dtype == s.truth_image.dtype == np.float32
        assert s.truth_labels.shape == (V, *space) and s.truth_labels.dtype == np.uint8
        assert set(np.unique(s.truth_labels)) == set(range(len(at.ATROPHY.labels) + 1))
        assert s.biomarkers.shape == (V, 4) and s.truth_biomarkers.shape == (3, V, 4)
        assert np.isfinite(s.image[s.observed]).all() and np.isnan(s.image[~s.observed]).all()
        assert np.isfinite(s.biomarkers[s.observed]).all() and np.isnan(s.biomarkers[~s.observed]).all()
        score = s.biomarkers[s.observed, 3]
        assert np.all(score == np.round(score)) and score.min() >= 0 and score.max() <= 30
        assert len(s.parameters) == len(at.ATROPHY.parameter) and len(s.covariates) == len(at.ATROPHY.covariate)
        assert np.isfinite(s.truth_image).all() and np.isfinite(s.truth_biomarkers).all()
        assert s.baseline_time == s.covariates[0] and s.affine.shape == (4, 4)
        for events in (s.events, s.alternative_events):
            t = [e[0] for e in events]
            assert t == sorted(t) and all(0 <= x <= 4.0 for x in t) and len(events) <= at.event_capacity(CFG)
        assert s.events != s.alternative_events
    assert any(not s.observed.all() for s in subjects)  # missed visits happen
    assert any(s.events for s in subjects) and any(not s.events for s in subjects)


def test_truth_is_the_closed_form_of_the_stored_parameters(subjects):
    names = at.ATROPHY.parameter
    for s in subjects:
        p = dict(zip(names, s.parameters))
        response = at.Response(tx.OneCompartment.from_half_life(p["half_life"], CFG.pk_volume), p["emax"], p["ec50"])
        for k, events in enumerate((s.events, [], s.alternative_events)):
            stage = at.stage(s.time, s.baseline_time, p["onset_age"], p["rate"], events, response)
            np.testing.assert_allclose(s.truth_biomarkers[k, :, 3], at.cognitive_score(stage), rtol=1e-12)
        first = [e[0] for e in s.events[:1]] or [np.nan]
        np.testing.assert_array_equal(first, [p["treatment_start"]])


def test_same_seed_same_subject_and_seeds_differ(base2d, subjects):
    again = _subject(base2d, 0)
    for name in ("time", "observed", "image", "truth_image", "truth_labels", "biomarkers", "truth_biomarkers",
                 "parameters", "covariates", "mask"):
        np.testing.assert_array_equal(getattr(again, name), getattr(subjects[0], name))
    assert again.events == subjects[0].events
    assert not np.array_equal(subjects[0].truth_image, subjects[1].truth_image)
    assert not np.array_equal(subjects[0].parameters, subjects[1].parameters)


def test_nothing_changes_outside_the_brain(subjects):
    for s in subjects:
        outside = s.truth_image[..., ~s.mask]  # (3, V, C, N)
        np.testing.assert_array_equal(outside, np.broadcast_to(outside[:1, :1], outside.shape))
        assert np.all(s.truth_labels[:, ~s.mask] == 0)


def test_untreated_is_monotone_and_treatment_only_slows_it(subjects):
    for s in subjects:
        vent, grey, hippo, score = np.moveaxis(s.truth_biomarkers, -1, 0)  # each (3, V)
        for k in range(3):  # with Emax < 1 even treated subjects keep progressing, only slower
            assert np.all(np.diff(vent[k]) >= 0) and np.all(np.diff(grey[k]) <= 0)
            assert np.all(np.diff(hippo[k]) <= 0) and np.all(np.diff(score[k]) <= 0)
        assert np.all(vent[0] <= vent[1]) and np.all(score[0] >= score[1])
        # every scenario starts from the same baseline scan
        baseline = s.truth_image[:, 0]
        np.testing.assert_array_equal(baseline, np.broadcast_to(baseline[1], baseline.shape))
        if not s.events:  # factual is untreated, bit for bit
            np.testing.assert_array_equal(s.truth_image[0], s.truth_image[1])
            np.testing.assert_array_equal(s.truth_biomarkers[0], s.truth_biomarkers[1])
    effects = [s.truth_biomarkers[0, -1, 3] - s.truth_biomarkers[1, -1, 3] for s in subjects if s.events]
    assert max(effects) > 3.0  # someone treated while progressing keeps several points


def test_labels_agree_with_volumes_up_to_partial_volume(base2d, subjects):
    for s in subjects:
        for label, column in ((4, 0), (2, 1), (5, 2)):
            counted = (s.truth_labels == label).sum((1, 2)) * base2d.voxel_volume
            if label == 2:
                counted = counted + (s.truth_labels == 5).sum((1, 2)) * base2d.voxel_volume  # hippocampus is grey
            ratio = counted / s.truth_biomarkers[0, :, column]
            assert np.all((ratio > 0.6) & (ratio < 1.6))


def test_3d_subject_once():
    pytest.importorskip("twin.data.acquisition")
    anatomy = pytest.importorskip("twin.data.anatomy")
    base = anatomy.template(3, 32)
    s = _subject(base, 6, at.AtrophyConfig(visits=(0.0, 2.0, 4.0)))
    assert s.truth_image.shape == (3, 3, 1, 32, 32, 32) and np.isfinite(s.truth_image).all()
    outside = s.truth_image[..., ~s.mask]
    np.testing.assert_array_equal(outside, np.broadcast_to(outside[:1, :1], outside.shape))
    vent, grey, hippo, _ = np.moveaxis(s.truth_biomarkers, -1, 0)
    assert np.all(np.diff(vent[1]) >= 0) and np.all(np.diff(grey[1]) <= 0) and np.all(np.diff(hippo[1]) <= 0)
