"""NIfTI export: a BIDS-derivatives tree that imports back to the same cohort, written all or nothing."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from conftest import tiny_cohort
from test_bids import make_tree

from twin.cli import main
from twin.data import cohort, validate, write_cohort
from twin.data.bids import import_bids
from twin.data.export import bids_label, export_nifti
from twin.data.schema import SCENARIOS
from twin.errors import InputError


def same_cohort(a: xr.Dataset, b: xr.Dataset) -> None:
    """Identical data, coordinates and attributes; only `source` (where it was read) may differ."""
    xr.testing.assert_identical(a.drop_attrs(deep=False), b.drop_attrs(deep=False))
    assert {k: v for k, v in a.attrs.items() if k != "source"} == {k: v for k, v in b.attrs.items() if k != "source"}


def same_observed(original: xr.Dataset, back: xr.Dataset, ids: list[str]) -> None:
    """`back` holds `original`'s observed visits (renamed subjects `ids`), images, geometry, covariates, events."""
    assert list(back["subject"].values) == ids
    assert list(back["channel"].values) == sorted(map(str, original["channel"].values))
    order = [list(original["channel"].values).index(c) for c in back["channel"].values]
    for s in range(original.sizes["subject"]):
        seen = np.flatnonzero(original["observed"].values[s])
        n = len(seen)
        assert back["observed"].values[s].sum() == n
        np.testing.assert_allclose(back["time"].values[s, :n], original["time"].values[s, seen], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(back["image"].values[s, :n], original["image"].values[s, seen][:, order])
    np.testing.assert_allclose(back["baseline_time"].values, original["baseline_time"].values, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(back["affine"].values, original["affine"].values)
    np.testing.assert_array_equal(back["covariates"].values, original["covariates"].values)
    np.testing.assert_allclose(back["event_time"].values, original["event_time"].values, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(back["event_agent"].values, original["event_agent"].values)
    np.testing.assert_array_equal(back["event_dose"].values, original["event_dose"].values)
    assert back.attrs["clock"] == original.attrs["clock"]


@pytest.mark.parametrize("clock", ["age", "acq_time"])
def test_bids_round_trip_is_identical(tmp_path, clock):
    make_tree(tmp_path / "in", clock=clock)
    ds = import_bids(tmp_path / "in", progress=False)
    files = export_nifti(ds, tmp_path / "out", progress=False)
    assert len(files) == 5 * 2 and all(f.is_file() for f in files)
    same_cohort(import_bids(tmp_path / "out", progress=False), ds)


def test_layout(tmp_path):
    make_tree(tmp_path / "in")
    ds = import_bids(tmp_path / "in", progress=False)
    out = tmp_path / "out"
    files = export_nifti(ds, out, progress=False)
    assert out / "sub-01/ses-m06/anat/sub-01_ses-m06_FLAIR.nii.gz" in files
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "twin"
    assert (out / "sub-01/sub-01_sessions.tsv").read_text() == "session_id\tage\nses-base\t70.0\nses-m06\t70.5\nses-m12\t71.0\n"
    assert (out / "sub-01/sub-01_treatments.tsv").read_text().splitlines()[1] == "70.25\ttemozolomide\t150.0"
    assert not (out / "sub-02/sub-02_treatments.tsv").exists()
    assert (out / "participants.tsv").read_text().splitlines() == [
        "participant_id\tsex\tgroup\tweight", "sub-01\tM\tpatient\t80.5", "sub-02\tF\tcontrol\tn/a"]
    # The file is the cohort's scan transposed, with the subject's affine.
    image = nib.load(out / "sub-02/ses-b/anat/sub-02_ses-b_T1w.nii.gz")
    np.testing.assert_array_equal(np.asarray(image.dataobj), ds["image"].sel(subject="02", channel="T1w").values[1].T)
    np.testing.assert_array_equal(image.affine, ds["affine"].sel(subject="02").values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no partial left beside it


def _with_truth(ds: xr.Dataset, seed: int = 3) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    truth = rng.random((len(SCENARIOS), *ds["image"].shape)).astype(np.float32)
    return ds.assign(truth_image=(("scenario", *ds["image"].dims), truth)).assign_coords(scenario=list(SCENARIOS))


def test_2d_cohort_with_ground_truth(tmp_path):
    ds = _with_truth(tiny_cohort(subjects=("sim-0001", "sim-0002", "sim-0003")))
    ds["observed"][0, 2] = False  # a missed visit: not exported
    ds["image"][0, 2] = np.nan
    validate(ds)
    out = tmp_path / "out"
    files = export_nifti(ds, out, variables=("image", "truth_image"), progress=False)
    n_observed = int(ds["observed"].sum())
    assert len(files) == n_observed * (1 + len(SCENARIOS))
    truth = nib.load(out / "sub-sim0001/ses-v03/anat/sub-sim0001_ses-v03_desc-truthUntreated_t1.nii.gz")
    assert truth.shape == (5, 6, 1)  # a 2D slice (y, x) is NIfTI (X, Y, 1)
    np.testing.assert_array_equal(np.asarray(truth.dataobj)[..., 0].T, ds["truth_image"].values[1, 0, 3, 0])
    assert not (out / "sub-sim0001/ses-v02").exists()
    assert (out / "sub-sim0001/sub-sim0001_sessions.tsv").read_text().splitlines()[1:] == [
        f"ses-v0{v}\t{float(ds['baseline_time'][0] + ds['time'][0, v])!r}" for v in (0, 1, 3)]
    back = validate(import_bids(out, progress=False))  # derivatives (desc-) are skipped
    assert back["image"].dims[-2:] == ("y", "x")
    same_observed(ds, back, ["sim0001", "sim0002", "sim0003"])
    assert list(back["session_id"].values[0]) == ["v00", "v01", "v03", ""]
    # and the re-imported cohort exports to an identical tree: session labels are kept
    export_nifti(back, tmp_path / "again", progress=False)
    same_cohort(import_bids(tmp_path / "again", progress=False), back)


def test_3d_cohort_on_default_clock(tmp_path):
    rng = np.random.default_rng(4)
    time = np.array([[0.0, 0.4, 1.1], [0.0, 0.9, np.nan]])
    image = rng.random((2, 3, 2, 4, 5, 6)).astype(np.float32)
    image[1, 2] = np.nan
    affine = np.array([[[2.0, 0, 0, -5], [0, 2.5, 0, 1], [0, 0, 3.0, 7], [0, 0, 0, 1]], np.diag([1.0, 1.0, 1.0, 1.0])])
    ds = cohort(subject=["p_1", "p_2"], time=time, image=image, channel=["t1c", "flair"], affine=affine,
                covariates=rng.normal(size=(2, 1)), covariate=["age"], events=[[(0.1, "rt", 2.0)], [(-0.5, "tmz", 75.0)]])
    out = tmp_path / "out"
    export_nifti(ds, out, progress=False)
    assert nib.load(out / "sub-p1/ses-v01/anat/sub-p1_ses-v01_t1c.nii.gz").shape == (6, 5, 4)
    assert (out / "sub-p2/sub-p2_treatments.tsv").read_text().splitlines()[1] == "1999-07-02T09:00:00\ttmz\t75.0"
    back = validate(import_bids(out, progress=False))
    assert back.attrs["clock"] == "years since baseline"
    same_observed(ds, back, ["p1", "p2"])


def test_labels_must_be_bids_safe(tmp_path):
    assert bids_label("sim-0001") == "sim0001" and bids_label("a_b.c") == "abc"
    for ids, words in ((("a-1", "a1", "c"), "'a-1' and 'a1' both become BIDS label 'a1'"),
                       (("--", "b", "c"), "'--' has no letters or digits")):
        with pytest.raises(InputError, match=words) as err:
            export_nifti(tiny_cohort(subjects=ids), tmp_path / "out", progress=False)
        assert err.value.field == "subject" and not (tmp_path / "out").exists()


def test_refuses_a_non_empty_folder_and_overwrites_atomically(tmp_path):
    ds = tiny_cohort()
    out = tmp_path / "out"
    out.mkdir()
    export_nifti(ds, out, progress=False)  # an empty folder is fine
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty") as err:
        export_nifti(ds, out, progress=False)
    assert err.value.source == str(out) and (out / "keep.txt").read_text() == "mine"
    files = export_nifti(ds.isel(subject=[0]), out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and not (out / "sub-b").exists() and all(f.is_file() for f in files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_leaves_nothing(tmp_path):
    ds = tiny_cohort()
    mean = ds["image"].copy()
    mean[2, 1, 0, 3, 3] = np.nan  # the last subject's second (observed) visit: fails after others were written
    ds = ds.assign(mean=mean)
    with pytest.raises(InputError, match="NaN or Inf voxels at observed visit 1 of subject 'c'") as err:
        export_nifti(ds, tmp_path / "out", variables=("image", "mean"), progress=False)
    assert err.value.field == "mean"
    assert list(tmp_path.iterdir()) == []
    # an existing export stays as it was
    export_nifti(tiny_cohort(), tmp_path / "out", progress=False)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(InputError):
        export_nifti(ds, tmp_path / "out", variables=("mean",), overwrite=True, progress=False)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_bad_variables(tmp_path):
    ds = tiny_cohort()
    with pytest.raises(InputError, match=r"not in the cohort; its image variables are \['image'\]") as err:
        export_nifti(ds, tmp_path / "o", variables=("truth_image",), progress=False)
    assert err.value.field == "truth_image"
    with pytest.raises(InputError, match="expected dims") as err:
        export_nifti(ds, tmp_path / "o", variables=("biomarkers",), progress=False)
    ds = ds.assign(truth=ds["image"], truth_image=ds["image"])
    with pytest.raises(InputError, match="_desc-truth") as err:
        export_nifti(ds, tmp_path / "o", variables=("truth", "truth_image"), progress=False)
    assert not (tmp_path / "o").exists()


def test_cli_export(tmp_path, capsys):
    store = write_cohort(tiny_cohort(), tmp_path / "c.zarr")
    out = tmp_path / "nifti"
    assert main(["export", "nifti", str(store), "-q", "-o", str(out)]) == 0
    assert f"wrote 10 files under {out}" in capsys.readouterr().out
    assert main(["export", "nifti", str(store), "-q", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and f"{out}: output: already exists and is not empty" in err
    assert main(["export", "nifti", str(store), "-q", "--variables", "image,nope", "-o", str(tmp_path / "x")]) == 2
    assert "nope: not in the cohort" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["export", "nifti", str(store), "-q", "--overwrite", "-o", str(out)]) == 0
