"""The ds.twin accessor answers the usual questions from the stored variables."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from twin.data import describe, geometry
from twin.errors import InputError


def test_history_drops_missed_and_padding(small):
    ds = small.copy(deep=True)
    ds["observed"].values[0, 1] = False
    ds["image"].values[0, 1] = np.nan
    hist = ds.twin.history("a")
    np.testing.assert_array_equal(hist["time"].values, small["time"].values[0, [0, 2, 3]])
    assert ds.twin.history("c").sizes["visit"] == 2


def test_times_on_the_cohort_clock(small):
    np.testing.assert_allclose(small.twin.visit_times("b", clock=True),
                               small["time"].values[1] + small["baseline_time"].values[1])


def test_events_table(small):
    events = small.twin.events("a")
    assert list(events.columns) == ["time", "agent", "dose"]
    assert events["agent"].tolist() == ["dmt", "dmt"] and events["time"].tolist() == [0.2, 0.5]
    assert small.twin.events("b").empty


def test_unknown_subject(small):
    with pytest.raises(InputError, match="unknown subject 'zz'"):
        small.twin.history("zz")


def test_spacing_from_affine(small):
    assert small.twin.spacing() == (2.0, 2.0)  # a 2D cohort: (y, x)
    # array axes run opposite to the affine's columns: (z, y, x) <- (x, y, z)
    assert geometry.spacing(np.diag([1.0, 2.0, 3.0, 1.0])) == (3.0, 2.0, 1.0)
    assert geometry.spacing(np.diag([1.0, 2.0, 3.0, 1.0]), 2) == (2.0, 1.0)


def test_accessor_refuses_other_datasets():
    with pytest.raises(InputError, match="not a Twin cohort"):
        xr.Dataset().twin.subjects


def test_describe_counts(small):
    s = describe(small)
    assert s["subjects"] == 3 and s["visits"] == 4 + 4 + 2
    assert s["events"] == {"dmt": 2} and s["channels"] == ["t1"]
    assert s["biomarkers"]["volume"]["unit"] == "mL"
