"""The `.twin` accessor on xarray Datasets: the usual questions about a cohort, answered thinly.

`ds.twin.history("sim-0001")`, `ds.twin.events(...)`, `ds.twin.describe()`. The accessor only
checks that the Dataset is a cohort and delegates to pure functions; full validation is
`ds.twin.validate()`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from twin.errors import InputError

from . import geometry
from .schema import FORMAT, SUBJECT, space_dims, subject_slice
from .validate import validate


@xr.register_dataset_accessor("twin")
class TwinAccessor:
    def __init__(self, ds: xr.Dataset):
        if ds.attrs.get("twin_format") != FORMAT:
            raise InputError(f"not a Twin cohort: attribute twin_format is {ds.attrs.get('twin_format')!r}, expected {FORMAT!r}")
        self._ds = ds

    @property
    def subjects(self) -> list[str]:
        return [str(s) for s in self._ds[SUBJECT].values]

    @property
    def clock(self) -> str:
        return self._ds.attrs.get("clock", "")

    def _check(self, subject: str) -> None:
        if subject not in self.subjects:
            raise InputError(f"unknown subject {subject!r}", field="subject")

    def history(self, subject: str) -> xr.Dataset:
        """The subject's observed visits (missed and padding slots dropped)."""
        self._check(subject)
        one = subject_slice(self._ds, subject)
        return one.isel(visit=np.flatnonzero(one["observed"].values))

    def visit_times(self, subject: str, *, clock: bool = False) -> np.ndarray:
        """Observed visit times, in years since baseline or on the cohort's own clock."""
        one = self.history(subject)
        return one["time"].values + (float(one["baseline_time"]) if clock else 0.0)

    def events(self, subject: str, *, clock: bool = False) -> pd.DataFrame:
        """The subject's treatment events as a table: time, agent, dose."""
        self._check(subject)
        one = subject_slice(self._ds, subject)
        shift = float(one["baseline_time"]) if clock else 0.0
        return pd.DataFrame({
            "time": one["event_time"].values + shift,
            "agent": [str(a) for a in one["event_agent"].values],
            "dose": one["event_dose"].values,
        })

    def spacing(self, subject: str | None = None) -> tuple[float, ...]:
        """Voxel size in mm of a subject's grid (the first subject's by default)."""
        affine = self._ds["affine"].sel({SUBJECT: subject}) if subject else self._ds["affine"].isel({SUBJECT: 0})
        return geometry.spacing(affine.values, len(space_dims(self._ds)) or 3)

    def validate(self) -> xr.Dataset:
        return validate(self._ds)

    def describe(self) -> dict:
        return describe(self._ds)


def describe(ds: xr.Dataset) -> dict:
    """A summary for people: subjects, visits, time span, channels, biomarkers, events."""
    observed = ds["observed"].values
    time = ds["time"].values
    per_subject = observed.sum(axis=1)
    planned = np.isfinite(time)
    span = np.where(observed, time, np.nan)
    out: dict = {
        "kind": ds.attrs.get("kind", "imported" if "source" in ds.attrs else "unknown"),
        "subjects": int(ds.sizes[SUBJECT]),
        "visits": int(observed.sum()),
        "visits_per_subject": {"min": int(per_subject.min()), "median": float(np.median(per_subject)), "max": int(per_subject.max())},
        "missed_visits": int((planned & ~observed).sum()),
        "follow_up_years": {"median": float(np.nanmedian(np.nanmax(span, axis=1))), "max": float(np.nanmax(span))},
        "clock": ds.attrs.get("clock", ""),
        "baseline_on_clock": {"min": float(ds["baseline_time"].min()), "max": float(ds["baseline_time"].max())},
    }
    if "image" in ds:
        space = [d for d in ds["image"].dims if d in ("z", "y", "x")]
        out["channels"] = [str(c) for c in ds["channel"].values]
        out["grid"] = {"dims": space, "shape": [int(ds.sizes[d]) for d in space],
                       "spacing_mm": [round(s, 3) for s in geometry.spacing(ds["affine"].isel({SUBJECT: 0}).values, len(space))]}
    if "biomarkers" in ds:
        measured = np.isfinite(ds["biomarkers"].values) & observed[..., None]
        units = ds["biomarker_unit"].values if "biomarker_unit" in ds.coords else [""] * ds.sizes["biomarker"]
        out["biomarkers"] = {str(b): {"unit": str(u), "measured": int(measured[..., k].sum())}
                             for k, (b, u) in enumerate(zip(ds["biomarker"].values, units))}
    if "covariates" in ds:
        out["covariates"] = [str(c) for c in ds["covariate"].values]
    agents = [str(a) for a in ds["event_agent"].values.ravel() if str(a)]
    out["events"] = {a: agents.count(a) for a in sorted(set(agents))}
    out["ground_truth"] = [v for v in ds.data_vars if v.startswith("truth_")]
    return out
