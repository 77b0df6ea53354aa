"""Geometry derived from the one stored 4x4 voxel-to-world affine (RAS, mm).

Nothing else about the grid is stored: spacing, origin and orientation are read off the
affine here, so they can never disagree with it.

Axis convention (NIfTI's): cohort arrays are indexed (..., z, y, x) or (..., y, x), and the
affine maps the index *in reverse order*, (x, y, z, 1), to world millimetres, so that a
scan's array transposed is exactly the NIfTI array with the same affine. A 2D slice is the
NIfTI volume of shape (X, Y, 1).
"""

from __future__ import annotations

import numpy as np


def spacing(affine: np.ndarray, ndim: int = 3) -> tuple[float, ...]:
    """Voxel size in mm along each of the `ndim` array axes, in array order ((z,) y, x).

    The column norms of the 3x3 part give it in (x, y, z) order; the array axes run the other way.
    """
    norms = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return tuple(float(s) for s in norms[:ndim][::-1])


def origin(affine: np.ndarray) -> tuple[float, float, float]:
    """World position (mm) of voxel (0, 0, 0)."""
    return tuple(float(v) for v in np.asarray(affine)[:3, 3])


def orientation(affine: np.ndarray) -> str:
    """Axis codes such as 'RAS': where each array axis points in world space."""
    import nibabel as nib

    return "".join(nib.aff2axcodes(np.asarray(affine)))


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in millilitres (|det| of the 3x3 part, mm^3 / 1000)."""
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3])) / 1000.0)
