"""Real brain anatomy for the simulators: nilearn's offline MNI152 maps on a coarse grid.

`template` resamples the MNI152 (ICBM152 2009a asymmetric, 2 mm) T1, grey- and white-matter
probability maps and brain mask that nilearn ships to a `size`-voxel grid per axis covering a
192 mm field of view (3 mm voxels at the default size 64), centred on the brain: a 3D volume,
or a 2D coronal slice at MNI y = -22 mm through the hippocampi and the lateral ventricles.
`subject_anatomy` turns it into one subject's brain by a smooth random diffeomorphism; `warp` is
the resampler that it and the simulators' mass effects share.

Axis convention (`twin.data.geometry`): arrays are (z, y, x) in 3D and (y, x) in 2D, and the
affine maps the index in reverse order (x, y, z) to RAS mm, so `array.T` is the NIfTI array.
The 2D slice's rows run from inferior (row 0) to superior and its columns from the subject's
right to left... in world terms from -x to +x, so both in-plane axes step in the positive RAS
direction: a NIfTI reader's reorientation to RAS (`as_closest_canonical`) only permutes axes
and never flips them, and a slice exported and imported again is the same array.
`imshow(origin='lower')` shows it upright, in neurological convention (world -x on the
image's left). The affine's third column is the slice normal (world y), as long as the slab
is thick.

Two structures have no offline atlas and are derived on the 2 mm grid before resampling:
ventricles = deep (> 15 mm from the brain boundary) CSF-dominant (p_csf > 0.5) voxels in the
connected components of at least 1 mL whose centroid lies within 30 mm of the brain's centre of
mass (the lateral and third ventricles with the cisterns between them; the Sylvian fissures and
sulci are shallower or farther out); hippocampus = grey-matter-dominant voxels in two
ellipsoids centred on MNI (+-28, -22, -14) mm with half-axes 8 mm (left-right), 20 mm along the
hippocampal long axis and 7 mm across it, the long axis tilted 30 degrees up posteriorly in the
sagittal plane as the hippocampal tail rises (about 3.6 mL per side, MNI space being ~1.1x
larger per axis than an average native brain).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from twin.errors import InputError

from .geometry import spacing as _spacing
from .geometry import voxel_volume_ml

FIELD_OF_VIEW_MM = 192.0  # covers MNI152's brain (144 x 178 x 154 mm) with a margin
CORONAL_Y_MM = -22.0  # the 2D slice: through the hippocampal bodies and lateral ventricles
VENTRICLE_CSF = 0.5
VENTRICLE_DEPTH_MM = 15.0
VENTRICLE_REACH_MM = 30.0  # component centroid to brain centre of mass
VENTRICLE_MIN_ML = 1.0
HIPPOCAMPUS_CENTRE_MM = (28.0, -22.0, -14.0)  # (|x|, y, z), one per hemisphere
HIPPOCAMPUS_HALF_AXES_MM = (8.0, 20.0, 7.0)  # left-right, along the long axis, across it
HIPPOCAMPUS_TILT_DEG = 30.0
WARP_SMOOTHING_MM = 20.0  # subjects differ in gyri-to-lobe sized bulges, not voxel-sized jitter


@dataclass(frozen=True, eq=False)
class Anatomy:
    """One brain on a voxel grid. Every array has shape (*space) = (Z, Y, X) or (Y, X).

    t1: float32 T1-weighted intensity, white matter ~= 1. gm, wm, csf: float32 tissue
    probabilities, 0 outside `mask`, gm + wm + csf == 1 inside it (to float32 rounding).
    mask, ventricles, hippocampus: bool; the last two lie inside `mask`.
    t1 is left as sampled outside the mask (the MNI152 template is skull-stripped: ~0 there).
    affine: (4, 4) float64 voxel-to-world (RAS mm) of the reversed index.
    (eq=False: equality and hashing by identity; elementwise array equality has no single truth.)
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    mask: np.ndarray
    ventricles: np.ndarray
    hippocampus: np.ndarray
    affine: np.ndarray

    def __post_init__(self):
        affine = np.asarray(self.affine)
        if affine.shape != (4, 4):
            raise InputError(f"affine must be 4x4, got {affine.shape}", source="Anatomy", field="affine")
        shape = np.shape(self.mask)
        if len(shape) not in (2, 3):
            raise InputError(f"expected a 2D (Y, X) or 3D (Z, Y, X) mask, got shape {shape}",
                             source="Anatomy", field="mask")
        for name in ("t1", "gm", "wm", "csf", "ventricles", "hippocampus"):
            if np.shape(getattr(self, name)) != shape:
                raise InputError(f"expected shape {shape} like the mask, got {np.shape(getattr(self, name))}",
                                 source="Anatomy", field=name)

    @property
    def ndim(self) -> int:
        return self.mask.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mask.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """mm per array axis, in array order ((z,) y, x)."""
        return _spacing(self.affine, self.ndim)

    @property
    def voxel_volume(self) -> float:
        """mL per voxel; a 2D voxel is a slab, as thick as the affine's third column is long."""
        return voxel_volume_ml(self.affine)


# ---------------------------------------------------------------- the template


def template(dims: int = 2, size: int = 64) -> Anatomy:
    """MNI152 on a `size`^dims grid of (192 / size) mm voxels centred on the brain; cached, read-only.

    dims=3: (size, size, size) volume, affine diagonal (RAS). dims=2: (size, size) coronal slice
    at MNI y = -22 mm, rows from inferior to superior (world +z), columns along world +x.
    """
    if dims not in (2, 3):
        raise InputError(f"expected dims 2 (coronal slice) or 3 (volume), got {dims!r}",
                         source="template", field="dims")
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise InputError(f"expected an integer size >= 8 voxels per axis, got {size!r}",
                         source="template", field="size")
    return _template(int(dims), int(size))  # one cache key per grid, however it was asked for


@lru_cache(maxsize=None)
def _template(dims: int, size: int) -> Anatomy:
    mni = _mni152()
    h = FIELD_OF_VIEW_MM / size
    first = np.asarray(mni["centre"]) - (size - 1) / 2 * h  # world (x, y, z) of the first voxel centre
    affine = np.eye(4)
    if dims == 3:
        affine[:3, :3] = np.diag([h, h, h])
        affine[:3, 3] = first
    else:
        affine[:3, 0] = (h, 0.0, 0.0)  # column index -> world x (left to right)
        affine[:3, 1] = (0.0, 0.0, h)  # row index -> world z, upwards: RAS-positive, no flip on reorientation
        affine[:3, 2] = (0.0, h, 0.0)  # the slice normal, one voxel thick
        affine[:3, 3] = (first[0], CORONAL_Y_MM, first[2])
    shape = (size,) * dims

    def sample(name):
        return _sample(mni[name], mni["affine"], affine, shape)

    mask = sample("mask") >= 0.5
    gm = np.where(mask, np.clip(sample("gm"), 0.0, 1.0), 0.0)
    wm = np.where(mask, np.clip(sample("wm"), 0.0, 1.0), 0.0)
    over = np.maximum(gm + wm, 1.0)  # the maps' own rounding lets gm + wm reach 1 + 3e-8
    gm, wm = gm / over, wm / over
    csf = np.where(mask, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0)
    out = Anatomy(t1=sample("t1").astype(np.float32), gm=gm.astype(np.float32), wm=wm.astype(np.float32),
                  csf=csf.astype(np.float32), mask=mask, ventricles=(sample("ventricles") >= 0.5) & mask,
                  hippocampus=(sample("hippocampus") >= 0.5) & mask, affine=affine)
    for name in ("t1", "gm", "wm", "csf", "mask", "ventricles", "hippocampus", "affine"):
        getattr(out, name).setflags(write=False)  # the cache hands out the same arrays to everyone
    return out


def _sample(volume: np.ndarray, source_affine: np.ndarray, target_affine: np.ndarray,
            shape: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation of a NIfTI-ordered (X, Y, Z) volume at every voxel of a (*shape) grid.

    The grid's array index is reversed to (i, j[, k]) before its affine maps it to world mm
    (a 2D grid's k is 0); zero outside the source volume. Returns float64 (*shape).
    """
    index = np.indices(shape, dtype=np.float64).reshape(len(shape), -1)[::-1]  # (i, j[, k])
    if len(shape) == 2:
        index = np.concatenate([index, np.zeros((1, index.shape[1]))])
    world = target_affine[:3, :3] @ index + target_affine[:3, 3:]
    inv = np.linalg.inv(source_affine)
    voxel = inv[:3, :3] @ world + inv[:3, 3:]
    return ndimage.map_coordinates(volume, voxel, order=1, mode="constant", cval=0.0).reshape(shape)


@lru_cache(maxsize=1)
def _mni152() -> dict:
    """The MNI152 maps at 2 mm in NIfTI order (X, Y, Z) and what is derived from them there."""
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=2)
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    t1 = np.asarray(t1_img.get_fdata(), dtype=np.float64)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=2).get_fdata(), dtype=np.float64)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=2).get_fdata(), dtype=np.float64)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=2).get_fdata()) > 0
    h = np.linalg.norm(affine[:3, :3], axis=0)
    world = np.einsum("ab,b...->a...", affine[:3, :3], np.indices(mask.shape, dtype=np.float64)) \
        + affine[:3, 3, None, None, None]  # (3, X, Y, Z) mm
    csf = np.where(mask, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0)

    # ventricles: deep CSF in big components near the middle of the brain
    depth = ndimage.distance_transform_edt(mask, sampling=h)
    deep = mask & (csf > VENTRICLE_CSF) & (depth > VENTRICLE_DEPTH_MM)
    labels, n = ndimage.label(deep)
    centre_of_mass = world[:, mask].mean(axis=1)
    ventricles = np.zeros_like(mask)
    for k in range(1, n + 1):
        part = labels == k
        big = part.sum() * np.prod(h) / 1000.0 >= VENTRICLE_MIN_ML
        if big and np.linalg.norm(world[:, part].mean(axis=1) - centre_of_mass) <= VENTRICLE_REACH_MM:
            ventricles |= part

    # hippocampus: grey-matter-dominant voxels in a tilted ellipsoid per hemisphere
    grey = mask & (gm >= wm) & (gm >= csf)
    tilt = np.deg2rad(HIPPOCAMPUS_TILT_DEG)
    ax, al, ac = HIPPOCAMPUS_HALF_AXES_MM
    cx, cy, cz = HIPPOCAMPUS_CENTRE_MM
    hippocampus = np.zeros_like(mask)
    for side in (-1.0, 1.0):
        dx, dy, dz = world[0] - side * cx, world[1] - cy, world[2] - cz
        along = -dy * np.cos(tilt) + dz * np.sin(tilt)  # long axis: posterior and up
        across = dy * np.sin(tilt) + dz * np.cos(tilt)
        hippocampus |= (dx / ax) ** 2 + (along / al) ** 2 + (across / ac) ** 2 <= 1.0
    hippocampus &= grey

    # centre of the grid: the middle of the brain's bounding box
    inside = world[:, mask]
    centre = tuple(float(c) for c in (inside.min(axis=1) + inside.max(axis=1)) / 2)
    wm_level = float(np.median(t1[mask & (wm > 0.9)]))  # T1 normalised so white matter ~= 1
    return {"affine": affine, "t1": t1 / wm_level, "gm": gm, "wm": wm, "mask": mask.astype(np.float64),
            "ventricles": ventricles.astype(np.float64), "hippocampus": hippocampus.astype(np.float64),
            "centre": centre}


# ---------------------------------------------------------------- deformations


def warp(volume: np.ndarray, displacement: np.ndarray, order: int = 1) -> np.ndarray:
    """output(x) = volume(x - displacement(x)): pull-back resampling of (*space) by (ndim, *space).

    displacement is in voxels, its first axis in array-axis order. Samples beyond the grid take
    the nearest edge value. A bool volume is resampled by nearest neighbour (order 0) and comes
    back bool; floating volumes keep their dtype, others come back float64.
    """
    volume = np.asarray(volume)
    displacement = np.asarray(displacement, dtype=np.float64)
    if displacement.shape != (volume.ndim, *volume.shape):
        raise InputError(f"expected displacement of shape {(volume.ndim, *volume.shape)} for a volume "
                         f"of shape {volume.shape}, got {displacement.shape}", source="warp", field="displacement")
    coords = np.indices(volume.shape, dtype=np.float64) - displacement
    if volume.dtype == bool:
        return ndimage.map_coordinates(volume.astype(np.uint8), coords, order=0, mode="nearest").astype(bool)
    dtype = volume.dtype if np.issubdtype(volume.dtype, np.floating) else np.float64
    return ndimage.map_coordinates(volume.astype(dtype, copy=False), coords, order=order, mode="nearest")


def subject_anatomy(base: Anatomy, rng: np.random.Generator, *, scale_sd: float = 0.04,
                    warp_mm: float = 2.0) -> Anatomy:
    """One subject's brain: `base` deformed by a random smooth diffeomorphism drawn from `rng`.

    The displacement is v = (x - c)(1 - 1/s) + r(x): a global scaling by s ~ N(1, scale_sd)
    (clipped to [0.8, 1.25]) about the brain's centre c, plus Gaussian noise smoothed over
    20 mm and rescaled to an RMS length of `warp_mm` inside the brain. r is shrunk, if needed,
    until |grad v| (Frobenius, voxel units) stays below 1/2 everywhere, so det(I - grad v) > 0
    and x -> x - v(x) keeps topology. Tissue maps are warped linearly, masks as fractions thresholded at 1/2; the affine
    is the base's (the subject's head sits on the template grid). Note that the brain grows
    by s per axis: past s ~ 1.07 the 3D brain touches the 192 mm grid's front and back.
    """
    v, _ = _deformation(base, rng, scale_sd, warp_mm)

    def fraction(a):  # linear, and tissue stays where the new brain is
        return warp(np.asarray(a, dtype=np.float32), v, order=1)

    mask = fraction(base.mask) >= 0.5
    gm, wm = (np.where(mask, np.clip(fraction(a), 0.0, 1.0), 0.0) for a in (base.gm, base.wm))
    # CSF fills the rest of the (new) brain, so gm + wm + csf == 1 inside it as in the template
    csf = np.where(mask, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0)
    return Anatomy(t1=fraction(base.t1), gm=gm.astype(np.float32), wm=wm.astype(np.float32),
                   csf=csf.astype(np.float32), mask=mask,
                   ventricles=(fraction(base.ventricles) >= 0.5) & mask,
                   hippocampus=(fraction(base.hippocampus) >= 0.5) & mask,
                   affine=np.array(base.affine, dtype=np.float64))


def _deformation(base: Anatomy, rng: np.random.Generator, scale_sd: float, warp_mm: float) -> tuple[np.ndarray, float]:
    """subject_anatomy's displacement v (ndim, *space) in voxels, and its global scale s."""
    if scale_sd < 0 or warp_mm < 0:
        raise InputError(f"expected scale_sd >= 0 and warp_mm >= 0, got {scale_sd} and {warp_mm}",
                         source="subject_anatomy")
    ndim = base.ndim
    h = np.asarray(base.spacing, dtype=np.float64)
    s = float(np.clip(rng.normal(1.0, scale_sd), 0.8, 1.25))  # beyond +-5 sd nothing is a brain
    noise = rng.standard_normal((ndim, *base.shape))

    grid = np.indices(base.shape, dtype=np.float64)
    mask = np.asarray(base.mask, dtype=bool)
    centre = np.array([g[mask].mean() if mask.any() else (n - 1) / 2 for g, n in zip(grid, base.shape)])
    expand = (grid - centre.reshape(-1, *[1] * ndim)) * (1.0 - 1.0 / s)
    smooth = np.stack([ndimage.gaussian_filter(n, WARP_SMOOTHING_MM / h) for n in noise])  # (ndim, *space)
    length = np.sqrt(np.sum(np.square(smooth), axis=0))[mask]
    rms = float(np.sqrt(np.mean(np.square(length)))) if length.size else 0.0
    r = smooth * (warp_mm / rms if rms > 0 else 0.0) / h.reshape(-1, *[1] * ndim)  # mm -> voxels per axis
    budget = 0.5 - abs(1.0 - 1.0 / s) * np.sqrt(ndim)  # ||A + B|| <= ||A|| + ||B||
    worst = _max_gradient_norm(r)
    if worst > budget:
        r *= max(budget, 0.0) / worst
    return expand + r, s


def _max_gradient_norm(v: np.ndarray) -> float:
    """max over the grid of the Frobenius norm of grad v, v (ndim, *space) in voxels."""
    total = np.zeros(v.shape[1:])
    for component in v:
        for g in np.gradient(component):
            total += g * g
    return float(np.sqrt(total.max())) if total.size else 0.0
