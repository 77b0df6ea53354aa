"""The cohort store: round trips, appending, and writes that never leave damage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import xarray as xr

from twin.data import append_subjects, open_cohort, write_cohort
from twin.data.store import concat_cohorts
from twin.errors import CohortError, InputError

from conftest import tiny_cohort


def test_round_trip_is_identical(tmp_path, small):
    write_cohort(small, tmp_path / "c.zarr")
    back = open_cohort(tmp_path / "c.zarr")
    assert back["image"].chunks is not None, "stores open lazily"
    xr.testing.assert_identical(back.load(), small)


def test_chunked_by_subject_and_visit(tmp_path, small):
    write_cohort(small, tmp_path / "c.zarr")
    back = open_cohort(tmp_path / "c.zarr")
    assert back["image"].encoding["chunks"][:2] == (1, 1)


def test_blocks_write_like_one_dataset(tmp_path, small):
    write_cohort([small.isel(subject=[0]), small.isel(subject=[1, 2])], tmp_path / "c.zarr")
    xr.testing.assert_identical(open_cohort(tmp_path / "c.zarr").load(), small)


def test_refuses_to_overwrite_unless_asked(tmp_path, small):
    write_cohort(small, tmp_path / "c.zarr")
    with pytest.raises(InputError, match="already exists"):
        write_cohort(small, tmp_path / "c.zarr")
    other = tiny_cohort(seed=5)
    write_cohort(other, tmp_path / "c.zarr", overwrite=True)
    xr.testing.assert_identical(open_cohort(tmp_path / "c.zarr").load(), other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr"], "no backup or partial left over"


def test_append_pads_histories_and_events(tmp_path, small):
    write_cohort(small, tmp_path / "c.zarr")
    longer = tiny_cohort(("d", "e"), seed=3, visits=6)
    append_subjects(tmp_path / "c.zarr", longer)
    back = open_cohort(tmp_path / "c.zarr").load()
    assert back.twin.subjects == ["a", "b", "c", "d", "e"]
    assert back.sizes["visit"] == 6
    xr.testing.assert_identical(back.sel(subject=["a", "b", "c"]).isel(visit=slice(0, 4)).drop_vars("visit"),
                                small.drop_vars("visit"))
    assert not back["observed"].sel(subject="a").values[4:].any()
    np.testing.assert_array_equal(back["image"].sel(subject="e").values, longer["image"].sel(subject="e").values)


def test_append_rejects_clashes_and_keeps_store(tmp_path, small):
    write_cohort(small, tmp_path / "c.zarr")
    with pytest.raises(InputError, match="already in the store"):
        append_subjects(tmp_path / "c.zarr", tiny_cohort(("c", "z")))
    with pytest.raises(InputError, match="biomarker"):
        append_subjects(tmp_path / "c.zarr", tiny_cohort(("z",), biomarkers=False))
    xr.testing.assert_identical(open_cohort(tmp_path / "c.zarr").load(), small)


def test_invalid_cohort_is_not_written(tmp_path, small):
    bad = small.copy(deep=True)
    bad["time"][0, 1] = bad["time"][0, 0]
    with pytest.raises(CohortError, match="duplicate visit times"):
        write_cohort(bad, tmp_path / "c.zarr")
    assert not any(tmp_path.iterdir())


def test_failure_mid_write_leaves_nothing(tmp_path, small):
    def blocks():
        yield small.isel(subject=[0])
        raise RuntimeError("simulator crashed")

    with pytest.raises(RuntimeError):
        write_cohort(blocks(), tmp_path / "c.zarr")
    assert not any(tmp_path.iterdir())


def test_failure_mid_overwrite_keeps_old_store(tmp_path, small):
    write_cohort(small, tmp_path / "c.zarr")

    def blocks():
        yield tiny_cohort(("x",), seed=9)
        raise RuntimeError("simulator crashed")

    with pytest.raises(RuntimeError):
        write_cohort(blocks(), tmp_path / "c.zarr", overwrite=True)
    xr.testing.assert_identical(open_cohort(tmp_path / "c.zarr").load(), small)


KILLED_WRITER = textwrap.dedent("""
    import sys, time, pathlib
    sys.path.insert(0, {tests!r})
    from conftest import tiny_cohort
    from twin.data import write_cohort
    def blocks():
        yield tiny_cohort(("p",), seed=1)
        yield tiny_cohort(("q",), seed=2)
        pathlib.Path({marker!r}).touch()
        time.sleep(60)
    write_cohort(blocks(), {target!r}, overwrite=True)
""")


@pytest.mark.parametrize("existing", [False, True])
def test_killed_writer_leaves_no_damage(tmp_path, small, existing):
    target, marker = tmp_path / "c.zarr", tmp_path / "marker"
    if existing:
        write_cohort(small, target)
    code = KILLED_WRITER.format(tests=os.path.dirname(__file__), marker=str(marker), target=str(target))
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "writer never reached the middle of its write"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if existing:
        xr.testing.assert_identical(open_cohort(target).load(), small)
    else:
        with pytest.raises(InputError, match="no cohort store"):
            open_cohort(target)
    write_cohort(tiny_cohort(("r",)), target, overwrite=True)  # the next write cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr", "marker"]


def test_interrupted_swap_is_finished_on_open(tmp_path, small):
    """A kill between the two renames of a swap leaves the old store aside; opening restores it."""
    write_cohort(small, tmp_path / "c.zarr")
    os.rename(tmp_path / "c.zarr", tmp_path / ".c.zarr.old-12345")
    xr.testing.assert_identical(open_cohort(tmp_path / "c.zarr").load(), small)


def test_concat_matches_single_cohort(small):
    xr.testing.assert_identical(concat_cohorts([small.isel(subject=[0, 1]), small.isel(subject=[2])]), small)


def test_unreadable_store_is_a_clean_error(tmp_path):
    (tmp_path / "c.zarr").mkdir()
    (tmp_path / "c.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(InputError, match="c.zarr"):
        open_cohort(tmp_path / "c.zarr")


def test_strings_read_back_as_python_objects(tmp_path, small):
    # zarr hands back numpy StringDType; a cohort from disk must look like one built in memory
    path = write_cohort(small, tmp_path / "c.zarr")
    ds = open_cohort(path)
    for name in ("subject", "channel", "biomarker", "event_agent", "biomarker_unit"):
        assert ds[name].dtype == object, name
    assert list(ds["subject"].values) == list(small["subject"].values)
