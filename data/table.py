"""Biomarker tables in and out: a long CSV of visits, with optional covariates and treatment events.

Biomarker-only cohorts arrive as tables. Three CSV files, each row naming its subject:

- visits: `subject,time,<biomarker>...`, one row per visit, in increasing time within each
  subject (leaspy's `ID,TIME,...` tables import as they are). A biomarker header may carry
  its unit in brackets, `volume [mL]`. Empty, `NA`, `NaN` or `n/a` cells are "not measured".
- covariates (optional): `subject,<covariate>...`, one row per subject. A column whose
  values are not all numbers is coded as category indices in sorted order (so `sex` M/F
  becomes 1/0); the cohort attribute `covariate_categories` keeps the mapping.
- events (optional): exactly `subject,time,agent,dose`, time on the visits' clock.

The cohort keeps the table's own clock, named from the time column: `age` and leaspy's
`TIME` are "age (years)", `time` is "time (years)", and `time [<clock>]` names any other
clock (what `export_table` writes for one). Stored time is years since each subject's
first visit; `baseline_time` is that first visit on the clock. The reading helpers here
are shared with the BIDS importer (`bids.py`), whose TSV files follow the same rules.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from twin.errors import InputError

from .schema import cohort

MISSING = frozenset({"", "na", "nan", "n/a"})  # compared lower-case
AGE_CLOCK = "age (years)"
TIME_CLOCK = "time (years)"
SUBJECT_COLUMNS = ("subject", "ID")
EVENT_COLUMNS = ("subject", "time", "agent", "dose")
_BRACKETED = re.compile(r"^(.*\S)\s*\[([^\[\]]*)\]$")  # "volume [mL]" -> ("volume", "mL")


@dataclass(frozen=True)
class Table:
    """A delimited text file read as strings: header and (line number, cells) per data row."""

    path: Path
    columns: tuple[str, ...]
    rows: tuple[tuple[int, tuple[str, ...]], ...]

    def index(self, column: str) -> int:
        return self.columns.index(column)


def read_table(path: str | os.PathLike, *, delimiter: str = ",") -> Table:
    """Read a CSV (or TSV) file; every structural problem is an `InputError` naming the file."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise InputError("no such file", source=source, field="file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            header = None
            rows = []
            for cells in reader:
                if not any(c.strip() for c in cells):
                    continue  # blank lines carry nothing
                if header is None:
                    header = tuple(c.strip() for c in cells)
                    continue
                if len(cells) != len(header):
                    raise InputError(f"line {reader.line_num}: {len(cells)} cells, the header has {len(header)}",
                                     source=source, field="columns")
                rows.append((reader.line_num, tuple(c.strip() for c in cells)))
    except UnicodeDecodeError as err:
        raise InputError(f"not UTF-8 text ({err.reason} at byte {err.start})", source=source, field="encoding") from None
    except csv.Error as err:
        raise InputError(f"not a readable {'TSV' if delimiter == chr(9) else 'CSV'} file ({err})", source=source, field="format") from None
    if header is None:
        raise InputError("empty file: expected a header line", source=source, field="header")
    if "" in header:
        raise InputError(f"column {header.index('') + 1} has no name", source=source, field="header")
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise InputError(f"duplicate column(s) {dupes}", source=source, field=dupes[0])
    return Table(path, header, tuple(rows))


def number(cell: str, *, source: Path, line: int, field: str, required: bool = False) -> float:
    """A cell as a float: NaN when missing (an error if `required`); text or Inf are errors."""
    if cell.lower() in MISSING:
        if required:
            raise InputError(f"line {line}: missing value", source=str(source), field=field)
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        raise InputError(f"line {line}: expected a number, got {cell!r}", source=str(source), field=field) from None
    if not math.isfinite(value):
        raise InputError(f"line {line}: expected a finite number, got {cell!r}", source=str(source), field=field)
    return value


def covariate_matrix(table: Table, subject_column: str, subjects: list[str], *, label=lambda s: s,
                     role: str = "visits") -> tuple[np.ndarray, list[str], dict[str, list[str]]]:
    """Covariates (S, K) for `subjects` from a one-row-per-subject table, NaN where a subject has no row.

    Numeric columns are kept; any other column is coded 0, 1, ... in the sorted order of its
    categories, returned as {column: [category, ...]}. `label` maps a cell to a subject id.
    A row for a subject outside `subjects` (it would have no visits) is an error.
    """
    source = str(table.path)
    names = [c for c in table.columns if c != subject_column]
    where = {s: i for i, s in enumerate(subjects)}
    cells: dict[int, tuple[int, tuple[str, ...]]] = {}
    col = table.index(subject_column)
    for line, row in table.rows:
        subject = label(row[col])
        if subject not in where:
            raise InputError(f"line {line}: subject {row[col]!r} has no visits in the {role}",
                             source=source, field=subject_column)
        if where[subject] in cells:
            raise InputError(f"line {line}: subject {row[col]!r} also on line {cells[where[subject]][0]}",
                             source=source, field=subject_column)
        cells[where[subject]] = (line, row)
    values = np.full((len(subjects), len(names)), np.nan)
    categories: dict[str, list[str]] = {}
    for k, name in enumerate(names):
        j = table.index(name)
        column = {s: (line, row[j]) for s, (line, row) in cells.items() if row[j].lower() not in MISSING}
        if all(_is_float(c) for _, c in column.values()):
            for s, (line, c) in column.items():
                values[s, k] = number(c, source=table.path, line=line, field=name)
        else:
            categories[name] = sorted({c for _, c in column.values()})
            code = {c: float(i) for i, c in enumerate(categories[name])}
            for s, (_, c) in column.items():
                values[s, k] = code[c]
    return values, names, categories


def _is_float(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _pick(table: Table, candidates: tuple[str, ...], what: str, expected: str) -> str:
    found = [c for c in table.columns if c in candidates]
    if len(found) != 1:
        got = "none" if not found else f"several: {found}"
        raise InputError(f"expected one {what} column ({expected}), got {got}; columns are {list(table.columns)}",
                         source=str(table.path), field=what)
    return found[0]


def _time_column(table: Table) -> tuple[str, str]:
    """The time column and the clock it names (see the module docstring)."""
    found = [c for c in table.columns if c in ("time", "TIME") or _clock_of(c) is not None]
    if not found and "age" in table.columns:
        found = ["age"]
    if len(found) != 1:
        got = "none" if not found else f"several: {found}"
        raise InputError(f"expected one time column ('time', 'time [<clock>]', 'age' or leaspy's 'TIME'), got {got}",
                         source=str(table.path), field="time")
    column = found[0]
    if column in ("age", "TIME"):  # leaspy's TIME is the subject's age in years
        return column, AGE_CLOCK
    if column == "time":
        return column, TIME_CLOCK
    return column, _clock_of(column)


def _clock_of(header: str) -> str | None:
    """'time [age (years)]' -> 'age (years)'; None for any other header."""
    match = _BRACKETED.match(header)
    return match.group(2).strip() if match and match.group(1) == "time" else None


def import_table(
    visits: str | os.PathLike,
    *,
    covariates: str | os.PathLike | None = None,
    events: str | os.PathLike | None = None,
    clock: str | None = None,
) -> xr.Dataset:
    """A biomarker cohort from a long CSV of visits (+ covariates, events); see the module docstring.

    clock: name of the time column's clock, overriding the one read off its header.
    Subjects keep their order of first appearance. Raises `InputError` naming the file, the
    field and the line for missing or ambiguous columns, missing, duplicate or decreasing
    times, non-numeric or infinite cells, and covariates or events for unknown subjects.
    """
    table = read_table(visits)
    source = str(table.path)
    subject_col = _pick(table, SUBJECT_COLUMNS, "subject", "'subject' or leaspy's 'ID'")
    time_col, file_clock = _time_column(table)
    markers = [c for c in table.columns if c not in (subject_col, time_col)]
    if not markers:
        raise InputError(f"no biomarker columns: expected {subject_col},{time_col},<biomarker>...",
                         source=source, field="columns")
    named = [_BRACKETED.match(c) for c in markers]
    biomarker = [m.group(1) if m else c for m, c in zip(named, markers)]
    units = [m.group(2).strip() if m else "" for m in named]
    dupes = sorted({b for b in biomarker if biomarker.count(b) > 1})
    if dupes:
        raise InputError(f"biomarker {dupes[0]!r} appears twice (with different units)", source=source, field=dupes[0])

    i_subject, i_time = table.index(subject_col), table.index(time_col)
    i_markers = [table.index(c) for c in markers]
    history: dict[str, list[tuple[float, list[float], int]]] = {}
    for line, row in table.rows:
        subject = row[i_subject]
        if not subject:
            raise InputError(f"line {line}: empty subject id", source=source, field=subject_col)
        t = number(row[i_time], source=table.path, line=line, field=time_col, required=True)
        values = [number(row[i], source=table.path, line=line, field=c) for i, c in zip(i_markers, markers)]
        past = history.setdefault(subject, [])
        if past and t <= past[-1][0]:
            why = "duplicate" if t == past[-1][0] else "decreasing"
            raise InputError(f"line {line}: {why} time {row[i_time]} for subject {subject!r} after {past[-1][0]!r} "
                             f"on line {past[-1][2]}; a subject's visits must be in increasing time",
                             source=source, field=time_col)
        past.append((t, values, line))
    if not history:
        raise InputError("no visits: the file has a header but no rows", source=source, field=subject_col)

    subjects = list(history)
    n_visits = max(len(h) for h in history.values())
    time = np.full((len(subjects), n_visits), np.nan)
    bio = np.full((len(subjects), n_visits, len(markers)), np.nan)
    baseline = np.array([history[s][0][0] for s in subjects])
    for s, subject in enumerate(subjects):
        for v, (t, values, _) in enumerate(history[subject]):
            time[s, v] = t - baseline[s]
            bio[s, v] = values

    attrs = {"source": source}
    cov = cov_names = None
    if covariates is not None:
        ctable = read_table(covariates)
        ccol = _pick(ctable, SUBJECT_COLUMNS, "subject", "'subject' or 'ID'")
        cov, cov_names, categories = covariate_matrix(ctable, ccol, subjects, role=f"visits ({table.path.name})")
        if not cov_names:
            raise InputError(f"no covariate columns: expected {ccol},<covariate>...", source=str(ctable.path), field="columns")
        if categories:
            attrs["covariate_categories"] = json.dumps(categories)
    subject_events = _read_events(events, subjects, baseline, table.path.name) if events is not None else None
    return cohort(subject=subjects, time=time, biomarkers=bio, biomarker=biomarker, biomarker_units=units,
                  covariates=cov, covariate=cov_names, events=subject_events, baseline_time=baseline,
                  clock=clock or file_clock, attrs=attrs)


def _read_events(path, subjects: list[str], baseline: np.ndarray, visits_name: str) -> list[list[tuple[float, str, float]]]:
    table = read_table(path)
    source = str(table.path)
    for column in table.columns:
        if column not in EVENT_COLUMNS:
            raise InputError(f"unknown column; expected exactly {','.join(EVENT_COLUMNS)}", source=source, field=column)
    for column in EVENT_COLUMNS:
        if column not in table.columns:
            raise InputError(f"missing column; expected exactly {','.join(EVENT_COLUMNS)}", source=source, field=column)
    where = {s: i for i, s in enumerate(subjects)}
    out: list[list[tuple[float, str, float]]] = [[] for _ in subjects]
    i_s, i_t, i_a, i_d = (table.index(c) for c in EVENT_COLUMNS)
    for line, row in table.rows:
        if row[i_s] not in where:
            raise InputError(f"line {line}: subject {row[i_s]!r} has no visits in {visits_name}", source=source, field="subject")
        s = where[row[i_s]]
        t = number(row[i_t], source=table.path, line=line, field="time", required=True)
        if not row[i_a]:
            raise InputError(f"line {line}: empty agent", source=source, field="agent")
        dose = number(row[i_d], source=table.path, line=line, field="dose", required=True)
        if dose < 0:
            raise InputError(f"line {line}: negative dose {row[i_d]}", source=source, field="dose")
        out[s].append((t - baseline[s], row[i_a], dose))
    return out


def export_table(ds: xr.Dataset, path: str | os.PathLike) -> list[Path]:
    """Write a cohort's biomarkers as CSV on its own clock, so that `import_table` gives it back.

    Writes `path` (observed visits: subject, time, `name [unit]` columns) and, next to it,
    `<stem>_covariates.csv` and `<stem>_events.csv` when the cohort has covariates or events.
    The time column is `age` for the clock "age (years)", `time` for "time (years)", and
    `time [<clock>]` otherwise. Each file appears complete or not at all. Returns the paths.
    """
    path = Path(path)
    if "biomarkers" not in ds:
        raise InputError("nothing to write: the cohort has no biomarkers (export images with export_nifti)",
                         source=str(path), field="biomarkers")
    clock = str(ds.attrs.get("clock", TIME_CLOCK))
    time_header = {AGE_CLOCK: "age", TIME_CLOCK: "time"}.get(clock, f"time [{clock}]")
    units = ds["biomarker_unit"].values if "biomarker_unit" in ds.coords else [""] * ds.sizes["biomarker"]
    header = ["subject", time_header] + [f"{b} [{u}]" if str(u) else str(b) for b, u in zip(ds["biomarker"].values, units)]
    if len(set(header)) != len(header):
        raise InputError(f"column names would clash: {header}", source=str(path), field="biomarker")

    subjects = [str(s) for s in ds["subject"].values]
    time, observed = ds["time"].values, ds["observed"].values
    baseline, bio = ds["baseline_time"].values, ds["biomarkers"].values
    visits = [header]
    for s, subject in enumerate(subjects):
        for v in np.flatnonzero(observed[s]):
            visits.append([subject, _cell(baseline[s] + time[s, v]), *(_cell(x) for x in bio[s, v])])
    files = {path: visits}

    if "covariates" in ds:
        categories = json.loads(ds.attrs.get("covariate_categories", "{}"))
        names = [str(c) for c in ds["covariate"].values]
        rows = [["subject", *names]]
        for s, subject in enumerate(subjects):
            rows.append([subject, *(_category(x, categories.get(n)) for n, x in zip(names, ds["covariates"].values[s]))])
        files[path.with_name(f"{path.stem}_covariates.csv")] = rows

    event_time = ds["event_time"].values
    if np.isfinite(event_time).any():
        rows = [list(EVENT_COLUMNS)]
        for s, subject in enumerate(subjects):
            for e in np.flatnonzero(np.isfinite(event_time[s])):
                rows.append([subject, _cell(baseline[s] + event_time[s, e]), str(ds["event_agent"].values[s, e]),
                             _cell(ds["event_dose"].values[s, e])])
        files[path.with_name(f"{path.stem}_events.csv")] = rows
    write_rows_atomic(files)
    return list(files)


def _cell(x: float) -> str:
    """Shortest text that reads back as the same float64; empty for NaN."""
    x = float(x)
    return "" if math.isnan(x) else repr(x)


def _category(x: float, categories: list[str] | None) -> str:
    if categories is None or math.isnan(x):
        return _cell(x)
    return categories[int(x)]


def write_rows_atomic(files: dict[Path, list[list[str]]], *, delimiter: str = ",") -> None:
    """Write each file to a hidden sibling, then rename them all into place (none if any write fails)."""
    partials = {}
    try:
        for path, rows in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
            partials[partial] = path
            with open(partial, "w", newline="", encoding="utf-8") as f:
                csv.writer(f, delimiter=delimiter, lineterminator="\n").writerows(rows)
        for partial, path in partials.items():
            os.replace(partial, path)
    except BaseException:
        for partial in partials:
            partial.unlink(missing_ok=True)
        raise
