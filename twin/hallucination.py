"""Hallucinations in generated scans: the statistics that detect them, and the corruptions that test them.

A generated scan is suspect when it shows what neither the model nor the anatomy allows. Each
statistic below is one number per scan; `twin.scan_checks` compares them with thresholds fitted
on honest outputs of held-out subjects (so each check's false-alarm rate is set by a budget,
not tuned on corrupted scans), and `twin evaluate` measures detection on the corruptions.

    off_prediction     the largest connected region (voxels) where the scan leaves the twin's own
                       prediction by more than Z spreads: z = |x - centre| / sqrt(sd^2 + floor^2),
                       centre the point forecast, sd the draws' spread. A lesion the dynamics did
                       not ask for, or a region moved where no draw moved it, is a large
                       connected excursion; texture noise is many small ones.
    tissue_intensity   brain voxels outside the intensity range of every tissue in the training
                       scans: no deformation of anatomy makes a brightness that no tissue has.
    largest_z          for local volume: max over the brain of |log det J| of the deformation
                       that takes the prediction to the scan (found by registration), in units of
                       the draws' own spread of log det J: tissue created or destroyed where the
                       twin's draws agree that none is.
    jacobian_extent    max |log det J| over the brain (inf where it folds): the twin's own change.

Corruptions (each of a scan (C, *space) inside its brain mask, sized by the brain's extent E,
the longest side of the mask's bounding box, so they mean the same on any grid):

    inserted_lesion       a round lesion of radius 0.08 E, brighter by half the median brain
                          intensity in every channel, soft-edged (1.5 voxels), at a random
                          brain voxel.
    flipped_region        a square (cube) of side 0.25 E about a random brain voxel, reversed
                          along a random spatial axis (what a generator that confuses
                          orientation or copies a patch wrongly draws).
    implausible_shrinkage tissue pulled towards a random brain point: x -> c + (1 + a g)(x - c),
                          g a Gaussian of sd 0.12 E, a set so that the tissue at c loses `loss`
                          (default half) of its volume, (1 + a)^dims = 1 / (1 - loss): decades
                          of atrophy (0.5-1% of brain volume a year), in any gap.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CORRUPTIONS = ("inserted_lesion", "flipped_region", "implausible_shrinkage")
Z = 4.0  # a voxel is off the prediction beyond this many spreads (honest draws of K=16 stay below ~4.1)


# ---- statistics ---------------------------------------------------------------------------------


def off_prediction(scans, centre, spread, mask, floor: float, z: float = Z) -> np.ndarray:
    """Largest connected off-prediction region, in voxels, per scan: (N, C, *space) -> (N,).

    centre, spread: (N, C, *space) the point forecast and the draws' sd; mask (N, *space) bool;
    floor: the spread below which an intensity difference is not resolved (a share of the
    cohort's intensity range), so voxels where every draw agrees are not divided by zero.
    A voxel counts when any channel is off; regions are face-connected.
    """
    off = (np.abs(scans - centre) > z * np.sqrt(spread ** 2 + floor ** 2)).any(axis=1) & mask
    return np.asarray([_largest_region(o) for o in off], dtype=np.float64)


def largest_z(values, spread, mask, floor: float) -> np.ndarray:
    """max over the brain of |values| / sqrt(spread^2 + floor^2) per scan: (N, *space) x 2 -> (N,)."""
    z = np.abs(values) / np.sqrt(spread ** 2 + floor ** 2)
    return np.where(mask, z, 0.0).reshape(len(z), -1).max(axis=1)


def tissue_intensity(scans, mask, low, high) -> np.ndarray:
    """Brain voxels with any channel outside [low, high] (per channel, (C,)) per scan: (N, C, *space) -> (N,)."""
    shape = (1, -1) + (1,) * (scans.ndim - 2)
    outside = ((scans < np.reshape(low, shape)) | (scans > np.reshape(high, shape))).any(axis=1) & mask
    return outside.reshape(len(scans), -1).sum(1).astype(np.float64)


def jacobian_extent(det, mask) -> np.ndarray:
    """max over the brain of |log det J| per scan, inf where det J <= 0: (N, *space) -> (N,)."""
    inside = np.where(mask, det, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        extent = np.abs(np.log(np.where(inside > 0, inside, np.nan)))
    folds = (inside <= 0).reshape(len(det), -1).any(1)
    return np.where(folds, np.inf, np.nanmax(extent.reshape(len(det), -1), axis=1))


def _largest_region(off: np.ndarray) -> int:
    labels, n = ndimage.label(off)
    return int(np.bincount(labels.ravel())[1:].max()) if n else 0


# ---- corruptions --------------------------------------------------------------------------------


def corrupt(scan, mask, kind: str, rng: np.random.Generator, *, loss: float = 0.5) -> np.ndarray:
    """`scan` (C, *space) with the corruption `kind` (one of CORRUPTIONS) inside `mask` (*space);
    `loss`: the implausible shrinkage's peak local volume loss."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"kind must be one of {CORRUPTIONS}, got {kind!r}")
    scan = np.asarray(scan, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    extent = _extent(mask)
    brain = np.argwhere(mask)
    c = brain[rng.integers(len(brain))].astype(np.float64)
    grid = np.indices(mask.shape, dtype=np.float64)
    offset = grid - c.reshape(-1, *[1] * mask.ndim)
    if kind == "inserted_lesion":
        r = 0.08 * extent
        distance = np.sqrt((offset ** 2).sum(0))
        profile = np.clip((r - distance) / 1.5 + 0.5, 0.0, 1.0) * mask
        level = np.median(scan[:, mask], axis=1).reshape(-1, *[1] * mask.ndim)
        out = scan + 0.5 * level * profile
    elif kind == "flipped_region":
        half = max(1, int(round(0.125 * extent)))
        box = tuple(slice(max(0, int(ci) - half), min(n, int(ci) + half + 1)) for ci, n in zip(c, mask.shape))
        axis = int(rng.integers(mask.ndim))
        out = scan.copy()
        out[(slice(None), *box)] = np.flip(scan[(slice(None), *box)], axis=1 + axis)
    else:
        g = np.exp(-(offset ** 2).sum(0) / (2 * (0.12 * extent) ** 2))
        a = (1.0 / (1.0 - loss)) ** (1.0 / mask.ndim) - 1.0
        source = c.reshape(-1, *[1] * mask.ndim) + (1.0 + a * g) * offset
        out = np.stack([ndimage.map_coordinates(ch, source, order=1, mode="nearest") for ch in scan])
    return np.where(mask, out, scan).astype(np.float32)


def _extent(mask: np.ndarray) -> float:
    """Longest side of the mask's bounding box, voxels."""
    where = np.argwhere(mask)
    return float((where.max(0) - where.min(0) + 1).max())
