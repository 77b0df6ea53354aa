"""Image metrics for generated scans: pixel fidelity, change, bands, volumes, feature realism.

Everything takes numpy arrays of images (..., Y, X) or (..., Z, Y, X) and is batched over the
leading axes: a metric of one image is a number, of images (S, K, Y, X) an (S, K) array. Which
trailing axes are spatial is never guessed (an (N, Y, X) stack and a (Z, Y, X) volume look
alike), so every per-image metric takes `spatial_dims` = 2 or 3. Masks broadcast against the
images by NumPy's trailing-axis rule, which pairs spatial axes correctly: one (Y, X) brain mask
serves a whole (S, K, Y, X) stack. A voxel outside the mask does not count; an image whose mask
is empty scores NaN (nothing to score).

    pixel fidelity    mse, psnr, ssim, ms_ssim, pairwise_ms_ssim (sample diversity)
    change            change_rmse (error of the change since the last observed visit)
    bands, volumes    band_coverage, dice, volume
    feature realism   radiomics_features (with glcm, glcm_offsets), frechet_distance, kid

The feature distances compare *sets* of scans through hand-made radiomics-style features, not
a pretrained network: nothing to download, every feature has a meaning a reader can check, and
they work for 2D and 3D, any modality, at any size.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from twin.errors import InputError

# Wang, Simoncelli & Bovik (2003), Table 1: the weights of the five MS-SSIM scales, finest first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_TRUNCATE = 3.5  # Gaussian SSIM window: radius int(3.5 sigma + 0.5), 11 voxels for sigma 1.5 (as skimage)


# ---------------------------------------------------------------------------------------------
# Pixel fidelity
# ---------------------------------------------------------------------------------------------

def mse(pred, truth, mask=None, *, spatial_dims: int) -> np.ndarray:
    """Mean squared error per image inside the mask: (..., *S), (..., *S) -> (...)."""
    pred, truth = _pair(pred, truth, spatial_dims, "mse")
    return _masked_mean((pred - truth) ** 2, mask, spatial_dims, "mse")


def psnr(pred, truth, data_range: float, mask=None, *, spatial_dims: int) -> np.ndarray:
    """Peak signal-to-noise ratio per image, dB: (..., *S), (..., *S) -> (...).

        PSNR = 10 log10(R^2 / MSE),   R = data_range;   inf for identical images

    `data_range` has no default on purpose. Inferring it from the dtype (skimage takes [-1, 1]
    for floats) is wrong for MRI intensities, and inferring it per image from the truth's
    max - min makes the score of a voxel error depend on the brightest voxel of that one image,
    so scores stop being comparable across images, visits and methods. R belongs to the
    intensity normalisation of the cohort; the caller knows it and must say it.
    """
    r = _range(data_range, "psnr")
    err = mse(pred, truth, mask, spatial_dims=spatial_dims)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(r * r / err)


def ssim(pred, truth, data_range: float, *, spatial_dims: int, kernel: str = "uniform", window: int = 7,
         sigma: float = 1.5, K1: float = 0.01, K2: float = 0.03, mask=None) -> np.ndarray:
    """Structural similarity (Wang et al. 2004), mean of the local SSIM map: (..., *S) x 2 -> (...).

        SSIM = (2 mu_p mu_t + C1) (2 s_pt + C2) / ((mu_p^2 + mu_t^2 + C1) (s_p^2 + s_t^2 + C2)),
        C1 = (K1 R)^2,  C2 = (K2 R)^2,  R = data_range

    with local means, variances and covariance over a window filtered along the spatial axes
    only: kernel "uniform" a cube of side `window` (default 7, with the sample-covariance
    factor n / (n - 1), as skimage's default) or "gaussian" of `sigma` (Wang et al.: 1.5,
    truncated at 3.5 sigma: 11 voxels). Borders are reflected and then the half-window rim is
    left out of the mean, where the window would read reflected rather than real voxels. The
    data range enters only through C1 and C2 (why it has no default: see `psnr`). `mask`
    restricts the mean of the map to voxels inside it. 1 for identical images, symmetric, <= 1.
    """
    pred, truth = _pair(pred, truth, spatial_dims, "ssim")
    s, _ = _ssim_maps(pred, truth, _range(data_range, "ssim"), spatial_dims, kernel, window, sigma, K1, K2, "ssim")
    radius = _radius(kernel, window, sigma)
    m = np.broadcast_to(_mask(mask, pred.shape, "ssim"), pred.shape)
    return _masked_mean(_crop(s, radius, spatial_dims), _crop(m, radius, spatial_dims), spatial_dims, "ssim")


def ms_ssim(a, b, data_range: float, *, spatial_dims: int, scales: int | None = None, sigma: float = 1.5,
            K1: float = 0.01, K2: float = 0.03) -> np.ndarray:
    """Multi-scale SSIM (Wang, Simoncelli & Bovik 2003): (..., *S) x 2 -> (...).

        MS-SSIM = l_M^{w_M} prod_{j=1..M} cs_j^{w_j}

    with cs_j the mean contrast-structure term at scale j (scale 1 the input, each next one a
    2x average-pool along every spatial axis, an odd last row dropped), l_M the mean luminance
    term at the coarsest scale, a Gaussian window of `sigma`, and the weights of MS_SSIM_WEIGHTS.
    Small images: the window must fit inside the coarsest scale, so `scales=None` takes as many
    of the five scales as fit (at least one) and, when fewer than five, renormalises their
    weights to sum to 1; a 64 x 64 image gets three (64, 32, 16). An explicit `scales` that does not fit raises.
    Negative cs (anti-correlated structure) are clipped to 0 before the fractional powers, as
    in common implementations, so the result stays real. 1 for identical images.
    """
    a, b = _pair(a, b, spatial_dims, "ms_ssim")
    r = _range(data_range, "ms_ssim")
    radius = _radius("gaussian", 0, sigma)
    side = 2 * radius + 1
    smallest, fit = min(a.shape[-spatial_dims:]), 0
    while smallest >= side:  # scales whose (pooled) size still holds the window
        fit, smallest = fit + 1, smallest // 2
    if fit == 0:
        raise InputError(f"images of spatial shape {a.shape[-spatial_dims:]} are smaller than the {side}-voxel "
                         f"window of sigma {sigma}", source="ms_ssim", field="sigma")
    m = min(fit, len(MS_SSIM_WEIGHTS)) if scales is None else int(scales)
    if not 1 <= m <= min(fit, len(MS_SSIM_WEIGHTS)):
        raise InputError(f"scales must lie in [1, {min(fit, len(MS_SSIM_WEIGHTS))}] for spatial shape "
                         f"{a.shape[-spatial_dims:]} and a {side}-voxel window, got {scales}",
                         source="ms_ssim", field="scales")
    w = np.asarray(MS_SSIM_WEIGHTS[:m])
    if m < len(MS_SSIM_WEIGHTS):
        w = w / w.sum()
    out = np.ones(a.shape[:-spatial_dims])
    for j in range(m):
        s, cs = _ssim_maps(a, b, r, spatial_dims, "gaussian", 0, sigma, K1, K2, "ms_ssim")
        cs_mean = _crop(cs, radius, spatial_dims).mean(axis=_axes(spatial_dims))
        if j < m - 1:
            out = out * np.maximum(cs_mean, 0.0) ** w[j]
            a, b = _pool2(a, spatial_dims), _pool2(b, spatial_dims)
        else:
            # l_M cs_M, the full SSIM at the coarsest scale, carries the last weight.
            s_mean = _crop(s, radius, spatial_dims).mean(axis=_axes(spatial_dims))
            out = out * np.maximum(s_mean, 0.0) ** w[j]
    return out


def pairwise_ms_ssim(samples, data_range: float, *, spatial_dims: int, **kwargs) -> np.ndarray:
    """Sample diversity: mean MS-SSIM over the K (K - 1) / 2 pairs of samples (K, ..., *S) -> (...).

    1 when every sample is the same scan (a decoder that ignores its noise); lower is more
    diverse. Keywords go to `ms_ssim`.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim < spatial_dims + 1 or x.shape[0] < 2:
        raise InputError(f"expected samples (K >= 2, ..., *{spatial_dims} spatial axes), got {x.shape}",
                         source="pairwise_ms_ssim", field="samples")
    i, j = np.triu_indices(x.shape[0], k=1)
    return ms_ssim(x[i], x[j], data_range, spatial_dims=spatial_dims, **kwargs).mean(axis=0)


# ---------------------------------------------------------------------------------------------
# Change, bands, overlap, volume
# ---------------------------------------------------------------------------------------------

def change_rmse(pred, truth, reference, mask, *, spatial_dims: int, relative: bool = False) -> np.ndarray:
    """Error of the predicted change since the last observed visit, inside the mask: -> (...).

        RMSE = sqrt(mean_mask [((pred - ref) - (truth - ref))^2])

    pred, truth (..., *S); reference (the last observed scan) and mask (the brain) broadcast
    against them. As a number the reference cancels: this is the masked RMSE of pred against
    truth, and copy-last scores the RMS of the true change. What makes it a change metric is
    the mask and the comparison it is read in, which `relative=True` makes explicit: the RMSE
    divided by the RMS of the true change, so copying the last scan scores exactly 1 and a
    forecast that beats it scores below 1 (inf where the truth did not change and pred did,
    NaN where neither did). Nothing common to pred and truth, and nothing outside the mask,
    moves it.
    """
    pred, truth = _pair(pred, truth, spatial_dims, "change_rmse")
    ref = np.asarray(reference, dtype=np.float64)
    try:
        np.broadcast_shapes(ref.shape, pred.shape)
    except ValueError:
        raise InputError(f"expected reference broadcastable to {pred.shape}, got {ref.shape}",
                         source="change_rmse", field="reference") from None
    if mask is None:
        raise InputError("a mask is required: change outside the brain is not scored", source="change_rmse",
                         field="mask")
    err = np.sqrt(_masked_mean(((pred - ref) - (truth - ref)) ** 2, mask, spatial_dims, "change_rmse"))
    if not relative:
        return err
    scale = np.sqrt(_masked_mean((truth - ref) ** 2, mask, spatial_dims, "change_rmse"))
    with np.errstate(divide="ignore", invalid="ignore"):
        return err / scale


def band_coverage(lower, upper, truth, mask=None, *, spatial_dims: int) -> np.ndarray:
    """Fraction of voxels inside the mask with lower <= truth <= upper, per image: -> (...).

    A 90% band is calibrated voxelwise when this is about 0.9. NaN truth voxels do not count.
    """
    lower, upper = _pair(lower, upper, spatial_dims, "band_coverage")
    _, truth = _pair(lower, truth, spatial_dims, "band_coverage", "truth")
    inside = ((lower <= truth) & (truth <= upper)).astype(np.float64)
    valid = np.isfinite(truth) & _mask(mask, truth.shape, "band_coverage")
    return _masked_mean(inside, valid, spatial_dims, "band_coverage")


def dice(a, b, *, spatial_dims: int, labels: Sequence[int] | None = None) -> np.ndarray:
    """Dice overlap 2 |A & B| / (|A| + |B|), per image (and per label).

    Boolean masks (..., *S) -> (...); integer label maps with `labels` (L,) -> (..., L), each
    label's region scored on its own. NaN where both regions are empty (nothing to score).
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise InputError(f"expected b of a's shape {a.shape}, got {b.shape}", source="dice", field="b")
    _check_dims(a, spatial_dims, "dice")
    if labels is None:
        if a.dtype != bool or b.dtype != bool:
            raise InputError(f"expected boolean masks, or label maps with labels=..., got {a.dtype} and {b.dtype}",
                             source="dice", field="labels")
        a, b = a[..., None], b[..., None]  # one label, moved below
    else:
        values = np.asarray(labels).reshape(-1)
        a = a[..., None] == values
        b = b[..., None] == values
    axes = tuple(range(-spatial_dims - 1, -1))
    inter = (a & b).sum(axis=axes)
    total = a.sum(axis=axes) + b.sum(axis=axes)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(total > 0, 2 * inter / np.maximum(total, 1), np.nan)
    return out[..., 0] if labels is None else out


def volume(mask_or_prob, voxel_volume_ml: float, *, spatial_dims: int) -> np.ndarray:
    """Volume in ml of a mask or a probability map (soft volume): (..., *S) -> (...).

    sum of the voxel values times the voxel volume (`twin.data.geometry.voxel_volume_ml`).
    """
    x = np.asarray(mask_or_prob, dtype=np.float64)
    _check_dims(x, spatial_dims, "volume")
    if np.any(x < 0) or np.any(x > 1):
        raise InputError(f"expected a mask or probabilities in [0, 1], got values in [{np.nanmin(x)}, "
                         f"{np.nanmax(x)}]", source="volume", field="mask_or_prob")
    if not voxel_volume_ml > 0:
        raise InputError(f"voxel_volume_ml must be positive, got {voxel_volume_ml}", source="volume",
                         field="voxel_volume_ml")
    return x.sum(axis=_axes(spatial_dims)) * voxel_volume_ml


# ---------------------------------------------------------------------------------------------
# Radiomics-style features
# ---------------------------------------------------------------------------------------------

def glcm_offsets(spatial_dims: int) -> tuple[tuple[int, ...], ...]:
    """The unique unit offsets to the neighbours of a voxel, one per direction: 4 in 2D, 13 in 3D.

    Each offset's negative is the same direction; a symmetric GLCM counts both.
    """
    _check_spatial(spatial_dims, "glcm_offsets")
    out = []
    for d in itertools.product((-1, 0, 1), repeat=spatial_dims):
        if d > (0,) * spatial_dims:  # lexicographically positive: one of each +-d pair
            out.append(d)
    return tuple(out)


def glcm(levels_image, levels: int, offsets: Sequence[Sequence[int]], mask=None, *, spatial_dims: int,
         symmetric: bool = True) -> np.ndarray:
    """Grey-level co-occurrence counts (Haralick 1973): (..., *S) ints in [0, levels) -> (..., L, L).

    C[i, j] = number of voxel pairs (v, v + d), d in `offsets`, both inside the image and the
    mask, with grey level i at v and j at v + d, summed over the offsets (IBSI's "merged"
    matrix: stabler than averaging per-direction features when the mask is small). `symmetric`
    adds the transpose, counting each pair in both orders.
    """
    q = np.asarray(levels_image)
    _check_dims(q, spatial_dims, "glcm")
    if not np.issubdtype(q.dtype, np.integer) or q.min(initial=0) < 0 or q.max(initial=0) >= levels:
        raise InputError(f"expected integer grey levels in [0, {levels}), got {q.dtype} in "
                         f"[{q.min(initial=0)}, {q.max(initial=0)}]", source="glcm", field="levels_image")
    m = np.broadcast_to(_mask(mask, q.shape, "glcm"), q.shape)
    lead = q.shape[:-spatial_dims]
    n = int(np.prod(lead))
    q = q.reshape((n,) + q.shape[-spatial_dims:])
    m = m.reshape(q.shape)
    batch = np.arange(n).reshape((n,) + (1,) * spatial_dims)
    counts = np.zeros(n * levels * levels)
    for d in offsets:
        d = tuple(int(v) for v in d)
        if len(d) != spatial_dims:
            raise InputError(f"expected offsets of length {spatial_dims}, got {d}", source="glcm", field="offsets")
        src = (slice(None),) + tuple(slice(max(0, -k), s - max(0, k)) for k, s in zip(d, q.shape[1:]))
        dst = (slice(None),) + tuple(slice(max(0, k), s - max(0, -k)) for k, s in zip(d, q.shape[1:]))
        valid = m[src] & m[dst]
        index = (batch * levels + q[src]) * levels + q[dst]
        counts += np.bincount(index[valid], minlength=n * levels * levels)
    c = counts.reshape(lead + (levels, levels))
    return c + np.swapaxes(c, -1, -2) if symmetric else c


FEATURE_NAMES = (
    "firstorder_mean", "firstorder_sd", "firstorder_skewness", "firstorder_kurtosis",
    "firstorder_p10", "firstorder_p50", "firstorder_p90", "firstorder_entropy",
    "glcm_contrast", "glcm_homogeneity", "glcm_energy", "glcm_correlation",
    "gradient_mean", "gradient_sd", "gradient_p90",
    "shape_volume", "shape_surface", "shape_surface_to_volume",
)


def radiomics_features(images, mask=None, *, spatial_dims: int, intensity_range: tuple[float, float],
                       levels: int = 16, bins: int = 32, threshold: float | None = None) -> np.ndarray:
    """Radiomics-style features per image: (..., *S) -> (..., F), F = len(FEATURE_NAMES), in that order.

    The features describe an image the way a reader would: its intensities, texture, edges and
    the shape of its foreground, so a generator that blurs, adds noise, shifts contrast or
    distorts anatomy moves them. All are computed inside `mask` (broadcast to the images; None
    is the whole image), in voxel units (the same for every scan of a cohort). Quantisation uses
    the fixed `intensity_range` (lo, hi) for every image, real or generated (values outside are
    put in the end bins): a per-image range would rescale away the contrast differences the
    features are meant to see.

    first order     mean, sd, skewness, excess kurtosis, 10/50/90th percentiles: the intensity
                    distribution (contrast, bias, tails); entropy (bits) of the `bins`-bin
                    histogram on the fixed range: how spread the grey levels are. A constant
                    image has skewness and kurtosis 0 (the normal's) rather than NaN.
    GLCM texture    on `levels` grey levels, the merged symmetric GLCM over `glcm_offsets`
                    (P = C / sum C): contrast sum (i-j)^2 P (local variation, high for noise),
                    homogeneity sum P / (1 + (i-j)^2) (smoothness), energy sqrt(sum P^2)
                    (orderliness), correlation sum (i-mu)(j-mu) P / sd^2 (linear dependence of
                    neighbours; 1 for a constant image, as skimage).
    gradient        mean, sd and 90th percentile of the central-difference gradient magnitude:
                    edge sharpness (blurred scans have weak edges).
    shape           of the foreground (mask & image > threshold; threshold None is Otsu's on the
                    fixed-range histogram of each image): volume (voxels), surface (voxel faces
                    between foreground and background, the image border counting as background:
                    a count that needs no marching cubes) and surface / volume (ragged or
                    fragmented anatomy has more surface per volume).

    NaN for every feature of an image whose mask is empty.
    """
    x = np.asarray(images, dtype=np.float64)
    _check_dims(x, spatial_dims, "radiomics_features")
    lo, hi = (float(v) for v in intensity_range)
    if not hi > lo:
        raise InputError(f"expected intensity_range (lo, hi) with hi > lo, got {intensity_range}",
                         source="radiomics_features", field="intensity_range")
    m = np.broadcast_to(_mask(mask, x.shape, "radiomics_features"), x.shape)
    lead, shape = x.shape[:-spatial_dims], x.shape[-spatial_dims:]
    axes = _axes(spatial_dims)
    n_in = m.sum(axis=axes)

    # First order.
    mean = _masked_mean(x, m, spatial_dims, "radiomics_features")
    dev = x - mean.reshape(lead + (1,) * spatial_dims)
    m2, m3, m4 = (_masked_mean(dev ** k, m, spatial_dims, "radiomics_features") for k in (2, 3, 4))
    # A variance at roundoff level of the intensity range is a constant image: its m3 / m2^1.5
    # would be roundoff divided by roundoff.
    spread = m2 > (1e-8 * (hi - lo)) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = np.where(spread, m3 / m2 ** 1.5, 0.0)
        kurt = np.where(spread, m4 / m2 ** 2 - 3.0, 0.0)
    flat = np.where(m, x, np.nan).reshape(lead + (-1,))
    p10, p50, p90 = _nanpercentile(flat, (10, 50, 90))
    hist = _histogram(x, m, lo, hi, bins, spatial_dims)             # (..., bins)
    p = hist / np.maximum(hist.sum(axis=-1, keepdims=True), 1)
    entropy = -(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0.0)).sum(axis=-1)

    # GLCM texture.
    q = _quantise(x, lo, hi, levels)
    c = glcm(q, levels, glcm_offsets(spatial_dims), m, spatial_dims=spatial_dims)
    P = c / np.maximum(c.sum(axis=(-2, -1), keepdims=True), 1)
    i = np.arange(levels, dtype=np.float64)[:, None]
    j = i.T
    contrast = (P * (i - j) ** 2).sum(axis=(-2, -1))
    homogeneity = (P / (1 + (i - j) ** 2)).sum(axis=(-2, -1))
    energy = np.sqrt((P ** 2).sum(axis=(-2, -1)))
    mu = (P * i).sum(axis=(-2, -1))                                   # = mu_j: P is symmetric
    var = (P * (i - mu[..., None, None]) ** 2).sum(axis=(-2, -1))
    cov = (P * (i - mu[..., None, None]) * (j - mu[..., None, None])).sum(axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        correlation = np.where(var > 1e-12, cov / var, 1.0)

    # Gradient magnitude.
    grads = np.gradient(x, axis=axes)                                 # a list: spatial_dims >= 2
    g = np.sqrt(sum(gi ** 2 for gi in grads))
    g_mean = _masked_mean(g, m, spatial_dims, "radiomics_features")
    g_sd = np.sqrt(_masked_mean((g - g_mean.reshape(lead + (1,) * spatial_dims)) ** 2, m, spatial_dims,
                                "radiomics_features"))
    (g_p90,) = _nanpercentile(np.where(m, g, np.nan).reshape(lead + (-1,)), (90,))

    # Shape of the foreground.
    t = _otsu(hist, lo, hi) if threshold is None else np.full(lead, float(threshold))
    fg = m & (x > t.reshape(lead + (1,) * spatial_dims))
    vol = fg.sum(axis=axes).astype(np.float64)
    surface = np.zeros(lead)
    for ax in range(-spatial_dims, 0):
        pad = [(0, 0)] * x.ndim
        pad[ax] = (1, 1)
        surface = surface + np.abs(np.diff(np.pad(fg, pad).astype(np.int8), axis=ax)).sum(axis=axes)
    with np.errstate(divide="ignore", invalid="ignore"):
        s_to_v = np.where(vol > 0, surface / np.maximum(vol, 1), 0.0)

    out = np.stack([mean, np.sqrt(m2), skew, kurt, p10, p50, p90, entropy,
                    contrast, homogeneity, energy, correlation, g_mean, g_sd, g_p90,
                    vol, surface, s_to_v], axis=-1)
    return np.where((n_in > 0)[..., None], out, np.nan)


# ---------------------------------------------------------------------------------------------
# Distances between sets of scans, over features
# ---------------------------------------------------------------------------------------------

def frechet_distance(real, generated, *, standardise: bool = True) -> float:
    """Frechet distance between Gaussians fitted to two feature sets: (N, F), (M, F) -> float.

        FD = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2})

    (Dowson & Landau 1982; FID of Heusel et al. 2017 over other features). The trace of the
    matrix square root is computed as Tr (S_r^{1/2} S_g S_r^{1/2})^{1/2}, which has the same
    eigenvalues but is symmetric positive semidefinite, so a symmetric eigendecomposition with
    tiny negative eigenvalues clipped to 0 replaces scipy.linalg.sqrtm of the non-symmetric
    product (whose roundoff gives complex parts and NaN on singular covariances; the usual
    remedy adds eps I).

    `standardise` first z-scores both sets with the real set's mean and sd per feature: the
    features have unrelated units (voxels, bits, intensities), and unscaled the distance would
    be the largest-unit feature's alone; the real set's statistics fix one scale for every
    generator compared against it. A feature constant over the real set is centred, not scaled.
    """
    r, g = _features(real, generated, standardise, "frechet_distance")
    if r.shape[0] < 2 or g.shape[0] < 2:
        raise InputError(f"need at least 2 samples per set, got {r.shape[0]} and {g.shape[0]}",
                         source="frechet_distance", field="real")
    mu_r, mu_g = r.mean(axis=0), g.mean(axis=0)
    s_r = np.atleast_2d(np.cov(r, rowvar=False))
    s_g = np.atleast_2d(np.cov(g, rowvar=False))
    root_r = _sqrtm_psd(s_r)
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_r @ s_g @ root_r), 0.0, None)).sum()
    return float(((mu_r - mu_g) ** 2).sum() + np.trace(s_r) + np.trace(s_g) - 2 * tr_cross)


def kid(real, generated, *, degree: int = 3, coef0: float = 1.0, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0, standardise: bool = True) -> tuple[float, float]:
    """Kernel distance (KID, Binkowski et al. 2018): unbiased MMD^2, polynomial kernel -> (mean, sd).

        k(x, y) = (x.y / F + coef0)^degree
        MMD^2_u = sum_{i != j} k(r_i, r_j) / (m (m-1)) + sum_{i != j} k(g_i, g_j) / (m (m-1))
                  - 2 sum_{i, j} k(r_i, g_j) / m^2

    averaged over `subsets` random subsets of m = min(subset_size, N, M) from each set (drawn
    without replacement, numpy Generator of `seed`); the sd over subsets says how much of a
    difference is noise. Unbiased, so two samples of one distribution give about 0 (possibly
    below), unlike the Frechet distance, which is biased upwards for small sets. Features
    standardised as in `frechet_distance` (needed even more here: the kernel is a polynomial in
    dot products).
    """
    r, g = _features(real, generated, standardise, "kid")
    m = min(int(subset_size), r.shape[0], g.shape[0])
    if m < 2:
        raise InputError(f"need subsets of at least 2 samples, got {m}", source="kid", field="subset_size")
    if subsets < 1:
        raise InputError(f"subsets must be at least 1, got {subsets}", source="kid", field="subsets")
    rng = np.random.default_rng(seed)
    f = r.shape[1]
    vals = np.empty(subsets)
    for s in range(subsets):
        x = r[rng.choice(r.shape[0], m, replace=False)]
        y = g[rng.choice(g.shape[0], m, replace=False)]
        kxx = (x @ x.T / f + coef0) ** degree
        kyy = (y @ y.T / f + coef0) ** degree
        kxy = (x @ y.T / f + coef0) ** degree
        vals[s] = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                   - 2 * kxy.mean())
    return float(vals.mean()), float(vals.std(ddof=1)) if subsets > 1 else 0.0


# ---------------------------------------------------------------------------------------------

def _check_spatial(spatial_dims, source):
    if spatial_dims not in (2, 3):
        raise InputError(f"spatial_dims must be 2 or 3, got {spatial_dims}", source=source, field="spatial_dims")


def _check_dims(x, spatial_dims, source):
    _check_spatial(spatial_dims, source)
    if x.ndim < spatial_dims:
        raise InputError(f"expected images (..., *{spatial_dims} spatial axes), got shape {x.shape}",
                         source=source, field="spatial_dims")


def _axes(spatial_dims):
    return tuple(range(-spatial_dims, 0))


def _pair(a, b, spatial_dims, source, name_b="truth"):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"expected {name_b} of shape {a.shape}, got {b.shape}", source=source, field=name_b)
    _check_dims(a, spatial_dims, source)
    return a, b


def _range(data_range, source):
    r = float(data_range)
    if not (r > 0 and math.isfinite(r)):
        raise InputError(f"data_range must be a positive number, got {data_range}", source=source, field="data_range")
    return r


def _mask(mask, shape, source):
    if mask is None:
        return np.ones((1,) * len(shape), dtype=bool)
    m = np.asarray(mask)
    if m.dtype != bool:
        raise InputError(f"expected a boolean mask, got {m.dtype}", source=source, field="mask")
    try:
        np.broadcast_shapes(m.shape, shape)
    except ValueError:
        raise InputError(f"expected a mask broadcastable to {shape}, got {m.shape}", source=source,
                         field="mask") from None
    return m


def _masked_mean(v, mask, spatial_dims, source):
    """Mean over the spatial axes of the voxels in mask: (..., *S) -> (...), NaN for an empty mask."""
    m = np.broadcast_to(_mask(mask, v.shape, source), v.shape)
    axes = _axes(spatial_dims)
    n = m.sum(axis=axes)
    total = np.where(m, v, 0.0).sum(axis=axes)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def _radius(kernel, window, sigma):
    if kernel == "uniform":
        if not (int(window) == window and window >= 1 and window % 2 == 1):
            raise InputError(f"window must be an odd positive integer, got {window}", source="ssim", field="window")
        return int(window) // 2
    if kernel == "gaussian":
        if not sigma > 0:
            raise InputError(f"sigma must be positive, got {sigma}", source="ssim", field="sigma")
        return int(_TRUNCATE * sigma + 0.5)
    raise InputError(f"kernel must be 'uniform' or 'gaussian', got {kernel!r}", source="ssim", field="kernel")


def _ssim_maps(x, y, data_range, spatial_dims, kernel, window, sigma, K1, K2, source):
    """Local SSIM and contrast-structure maps, (..., *S) each, filtering along spatial axes only."""
    radius = _radius(kernel, window, sigma)
    if min(x.shape[-spatial_dims:]) < 2 * radius + 1:
        raise InputError(f"images of spatial shape {x.shape[-spatial_dims:]} are smaller than the "
                         f"{2 * radius + 1}-voxel window", source=source, field="window")
    lead = x.ndim - spatial_dims
    if kernel == "uniform":
        size = (1,) * lead + (int(window),) * spatial_dims
        filt = lambda v: ndimage.uniform_filter(v, size=size, mode="reflect")  # noqa: E731
        n = float(window) ** spatial_dims
        cov_norm = n / (n - 1) if n > 1 else 1.0  # sample covariance, as skimage's default
    else:
        s = (0.0,) * lead + (float(sigma),) * spatial_dims
        filt = lambda v: ndimage.gaussian_filter(v, sigma=s, mode="reflect", truncate=_TRUNCATE)  # noqa: E731
        cov_norm = 1.0
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    mx, my = filt(x), filt(y)
    vx = cov_norm * (filt(x * x) - mx * mx)
    vy = cov_norm * (filt(y * y) - my * my)
    vxy = cov_norm * (filt(x * y) - mx * my)
    cs = (2 * vxy + c2) / (vx + vy + c2)
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    return lum * cs, cs


def _crop(v, radius, spatial_dims):
    if radius == 0:
        return v
    return v[(Ellipsis,) + (slice(radius, -radius),) * spatial_dims]


def _pool2(v, spatial_dims):
    """2x average pooling along each spatial axis; an odd last row/column is dropped."""
    for ax in range(v.ndim - spatial_dims, v.ndim):
        n = v.shape[ax] // 2 * 2
        v = np.take(v, np.arange(n), axis=ax)
        v = v.reshape(v.shape[:ax] + (n // 2, 2) + v.shape[ax + 1:]).mean(axis=ax + 1)
    return v


def _nanpercentile(flat, qs):
    """Percentiles along the last axis ignoring NaN; all-NaN rows give NaN without a warning."""
    empty = np.all(np.isnan(flat), axis=-1)
    safe = np.where(empty[..., None], 0.0, flat)
    out = np.nanpercentile(safe, qs, axis=-1)
    return [np.where(empty, np.nan, o) for o in out]


def _quantise(x, lo, hi, levels):
    """Grey levels 0..levels-1 of equal width on [lo, hi]; values outside go to the end levels."""
    return np.clip(np.floor((x - lo) / (hi - lo) * levels), 0, levels - 1).astype(np.int64)


def _histogram(x, m, lo, hi, bins, spatial_dims):
    """Counts of in-mask voxels in `bins` equal bins of [lo, hi]: (..., *S) -> (..., bins)."""
    lead = x.shape[:-spatial_dims]
    n = int(np.prod(lead))
    q = _quantise(x, lo, hi, bins).reshape(n, -1)
    w = m.reshape(n, -1)
    index = np.arange(n)[:, None] * bins + q
    return np.bincount(index[w], minlength=n * bins).reshape(lead + (bins,)).astype(np.float64)


def _otsu(hist, lo, hi):
    """Otsu's threshold per histogram (..., bins): the bin edge maximising between-class variance."""
    bins = hist.shape[-1]
    p = hist / np.maximum(hist.sum(axis=-1, keepdims=True), 1)
    centres = lo + (np.arange(bins) + 0.5) * (hi - lo) / bins
    w0 = np.cumsum(p, axis=-1)[..., :-1]                      # class 0 = bins 0..k, k < bins - 1
    mu0 = np.cumsum(p * centres, axis=-1)[..., :-1]
    mu_t = (p * centres).sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where((w0 > 0) & (w0 < 1), (mu_t * w0 - mu0) ** 2 / (w0 * (1 - w0)), -1.0)
    k = np.argmax(between, axis=-1)
    return lo + (k + 1) * (hi - lo) / bins


def _features(real, generated, standardise, source):
    r = np.asarray(real, dtype=np.float64)
    g = np.asarray(generated, dtype=np.float64)
    if r.ndim != 2 or g.ndim != 2 or r.shape[1] != g.shape[1]:
        raise InputError(f"expected features (N, F) and (M, F), got {r.shape} and {g.shape}", source=source,
                         field="generated")
    for name, a in (("real", r), ("generated", g)):
        if not np.all(np.isfinite(a)):
            raise InputError("features must be finite (NaN comes from an image with an empty mask)",
                             source=source, field=name)
    if standardise:
        mu = r.mean(axis=0)
        sd = r.std(axis=0, ddof=1) if r.shape[0] > 1 else np.zeros(r.shape[1])
        sd = np.where(sd > 0, sd, 1.0)
        r, g = (r - mu) / sd, (g - mu) / sd
    return r, g


def _sqrtm_psd(s):
    """Symmetric square root of a symmetric positive semidefinite matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
