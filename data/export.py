"""Export scans of a cohort or result to NIfTI, as a BIDS-derivatives tree that `import_bids` reads back.

Layout under the output folder:

    dataset_description.json                      DatasetType "derivative", GeneratedBy twin
    participants.tsv                              participant_id and the covariates
    sub-<s>/sub-<s>_sessions.tsv                  session_id and age, or acq_time (see below)
    sub-<s>/sub-<s>_treatments.tsv                onset, agent, dose (subjects with events)
    sub-<s>/ses-<v>/anat/sub-<s>_ses-<v>_<channel>.nii.gz                     `image`
    sub-<s>/ses-<v>/anat/sub-<s>_ses-<v>_desc-<name>_<channel>.nii.gz         other variables
    sub-<s>/ses-<v>/anat/sub-<s>_ses-<v>_desc-<name><Scenario>_<channel>.nii.gz   with a scenario dim

<name> is the variable's name without a trailing `_image` and without non-alphanumerics
(`truth_image` -> `truth`, `q05` -> `q05`); <Scenario> is the capitalised scenario
(`desc-truthUntreated`). Only observed visits are written. Labels: BIDS allows only letters
and digits, so subject ids, session ids (`session_id` if the cohort has it, else `v00`,
`v01`, ... by visit slot) and channels lose every other character (`sim-0001` -> `sim0001`);
ids that become empty or collide are an error. The clock: "age (years)" is written as
`age`; any other clock as `acq_time`, counted from 2000-01-01T00:00:00 at baseline
(intervals are what count), which re-imports as "years since baseline" with baseline 0.
Images: (..., z, y, x) -> NIfTI (x, y, z) with the subject's affine; a 2D slice as (X, Y, 1).

The tree is written into a hidden sibling and renamed into place when complete, exactly
like the cohort store (`store.py`), so the folder holds the old export or the new one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import xarray as xr

from twin.errors import InputError

from .bids import YEAR_US
from .nifti import write_nifti
from .schema import SCENARIO, SPACE, SUBJECT, VISIT
from .store import _finish_interrupted_swap, _remove_stale_partials, _swap_into_place
from .table import AGE_CLOCK, write_rows_atomic

ANCHOR = datetime(2000, 1, 1)  # acq_time of every subject's baseline when the clock is not age
_ENTITY_CHANNEL = re.compile(r"^([A-Za-z0-9]+-[A-Za-z0-9]+_)*[A-Za-z0-9]+$")  # e.g. T1w, acq-fast_T1w


def bids_label(text: str) -> str:
    """A BIDS label: the letters and digits of `text` ('sim-0001' -> 'sim0001')."""
    return re.sub(r"[^A-Za-z0-9]", "", str(text))


def export_nifti(
    ds: xr.Dataset,
    out_dir: str | os.PathLike,
    *,
    variables: tuple[str, ...] = ("image",),
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Write `variables` (each (subject, visit, channel, [z,] y, x), optionally led by scenario) as NIfTI.

    Returns the NIfTI files written, under `out_dir`. Raises `InputError` for an unknown
    variable or one of other dims, labels that cannot be made BIDS-safe, non-finite voxels
    at an observed visit, or an existing non-empty `out_dir` without `overwrite`.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    variables = tuple(dict.fromkeys(variables))  # once each
    for name in variables:
        _check_variable(ds, name)
    _check_descs(ds, variables)
    subjects = _labels([str(s) for s in ds[SUBJECT].values], source="subject", what="subject id")
    channels = _channel_labels(ds) if "channel" in ds.coords else []
    _finish_interrupted_swap(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise InputError("already exists and is not empty; choose another folder or overwrite it", source=str(out), field="output")
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a folder", source=str(out), field="output")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)

    time = ds["time"].values
    visited = ds["observed"].values if "observed" in ds else np.isfinite(time)
    age = ds.attrs.get("clock") == AGE_CLOCK
    baseline = ds["baseline_time"].values if "baseline_time" in ds else np.zeros(len(subjects))
    written: list[Path] = []
    try:
        partial.mkdir()
        _write_description(partial)
        write_rows_atomic({partial / "participants.tsv": _participants(ds, subjects)}, delimiter="\t")
        for s, label in enumerate(tqdm(subjects, desc="exporting NIfTI", unit="subject", disable=not progress)):
            visits = np.flatnonzero(visited[s])
            sessions = _session_labels(ds, s, visits, label)
            folder = partial / f"sub-{label}"
            tables = {folder / f"sub-{label}_sessions.tsv": _sessions(sessions, time[s, visits], baseline[s], age)}
            events = _treatments(ds, s, baseline[s], age)
            if len(events) > 1:
                tables[folder / f"sub-{label}_treatments.tsv"] = events
            write_rows_atomic(tables, delimiter="\t")
            for name in variables:
                files = _write_scans(ds, name, s, visits, sessions, folder, channels)
                written += [out / f.relative_to(partial) for f in files]
        _swap_into_place(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return written


def _write_scans(ds: xr.Dataset, name: str, s: int, visits: np.ndarray, sessions: list[str], folder: Path,
                 channels: list[str]) -> list[Path]:
    """One subject's scans of one variable, per visit, scenario and channel, as NIfTI files."""
    values = ds[name].isel({SUBJECT: s}).values  # one subject in memory at a time
    scenarios = [str(c) for c in ds[SCENARIO].values] if SCENARIO in ds[name].dims else [None]
    affine = ds["affine"].values[s]
    label = folder.name  # sub-<label>
    files = []
    for v, session in zip(visits, sessions):
        anat = folder / f"ses-{session}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        for k, scenario in enumerate(scenarios):
            for c, channel in enumerate(channels):
                scan = values[k, v, c] if scenario is not None else values[v, c]
                if not np.isfinite(scan).all():  # import_bids would refuse the file: refuse it here
                    raise InputError(f"NaN or Inf voxels at observed visit {int(v)} of subject "
                                     f"{ds[SUBJECT].values[s]!r}, channel {channel!r}", source="cohort", field=name)
                file = anat / f"{label}_ses-{session}{_desc(name, scenario)}_{channel}.nii.gz"
                files.append(write_nifti(file, _to_nifti(scan), affine))
    return files


def _check_variable(ds: xr.Dataset, name: str) -> None:
    images = [n for n, v in ds.data_vars.items() if "channel" in v.dims and VISIT in v.dims]
    if name not in ds.data_vars:
        raise InputError(f"not in the cohort; its image variables are {images}", source="variables", field=name)
    dims = ds[name].dims
    body = dims[1:] if dims and dims[0] == SCENARIO else dims
    if body[:3] != (SUBJECT, VISIT, "channel") or body[3:] not in SPACE.values():
        raise InputError(f"expected dims ([scenario,] subject, visit, channel, [z,] y, x), got {dims}",
                         source="variables", field=name)
    if "affine" not in ds:
        raise InputError("a cohort with images needs each subject's affine", source="cohort", field="affine")


def _labels(ids: list[str], *, source: str, what: str) -> list[str]:
    labels = [bids_label(i) for i in ids]
    for i, label in zip(ids, labels):
        if not label:
            raise InputError(f"{what} {i!r} has no letters or digits, so no BIDS label", source=source, field=what.split()[0])
        if labels.count(label) > 1:
            other = next(j for j, lab in zip(ids, labels) if lab == label and j != i)
            raise InputError(f"{what}s {i!r} and {other!r} both become BIDS label {label!r}", source=source, field=what.split()[0])
    return labels


def _channel_labels(ds: xr.Dataset) -> list[str]:
    names = [str(c) for c in ds["channel"].values]
    if all(_ENTITY_CHANNEL.match(n) for n in names) and len(set(names)) == len(names):
        return names  # already BIDS: a suffix, perhaps after entities (acq-fast_T1w)
    return _labels(names, source="channel", what="channel name")


def _desc(name: str, scenario: str | None) -> str:
    """'' for the acquired image; '_desc-truthUntreated' for truth_image under scenario 'untreated'."""
    if name == "image" and scenario is None:
        return ""
    base = "image" if name == "image" else bids_label(name.removesuffix("_image"))
    tail = bids_label(scenario or "")
    return f"_desc-{base}{tail[:1].upper()}{tail[1:]}"


def _check_descs(ds: xr.Dataset, variables: tuple[str, ...]) -> None:
    """Two variables must not land in the same files ('truth' and 'truth_image' would)."""
    seen: dict[str, str] = {}
    for name in variables:
        scenarios = [str(c) for c in ds[SCENARIO].values] if SCENARIO in ds[name].dims else [None]
        for scenario in scenarios:
            desc = _desc(name, scenario)
            if desc == "_desc-" or desc in seen and seen[desc] != name:
                raise InputError(f"would be written as {desc or 'no desc'!r}, like {seen.get(desc, name)!r}; rename it",
                                 source="variables", field=name)
            seen[desc] = name


def _session_labels(ds: xr.Dataset, s: int, visits: np.ndarray, subject: str) -> list[str]:
    if "session_id" in ds:
        ids = [str(x) for x in ds["session_id"].values[s, visits]]
    else:
        width = max(2, len(str(ds.sizes[VISIT] - 1)))
        ids = [f"v{int(v):0{width}d}" for v in visits]
    return _labels(ids, source=f"sub-{subject}", what="session_id")


def _to_nifti(scan: np.ndarray) -> np.ndarray:
    """Cohort (z, y, x) or (y, x) -> NIfTI (x, y, z) or (x, y, 1)."""
    return scan.T if scan.ndim == 3 else scan.T[..., None]


def _on_clock(years_since_baseline: float, baseline: float, age: bool) -> str:
    if age:
        return repr(float(baseline + years_since_baseline))
    return (ANCHOR + timedelta(microseconds=round(years_since_baseline * YEAR_US))).isoformat()


def _sessions(sessions: list[str], times: np.ndarray, baseline: float, age: bool) -> list[list[str]]:
    rows = [["session_id", "age" if age else "acq_time"]]
    rows += [[f"ses-{label}", _on_clock(t, baseline, age)] for label, t in zip(sessions, times)]
    return rows


def _treatments(ds: xr.Dataset, s: int, baseline: float, age: bool) -> list[list[str]]:
    rows = [["onset", "agent", "dose"]]
    for t, agent, dose in zip(ds["event_time"].values[s], ds["event_agent"].values[s], ds["event_dose"].values[s]):
        if np.isfinite(t):
            rows.append([_on_clock(t, baseline, age), str(agent), repr(float(dose))])
    return rows


def _participants(ds: xr.Dataset, labels: list[str]) -> list[list[str]]:
    if "covariates" not in ds:
        return [["participant_id"]] + [[f"sub-{label}"] for label in labels]
    names = [str(c) for c in ds["covariate"].values]
    categories = json.loads(ds.attrs.get("covariate_categories", "{}"))
    rows = [["participant_id", *names]]
    for label, values in zip(labels, ds["covariates"].values):
        cells = []
        for name, x in zip(names, values):
            x = float(x)
            cells.append("n/a" if math.isnan(x) else categories[name][int(x)] if name in categories else repr(x))
        rows.append([f"sub-{label}", *cells])
    return rows


def _write_description(folder: Path) -> None:
    import twin

    description = {
        "Name": "Twin export",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "twin", "Version": twin.__version__,
                         "Description": "scans of a Twin cohort or result (twin export nifti)"}],
    }
    (folder / "dataset_description.json").write_text(json.dumps(description, indent=2) + "\n")
