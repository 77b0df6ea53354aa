"""The cohort schema: names, dimensions, and the one constructor every importer and simulator uses.

A cohort is an `xarray.Dataset`. Visits are irregular and padded per subject to the longest
history; time is in years since each subject's baseline visit, and the cohort's own clock
(age, say) is kept as `baseline_time` so requests and results can be given on it.
`docs/cohort-format.md` documents every variable; this module is its executable form.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

FORMAT = "twin-cohort/1"

SUBJECT, VISIT, CHANNEL, BIOMARKER, COVARIATE, EVENT = (
    "subject", "visit", "channel", "biomarker", "covariate", "event")
SPACE = {2: ("y", "x"), 3: ("z", "y", "x")}
AFFINE_DIMS = ("affine_row", "affine_col")

# Simulated cohorts: ground truth under the schedule the subject received, without any
# treatment, and under one alternative schedule, at the same (planned) visit times.
SCENARIO = "scenario"
SCENARIOS = ("factual", "untreated", "alternative")
PARAMETER = "parameter"
ALT_EVENT = "alternative_event"

DEFAULT_CLOCK = "years since baseline"


def space_dims(ds: xr.Dataset) -> tuple[str, ...]:
    """The spatial dims of a cohort's images, ('y', 'x') or ('z', 'y', 'x'); () if none."""
    if "image" not in ds:
        return ()
    return tuple(d for d in ds["image"].dims if d in ("z", "y", "x"))


def events_array(events: Sequence[Sequence[tuple[float, str, float]]]):
    """Pad per-subject event lists [(time, agent, dose), ...] to (S, E) arrays.

    Returns (time float64 NaN-padded, agent object '' padded, dose float64 NaN-padded),
    each subject's events sorted by time (stable, so same-time events keep their order).
    """
    n = max((len(e) for e in events), default=0)
    time = np.full((len(events), n), np.nan)
    agent = np.full((len(events), n), "", dtype=object)
    dose = np.full((len(events), n), np.nan)
    for s, subject_events in enumerate(events):
        for k, (t, a, d) in enumerate(sorted(subject_events, key=lambda e: e[0])):
            time[s, k], agent[s, k], dose[s, k] = t, str(a), d
    return time, agent, dose


def cohort(
    *,
    subject: Sequence[str],
    time: np.ndarray,
    observed: np.ndarray | None = None,
    image: np.ndarray | None = None,
    channel: Sequence[str] | None = None,
    affine: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    biomarkers: np.ndarray | None = None,
    biomarker: Sequence[str] | None = None,
    biomarker_units: Sequence[str] | None = None,
    covariates: np.ndarray | None = None,
    covariate: Sequence[str] | None = None,
    events: Sequence[Sequence[tuple[float, str, float]]] | None = None,
    baseline_time: np.ndarray | None = None,
    clock: str = DEFAULT_CLOCK,
    attrs: dict | None = None,
) -> xr.Dataset:
    """Assemble a cohort Dataset from arrays.

    subject: (S,) ids. time: (S, V) years since each subject's baseline, NaN-padded at the end.
    observed: (S, V) visit took place (default: time is finite); a planned but missed visit has
    a finite time and observed False. image: (S, V, C, [Z,] Y, X), NaN where not observed.
    affine: (4, 4) or (S, 4, 4) voxel-to-world, RAS mm. mask: (S, [Z,] Y, X) brain mask.
    biomarkers: (S, V, B), NaN = not measured. covariates: (S, K). events: per subject a list of
    (time since baseline, agent, dose). baseline_time: (S,) baseline on the cohort's `clock`.
    Shapes are checked here; the full rule set is `twin.data.validate`.
    """
    subject = np.asarray([str(s) for s in subject], dtype=object)
    time = np.asarray(time, dtype=np.float64)
    n_subjects, n_visits = time.shape
    if observed is None:
        observed = np.isfinite(time)
    coords: dict = {SUBJECT: subject, VISIT: np.arange(n_visits)}
    data: dict = {
        "time": ((SUBJECT, VISIT), time, {"units": "years", "long_name": "time since the subject's baseline visit"}),
        "observed": ((SUBJECT, VISIT), np.asarray(observed, dtype=bool), {"long_name": "visit took place"}),
    }
    base = np.zeros(n_subjects) if baseline_time is None else np.asarray(baseline_time, dtype=np.float64)
    data["baseline_time"] = ((SUBJECT,), base, {"long_name": "baseline visit on the cohort's own clock", "clock": clock})

    if image is not None:
        image = np.asarray(image, dtype=np.float32)
        space = SPACE.get(image.ndim - 3)
        if space is None:
            raise ValueError(f"image must be (S, V, C, Y, X) or (S, V, C, Z, Y, X), got {image.shape}")
        n_channels = image.shape[2]
        channel = [f"ch{c}" for c in range(n_channels)] if channel is None else [str(c) for c in channel]
        if len(channel) != n_channels:
            raise ValueError(f"{len(channel)} channel names for {n_channels} channels")
        coords[CHANNEL] = np.asarray(channel, dtype=object)
        data["image"] = ((SUBJECT, VISIT, CHANNEL, *space), image, {"long_name": "scan intensity"})
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        if affine.shape == (4, 4):
            affine = np.broadcast_to(affine, (n_subjects, 4, 4)).copy()
        data["affine"] = ((SUBJECT, *AFFINE_DIMS), affine, {"long_name": "voxel-to-world affine (RAS, mm)"})
        if mask is not None:
            data["mask"] = ((SUBJECT, *space), np.asarray(mask, dtype=bool), {"long_name": "brain mask"})

    if biomarkers is not None:
        biomarkers = np.asarray(biomarkers, dtype=np.float64)
        names = [str(b) for b in (biomarker or [f"b{k}" for k in range(biomarkers.shape[-1])])]
        coords[BIOMARKER] = np.asarray(names, dtype=object)
        units = [""] * len(names) if biomarker_units is None else [str(u) for u in biomarker_units]
        coords["biomarker_unit"] = (BIOMARKER, np.asarray(units, dtype=object))
        data["biomarkers"] = ((SUBJECT, VISIT, BIOMARKER), biomarkers, {"long_name": "biomarker value (NaN = not measured)"})

    if covariates is not None:
        covariates = np.asarray(covariates, dtype=np.float64)
        names = [str(c) for c in (covariate or [f"c{k}" for k in range(covariates.shape[-1])])]
        coords[COVARIATE] = np.asarray(names, dtype=object)
        data["covariates"] = ((SUBJECT, COVARIATE), covariates, {})

    event_time, event_agent, event_dose = events_array(events or [[] for _ in range(n_subjects)])
    data["event_time"] = ((SUBJECT, EVENT), event_time, {"units": "years", "long_name": "treatment event time since baseline"})
    data["event_agent"] = ((SUBJECT, EVENT), event_agent, {"long_name": "treatment agent"})
    data["event_dose"] = ((SUBJECT, EVENT), event_dose, {"long_name": "dose (agent's unit)"})
    coords[EVENT] = np.arange(event_time.shape[1])

    ds = xr.Dataset({k: xr.Variable(d, v, a) for k, (d, v, a) in data.items()}, coords=coords)
    ds.attrs.update({"twin_format": FORMAT, "clock": clock, **(attrs or {})})
    return ds


def subject_slice(ds: xr.Dataset, subject: str) -> xr.Dataset:
    """One subject's part of a cohort, padding dropped (visits and events that did not occur)."""
    one = ds.sel({SUBJECT: subject})
    keep = np.isfinite(one["time"].values)
    one = one.isel({VISIT: np.flatnonzero(keep)})
    if EVENT in one.dims:
        one = one.isel({EVENT: np.flatnonzero(np.isfinite(one["event_time"].values))})
    return one
