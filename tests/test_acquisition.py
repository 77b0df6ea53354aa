"""Acquisition corruptions against closed forms: Rician moments, polynomial bias bounds, exact rigid moves."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from twin.data import acquisition as acq
from twin.errors import InputError

# ---------------------------------------------------------------- visit schedules


@settings(max_examples=60, deadline=None)
@given(gaps=st.lists(st.floats(0.01, 3.0), min_size=0, max_size=12), jitter=st.floats(0.0, 5.0),
       p_missed=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1))
def test_schedule_invariants(gaps, jitter, p_missed, seed):
    nominal = np.concatenate([[0.0], np.cumsum(gaps)])
    time, observed = acq.visit_schedule(np.random.default_rng(seed), nominal, jitter, p_missed)
    assert time.shape == observed.shape == nominal.shape
    assert time.dtype == np.float64 and observed.dtype == bool
    assert time[0] == 0.0 and observed[0]
    assert np.all(np.diff(time) > 0)
    gap = np.diff(nominal)
    room = 0.45 * np.minimum(gap, np.append(gap[1:], np.inf))
    assert np.all(np.abs(time[1:] - nominal[1:]) <= room + 1e-12)


def test_schedule_extremes_and_rates():
    nominal = np.arange(2001) * 0.25
    time, observed = acq.visit_schedule(np.random.default_rng(0), nominal, 0.0, 0.0)
    np.testing.assert_array_equal(time, nominal)
    assert observed.all()
    time, observed = acq.visit_schedule(np.random.default_rng(1), nominal, 0.02, 0.3)
    assert (~observed[1:]).mean() == pytest.approx(0.3, abs=0.03)  # binomial sd ~0.01
    shift = time[1:] - nominal[1:]
    assert shift.std() == pytest.approx(0.02, rel=0.1) and abs(shift.mean()) < 0.003  # clipping unused at 5 sd
    _, observed = acq.visit_schedule(np.random.default_rng(2), nominal[:5], 0.01, 1.0)
    np.testing.assert_array_equal(observed, [True, False, False, False, False])
    time, observed = acq.visit_schedule(np.random.default_rng(3), [0.0], 0.1, 0.5)
    assert time.tolist() == [0.0] and observed.tolist() == [True]


def test_schedule_draws_in_a_fixed_order():
    nominal = [0.0, 0.5, 1.0, 2.0]
    a = acq.visit_schedule(np.random.default_rng(9), nominal, 0.05, 0.4)
    b = acq.visit_schedule(np.random.default_rng(9), nominal, 0.05, 0.4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    # V - 1 normals then V - 1 uniforms, whatever the parameters: later draws never shift
    rng, ref = np.random.default_rng(9), np.random.default_rng(9)
    acq.visit_schedule(rng, nominal, 0.0, 0.0)
    ref.normal(size=3), ref.random(3)
    assert rng.random() == ref.random()


def test_schedule_rejects_bad_plans():
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match=r"^visit_schedule: nominal: expected strictly increasing"):
        acq.visit_schedule(rng, [0.1, 0.5], 0.01, 0.1)
    with pytest.raises(InputError, match="nominal"):
        acq.visit_schedule(rng, [0.0, 0.5, 0.5], 0.01, 0.1)
    with pytest.raises(InputError, match="p_missed"):
        acq.visit_schedule(rng, [0.0, 0.5], 0.01, 1.5)


# ---------------------------------------------------------------- Rician noise


def test_rician_moments():
    rng = np.random.default_rng(0)
    sigma = 0.1
    zero = acq.rician_noise(np.zeros(200_000), sigma, rng)
    # Rayleigh at zero signal: mean sigma sqrt(pi/2), sd 0.655 sigma / sqrt(n) ~ 1.5e-3 sigma
    assert zero.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.01) and zero.min() >= 0
    # E[M^2] = A^2 + 2 sigma^2 exactly, at any signal level A
    for level in (0.05, 0.3, 2.0):
        m = acq.rician_noise(np.full(200_000, level), sigma, rng)
        assert np.mean(m**2) == pytest.approx(level**2 + 2 * sigma**2, rel=0.01)
    # high SNR: about Gaussian around the signal with variance sigma^2
    high = acq.rician_noise(np.full(200_000, 5.0), sigma, rng)
    assert high.var() == pytest.approx(sigma**2, rel=0.02) and high.mean() == pytest.approx(5.0, abs=2e-3)


def test_rician_keeps_dtype_shape_and_is_seeded():
    img = np.linspace(0, 1, 60, dtype=np.float32).reshape(2, 5, 6)
    a = acq.rician_noise(img, 0.05, np.random.default_rng(4))
    assert a.dtype == np.float32 and a.shape == img.shape
    np.testing.assert_array_equal(a, acq.rician_noise(img, 0.05, np.random.default_rng(4)))
    np.testing.assert_array_equal(acq.rician_noise(-img, 0.0, np.random.default_rng(4)), img)  # a magnitude
    with pytest.raises(InputError, match="rician_noise: sigma"):
        acq.rician_noise(img, -1.0, np.random.default_rng(4))


# ---------------------------------------------------------------- bias field


@pytest.mark.parametrize("shape", [(32, 40), (12, 14, 16)])
def test_bias_field_is_positive_smooth_and_unit_mean(shape):
    strength = 0.3
    f = acq.bias_field(shape, strength, np.random.default_rng(1))
    assert f.shape == shape and f.dtype == np.float32 and f.min() > 0
    assert f.mean() == pytest.approx(1.0, abs=1e-6)
    log = np.log(f.astype(np.float64))
    assert log.max() - log.min() == pytest.approx(2 * strength, rel=1e-5)
    # a cubic bounded by 1 on [-1, 1] has |p'| <= 9 (Markov): neighbours differ by <= 9 * 2/(n-1)
    for axis, n in enumerate(shape):
        assert np.abs(np.diff(log, axis=axis)).max() <= strength * 18 / (n - 1) + 1e-6
    np.testing.assert_array_equal(f, acq.bias_field(shape, strength, np.random.default_rng(1)))
    assert not np.array_equal(f, acq.bias_field(shape, strength, np.random.default_rng(2)))


def test_bias_field_without_strength_is_ones():
    np.testing.assert_array_equal(acq.bias_field((5, 6), 0.0, np.random.default_rng(0)), np.ones((5, 6), np.float32))
    with pytest.raises(InputError, match="bias_field: strength"):
        acq.bias_field((5, 6), -0.1, np.random.default_rng(0))


# ---------------------------------------------------------------- misregistration


def blob(shape, centre=None, width=3.0):
    grid = np.indices(shape, dtype=np.float64)
    centre = (np.asarray(shape) - 1) / 2 if centre is None else np.asarray(centre)
    r2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
    return np.exp(-r2 / (2 * width**2))


def test_misregister_without_motion_is_the_identity():
    img = np.random.default_rng(0).random((2, 9, 11, 10)).astype(np.float32)
    out = acq.misregister(img, np.random.default_rng(1), 0.0, 0.0)
    assert out.dtype == np.float32 and out.shape == img.shape
    np.testing.assert_allclose(out, img, atol=1e-6)


def test_pure_shift_is_scipys_shift():
    img = np.stack([blob((20, 24), (8, 13)), blob((20, 24), (11, 9), 2.0)])
    out = acq.misregister(img, np.random.default_rng(5), 0.0, 1.5)
    ref = np.random.default_rng(5)
    ref.uniform(0, 0, 1)  # the one 2D angle comes first
    t = ref.uniform(-1.5, 1.5, 2)
    for c in range(2):
        np.testing.assert_allclose(out[c], ndimage.shift(img[c], t, order=1, mode="constant"), atol=1e-12)


@pytest.mark.parametrize("shape", [(25, 25), (21, 21, 21)])
def test_rotation_is_about_the_centre_and_shared_by_channels(shape):
    # a centred round blob does not care about rotation; an off-centre one does
    centred = blob(shape)
    off = blob(shape, np.asarray(shape) / 2 - 4, 2.0)
    img = np.stack([centred, off, 2.0 * off])
    out = acq.misregister(img, np.random.default_rng(2), 15.0, 0.0)
    # (within the grid's inscribed ball: corners rotate out of the grid and come back as zeros)
    r = np.sqrt(sum((g - (n - 1) / 2) ** 2 for g, n in zip(np.indices(shape), shape)))
    ball = r <= (min(shape) - 1) / 2 - 1
    np.testing.assert_allclose(out[0][ball], centred[ball], atol=0.03)  # linear interpolation's error
    assert np.abs(out[1] - off).max() > 0.1
    np.testing.assert_allclose(out[2], 2.0 * out[1], rtol=1e-12)
    # each channel alone, from the same rng state, moves exactly as in the stack
    alone = acq.misregister(img[1:2], np.random.default_rng(2), 15.0, 0.0)
    np.testing.assert_array_equal(alone[0], out[1])
    # mass is kept away from the edges: a rigid move of an interior blob loses almost nothing
    assert out[1].sum() == pytest.approx(off.sum(), rel=0.02)


def test_2d_motion_moves_a_point_by_the_documented_rigid_map():
    # x -> R(x - c) + c + t, R = [[cos, -sin], [sin, cos]] in the (row, column) plane
    shape, p = (41, 41), np.array([12.0, 26.0])
    out = acq.misregister(blob(shape, p, 4.0)[None], np.random.default_rng(8), 10.0, 2.0)[0]
    ref = np.random.default_rng(8)
    theta = np.deg2rad(ref.uniform(-10.0, 10.0, 1)[0])
    t = ref.uniform(-2.0, 2.0, 2)
    c = (np.asarray(shape) - 1) / 2
    R = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    np.testing.assert_allclose(out, blob(shape, R @ (p - c) + c + t, 4.0), atol=0.015)


def test_misregister_keeps_zeros_outside_and_makes_no_nans():
    img = np.zeros((2, 30, 30), dtype=np.float32)
    img[:, 8:22, 8:22] = 1.0
    out = acq.misregister(img, np.random.default_rng(3), 3.0, 1.0)
    assert np.isfinite(out).all()
    assert np.all(out[:, :5] == 0) and np.all(out[:, -5:] == 0) and np.all(out[:, :, :5] == 0)
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    with pytest.raises(InputError, match="misregister: image: expected a scan"):
        acq.misregister(np.zeros((4, 4)), np.random.default_rng(0), 1.0, 1.0)
    with pytest.raises(InputError, match="misregister: image: expected finite"):
        acq.misregister(np.full((1, 4, 4), np.nan), np.random.default_rng(0), 1.0, 1.0)
