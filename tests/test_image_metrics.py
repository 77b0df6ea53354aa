"""Image metrics: exact answers on hand-made images, closed forms (constant-pair SSIM, Gaussian
Frechet distance), brute-force references (SSIM window by window, GLCM pair by pair), and the
batched path against the per-image path."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import linalg, stats

from twin.errors import InputError
from twin.image_metrics import (FEATURE_NAMES, band_coverage, change_rmse, dice, frechet_distance, glcm,
                                glcm_offsets, kid, ms_ssim, mse, pairwise_ms_ssim, psnr, radiomics_features,
                                ssim, volume)


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# Pixel fidelity
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spatial_dims,shape", [(2, (3, 24, 24)), (3, (2, 16, 16, 16))])
def test_identical_images_score_perfectly(spatial_dims, shape):
    x = _rng().random(shape)
    assert np.all(mse(x, x, spatial_dims=spatial_dims) == 0)
    assert np.all(np.isinf(psnr(x, x, 1.0, spatial_dims=spatial_dims)))
    for kernel in ("uniform", "gaussian"):
        np.testing.assert_allclose(ssim(x, x, 1.0, spatial_dims=spatial_dims, kernel=kernel), 1.0, atol=1e-12)
    assert ssim(x, x, 1.0, spatial_dims=spatial_dims).shape == shape[:1]


def test_psnr_matches_its_formula_for_known_noise_and_ignores_outside_the_mask():
    truth = _rng().random((32, 32))
    sign = np.where(_rng(1).random((32, 32)) < 0.5, -1.0, 1.0)
    pred = truth + 0.05 * sign                                  # squared error exactly 0.05^2 everywhere
    mask = np.zeros((32, 32), dtype=bool)
    mask[4:20, 4:20] = True
    pred_bad = np.where(mask, pred, 100.0)                      # outside the mask: huge errors
    np.testing.assert_allclose(mse(pred_bad, truth, mask, spatial_dims=2), 0.0025)
    np.testing.assert_allclose(psnr(pred_bad, truth, 2.0, mask, spatial_dims=2), 10 * np.log10(4 / 0.0025))
    assert math.isnan(mse(pred, truth, np.zeros((32, 32), bool), spatial_dims=2))


def test_ssim_is_symmetric_bounded_and_falls_with_noise():
    rng = _rng(2)
    x = _rng(3).random((40, 40))
    noise = rng.standard_normal((40, 40))
    scores = [ssim(x, x + s * noise, 1.0, spatial_dims=2) for s in (0.01, 0.05, 0.2, 0.5)]
    assert all(a > b for a, b in zip(scores, scores[1:]))
    assert all(s <= 1 for s in scores)
    y = x + 0.1 * noise
    for kernel in ("uniform", "gaussian"):
        assert ssim(x, y, 1.0, spatial_dims=2, kernel=kernel) == pytest.approx(
            ssim(y, x, 1.0, spatial_dims=2, kernel=kernel), abs=1e-14)


@pytest.mark.parametrize("data_range", [1.0, 4.0])
def test_ssim_of_a_constant_pair_has_its_closed_form(data_range):
    # Both variances and the covariance vanish, so the structure term is C2 / C2 = 1 and
    # SSIM = (2ab + C1) / (a^2 + b^2 + C1): the data range enters only through C1 = (K1 R)^2.
    a, b = 0.3, 0.5
    c1 = (0.01 * data_range) ** 2
    want = (2 * a * b + c1) / (a * a + b * b + c1)
    for spatial_dims, shape in ((2, (12, 12)), (3, (9, 9, 9))):
        got = ssim(np.full(shape, a), np.full(shape, b), data_range, spatial_dims=spatial_dims)
        assert got == pytest.approx(want, rel=1e-12)


def test_ssim_uniform_window_matches_a_window_by_window_reference():
    rng = _rng(4)
    x, y = rng.random((13, 11)), rng.random((13, 11))
    w, R, K1, K2 = 5, 2.0, 0.01, 0.03
    c1, c2 = (K1 * R) ** 2, (K2 * R) ** 2
    vals = []
    for i in range(w // 2, 13 - w // 2):
        for j in range(w // 2, 11 - w // 2):
            p = x[i - 2:i + 3, j - 2:j + 3].ravel()
            q = y[i - 2:i + 3, j - 2:j + 3].ravel()
            cov = np.cov(p, q)                                   # sample (n - 1) covariance
            vals.append((2 * p.mean() * q.mean() + c1) * (2 * cov[0, 1] + c2)
                        / ((p.mean() ** 2 + q.mean() ** 2 + c1) * (cov[0, 0] + cov[1, 1] + c2)))
    assert ssim(x, y, R, spatial_dims=2, window=w) == pytest.approx(np.mean(vals), rel=1e-10)


def test_ssim_batched_equals_per_image_and_respects_the_mask():
    rng = _rng(5)
    x = rng.random((2, 3, 10, 10, 10))
    y = x + 0.1 * rng.standard_normal(x.shape)
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[4, 4:6, 4:6] = True                                    # inside the 2^3 interior left by the crop
    batched = ssim(x, y, 1.0, spatial_dims=3, mask=mask, kernel="gaussian", sigma=1.0)
    for i, j in itertools.product(range(2), range(3)):
        assert batched[i, j] == ssim(x[i, j], y[i, j], 1.0, spatial_dims=3, mask=mask, kernel="gaussian", sigma=1.0)
    assert not np.allclose(batched, ssim(x, y, 1.0, spatial_dims=3, kernel="gaussian", sigma=1.0))


def test_ms_ssim_scales_identity_and_single_scale_equals_gaussian_ssim():
    rng = _rng(6)
    x = rng.random((2, 64, 64))
    np.testing.assert_allclose(ms_ssim(x, x, 1.0, spatial_dims=2), 1.0, atol=1e-12)
    y = x + 0.1 * rng.standard_normal(x.shape)
    np.testing.assert_allclose(ms_ssim(x, y, 1.0, spatial_dims=2, scales=1),
                               ssim(x, y, 1.0, spatial_dims=2, kernel="gaussian"), rtol=1e-12)
    assert np.all(ms_ssim(x, y, 1.0, spatial_dims=2) < 1)
    # 64 -> 32 -> 16 hold the 11-voxel window; 8 does not.
    with pytest.raises(InputError, match=r"^ms_ssim: scales: scales must lie in \[1, 3\] for spatial shape "
                                         r"\(64, 64\)"):
        ms_ssim(x, y, 1.0, spatial_dims=2, scales=4)
    with pytest.raises(InputError, match=r"^ms_ssim: sigma: images of spatial shape \(8, 8\) are smaller"):
        ms_ssim(x[:, :8, :8], y[:, :8, :8], 1.0, spatial_dims=2)


def test_pairwise_ms_ssim_is_one_for_copies_and_lower_for_diverse_samples():
    rng = _rng(7)
    base = rng.random((24, 24, 24))
    copies = np.broadcast_to(base, (3, 24, 24, 24))
    assert pairwise_ms_ssim(copies, 1.0, spatial_dims=3) == pytest.approx(1.0, abs=1e-12)
    diverse = base + 0.3 * rng.standard_normal((3, 24, 24, 24))
    assert pairwise_ms_ssim(diverse, 1.0, spatial_dims=3) < 0.9


# ---------------------------------------------------------------------------------------------
# Change, bands, overlap, volume
# ---------------------------------------------------------------------------------------------

def test_change_rmse_hand_value_and_what_it_ignores():
    ref = np.zeros((4, 4))
    truth = np.zeros((4, 4))
    truth[1, 1] = 2.0                                           # the true change: one voxel grew by 2
    pred = np.zeros((4, 4))
    pred[1, 1] = 1.0
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True                                         # 4 voxels
    assert change_rmse(pred, truth, ref, mask, spatial_dims=2) == pytest.approx(math.sqrt(1 / 4))
    outside = pred.copy()
    outside[3, 3] = 50.0
    common = _rng(8).random((4, 4))
    assert change_rmse(outside + common, truth + common, ref, mask, spatial_dims=2) == pytest.approx(0.5)
    # Relative: copy-last scores exactly 1, the forecast above half of it.
    assert change_rmse(ref, truth, ref, mask, spatial_dims=2, relative=True) == pytest.approx(1.0)
    assert change_rmse(pred, truth, ref, mask, spatial_dims=2, relative=True) == pytest.approx(0.5)
    with pytest.raises(InputError, match=r"^change_rmse: mask: a mask is required"):
        change_rmse(pred, truth, ref, None, spatial_dims=2)


def test_band_coverage_counts_voxels_inside_the_mask():
    truth = np.arange(8.0).reshape(2, 4)
    lower, upper = truth - 1, truth + 1
    upper[0, :3] = truth[0, :3] - 0.5                           # three misses in the first row
    np.testing.assert_allclose(band_coverage(lower, upper, truth, spatial_dims=2), 5 / 8)
    mask = np.array([[False, False, False, True], [True, True, True, True]])
    np.testing.assert_allclose(band_coverage(lower, upper, truth, mask, spatial_dims=2), 1.0)
    stack = lambda a, b: np.stack([a, b])  # noqa: E731
    np.testing.assert_allclose(band_coverage(stack(lower, lower), stack(upper, upper), stack(truth, truth + 10),
                                             mask, spatial_dims=2), [1.0, 0.0])


def test_dice_on_hand_made_masks_and_labels():
    a = np.zeros((5, 5), dtype=bool)
    b = np.zeros((5, 5), dtype=bool)
    a[:2, :2] = True                                            # 4 voxels
    b[1:3, 1:3] = True                                          # 4 voxels, 1 shared
    assert dice(a, b, spatial_dims=2) == pytest.approx(2 * 1 / 8)
    assert dice(a, a, spatial_dims=2) == 1.0
    assert math.isnan(dice(np.zeros_like(a), np.zeros_like(a), spatial_dims=2))
    la = a.astype(int) + 2 * (~a)                               # labels 1 (a) and 2 (rest)
    lb = b.astype(int) + 2 * (~b)
    np.testing.assert_allclose(dice(np.stack([la, la]), np.stack([lb, la]), spatial_dims=2, labels=(1, 2, 3)),
                               [[0.25, 2 * 18 / 42, np.nan], [1.0, 1.0, np.nan]])
    with pytest.raises(InputError, match=r"^dice: labels: expected boolean masks, or label maps"):
        dice(la, lb, spatial_dims=2)


def test_volume_of_masks_and_probabilities():
    m = np.zeros((2, 3, 4, 4))
    m[0, :, :2, :2] = 1.0                                       # 12 voxels
    m[1] = 0.5                                                  # 24 half voxels
    np.testing.assert_allclose(volume(m, 0.001, spatial_dims=3), [0.012, 0.024])
    with pytest.raises(InputError, match=r"^volume: mask_or_prob: expected a mask or probabilities in \[0, 1\]"):
        volume(m * 3, 1.0, spatial_dims=3)


# ---------------------------------------------------------------------------------------------
# GLCM and radiomics features
# ---------------------------------------------------------------------------------------------

def test_glcm_matches_a_hand_count():
    # Haralick's example (also skimage's docstring): horizontal neighbours, distance 1.
    image = np.array([[0, 0, 1, 1],
                      [0, 0, 1, 1],
                      [0, 2, 2, 2],
                      [2, 2, 3, 3]])
    want = np.array([[2, 2, 1, 0],
                     [0, 2, 0, 0],
                     [0, 0, 3, 1],
                     [0, 0, 0, 1]])
    np.testing.assert_array_equal(glcm(image, 4, [(0, 1)], spatial_dims=2, symmetric=False), want)
    np.testing.assert_array_equal(glcm(image, 4, [(0, 1)], spatial_dims=2), want + want.T)
    # Taking (0,1) out of the mask loses its two pairs: (0,0)-(0,1) (0 -> 0) and (0,1)-(0,2) (0 -> 1).
    mask = np.ones((4, 4), dtype=bool)
    mask[0, 1] = False
    got = glcm(image, 4, [(0, 1)], mask, spatial_dims=2, symmetric=False)
    assert got[0, 0] == 1 and got[0, 1] == 1 and got.sum() == want.sum() - 2


def test_glcm_offsets_and_batched_3d_against_pair_by_pair_reference():
    assert glcm_offsets(2) == ((0, 1), (1, -1), (1, 0), (1, 1))
    offsets = glcm_offsets(3)
    assert len(offsets) == 13 and len({tuple(-v for v in d) for d in offsets} & set(offsets)) == 0
    rng = _rng(9)
    q = rng.integers(0, 3, size=(2, 4, 5, 3))
    mask = rng.random((4, 5, 3)) < 0.8
    got = glcm(q, 3, offsets, mask, spatial_dims=3, symmetric=False)
    for b in range(2):
        want = np.zeros((3, 3))
        for v in itertools.product(*map(range, q.shape[1:])):
            for d in offsets:
                w = tuple(a + k for a, k in zip(v, d))
                if all(0 <= a < s for a, s in zip(w, q.shape[1:])) and mask[v] and mask[w]:
                    want[q[(b, *v)], q[(b, *w)]] += 1
        np.testing.assert_array_equal(got[b], want)


def test_radiomics_first_order_matches_scipy_and_shape_counts_faces():
    rng = _rng(10)
    x = rng.gamma(2.0, 0.2, size=(20, 20))
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:18, 3:15] = True
    f = dict(zip(FEATURE_NAMES, radiomics_features(x, mask, spatial_dims=2, intensity_range=(0, 2))))
    v = x[mask]
    assert f["firstorder_mean"] == pytest.approx(v.mean())
    assert f["firstorder_sd"] == pytest.approx(v.std())
    assert f["firstorder_skewness"] == pytest.approx(stats.skew(v))
    assert f["firstorder_kurtosis"] == pytest.approx(stats.kurtosis(v))
    assert f["firstorder_p90"] == pytest.approx(np.percentile(v, 90))
    hist = np.histogram(np.clip(v, 0, 2 - 1e-12), bins=32, range=(0, 2))[0] / v.size
    assert f["firstorder_entropy"] == pytest.approx(stats.entropy(hist, base=2))
    # Shape of a 4 x 5 bright block (threshold given) and of a 3 x 3 x 3 cube (Otsu finds it).
    block = np.zeros((10, 10))
    block[2:6, 3:8] = 1.0
    s = dict(zip(FEATURE_NAMES, radiomics_features(block, spatial_dims=2, intensity_range=(0, 1), threshold=0.5)))
    assert (s["shape_volume"], s["shape_surface"], s["shape_surface_to_volume"]) == (20, 18, 0.9)
    cube = np.zeros((6, 6, 6))
    cube[1:4, 1:4, 1:4] = 1.0
    c = dict(zip(FEATURE_NAMES, radiomics_features(cube, spatial_dims=3, intensity_range=(0, 1))))
    assert (c["shape_volume"], c["shape_surface"]) == (27, 54)


def test_radiomics_batched_constant_and_empty_mask():
    rng = _rng(11)
    x = rng.random((2, 3, 8, 8, 8))
    batched = radiomics_features(x, spatial_dims=3, intensity_range=(0, 1))
    assert batched.shape == (2, 3, len(FEATURE_NAMES))
    np.testing.assert_allclose(batched[1, 2], radiomics_features(x[1, 2], spatial_dims=3, intensity_range=(0, 1)))
    const = dict(zip(FEATURE_NAMES, radiomics_features(np.full((8, 8), 0.4), spatial_dims=2,
                                                       intensity_range=(0, 1))))
    assert (const["glcm_contrast"], const["glcm_correlation"], const["glcm_energy"]) == (0, 1, 1)
    assert (const["firstorder_skewness"], const["gradient_mean"]) == (0, 0)
    empty = radiomics_features(x[0], np.zeros((8, 8, 8), bool), spatial_dims=3, intensity_range=(0, 1))
    assert np.all(np.isnan(empty))
    # Noise raises texture contrast and edge strength: what the features are for.
    smooth = np.add.outer(np.linspace(0, 1, 16), np.linspace(0, 1, 16)) / 2
    noisy = np.clip(smooth + 0.2 * rng.standard_normal((16, 16)), 0, 1)
    fs, fn = (dict(zip(FEATURE_NAMES, radiomics_features(im, spatial_dims=2, intensity_range=(0, 1))))
              for im in (smooth, noisy))
    assert fn["glcm_contrast"] > fs["glcm_contrast"] and fn["gradient_mean"] > fs["gradient_mean"]


# ---------------------------------------------------------------------------------------------
# Feature distances
# ---------------------------------------------------------------------------------------------

def _gaussian_fd(mu1, s1, mu2, s2):
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(linalg.sqrtm(s1 @ s2))))


def test_frechet_distance_closed_form_and_zero_for_identical_sets():
    rng = _rng(12)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, -1.0])
    a1, a2 = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    s1, s2 = a1 @ a1.T + 0.5 * np.eye(3), a2 @ a2.T + 0.2 * np.eye(3)
    x = rng.multivariate_normal(mu1, s1, size=100_000)
    y = rng.multivariate_normal(mu2, s2, size=100_000)
    want = _gaussian_fd(mu1, s1, mu2, s2)
    assert frechet_distance(x, y, standardise=False) == pytest.approx(want, rel=0.03)
    # On the sample moments it equals the sqrtm reference to roundoff.
    ref = _gaussian_fd(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert frechet_distance(x, y, standardise=False) == pytest.approx(ref, rel=1e-9)
    assert frechet_distance(x[:500], x[:500]) == pytest.approx(0.0, abs=1e-9)
    # Standardising on the real set: a unit change of feature scale does not move the distance.
    scale = np.array([1.0, 1000.0, 0.01])
    assert frechet_distance(x[:2000] * scale, y[:2000] * scale) == pytest.approx(frechet_distance(x[:2000], y[:2000]))


def test_kid_is_about_zero_for_one_distribution_and_positive_for_a_shift():
    rng = _rng(13)
    real = rng.standard_normal((600, 5))
    same = rng.standard_normal((600, 5))
    shifted = rng.standard_normal((600, 5)) + 0.5
    m0, sd0 = kid(real, same, subsets=20, subset_size=300)
    m1, _ = kid(real, shifted, subsets=20, subset_size=300)
    assert abs(m0) < 0.02 and sd0 > 0
    assert m1 > 0.1 and m1 > 10 * abs(m0)
    assert kid(real, same, subsets=20, subset_size=300) == (m0, sd0)  # seeded


def test_errors_name_the_function_and_field():
    x = np.zeros((8, 8))
    with pytest.raises(InputError, match=r"^psnr: data_range: data_range must be a positive number, got 0"):
        psnr(x, x, 0, spatial_dims=2)
    with pytest.raises(InputError, match=r"^ssim: spatial_dims: spatial_dims must be 2 or 3, got 1"):
        ssim(x, x, 1.0, spatial_dims=1)
    with pytest.raises(InputError, match=r"^mse: truth: expected truth of shape \(8, 8\), got \(8, 7\)"):
        mse(x, x[:, :7], spatial_dims=2)
    with pytest.raises(InputError, match=r"^ssim: window: images of spatial shape \(8, 8\) are smaller than "
                                         r"the 11-voxel window"):
        ssim(x, x, 1.0, spatial_dims=2, window=11)
    with pytest.raises(InputError, match=r"^mse: mask: expected a boolean mask, got float64"):
        mse(x, x, np.ones((8, 8)), spatial_dims=2)
    with pytest.raises(InputError, match=r"^frechet_distance: generated: features must be finite"):
        frechet_distance(np.zeros((4, 2)), np.full((4, 2), np.nan))
