"""Export the predicted scans of a scan result as NIfTI-1 files, and its derived volumes as a CSV.

Layout under the output folder (one folder per subject):

    volumes.csv                                   subject,[arm,]time,structure,mean,q05,...,q95   (mL)
    sub-<s>/sub-<s>_time-<t>[_arm-<a>]_<channel>_mean.nii.gz       scan_mean
    sub-<s>/sub-<s>_time-<t>[_arm-<a>]_<channel>_q05.nii.gz        scan_quantiles, the 90% band's lower edge
    sub-<s>/sub-<s>_time-<t>[_arm-<a>]_<channel>_q95.nii.gz        scan_quantiles, its upper edge (a result
                                                                   without q05/q95: its widest band)
    sub-<s>/sub-<s>_time-<t>[_arm-<a>]_<channel>_sd.nii.gz         scan_spread (per-voxel predictive sd)
    sub-<s>/sub-<s>_time-<t>[_arm-<a>]_<channel>_samples.nii.gz    scan_samples, when the result has them

<s>, <a> and <channel> are the subject id, arm and channel with every character but letters
and digits dropped (`sim-0001` -> `sim0001`), as in the cohort export (`twin.data.export`); ids
that become empty or collide are an InputError. <t> is the requested time on the cohort's clock
with two decimals (`time-72.50`), or as many more (up to 6) as keep a subject's times apart; the
exact times are in volumes.csv. `_arm-<a>` appears only for scenario results. Padding requests
(NaN time) are skipped.

Volumes: the mean, quantiles and sd are one 3D volume (X, Y, Z) per file; samples are 4D
(X, Y, Z, K), the K draws along the fourth axis. The result's (z, y, x) scan is written as the
NIfTI array (x, y, z) with the subject's `scan_affine` as qform and sform, so voxel (i, j, k) of
the file is at world `scan_affine @ (i, j, k, 1)` (RAS, mm). A 2D scan (y, x) is written as
(X, Y, 1), exactly as the cohort export writes 2D cohorts, so that `twin.data.bids` would read
it back as the same 2D slice with the same affine. Values are written as they are, non-finite
voxels included (a result flags them in `scan_flags`, check `not_finite`).

The folder is written into a hidden sibling and renamed into place when complete, like cohort
stores and cohort exports, so it holds the old export or the new one, never a mixture.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import xarray as xr

from twin.data.export import _labels, _to_nifti
from twin.data.nifti import write_nifti
from twin.data.store import _finish_interrupted_swap, _remove_stale_partials, _swap_into_place
from twin.data.table import write_rows_atomic
from twin.errors import InputError

from .results import _cell, quantile_name

SPACES = (("y", "x"), ("z", "y", "x"))


def export_result_nifti(result: xr.Dataset, out_dir: str | os.PathLike, *, overwrite: bool = False,
                        progress: bool = False) -> list[Path]:
    """Write the scans of a scan result as NIfTI files and its volumes as `volumes.csv` under `out_dir`.

    Layout and names in the module docstring. Returns the NIfTI files written (their final
    paths), in order. Raises `InputError` for a result without scans (field `scan_mean`) or
    without `scan_affine`, labels that cannot be made file-safe, or an existing `out_dir` that is
    not an empty folder, unless `overwrite` (which replaces a folder, never a file).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    _check(result)
    subjects = _labels([str(s) for s in result["subject"].values], source="result", what="subject id")
    channels = _labels([str(c) for c in result["channel"].values], source="result", what="channel name")
    scenario = "arm" in result["scan_mean"].dims
    arms = _labels([str(a) for a in result["arm"].values], source="result", what="arm") if scenario else [None]
    _finish_interrupted_swap(out)
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a folder", source=str(out), field="output")
    if out.exists() and not overwrite and any(out.iterdir()):
        raise InputError("already exists and is not empty; choose another folder or overwrite it",
                         source=str(out), field="output")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)

    levels = [float(q) for q in result["quantile"].values]
    # the 90% band (q05, q95) where the result has it, the widest band otherwise
    pair = (0.05, 0.95) if {0.05, 0.95} <= set(levels) else (min(levels), max(levels))
    outer = [levels.index(pair[0]), levels.index(pair[1])] if len(levels) > 1 else []
    time = result["time"].values
    written: list[Path] = []
    try:
        partial.mkdir()
        if "volume_mean" in result:
            write_rows_atomic({partial / "volumes.csv": volume_rows(result)})
        for s, label in enumerate(tqdm(subjects, desc="exporting NIfTI", unit="subject", disable=not progress)):
            folder = partial / f"sub-{label}"
            folder.mkdir()
            valid = np.flatnonzero(np.isfinite(time[s]))
            stats = _subject_stats(result, s, outer, levels)  # name -> ([arm,] request, channel, [K,] *space)
            affine = result["scan_affine"].values[s]
            for r, when in zip(valid, _time_labels(time[s, valid], str(result['subject'].values[s]))):
                for a, arm in enumerate(arms):
                    for c, channel in enumerate(channels):
                        stem = f"sub-{label}_time-{when}" + (f"_arm-{arm}" if arm is not None else "") + f"_{channel}"
                        for name, values in stats.items():
                            scan = (values[a] if scenario else values)[r, c]
                            file = folder / f"{stem}_{name}.nii.gz"
                            write_nifti(file, _to_nifti_volume(scan, samples=name == "samples"), affine)
                            written.append(out / file.relative_to(partial))
        _swap_into_place(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return written


def volume_rows(result: xr.Dataset) -> list[list[str]]:
    """The rows (header first) of volumes.csv: subject,[arm,]time,structure,mean,q05,...; one per
    subject, [arm,] requested time and structure, in mL (the result's `structure_unit`), times on
    the cohort's clock written so they read back to the same float64."""
    levels = [float(q) for q in result["quantile"].values]
    scenario = "arm" in result["volume_mean"].dims
    header = ["subject", *(["arm"] if scenario else []), "time", "structure", "mean", *map(quantile_name, levels)]
    rows = [header]
    arms = [str(a) for a in result["arm"].values] if scenario else [None]
    structures = [str(n) for n in result["structure"].values]
    time = result["time"].values
    mean, quant = result["volume_mean"].values, result["volume_quantiles"].values
    for s, subject in enumerate(map(str, result["subject"].values)):
        for a, arm in enumerate(arms):
            m = mean[a] if scenario else mean  # (S, R, N)
            q = quant[a] if scenario else quant  # (Q, S, R, N)
            for r in np.flatnonzero(np.isfinite(time[s])):
                for k, structure in enumerate(structures):
                    rows.append([subject, *([arm] if scenario else []), _cell(time[s, r]), structure,
                                 _cell(m[s, r, k]), *(_cell(q[j, s, r, k]) for j in range(len(levels)))])
    return rows


def _check(result: xr.Dataset) -> None:
    if "scan_mean" not in result:
        raise InputError("the result has no scans (biomarkers only); export it with `twin export table` instead",
                         source="result", field="scan_mean")
    dims = result["scan_mean"].dims
    body = dims[1:] if dims[:1] == ("arm",) else dims
    if body[:3] != ("subject", "request", "channel") or body[3:] not in SPACES:
        raise InputError(f"expected dims ([arm,] subject, request, channel, [z,] y, x), got {dims}",
                         source="result", field="scan_mean")
    if "scan_affine" not in result:
        raise InputError("a result with scans needs each subject's scan_affine", source="result", field="scan_affine")


def _subject_stats(result: xr.Dataset, s: int, outer: list[int], levels: list[float]) -> dict[str, np.ndarray]:
    """One subject's scans to write, by file suffix; each ([arm,] request, channel, [sample,] *space)."""
    stats = {"mean": result["scan_mean"].isel(subject=s).values}
    if outer and "scan_quantiles" in result:
        q = result["scan_quantiles"].isel(subject=s)
        for j in outer:
            stats[quantile_name(levels[j])] = q.isel(quantile=j).values
    if "scan_spread" in result:
        stats["sd"] = result["scan_spread"].isel(subject=s).values
    if "scan_samples" in result:
        draws = result["scan_samples"].isel(subject=s)
        lead = [d for d in draws.dims if d == "arm"]
        stats["samples"] = draws.transpose(*lead, "request", "channel", "scan_sample", ...).values
    return stats


def _to_nifti_volume(scan: np.ndarray, *, samples: bool) -> np.ndarray:
    """([z,] y, x) -> (X, Y, Z) or (X, Y, 1); with samples, (K, [z,] y, x) -> (X, Y, Z, K) or (X, Y, 1, K)."""
    if not samples:
        return _to_nifti(scan)
    return np.stack([_to_nifti(draw) for draw in scan], axis=-1)


def _time_labels(times: np.ndarray, subject: str) -> list[str]:
    """Clock times as file-name labels, 2 decimals or as many more (up to 6) as keep them apart."""
    for decimals in range(2, 7):
        labels = [f"{t:.{decimals}f}" for t in times]
        if len(set(labels)) == len(labels):
            return labels
    raise InputError(f"subject {subject!r} has requested times less than 1e-6 apart, so their files would "
                     f"share a name", source="result", field="time")
