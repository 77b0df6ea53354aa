"""Every rule a cohort must satisfy, checked one by one so an error lists all that fail.

Works on lazy (dask-backed) cohorts: the per-voxel checks are reductions computed chunk by
chunk, so a cohort larger than memory validates without being loaded.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from twin.errors import CohortError

from .schema import FORMAT, SCENARIO, SCENARIOS, SPACE, SUBJECT, VISIT, space_dims

REQUIRED = ("time", "observed", "baseline_time", "event_time", "event_agent", "event_dose")


def problems(ds: xr.Dataset) -> list[str]:
    """The list of violated rules, each a sentence naming the variable; empty when valid."""
    out: list[str] = []
    if ds.attrs.get("twin_format") != FORMAT:
        out.append(f"attribute twin_format: expected {FORMAT!r}, got {ds.attrs.get('twin_format')!r}")
    missing = [v for v in REQUIRED if v not in ds.variables]
    if missing:
        return out + [f"missing variable(s): {', '.join(missing)}"]
    if "image" not in ds and "biomarkers" not in ds:
        out.append("a cohort needs images, biomarkers or both; it has neither")

    subjects = [str(s) for s in ds[SUBJECT].values]
    if ds.sizes[SUBJECT] == 0:
        out.append("the cohort has no subjects")
    dupes = sorted({s for s in subjects if subjects.count(s) > 1})
    if dupes:
        out.append(f"subject: duplicate ids {dupes}")

    out += _time_problems(ds, subjects)
    if "image" in ds:
        out += _image_problems(ds, subjects)
    if "biomarkers" in ds:
        bad = _subjects_where(np.isinf(ds["biomarkers"]).any((VISIT, "biomarker")).values, subjects)
        if bad:
            out.append(f"biomarkers: infinite values for subjects {bad}")
    if "covariates" in ds:
        bad = _subjects_where(np.isinf(ds["covariates"].values).any(axis=1), subjects)
        if bad:
            out.append(f"covariates: infinite values for subjects {bad}")
    out += _event_problems(ds, "event", subjects)
    out += _truth_problems(ds)
    return out


def validate(ds: xr.Dataset, *, source: str | None = None) -> xr.Dataset:
    """Raise `CohortError` listing every violated rule; return the cohort when valid."""
    found = problems(ds)
    if found:
        raise CohortError(found, source=source)
    return ds


def _subjects_where(flags: np.ndarray, subjects: list[str], limit: int = 5) -> str:
    hit = [subjects[i] for i in np.flatnonzero(flags)]
    if not hit:
        return ""
    more = f" and {len(hit) - limit} more" if len(hit) > limit else ""
    return ", ".join(hit[:limit]) + more


def _time_problems(ds: xr.Dataset, subjects: list[str]) -> list[str]:
    out = []
    time = ds["time"].values
    observed = ds["observed"].values
    finite = np.isfinite(time)
    if np.isinf(time).any():
        out.append(f"time: infinite values for subjects {_subjects_where(np.isinf(time).any(1), subjects)}")
    # Padding only at the end: once a slot is NaN, every later slot is NaN too.
    gap = (~finite[:, :-1]) & finite[:, 1:]
    if gap.any():
        out.append(f"time: missing (NaN) time before a later visit for subjects {_subjects_where(gap.any(1), subjects)}")
    if (observed & ~finite).any():
        out.append(f"observed: visits marked observed without a time for subjects {_subjects_where((observed & ~finite).any(1), subjects)}")
    none = ~observed.any(axis=1)
    if none.any():
        out.append(f"observed: subjects with no visits: {_subjects_where(none, subjects)}")
    with np.errstate(invalid="ignore"):
        step = np.diff(time, axis=1)
    both = finite[:, :-1] & finite[:, 1:]
    dup = both & (step == 0)
    if dup.any():
        out.append(f"time: duplicate visit times for subjects {_subjects_where(dup.any(1), subjects)}")
    unsorted = both & (step < 0)
    if unsorted.any():
        out.append(f"time: visit times not increasing for subjects {_subjects_where(unsorted.any(1), subjects)}")
    # Time counts from the subject's first observed visit.
    first = np.array([time[s, np.argmax(observed[s])] if observed[s].any() else 0.0 for s in range(len(time))])
    off = np.isfinite(first) & (np.abs(first) > 1e-9)
    if off.any():
        out.append(f"time: first observed visit is not at time 0 for subjects {_subjects_where(off, subjects)}")
    if not np.isfinite(ds["baseline_time"].values).all():
        out.append(f"baseline_time: non-finite for subjects {_subjects_where(~np.isfinite(ds['baseline_time'].values), subjects)}")
    return out


def _image_problems(ds: xr.Dataset, subjects: list[str]) -> list[str]:
    out = []
    space = space_dims(ds)
    image = ds["image"]
    if image.dims[:3] != (SUBJECT, VISIT, "channel") or len(space) not in SPACE or image.dims[3:] != SPACE[len(space)]:
        return [f"image: dims must be (subject, visit, channel, [z,] y, x), got {image.dims}"]
    observed = ds["observed"]
    finite = np.isfinite(image).all(("channel", *space))
    bad = (observed & ~finite).values
    if bad.any():
        out.append(f"image: NaN or Inf voxels in observed visits for subjects {_subjects_where(bad.any(1), subjects)}")
    if "affine" not in ds:
        out.append("affine: missing; a cohort with images needs each subject's voxel-to-world affine")
    else:
        affine = ds["affine"].values
        if affine.shape[1:] != (4, 4):
            out.append(f"affine: must be 4x4 per subject, got {affine.shape[1:]}")
        else:
            ok = np.isfinite(affine).all((1, 2)) & np.allclose(affine[:, 3], [0, 0, 0, 1])
            ok &= np.abs(np.linalg.det(np.nan_to_num(affine[:, :3, :3]))) > 1e-12
            if not ok.all():
                out.append(f"affine: not a finite invertible 4x4 with last row [0 0 0 1] for subjects {_subjects_where(~ok, subjects)}")
    if "mask" in ds and ds["mask"].dims != (SUBJECT, *space):
        out.append(f"mask: dims must be (subject, {', '.join(space)}), got {ds['mask'].dims}")
    return out


def _event_problems(ds: xr.Dataset, prefix: str, subjects: list[str]) -> list[str]:
    out = []
    time = ds[f"{prefix}_time"].values
    agent = ds[f"{prefix}_agent"].values
    dose = ds[f"{prefix}_dose"].values
    finite = np.isfinite(time)
    if np.isinf(time).any():
        out.append(f"{prefix}_time: infinite values")
    with np.errstate(invalid="ignore"):
        unsorted = finite[:, :-1] & finite[:, 1:] & (np.diff(time, axis=1) < 0)
    if unsorted.any():
        out.append(f"{prefix}_time: events not sorted by time for subjects {_subjects_where(unsorted.any(1), subjects)}")
    named = np.vectorize(lambda a: bool(str(a).strip()), otypes=[bool])(agent) if agent.size else np.zeros(agent.shape, bool)
    if (finite & ~named).any():
        out.append(f"{prefix}_agent: events without an agent for subjects {_subjects_where((finite & ~named).any(1), subjects)}")
    with np.errstate(invalid="ignore"):
        bad_dose = finite & ~(np.isfinite(dose) & (dose >= 0))
    if bad_dose.any():
        out.append(f"{prefix}_dose: missing or negative doses for subjects {_subjects_where(bad_dose.any(1), subjects)}")
    return out


def _truth_problems(ds: xr.Dataset) -> list[str]:
    out = []
    for name, like in (("truth_image", "image"), ("truth_biomarkers", "biomarkers")):
        if name not in ds:
            continue
        truth = ds[name]
        if truth.dims[0] != SCENARIO or list(ds[SCENARIO].values) != list(SCENARIOS):
            out.append(f"{name}: first dim must be scenario with values {list(SCENARIOS)}")
        elif like in ds and truth.dims[1:] != ds[like].dims:
            out.append(f"{name}: dims {truth.dims[1:]} after scenario do not match {like} {ds[like].dims}")
    if "alternative_event_time" in ds:
        out += _event_problems(ds, "alternative_event", [str(s) for s in ds[SUBJECT].values])
    return out
