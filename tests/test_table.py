"""Biomarker tables: leaspy's data import, round trips, and every bad input as one named error."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from twin.cli import main
from twin.data import open_cohort, validate
from twin.data.table import export_table, import_table
from twin.errors import InputError

LEASPY = Path(__file__).parent / "data" / "leaspy" / "alzheimer.csv"

VISITS = """subject,age,volume [mL],score
p1,70.0,1.5,20
p1,70.5,1.4,
p1,71.25,1.3,18
p2,65.0,2.0,25
p2,66.0,NaN,24
"""
COVARIATES = "subject,sex,apoe4\np2,M,1\np1,F,0\n"
EVENTS = "subject,time,agent,dose\np1,70.75,dmt,10\np1,70.25,dmt,5\np2,64.5,dmt,10\n"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def same_cohort(a: xr.Dataset, b: xr.Dataset) -> None:
    """Identical data, coordinates and attributes; only `source` (where it was read) may differ."""
    xr.testing.assert_identical(a.drop_attrs(deep=False), b.drop_attrs(deep=False))
    assert {k: v for k, v in a.attrs.items() if k != "source"} == {k: v for k, v in b.attrs.items() if k != "source"}


@pytest.fixture
def files(tmp_path):
    return (write(tmp_path, "visits.csv", VISITS), write(tmp_path, "cov.csv", COVARIATES),
            write(tmp_path, "events.csv", EVENTS))


def test_leaspy_imports(tmp_path):
    ds = import_table(LEASPY)
    validate(ds)
    assert ds.sizes["subject"] == 200 and ds.sizes["biomarker"] == 7
    assert int(ds["observed"].sum()) == 1975
    assert ds.attrs["clock"] == "age (years)" and ds["biomarker"].values[2] == "MMSE"
    with open(LEASPY) as f:
        rows = list(csv.DictReader(f))
    first: dict[str, float] = {}
    for row in rows:
        first[row["ID"]] = min(first.get(row["ID"], np.inf), float(row["TIME"]))
    np.testing.assert_array_equal(ds["baseline_time"].values, [first[s] for s in ds["subject"].values])
    np.testing.assert_array_equal(ds["time"].values[:, 0], 0.0)
    one = [r for r in rows if r["ID"] == "GS-001"]
    np.testing.assert_allclose(ds.twin.visit_times("GS-001", clock=True), [float(r["TIME"]) for r in one], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(ds["biomarkers"].sel(subject="GS-001", biomarker="MMSE").values[: len(one)],
                                  [float(r["MMSE"]) for r in one])


def test_leaspy_round_trip(tmp_path):
    ds = import_table(LEASPY)
    (path,) = export_table(ds, tmp_path / "out.csv")
    same_cohort(import_table(path), ds)


def test_small_table_with_covariates_and_events(files):
    visits, cov, events = files
    ds = validate(import_table(visits, covariates=cov, events=events))
    assert list(ds["subject"].values) == ["p1", "p2"]
    assert list(ds["biomarker"].values) == ["volume", "score"]
    assert list(ds["biomarker_unit"].values) == ["mL", ""]
    np.testing.assert_array_equal(ds["baseline_time"].values, [70.0, 65.0])
    np.testing.assert_array_equal(ds["time"].values, [[0.0, 0.5, 1.25], [0.0, 1.0, np.nan]])
    assert np.isnan(ds["biomarkers"].values[0, 1, 1]) and np.isnan(ds["biomarkers"].values[1, 1, 0])
    # sex: categories sorted, F -> 0, M -> 1; numeric columns kept as numbers
    np.testing.assert_array_equal(ds["covariates"].values, [[0.0, 0.0], [1.0, 1.0]])
    assert json.loads(ds.attrs["covariate_categories"]) == {"sex": ["F", "M"]}
    # events converted to years since each subject's baseline, sorted
    np.testing.assert_allclose(ds["event_time"].values, [[0.25, 0.75], [-0.5, np.nan]])
    np.testing.assert_array_equal(ds["event_dose"].values, [[5.0, 10.0], [10.0, np.nan]])


def test_small_table_round_trip(files, tmp_path):
    ds = import_table(files[0], covariates=files[1], events=files[2])
    out = export_table(ds, tmp_path / "out" / "visits.csv")
    assert [p.name for p in out] == ["visits.csv", "visits_covariates.csv", "visits_events.csv"]
    same_cohort(import_table(out[0], covariates=out[1], events=out[2]), ds)
    assert not [p for p in out[0].parent.iterdir() if p.name.startswith(".")]  # no partials left


def test_clock_from_header_or_argument(tmp_path):
    generic = write(tmp_path, "a.csv", "subject,time,b\nx,2.0,1\nx,3.5,2\n")
    ds = import_table(generic)
    assert ds.attrs["clock"] == "time (years)" and float(ds["baseline_time"][0]) == 2.0
    assert import_table(generic, clock="years since diagnosis").attrs["clock"] == "years since diagnosis"
    named = write(tmp_path, "b.csv", "subject,time [years since diagnosis],b\nx,2.0,1\nx,3.5,2\n")
    ds = import_table(named)
    assert ds.attrs["clock"] == "years since diagnosis"
    (back,) = export_table(ds, tmp_path / "c.csv")
    assert back.read_text().splitlines()[0] == "subject,time [years since diagnosis],b"
    same_cohort(import_table(back), ds)


def test_export_writes_observed_visits_on_the_clock(small, tmp_path):
    small = small.copy(deep=True)
    small["observed"][0, 2] = False  # a missed visit is not a visit in the table
    small["biomarkers"][0, 2] = np.nan
    visits, cov, events = export_table(small, tmp_path / "v.csv")
    rows = list(csv.reader(visits.open()))
    assert rows[0] == ["subject", "age", "volume [mL]", "score [points]"]
    assert len(rows) - 1 == int(small["observed"].sum())
    np.testing.assert_allclose(float(rows[1][1]), float(small["baseline_time"][0]))
    back = import_table(visits, covariates=cov, events=events)
    kept = small.twin.history("a")
    np.testing.assert_allclose(back.twin.history("a")["time"].values, kept["time"].values, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(back.twin.history("a")["biomarkers"].values, kept["biomarkers"].values)
    np.testing.assert_allclose(back["event_time"].values, small["event_time"].values, rtol=0, atol=1e-12)


def test_export_needs_biomarkers(small, tmp_path):
    with pytest.raises(InputError, match="no biomarkers"):
        export_table(small.drop_vars(["biomarkers", "biomarker", "biomarker_unit"]), tmp_path / "v.csv")
    assert not list(tmp_path.iterdir())


# (file to corrupt, its text, field the error must name, words the message must contain)
BAD = [
    ("visits", "who,age,b\nx,1,2\n", "subject", "expected one subject column"),
    ("visits", "subject,ID,age,b\nx,x,1,2\n", "subject", "several"),
    ("visits", "subject,when,b\nx,1,2\n", "time", "expected one time column"),
    ("visits", "subject,time\nx,1\n", "columns", "no biomarker columns"),
    ("visits", "subject,time,b\nx,1,2\nx,1,3\n", "time", "line 3: duplicate time"),
    ("visits", "subject,time,b\nx,2,2\ny,0,1\nx,1,3\n", "time", "line 4: decreasing time"),
    ("visits", "subject,time,b\nx,1,2\nx,,3\n", "time", "line 3: missing value"),
    ("visits", "subject,time,b\nx,1,2\nx,abc,3\n", "time", "line 3: expected a number"),
    ("visits", "subject,time,b,c\nx,1,2,3\nx,2,high,3\n", "b", "line 3: expected a number, got 'high'"),
    ("visits", "subject,time,b\nx,1,inf\n", "b", "line 2: expected a finite number"),
    ("visits", "subject,time,b\nx,1,2,3\n", "columns", "line 2: 4 cells, the header has 3"),
    ("visits", "subject,time,b,b\nx,1,2,3\n", "b", "duplicate column"),
    ("visits", "subject,time,b\n,1,2\n", "subject", "line 2: empty subject id"),
    ("visits", "subject,time,b\n", "subject", "no visits"),
    ("visits", "", "header", "empty file"),
    ("covariates", "subject,sex\nx,M\nghost,F\n", "subject", "line 3: subject 'ghost' has no visits"),
    ("covariates", "subject,sex\nx,M\nx,F\n", "subject", "also on line 2"),
    ("covariates", "subject,weight\nx,-inf\n", "weight", "finite"),
    ("covariates", "name,sex\nx,M\n", "subject", "expected one subject column"),
    ("events", "subject,time,agent,dose,route\nx,1,dmt,2,oral\n", "route", "unknown column"),
    ("events", "subject,time,agent\nx,1,dmt\n", "dose", "missing column"),
    ("events", "subject,time,agent,dose\nghost,1,dmt,2\n", "subject", "line 2: subject 'ghost' has no visits"),
    ("events", "subject,time,agent,dose\nx,1,dmt,-2\n", "dose", "line 2: negative dose"),
    ("events", "subject,time,agent,dose\nx,1,,2\n", "agent", "line 2: empty agent"),
    ("events", "subject,time,agent,dose\nx,,dmt,2\n", "time", "line 2: missing value"),
]
GOOD = {"visits": "subject,time,b\nx,1,2\nx,2,3\n", "covariates": "subject,sex\nx,M\n",
        "events": "subject,time,agent,dose\nx,1.5,dmt,2\n"}


def _paths(tmp_path, which, text):
    paths = {k: write(tmp_path, f"{k}.csv", text if k == which else v) for k, v in GOOD.items()}
    return paths["visits"], paths["covariates"], paths["events"]


@pytest.mark.parametrize("which, text, field, words", BAD)
def test_bad_input_names_file_and_field(tmp_path, which, text, field, words):
    visits, cov, events = _paths(tmp_path, which, text)
    with pytest.raises(InputError) as err:
        import_table(visits, covariates=cov, events=events)
    assert err.value.source == str(tmp_path / f"{which}.csv") and err.value.field == field
    assert words in err.value.message and "\n" not in str(err.value)


@pytest.mark.parametrize("which, text, field, words", BAD[::4])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, which, text, field, words):
    visits, cov, events = _paths(tmp_path, which, text)
    out = tmp_path / "c.zarr"
    assert main(["import", "table", str(visits), "--covariates", str(cov), "--events", str(events), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and f"{which}.csv: {field}: " in err and words in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file") as err:
        import_table(tmp_path / "nope.csv")
    assert err.value.field == "file"


def test_cli_imports_leaspy(tmp_path, capsys):
    out = tmp_path / "alz.zarr"
    assert main(["import", "table", str(LEASPY), "-o", str(out)]) == 0
    assert "200 subjects, 1975 visits, 7 biomarkers" in capsys.readouterr().out
    same_cohort(open_cohort(out).load(), import_table(LEASPY))
