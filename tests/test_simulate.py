"""Simulated cohorts: stacked correctly, deterministic per subject, valid, and stored by the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import xarray as xr

from twin.cli import main
from twin.data import open_cohort, validate
from twin.data.schema import SCENARIOS
from twin.errors import InputError

pytest.importorskip("twin.data.anatomy")
pytest.importorskip("twin.data.atrophy")
from twin.data.simulate import simulate, simulate_cohort, simulators  # noqa: E402


def _config(kind):
    cfg = simulators()[kind].config()
    return replace(cfg, n_visits=4) if kind == "glioma" else cfg


@pytest.fixture(scope="module", params=["atrophy", "glioma"])
def cohort2d(request):
    kind = request.param
    return kind, simulate_cohort(kind, 3, dims=2, seed=5, config=_config(kind), block=2, progress=False)


def test_blocks_are_valid_cohorts_with_truth(cohort2d):
    kind, ds = cohort2d
    validate(ds)
    spec = simulators()[kind].spec
    assert list(ds.subject.values) == ["sim-0001", "sim-0002", "sim-0003"]
    assert list(ds.scenario.values) == list(SCENARIOS)
    assert list(ds.channel.values) == list(spec.channel) and list(ds.biomarker.values) == list(spec.biomarker)
    assert ds["truth_image"].dims[:3] == ("scenario", "subject", "visit")
    assert ds["truth_parameters"].shape == (3, len(spec.parameter))
    assert json.loads(ds["truth_labels"].attrs["labels"]) == list(spec.labels)
    assert ds.attrs["kind"] == kind and ds.attrs["seed"] == 5 and ds.attrs["clock"] == spec.clock
    assert set(json.loads(ds.attrs["config"])) == set(_config(kind).__dataclass_fields__)
    # measured images exist exactly at observed visits; the truth exists at every planned one
    observed = ds["observed"].values
    finite = np.isfinite(ds["image"].values).all(axis=tuple(range(2, ds["image"].ndim)))
    assert (finite == observed).all()
    planned = np.isfinite(ds["time"].values)
    assert np.isfinite(ds["truth_image"].values[:, planned]).all()
    # factual events are the ones the subject received; the untreated truth had none
    assert (ds["event_agent"].values != "").any() or kind == "atrophy"


def test_subject_does_not_depend_on_block_size_or_cohort_size(cohort2d):
    kind, ds = cohort2d
    alone = simulate_cohort(kind, 2, dims=2, seed=5, config=_config(kind), block=1, progress=False)
    xr.testing.assert_identical(alone.drop_attrs().isel(subject=1), ds.drop_attrs().isel(subject=1))
    other = simulate_cohort(kind, 1, dims=2, seed=6, config=_config(kind), progress=False)
    assert not np.array_equal(other["truth_parameters"].values[0], ds["truth_parameters"].values[0])


def test_bad_arguments_are_input_errors():
    with pytest.raises(InputError, match="kind"):
        next(simulate("tumour", 2))
    with pytest.raises(InputError, match="dims"):
        next(simulate("atrophy", 2, dims=4))
    with pytest.raises(InputError, match="config"):
        next(simulate("atrophy", 2, config=simulators()["glioma"].config()))


def test_cli_simulate_then_validate_and_info(tmp_path, capsys):
    out = tmp_path / "a.zarr"
    assert main(["simulate", "--kind", "atrophy", "--subjects", "2", "--dims", "2", "--seed", "1", "-o", str(out), "-q"]) == 0
    assert main(["validate", str(out)]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["subjects"] == 2 and info["kind"] == "atrophy"
    # same seed, same cohort, byte for byte in the arrays
    again = tmp_path / "b.zarr"
    assert main(["simulate", "--kind", "atrophy", "--subjects", "2", "--dims", "2", "--seed", "1", "-o", str(again), "-q"]) == 0
    xr.testing.assert_identical(open_cohort(out).load(), open_cohort(again).load())
    # an existing store is not replaced without --overwrite
    assert main(["simulate", "--kind", "atrophy", "--subjects", "1", "-o", str(out), "-q"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["atrophy", "glioma"])
def test_3d_stores_validate(tmp_path, kind):
    cfg = replace(_config(kind), n_visits=3) if kind == "glioma" else _config(kind)
    ds = simulate_cohort(kind, 1, dims=3, seed=0, size=32, config=cfg, progress=False)
    validate(ds)
    assert ds["image"].dims[-3:] == ("z", "y", "x") and ds.sizes["z"] == 32
