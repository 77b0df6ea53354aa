"""Import a BIDS tree of longitudinal anatomical scans into a cohort.

What is read (everything else in the tree is ignored):

- `sub-<label>/ses-<label>/anat/sub-<label>_ses-<label>[_<entities>]_<suffix>.nii[.gz]`: one
  3D scan per modality. The channel is the name after `ses-<label>_`, entities included
  (`T1w`, `FLAIR`, `acq-fast_T1w`), so two acquisitions are never merged. Files with a
  `desc-` entity are derivatives (what `export_nifti` writes for ground truth or results)
  and are skipped. Every session must have every channel found in the cohort: a missing
  modality is an error naming the session and the channel, never a silently dropped one.
- `sub-<label>/sub-<label>_sessions.tsv`: `session_id` and the visit time, `age` (years,
  clock "age (years)") or, when there is no `age` column, `acq_time` (ISO 8601 date-time;
  only intervals count since dates are often shifted: clock "years since baseline", years of
  365.25 days, baseline 0). Every row needs a session folder with `anat/`, every session
  folder a row; times must be present and distinct. Sessions are ordered by time.
- `participants.tsv` (optional): `participant_id` and covariate columns, coded as by
  `table.covariate_matrix` (numbers kept, other columns as sorted category indices: sex F/M
  is 0/1). A participant without a folder is an error (a subject with no visits).
- `sub-<label>/sub-<label>_treatments.tsv` (optional, Twin's extension): exactly `onset`
  (on the sessions' clock: age in years or an ISO date-time), `agent`, `dose`.

Geometry: scans are read in RAS (`read_nifti`). A subject's scans must share shape and
affine; with `resample=True` each is resampled (trilinear, 0 outside its field of view) onto
the grid of the subject's first scan instead. Subjects may have different affines, but all
must share one array shape (Twin does not resample across subjects: crop or register first).
Cohort image (..., z, y, x) is the NIfTI array (x, y, z) transposed, with the same affine.
If every scan is a single slice (one axis of length 1), the cohort is 2D: the thin axis is
moved last, with its affine column, and the slice (X, Y) becomes (y, x).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import xarray as xr

from twin.errors import InputError

from .nifti import SUFFIXES, read_nifti
from .schema import DEFAULT_CLOCK, SUBJECT, VISIT, cohort
from .table import AGE_CLOCK, MISSING, covariate_matrix, number, read_table

TREATMENT_COLUMNS = ("onset", "agent", "dose")
YEAR_US = 365.25 * 86400 * 1e6  # microseconds per year: acq_time intervals are whole microseconds
_AFFINE_ATOL = 1e-4  # mm; NIfTI stores the affine in float32


@dataclass
class _Subject:
    """One subject's layout (sessions in time order) before any voxel is read."""

    label: str
    folder: Path
    sessions_tsv: Path
    time_column: str  # "age" or "acq_time"
    sessions: list[str]  # labels, in time order
    clock_values: list  # floats (age) or datetimes (acq_time), in time order
    files: list[dict[str, Path]]  # per session: channel -> file
    events: list[tuple[float, str, float]] = field(default_factory=list)


def import_bids(root: str | os.PathLike, *, resample: bool = False, progress: bool = True) -> xr.Dataset:
    """A cohort from a BIDS tree (see the module docstring for what is read and the rules).

    Returns image (S, V, C, [Z,] Y, X) with per-subject affines, time, baseline_time and the
    clock, covariates, events, and `session_id` (S, V): each visit's session label, '' for
    padding. Raises `InputError(source=<file or folder>, field=...)` on any bad input.
    """
    from tqdm.auto import tqdm

    root = Path(root)
    if not root.is_dir():
        raise InputError("no such directory", source=str(root), field="file")
    labels = sorted(p.name[4:] for p in root.iterdir() if p.is_dir() and p.name.startswith("sub-"))
    if not labels:
        raise InputError("no sub-<label> folders: not a BIDS tree", source=str(root), field="subject")
    subjects = [_layout(root / f"sub-{label}", label) for label in labels]
    _check_clocks(subjects)
    channels = _check_channels(subjects)

    scans, affines = [], []
    for subject in tqdm(subjects, desc="importing BIDS", unit="subject", disable=not progress):
        data, affine = _read_scans(subject, channels, resample)
        scans.append(data)
        affines.append(affine)
    image, affines = _to_cohort_grid(subjects, scans, affines)

    n_visits = max(len(s.sessions) for s in subjects)
    time = np.full((len(subjects), n_visits), np.nan)
    session_id = np.full((len(subjects), n_visits), "", dtype=object)
    full = np.full((len(subjects), n_visits, len(channels), *image[0].shape[2:]), np.nan, dtype=np.float32)
    for s, subject in enumerate(subjects):
        n = len(subject.sessions)
        time[s, :n] = _years_since_first(subject.clock_values)
        session_id[s, :n] = subject.sessions
        full[s, :n] = image[s]
    age = subjects[0].time_column == "age"
    baseline = np.array([s.clock_values[0] if age else 0.0 for s in subjects], dtype=np.float64)

    attrs = {"source": str(root)}
    covariates, names = None, None
    participants = root / "participants.tsv"
    if participants.is_file():
        table = read_table(participants, delimiter="\t")
        if "participant_id" not in table.columns:
            raise InputError(f"missing column; columns are {list(table.columns)}", source=str(participants), field="participant_id")
        covariates, names, categories = covariate_matrix(table, "participant_id", labels, label=_strip("sub-"),
                                                         role="BIDS tree (no sub-<label> folder)")
        if not names:
            covariates, names = None, None
        if categories:
            attrs["covariate_categories"] = json.dumps(categories)
    ds = cohort(subject=labels, time=time, image=full, channel=channels, affine=np.stack(affines),
                covariates=covariates, covariate=names, events=[s.events for s in subjects],
                baseline_time=baseline, clock=AGE_CLOCK if age else DEFAULT_CLOCK, attrs=attrs)
    return ds.assign(session_id=xr.Variable((SUBJECT, VISIT), session_id, {"long_name": "BIDS session label (without 'ses-')"}))


def _strip(prefix: str):
    return lambda text: text[len(prefix):] if text.startswith(prefix) else text


def _layout(folder: Path, label: str) -> _Subject:
    """Read sessions.tsv and treatments.tsv and list the scans; no voxel is read here."""
    tsv = folder / f"sub-{label}_sessions.tsv"
    if not tsv.is_file():
        raise InputError("missing; needed for the visit times (columns session_id and age or acq_time)",
                         source=str(tsv), field="file")
    table = read_table(tsv, delimiter="\t")
    if "session_id" not in table.columns:
        raise InputError(f"missing column; columns are {list(table.columns)}", source=str(tsv), field="session_id")
    column = "age" if "age" in table.columns else "acq_time" if "acq_time" in table.columns else None
    if column is None:
        raise InputError(f"no visit time column: expected 'age' (years) or 'acq_time' (ISO date-time); columns are "
                         f"{list(table.columns)}", source=str(tsv), field="age")
    rows: dict[str, tuple[int, object]] = {}
    i_ses, i_time = table.index("session_id"), table.index(column)
    for line, row in table.rows:
        session = _strip("ses-")(row[i_ses])
        if not session:
            raise InputError(f"line {line}: empty session_id", source=str(tsv), field="session_id")
        if session in rows:
            raise InputError(f"line {line}: ses-{session} also on line {rows[session][0]}", source=str(tsv), field="session_id")
        rows[session] = (line, _clock_value(row[i_time], column, tsv, line))
    if not rows:
        raise InputError("no sessions listed (a subject with no visits)", source=str(tsv), field="session_id")
    order = sorted(rows, key=lambda s: rows[s][1])
    for a, b in zip(order, order[1:]):
        if rows[a][1] == rows[b][1]:
            raise InputError(f"ses-{a} (line {rows[a][0]}) and ses-{b} (line {rows[b][0]}) have the same time",
                             source=str(tsv), field=column)

    folders = {p.name[4:] for p in folder.iterdir() if p.is_dir() and p.name.startswith("ses-")}
    unlisted = sorted(folders - set(rows))
    if unlisted:
        raise InputError(f"session folder not listed in {tsv.name}", source=str(folder / f"ses-{unlisted[0]}"), field="session_id")
    files = []
    for session in order:
        anat = folder / f"ses-{session}" / "anat"
        if not anat.is_dir():
            raise InputError(f"line {rows[session][0]}: ses-{session} has no anat folder (expected {anat})",
                             source=str(tsv), field="session_id")
        files.append(_scans(anat, label, session))
    times = [rows[s][1] for s in order]
    subject = _Subject(label, folder, tsv, column, order, times, files)
    treatments = folder / f"sub-{label}_treatments.tsv"
    if treatments.is_file():
        subject.events = _treatments(treatments, column, times[0])
    return subject


def _clock_value(cell: str, column: str, source: Path, line: int):
    if column == "age":
        return number(cell, source=source, line=line, field=column, required=True)
    if cell.lower() in MISSING:
        raise InputError(f"line {line}: missing value", source=str(source), field=column)
    try:
        when = datetime.fromisoformat(cell[:-1] + "+00:00" if cell.endswith("Z") else cell)
    except ValueError:
        raise InputError(f"line {line}: expected an ISO 8601 date-time such as 2020-01-31T09:30:00, got {cell!r}",
                         source=str(source), field=column) from None
    # Aware times are compared in UTC; naive ones are taken to share one (unknown) zone.
    return when.astimezone(timezone.utc).replace(tzinfo=None) if when.tzinfo else when


def _years_since_first(values: list) -> np.ndarray:
    first = values[0]
    if isinstance(first, datetime):
        return np.array([((v - first) // timedelta(microseconds=1)) / YEAR_US for v in values])
    return np.array([v - first for v in values], dtype=np.float64)


def _scans(anat: Path, label: str, session: str) -> dict[str, Path]:
    """Channel -> file for one session's anat folder (derivatives with `desc-` skipped)."""
    prefix = f"sub-{label}_ses-{session}_"
    out: dict[str, Path] = {}
    for path in sorted(anat.iterdir()):
        name = path.name
        if name.startswith(".") or not name.endswith(SUFFIXES):
            continue
        if not name.startswith(prefix):
            raise InputError(f"expected a name starting with {prefix!r}", source=str(path), field="name")
        channel = name[len(prefix):].removesuffix(".gz").removesuffix(".nii")
        if not channel or any(part.startswith("desc-") for part in channel.split("_")):
            continue
        if channel in out:
            raise InputError(f"two files for channel {channel!r}: {out[channel].name} and {name}", source=str(path), field="name")
        out[channel] = path
    if not out:
        raise InputError("no NIfTI scans (sub-*_ses-*_<suffix>.nii[.gz])", source=str(anat), field="image")
    return out


def _treatments(path: Path, column: str, first) -> list[tuple[float, str, float]]:
    table = read_table(path, delimiter="\t")
    for name in table.columns:
        if name not in TREATMENT_COLUMNS:
            raise InputError(f"unknown column; expected exactly {', '.join(TREATMENT_COLUMNS)}", source=str(path), field=name)
    for name in TREATMENT_COLUMNS:
        if name not in table.columns:
            raise InputError(f"missing column; expected exactly {', '.join(TREATMENT_COLUMNS)}", source=str(path), field=name)
    i_onset, i_agent, i_dose = (table.index(c) for c in TREATMENT_COLUMNS)
    events = []
    for line, row in table.rows:
        try:
            onset = _clock_value(row[i_onset], column, path, line)
        except InputError as err:  # same rules as the sessions' clock, reported as the onset field
            raise InputError(err.message + f" (onset is on the sessions' clock, {column})", source=str(path), field="onset") from None
        if not row[i_agent]:
            raise InputError(f"line {line}: empty agent", source=str(path), field="agent")
        dose = number(row[i_dose], source=path, line=line, field="dose", required=True)
        if dose < 0:
            raise InputError(f"line {line}: negative dose {row[i_dose]}", source=str(path), field="dose")
        events.append((float(_years_since_first([first, onset])[1]), row[i_agent], dose))
    return events


def _check_clocks(subjects: list[_Subject]) -> None:
    first = subjects[0]
    for subject in subjects[1:]:
        if subject.time_column != first.time_column:
            raise InputError(f"visit times are {subject.time_column} but {first.sessions_tsv.name} uses "
                             f"{first.time_column}; one cohort has one clock", source=str(subject.sessions_tsv),
                             field=subject.time_column)


def _check_channels(subjects: list[_Subject]) -> list[str]:
    """The cohort's channels (sorted); every session must have all of them."""
    seen: dict[str, Path] = {}
    for subject in subjects:
        for files in subject.files:
            for channel, path in files.items():
                seen.setdefault(channel, path)
    channels = sorted(seen)
    for subject in subjects:
        for session, files in zip(subject.sessions, subject.files):
            for channel in channels:
                if channel not in files:
                    raise InputError(f"no {channel} scan in this session, though {seen[channel].name} has one; every "
                                     f"session needs every modality", source=str(subject.folder / f"ses-{session}" / "anat"),
                                     field=channel)
    return channels


def _read_scans(subject: _Subject, channels: list[str], resample: bool) -> tuple[np.ndarray, np.ndarray]:
    """(V, C, X, Y, Z) float32 in RAS on the grid of the subject's first scan, and that grid's affine."""
    ref_path = subject.files[0][channels[0]]
    ref_data, ref_affine = _read_3d(ref_path)
    out = np.empty((len(subject.sessions), len(channels), *ref_data.shape), dtype=np.float32)
    for v, files in enumerate(subject.files):
        for c, channel in enumerate(channels):
            path = files[channel]
            data, affine = (ref_data, ref_affine) if (v, c) == (0, 0) else _read_3d(path)
            same_shape = data.shape == ref_data.shape
            same_affine = np.allclose(affine, ref_affine, rtol=0, atol=_AFFINE_ATOL)
            if not (same_shape and same_affine):
                if not resample:
                    what, got, want = (("shape", data.shape, ref_data.shape) if not same_shape else
                                       ("affine", _fmt(affine), _fmt(ref_affine)))
                    raise InputError(f"{got} differs from {want} of {ref_path.name} (a subject's visits share one grid); "
                                     f"resample=True (--resample) resamples onto the first visit's grid",
                                     source=str(path), field=what)
                data = _resample(data, affine, ref_data.shape, ref_affine)
            out[v, c] = data
    return out, ref_affine


def _read_3d(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data, affine = read_nifti(path)
    if data.ndim != 3:
        raise InputError(f"expected one 3D volume per modality, got shape {data.shape}", source=str(path), field="dim")
    return data, affine


def _fmt(affine: np.ndarray) -> str:
    return "[" + "; ".join(" ".join(f"{x:g}" for x in row) for row in np.asarray(affine)[:3]) + "]"


def _resample(data: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], target: np.ndarray) -> np.ndarray:
    """Trilinear resampling of `data` (grid `affine`) onto `shape` with affine `target`; 0 outside.

    Target voxel i lies at world `target @ i`, i.e. at source voxel `inv(affine) @ target @ i`.
    """
    from scipy import ndimage

    m = np.linalg.inv(affine) @ target
    return ndimage.affine_transform(data, m[:3, :3], offset=m[:3, 3], output_shape=shape, order=1,
                                    mode="constant", cval=0.0, output=np.float32)


def _to_cohort_grid(subjects: list[_Subject], scans: list[np.ndarray], affines: list[np.ndarray]):
    """NIfTI (V, C, X, Y, Z) per subject -> cohort (V, C, [Z,] Y, X); 2D if every scan is one slice."""
    thin = [[k for k, n in enumerate(d.shape[2:]) if n == 1] for d in scans]
    flat = all(len(k) == 1 for k in thin)
    out, out_affines = [], []
    for data, affine, k in zip(scans, affines, thin):
        if flat:  # move the thin axis last, with its affine column: NIfTI (X, Y, 1) is a 2D slice
            perm = [a for a in range(3) if a != k[0]] + [k[0]]
            data = data.transpose(0, 1, *(2 + a for a in perm))[..., 0].swapaxes(-1, -2)
            affine = affine[:, perm + [3]]
        else:
            data = data.transpose(0, 1, 4, 3, 2)
        out.append(data)
        out_affines.append(affine)
    for subject, data in zip(subjects[1:], out[1:]):
        if data.shape[2:] != out[0].shape[2:]:
            raise InputError(f"grid {_nifti_shape(data)} differs from {_nifti_shape(out[0])} of sub-{subjects[0].label}; "
                             f"all subjects of a cohort share one array shape (crop or register first)",
                             source=str(next(iter(subject.files[0].values()))), field="shape")
    return out, out_affines


def _nifti_shape(data: np.ndarray) -> tuple[int, ...]:
    space = data.shape[2:][::-1]
    return space + (1,) if len(space) == 2 else space
