"""Every validation rule fires on the input that breaks it, and only then."""

from __future__ import annotations

import numpy as np
import pytest

from twin.data import validate
from twin.data.validate import problems
from twin.errors import CohortError


def test_valid_cohort_has_no_problems(small):
    assert problems(small) == []
    assert validate(small) is small


def _broken(small, edit):
    ds = small.copy(deep=True)
    edit(ds)
    return ds


CASES = {
    "duplicate visit times": lambda ds: ds["time"].values.__setitem__((0, 2), ds["time"].values[0, 1]),
    "not increasing": lambda ds: ds["time"].values.__setitem__((0, 2), 0.1),
    "missing (NaN) time before a later visit": lambda ds: ds["time"].values.__setitem__((0, 1), np.nan),
    "not at time 0": lambda ds: ds["time"].values.__setitem__((1, 0), 0.05),
    "NaN or Inf voxels": lambda ds: ds["image"].values.__setitem__((1, 1, 0, 2, 2), np.inf),
    "subjects with no visits": lambda ds: ds["observed"].values.__setitem__((2, slice(None)), False),
    "duplicate ids": lambda ds: ds.__setitem__("subject", ["a", "a", "c"]),
    "not a finite invertible": lambda ds: ds["affine"].values.__setitem__((0, 0, 0), 0.0) or ds["affine"].values.__setitem__((0, slice(None), 0), 0.0),
    "events not sorted": lambda ds: ds["event_time"].values.__setitem__((0, 0), 0.9),
    "negative doses": lambda ds: ds["event_dose"].values.__setitem__((0, 1), -1.0),
    "without an agent": lambda ds: ds["event_agent"].values.__setitem__((0, 1), ""),
    "infinite values": lambda ds: ds["biomarkers"].values.__setitem__((0, 0, 0), np.inf),
    "observed without a time": lambda ds: ds["observed"].values.__setitem__((2, 3), True),
}


@pytest.mark.parametrize("message", list(CASES))
def test_each_rule_fires(small, message):
    bad = _broken(small, CASES[message])
    found = problems(bad)
    assert any(message in p for p in found), found
    with pytest.raises(CohortError, match="problem"):
        validate(bad, source="cohort.zarr")


def test_error_names_the_subject_and_source(small):
    bad = _broken(small, CASES["duplicate visit times"])
    with pytest.raises(CohortError) as info:
        validate(bad, source="my.zarr")
    assert "my.zarr" in str(info.value) and "a" in info.value.problems[0]


def test_all_problems_are_listed_at_once(small):
    bad = _broken(small, lambda ds: (CASES["duplicate visit times"](ds), CASES["negative doses"](ds)))
    assert len(problems(bad)) == 2


def test_missed_visit_with_time_is_valid(small):
    ds = _broken(small, lambda ds: (ds["observed"].values.__setitem__((0, 2), False),
                                    ds["image"].values.__setitem__((0, 2), np.nan)))
    assert problems(ds) == []


def test_biomarker_only_and_image_only_cohorts(small):
    assert problems(small.drop_vars(["image", "affine"])) == []
    assert problems(small.drop_vars(["biomarkers"]).drop_vars("biomarker_unit")) == []
    assert any("neither" in p for p in problems(small.drop_vars(["image", "affine", "biomarkers"])))


def test_not_a_cohort(small):
    ds = small.copy()
    ds.attrs = {}
    assert any("twin_format" in p for p in problems(ds))
