"""Cohort -> model tensors: standardisation (volumes on the log scale), its inverse, doses per agent."""

from __future__ import annotations

import numpy as np

from conftest import tiny_cohort
from twin.tensors import Standardiser


def _cohort(volume_offset: float):
    ds = tiny_cohort()
    b = ds["biomarkers"].values.copy()
    b[..., 0] = np.abs(b[..., 0]) + volume_offset  # "volume" in mL
    return ds.assign(biomarkers=(ds["biomarkers"].dims, b))


def test_positive_volumes_are_standardised_on_the_log_scale_and_back():
    ds = _cohort(1.0)
    st = Standardiser.from_cohort(ds)
    assert st.log_shift[0] == 0.0 and np.isnan(st.log_shift[1])  # mL and positive; "points" stay linear
    values = np.where(ds["observed"].values[..., None], ds["biomarkers"].values, np.nan)
    z = st.standardise(values)
    np.testing.assert_allclose(np.nanmean(z, axis=(0, 1)), 0.0, atol=1e-12)
    np.testing.assert_allclose(st.values(z), values, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(z[..., 0], (np.log(values[..., 0]) - st.mean[0]) / st.scale[0], rtol=1e-12)
    again = Standardiser.from_dict(st.to_dict())
    assert again.log_shift[0] == 0.0 and again.mean == st.mean


def test_a_volume_that_touches_zero_stays_linear():
    ds = _cohort(0.0).pipe(lambda d: d.assign(
        biomarkers=d["biomarkers"].where(~((d["visit"] == 0) & (d["subject"] == "a")), 0.0)))
    st = Standardiser.from_cohort(ds)
    assert np.isnan(st.log_shift[0])
    values = np.where(ds["observed"].values[..., None], ds["biomarkers"].values, np.nan)
    np.testing.assert_allclose(st.values(st.standardise(values)), values, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert Standardiser.from_dict(st.to_dict()).to_dict() == st.to_dict()  # strict JSON: None, not NaN


def test_batch_splits_events_by_agent():
    ds = _cohort(1.0)
    st = Standardiser.from_cohort(ds)
    batch = st.batch(ds)
    assert st.agents == ("dmt",) and not st.radiotherapy and batch.fractions is None
    dose_time, dose = batch.doses[0]
    assert dose_time.shape == (3, 2) and float(dose[0, 1]) == 10.0 and bool(dose_time[1].isnan().all())
