"""How clinics and scanners corrupt the truth: visit schedules, Rician noise, bias fields, misregistration.

The simulators draw a noise-free image per planned visit; these functions turn it into what a
cohort actually holds. Each takes an explicit `np.random.Generator` and draws from it in a fixed
order, so a subject is reproducible from its generator's state alone.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

from twin.errors import InputError


def visit_schedule(rng: np.random.Generator, nominal, jitter: float, p_missed: float) -> tuple[np.ndarray, np.ndarray]:
    """Actual visit times and attendance from a plan: (time (V,) float64, observed (V,) bool).

    nominal (V,): planned times in years, nominal[0] == 0, strictly increasing. Every later
    visit moves by N(0, jitter), clipped to 0.45 of the planned gap on each side, so visits
    keep their order and never reach baseline; time[0] == 0 exactly. Each later visit is missed
    with probability p_missed; the baseline never is. Draws: V - 1 normals, then V - 1 uniforms.
    """
    nominal = np.asarray(nominal, dtype=np.float64)
    if nominal.ndim != 1 or nominal.size == 0 or nominal[0] != 0 or np.any(np.diff(nominal) <= 0):
        raise InputError(f"expected strictly increasing planned times starting at 0, got {nominal.tolist()}",
                         source="visit_schedule", field="nominal")
    if not (jitter >= 0 and 0 <= p_missed <= 1):
        raise InputError(f"expected jitter >= 0 and 0 <= p_missed <= 1, got {jitter} and {p_missed}",
                         source="visit_schedule")
    n = nominal.size - 1
    shift = rng.normal(0.0, jitter, n)
    missed = rng.random(n) < p_missed
    gap = np.diff(nominal)  # (V - 1,): gap[i] is before visit i + 1
    room = 0.45 * np.minimum(gap, np.append(gap[1:], np.inf))  # the last visit is bounded before only
    time = nominal.copy()
    time[1:] += np.clip(shift, -room, room)
    return time, np.concatenate([[True], ~missed])


def rician_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """|image + n1 + i n2|, n1, n2 ~ N(0, sigma^2) iid: a magnitude MR image. Same shape and dtype.

    At zero signal the result is Rayleigh, mean sigma sqrt(pi/2); at high SNR it is about
    image + n1. Floating dtypes are kept; other inputs come back float64.
    """
    image = np.asarray(image)
    if not sigma >= 0:
        raise InputError(f"expected sigma >= 0, got {sigma}", source="rician_noise", field="sigma")
    dtype = image.dtype if np.issubdtype(image.dtype, np.floating) else np.float64
    n = rng.standard_normal((2, *image.shape)) * sigma
    return np.hypot(image + n[0], n[1]).astype(dtype)


def bias_field(shape: tuple[int, ...], strength: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative intensity inhomogeneity (*shape) float32: exp(strength s(x)) / mean.

    s is a random cubic polynomial of the coordinates (each axis scaled to [-1, 1]; monomials
    of total degree 1 to 3 with N(0, 1) coefficients) rescaled to span exactly [-1, 1] over the
    grid, so log(field) spans 2 * strength and, by Markov's inequality for polynomials, changes
    by at most 18 strength / (n - 1) between neighbours along an axis of n voxels.
    """
    shape = tuple(int(n) for n in shape)
    if not strength >= 0:
        raise InputError(f"expected strength >= 0, got {strength}", source="bias_field", field="strength")
    axes = [np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in shape]
    grid = np.meshgrid(*axes, indexing="ij")
    monomials = [m for d in (1, 2, 3) for m in itertools.combinations_with_replacement(range(len(shape)), d)]
    coefficients = rng.normal(size=len(monomials))
    s = np.zeros(shape)
    for c, m in zip(coefficients, monomials):
        s += c * np.prod([grid[a] for a in m], axis=0)
    span = s.max() - s.min() if s.size else 0.0
    s = 2.0 * (s - s.min()) / span - 1.0 if span > 0 else np.zeros(shape)
    field = np.exp(strength * s)
    return (field / field.mean()).astype(np.float32) if field.size else field.astype(np.float32)


def misregister(image: np.ndarray, rng: np.random.Generator, max_rotation_deg: float,
                max_shift_vox: float) -> np.ndarray:
    """One small random rigid motion of a scan (C, *space), the same for every channel.

    Rotation about the grid centre by angles uniform in +-max_rotation_deg (one per rotation
    plane: 1 in 2D, 3 in 3D, in the array axes' planes (0,1), (0,2), (1,2)), then a shift
    uniform in +-max_shift_vox per axis. It acts on voxel indices, so it is rigid in world space
    for isotropic voxels (as the templates have). Linear interpolation; zero where the moved
    scan has no data. Same dtype out. Draws: the angles, then the shifts.
    """
    image = np.asarray(image)
    ndim = image.ndim - 1
    if ndim not in (2, 3):
        raise InputError(f"expected a scan (C, Y, X) or (C, Z, Y, X), got shape {image.shape}",
                         source="misregister", field="image")
    if not (max_rotation_deg >= 0 and max_shift_vox >= 0):
        raise InputError(f"expected max_rotation_deg >= 0 and max_shift_vox >= 0, got {max_rotation_deg} "
                         f"and {max_shift_vox}", source="misregister")
    if not np.isfinite(image).all():
        raise InputError("expected finite voxels, got NaN or Inf", source="misregister", field="image")
    planes = list(itertools.combinations(range(ndim), 2))
    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, len(planes)))
    shift = rng.uniform(-max_shift_vox, max_shift_vox, ndim)
    rotation = np.eye(ndim)
    for (a, b), theta in zip(planes, angles):
        r = np.eye(ndim)
        r[a, a] = r[b, b] = np.cos(theta)
        r[a, b], r[b, a] = -np.sin(theta), np.sin(theta)
        rotation = rotation @ r
    centre = (np.asarray(image.shape[1:], dtype=np.float64) - 1) / 2
    # moved(x) = image(R^T (x - c - t) + c): pull back through the inverse of x -> R(x - c) + c + t
    matrix = rotation.T
    offset = centre - matrix @ (centre + shift)
    dtype = image.dtype if np.issubdtype(image.dtype, np.floating) else np.float64
    if image.shape[0] == 0:
        return image.astype(dtype)
    return np.stack([ndimage.affine_transform(channel.astype(dtype, copy=False), matrix, offset, order=1,
                                              mode="constant", cval=0.0) for channel in image])
