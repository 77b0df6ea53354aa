"""BIDS import: tiny trees built here with nibabel; layout, clocks, geometry, and every bad input."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from twin.cli import main
from twin.data import open_cohort, validate
from twin.data.bids import import_bids
from twin.errors import InputError

SHAPE = (8, 7, 6)  # NIfTI (X, Y, Z)
AFFINES = {
    "01": np.array([[1.5, 0, 0, -6.0], [0, 1.25, 0, -4.0], [0, 0, 2.0, -5.0], [0, 0, 0, 1]]),
    "02": np.array([[1.0, 0, 0, 3.0], [0, 1.0, 0, 2.0], [0, 0, 1.0, 1.0], [0, 0, 0, 1]]),
}
# Session folders are not named in time order, and sessions.tsv lists them shuffled.
SESSIONS = {
    "01": {"base": (70.0, "2021-03-01T10:00:00"), "m12": (71.0, "2022-03-01T10:00:00"),
           "m06": (70.5, "2021-08-31T22:00:00")},
    "02": {"a": (65.25, "2019-01-15T08:30:00"), "b": (66.0, "2019-10-15T08:30:00")},
}
TREATMENTS = {"01": [(70.25, "2021-06-01T00:00:00", "temozolomide", 150.0), (70.75, "2021-12-01T00:00:00", "radiotherapy", 2.0)]}
CHANNELS = ("T1w", "FLAIR")


def tsv(path: Path, rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(str(c) for c in row) + "\n" for row in rows))
    return path


def scan(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
    return path


def make_tree(root: Path, *, clock: str = "age", shape=SHAPE, seed: int = 0) -> dict:
    """Two subjects (3 and 2 sessions), two modalities; returns {(subject, session, channel): data}."""
    rng = np.random.default_rng(seed)
    truth = {}
    for subject, sessions in SESSIONS.items():
        rows = [["session_id", clock]]
        for session, (age, when) in sessions.items():
            rows.append([f"ses-{session}", age if clock == "age" else when])
            for channel in CHANNELS:
                data = rng.random(shape).astype(np.float32)
                scan(root / f"sub-{subject}" / f"ses-{session}" / "anat" / f"sub-{subject}_ses-{session}_{channel}.nii.gz",
                     data, AFFINES[subject])
                truth[subject, session, channel] = data
        tsv(root / f"sub-{subject}" / f"sub-{subject}_sessions.tsv", rows)
        if subject in TREATMENTS:
            tsv(root / f"sub-{subject}" / f"sub-{subject}_treatments.tsv",
                [["onset", "agent", "dose"]] + [[a if clock == "age" else w, agent, d] for a, w, agent, d in TREATMENTS[subject]])
    tsv(root / "participants.tsv", [["participant_id", "sex", "group", "weight"],
                                    ["sub-01", "M", "patient", 80.5], ["sub-02", "F", "control", "n/a"]])
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    return truth


def years(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds() / (365.25 * 86400)


def test_age_tree(tmp_path):
    truth = make_tree(tmp_path)
    ds = validate(import_bids(tmp_path, progress=False))
    assert list(ds["subject"].values) == ["01", "02"] and list(ds["channel"].values) == ["FLAIR", "T1w"]
    assert ds.attrs["clock"] == "age (years)" and ds.attrs["source"] == str(tmp_path)
    assert ds["image"].dims == ("subject", "visit", "channel", "z", "y", "x")
    assert [list(r) for r in ds["session_id"].values] == [["base", "m06", "m12"], ["a", "b", ""]]
    np.testing.assert_array_equal(ds["time"].values, [[0.0, 0.5, 1.0], [0.0, 0.75, np.nan]])
    np.testing.assert_array_equal(ds["baseline_time"].values, [70.0, 65.25])
    np.testing.assert_array_equal(ds["observed"].values, [[True, True, True], [True, True, False]])
    for (subject, session, channel), data in truth.items():
        v = list(ds["session_id"].sel(subject=subject).values).index(session)
        np.testing.assert_array_equal(ds["image"].sel(subject=subject, channel=channel).values[v], data.T)
    assert np.isnan(ds["image"].values[1, 2]).all()
    for subject, affine in AFFINES.items():
        np.testing.assert_array_equal(ds["affine"].sel(subject=subject).values, affine)
    # participants.tsv: sex F/M -> 0/1, other text columns coded likewise, numbers kept, n/a -> NaN
    assert list(ds["covariate"].values) == ["sex", "group", "weight"]
    np.testing.assert_array_equal(ds["covariates"].values, [[1.0, 1.0, 80.5], [0.0, 0.0, np.nan]])
    assert json.loads(ds.attrs["covariate_categories"]) == {"sex": ["F", "M"], "group": ["control", "patient"]}
    np.testing.assert_allclose(ds["event_time"].values, [[0.25, 0.75], [np.nan, np.nan]])
    assert list(ds["event_agent"].values[0]) == ["temozolomide", "radiotherapy"]
    np.testing.assert_array_equal(ds["event_dose"].values[0], [150.0, 2.0])


def test_acq_time_tree_counts_intervals(tmp_path):
    make_tree(tmp_path, clock="acq_time")
    ds = validate(import_bids(tmp_path, progress=False))
    assert ds.attrs["clock"] == "years since baseline"
    np.testing.assert_array_equal(ds["baseline_time"].values, [0.0, 0.0])
    s01 = SESSIONS["01"]
    expected = [0.0, years(s01["base"][1], s01["m06"][1]), years(s01["base"][1], s01["m12"][1])]
    np.testing.assert_allclose(ds["time"].values[0], expected, rtol=0, atol=1e-12)
    assert list(ds["session_id"].values[0]) == ["base", "m06", "m12"]
    np.testing.assert_allclose(ds["event_time"].values[0], [years(s01["base"][1], w) for _, w, _, _ in TREATMENTS["01"]],
                               rtol=0, atol=1e-12)


def test_lps_scans_are_read_in_ras(tmp_path):
    truth = make_tree(tmp_path)
    lps = AFFINES["02"] @ np.diag([-1.0, -1.0, 1.0, 1.0])  # same voxels, x and y axes reversed
    for session in SESSIONS["02"]:
        for channel in CHANNELS:
            path = tmp_path / "sub-02" / f"ses-{session}" / "anat" / f"sub-02_ses-{session}_{channel}.nii.gz"
            scan(path, truth["02", session, channel], lps)
    ds = import_bids(tmp_path, progress=False)
    affine = ds["affine"].sel(subject="02").values
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    flipped = truth["02", "a", "T1w"][::-1, ::-1, :]
    np.testing.assert_array_equal(ds["image"].sel(subject="02", channel="T1w").values[0], flipped.T)
    # The last voxel of the reoriented grid is where the first voxel was.
    np.testing.assert_allclose(affine @ [SHAPE[0] - 1, SHAPE[1] - 1, 0, 1], lps @ [0, 0, 0, 1])


def test_single_slices_make_a_2d_cohort(tmp_path):
    rng = np.random.default_rng(1)
    coronal = np.array([[2.0, 0, 0, -60], [0, 0, 2.0, -20], [0, 2.0, 0, 10], [0, 0, 0, 1]])  # (X, Y, 1): R, S, A
    slices = {}
    for session, age in (("1", 50.0), ("2", 51.5)):
        slices[session] = rng.random((9, 5, 1)).astype(np.float32)
        scan(tmp_path / "sub-x" / f"ses-{session}" / "anat" / f"sub-x_ses-{session}_T1w.nii", slices[session], coronal)
    tsv(tmp_path / "sub-x" / "sub-x_sessions.tsv", [["session_id", "age"], ["ses-1", 50.0], ["ses-2", 51.5]])
    ds = validate(import_bids(tmp_path, progress=False))
    assert ds["image"].dims == ("subject", "visit", "channel", "y", "x") and ds["image"].shape[-2:] == (5, 9)
    np.testing.assert_array_equal(ds["image"].values[0, 1, 0], slices["2"][:, :, 0].T)
    np.testing.assert_array_equal(ds["affine"].values[0], coronal)  # the thin axis went back last
    assert "covariates" not in ds and ds.sizes["event"] == 0


def test_grid_mismatch_is_an_error_unless_resampled(tmp_path):
    truth = make_tree(tmp_path)
    shifted = AFFINES["01"].copy()
    shifted[0, 3] += 1.5  # one voxel along x: this visit's voxel i is the first visit's voxel i + 1
    for channel in CHANNELS:
        scan(tmp_path / "sub-01" / "ses-m06" / "anat" / f"sub-01_ses-m06_{channel}.nii.gz", truth["01", "m06", channel], shifted)
    with pytest.raises(InputError) as err:
        import_bids(tmp_path, progress=False)
    assert err.value.field == "affine" and err.value.source.endswith("sub-01_ses-m06_FLAIR.nii.gz")
    assert "sub-01_ses-base_FLAIR.nii.gz" in err.value.message and "resample" in err.value.message
    ds = import_bids(tmp_path, resample=True, progress=False)
    got = ds["image"].sel(subject="01", channel="T1w").values[1].T  # NIfTI order (X, Y, Z)
    np.testing.assert_allclose(got[1:], truth["01", "m06", "T1w"][:-1], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[0], 0.0)  # outside that visit's field of view
    np.testing.assert_array_equal(ds["affine"].sel(subject="01").values, AFFINES["01"])


def test_shape_mismatch_within_a_subject(tmp_path):
    make_tree(tmp_path)
    thin = np.random.default_rng(2).random((8, 7, 5)).astype(np.float32)
    for channel in CHANNELS:
        scan(tmp_path / "sub-02" / "ses-b" / "anat" / f"sub-02_ses-b_{channel}.nii.gz", thin, AFFINES["02"])
    with pytest.raises(InputError) as err:
        import_bids(tmp_path, progress=False)
    assert err.value.field == "shape" and "(8, 7, 5) differs from (8, 7, 6)" in err.value.message
    ds = import_bids(tmp_path, resample=True, progress=False)
    got = ds["image"].sel(subject="02", channel="T1w").values[1].T
    np.testing.assert_allclose(got[..., :5], thin, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[..., 5], 0.0)


def test_subjects_must_share_a_shape_even_when_resampling(tmp_path):
    make_tree(tmp_path)
    other = np.zeros((8, 7, 5), np.float32)
    for session in SESSIONS["02"]:
        for channel in CHANNELS:
            scan(tmp_path / "sub-02" / f"ses-{session}" / "anat" / f"sub-02_ses-{session}_{channel}.nii.gz", other, AFFINES["02"])
    for resample in (False, True):
        with pytest.raises(InputError, match=r"\(8, 7, 5\) differs from \(8, 7, 6\) of sub-01") as err:
            import_bids(tmp_path, resample=resample, progress=False)
        assert err.value.field == "shape" and "sub-02" in err.value.source


def test_derivatives_and_other_files_are_ignored(tmp_path):
    make_tree(tmp_path)
    anat = tmp_path / "sub-01" / "ses-base" / "anat"
    scan(anat / "sub-01_ses-base_desc-truth_T1w.nii.gz", np.full(SHAPE, np.nan), AFFINES["01"])  # would fail if read
    (anat / "sub-01_ses-base_T1w.json").write_text("{}")
    (tmp_path / "sub-01" / "ses-base" / "anat" / ".partial.nii.gz").write_bytes(b"junk")
    (tmp_path / "code").mkdir()
    ds = import_bids(tmp_path, progress=False)
    assert list(ds["channel"].values) == ["FLAIR", "T1w"]


# Each case damages a good tree; the error must name `source` (path relative to the root) and `field`.
def _rm(path):
    return lambda root: (root / path).unlink() if (root / path).is_file() else shutil.rmtree(root / path)


def _text(path, text):
    return lambda root: (root / path).write_text(text)


def _bytes(path, cut):
    return lambda root: (root / path).write_bytes((root / path).read_bytes()[:cut])


def _nan_voxel(path):
    def damage(root):
        data = np.asarray(nib.load(root / path).dataobj).copy()
        data[1, 1, 1] = np.nan
        scan(root / path, data, AFFINES[path[4:6]])
    return damage


def _plain_gz(path):
    def damage(root):
        data = np.asarray(nib.load(root / path).dataobj)
        scan(root / "tmp.nii", data, AFFINES[path[4:6]])
        (root / "tmp.nii").replace(root / path)
    return damage


def _four_d(path):
    return lambda root: scan(root / path, np.zeros((*SHAPE, 2)), AFFINES[path[4:6]])


T1 = "sub-01/ses-m06/anat/sub-01_ses-m06_T1w.nii.gz"
SES = "sub-01/sub-01_sessions.tsv"
TRT = "sub-01/sub-01_treatments.tsv"
BAD = [
    ("truncated", _bytes(T1, -100), T1, "gzip", "truncated"),
    ("gz not gzip", _plain_gz(T1), T1, "gzip", "not gzip"),
    ("nan voxels", _nan_voxel(T1), T1, "voxels", "NaN or Inf"),
    ("4D file", _four_d(T1), T1, "dim", "one 3D volume per modality"),
    ("missing modality", _rm(T1), "sub-01/ses-m06/anat", "T1w", "no T1w scan in this session"),
    ("bad file name", lambda r: (r / T1).rename(r / "sub-01/ses-m06/anat/sub-01_T1w.nii.gz"),
     "sub-01/ses-m06/anat/sub-01_T1w.nii.gz", "name", "expected a name starting with 'sub-01_ses-m06_'"),
    ("no sessions.tsv", _rm(SES), SES, "file", "missing"),
    ("no session_id", _text(SES, "id\tage\nses-base\t70\n"), SES, "session_id", "missing column"),
    ("no time column", _text(SES, "session_id\tdate\nses-base\tx\n"), SES, "age", "expected 'age' (years) or 'acq_time'"),
    ("missing time", _text(SES, "session_id\tage\nses-base\t70\nses-m06\tn/a\nses-m12\t71\n"), SES, "age", "line 3: missing value"),
    ("text time", _text(SES, "session_id\tage\nses-base\t70\nses-m06\tsoon\nses-m12\t71\n"), SES, "age", "line 3: expected a number"),
    ("duplicate time", _text(SES, "session_id\tage\nses-base\t70\nses-m06\t71\nses-m12\t71\n"), SES, "age",
     "ses-m06 (line 3) and ses-m12 (line 4) have the same time"),
    ("duplicate session", _text(SES, "session_id\tage\nses-base\t70\nses-m06\t71\nses-m06\t72\n"), SES, "session_id", "also on line 3"),
    ("bad acq_time", _text(SES, "session_id\tacq_time\nses-base\t2020-01-01\nses-m06\tJune 2020\nses-m12\t2021-01-01\n"), SES,
     "acq_time", "line 3: expected an ISO 8601 date-time"),
    ("folder not listed", _text(SES, "session_id\tage\nses-base\t70\nses-m12\t71\n"), "sub-01/ses-m06", "session_id",
     "not listed in sub-01_sessions.tsv"),
    ("row without anat", _rm("sub-01/ses-m12/anat"), SES, "session_id", "line 3: ses-m12 has no anat folder"),
    ("no sessions", _text(SES, "session_id\tage\n"), SES, "session_id", "no sessions listed"),
    ("treatment extra column", _text(TRT, "onset\tduration\tagent\tdose\n70.2\t0\ttmz\t1\n"), TRT, "duration", "unknown column"),
    ("treatment missing column", _text(TRT, "onset\tagent\n70.2\ttmz\n"), TRT, "dose", "missing column"),
    ("negative dose", _text(TRT, "onset\tagent\tdose\n70.2\ttmz\t-1\n"), TRT, "dose", "line 2: negative dose"),
    ("missing onset", _text(TRT, "onset\tagent\tdose\nn/a\ttmz\t1\n"), TRT, "onset", "line 2: missing value"),
    ("participant without folder", _text("participants.tsv", "participant_id\tsex\nsub-01\tM\nsub-03\tF\n"), "participants.tsv",
     "participant_id", "line 3: subject 'sub-03' has no visits"),
    ("participants without id", _text("participants.tsv", "id\tsex\nsub-01\tM\n"), "participants.tsv", "participant_id", "missing"),
    ("mixed clocks", _text("sub-02/sub-02_sessions.tsv", "session_id\tacq_time\nses-a\t2020-01-01T00:00:00\nses-b\t2020-06-01T00:00:00\n"),
     "sub-02/sub-02_sessions.tsv", "acq_time", "one cohort has one clock"),
    ("no subjects", lambda r: [shutil.rmtree(r / f"sub-{s}") for s in SESSIONS], ".", "subject", "no sub-<label> folders"),
]


@pytest.mark.parametrize("damage, source, field, words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_file_and_field(tmp_path, damage, source, field, words):
    make_tree(tmp_path)
    damage(tmp_path)
    with pytest.raises(InputError) as err:
        import_bids(tmp_path, progress=False)
    assert (err.value.source, err.value.field) == (str(tmp_path if source == "." else tmp_path / source), field)
    assert words in err.value.message and "\n" not in str(err.value)


@pytest.mark.parametrize("damage, source, field, words", [b[1:] for b in BAD[::3]], ids=[b[0] for b in BAD[::3]])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, damage, source, field, words):
    root = tmp_path / "bids"
    make_tree(root)
    damage(root)
    out = tmp_path / "c.zarr"
    assert main(["import", "bids", str(root), "-q", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and f": {field}: " in err and words in err
    assert (Path(source).name if source != "." else "bids") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bids"]


def test_cli_imports(tmp_path, capsys):
    make_tree(tmp_path / "bids")
    out = tmp_path / "c.zarr"
    assert main(["import", "bids", str(tmp_path / "bids"), "-q", "-o", str(out)]) == 0
    assert "2 subjects, 5 visits" in capsys.readouterr().out
    stored = open_cohort(out).load()
    assert list(stored["session_id"].values[1]) == ["a", "b", ""]
    np.testing.assert_array_equal(stored["image"].values, import_bids(tmp_path / "bids", progress=False)["image"].values)
