"""Scan results presented: figures of predicted scans, the self-contained HTML report, the NIfTI export."""

from __future__ import annotations

import base64
import csv
import re
from html.parser import HTMLParser

import nibabel as nib
import numpy as np
import pytest
import xarray as xr

from twin.data import cohort
from twin.errors import InputError
from twin.report import save_figure, write_report
from twin.result_nifti import export_result_nifti
from twin.results import build_result
from twin.scan_figures import scan_timeline, scenario_scans, volume_fan

SUBJECTS = ("a-1", "b_2")
LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)
TIME = np.array([[70.0, 70.5, 71.25], [60.0, 61.0, np.nan]])  # subject b_2's last request is padding
REFERENCE_TIME = np.array([[69.0, 69.0, 70.2], [59.5, 59.5, np.nan]])
STRUCTURES = ("ventricles", "hippocampus")
CHECKS = ("jacobian_range", "outside_mask")


def scan_result(space=(6, 5), channels=("t1",), arms=None, samples=0, seed=0) -> xr.Dataset:
    """A small synthetic scan result: 2 subjects, 3 requests (one padding), `channels`, optional arms."""
    rng = np.random.default_rng(seed)
    S, R, Q, C, N = len(SUBJECTS), TIME.shape[1], len(LEVELS), len(channels), len(STRUCTURES)
    lead = (len(arms),) if arms else ()
    horizon = TIME - np.array([[70.2], [59.5]])
    biomarker = dict(mean=rng.normal(size=(*lead, S, R, 1)), quantiles=np.sort(rng.normal(size=(*lead, Q, S, R, 1)),
                     axis=len(lead)), flags=np.zeros((*lead, 1, S, R, 1), bool))
    result = build_result(kind="scenario" if arms else "forecast", subjects=SUBJECTS, biomarkers=["score"],
                          units=["points"], clock="age (years)", time=TIME, horizon=horizon, levels=LEVELS,
                          checks=["not_finite"], reasons=[], arms=arms, **biomarker)
    larm = ("arm",) if arms else ()
    sp = ("z", "y", "x")[-len(space):]
    mean = rng.random((*lead, S, R, C, *space)).astype(np.float32)
    spread = (0.05 + 0.1 * rng.random((*lead, S, R, C, *space))).astype(np.float32)
    z = np.array([-1.645, -0.674, 0.0, 0.674, 1.645]).reshape((*[1] * len(lead), Q, *[1] * (3 + len(space))))
    quantiles = (mean[(slice(None),) * len(lead) + (None,)] + z * spread[(slice(None),) * len(lead) + (None,)])
    volume_mean = 20 + 5 * rng.random((*lead, S, R, N))
    volume_q = volume_mean[(slice(None),) * len(lead) + (None,)] + np.array(
        [-2.0, -1.0, 0.0, 1.0, 2.0]).reshape((*[1] * len(lead), Q, 1, 1, 1))
    flags = np.zeros((*lead, len(CHECKS), S, R), bool)
    flags[(*([0] if arms else []), 1, 0, 1)] = True  # subject a-1's second request fails a check
    affine = np.stack([np.array([[1.5, 0, 0, -10], [0, 2.0, 0, 5], [0, 0, 3.0, 7 + s], [0, 0, 0, 1]])
                       for s in range(S)])
    data = {
        "scan_mean": ((*larm, "subject", "request", "channel", *sp), mean),
        "scan_quantiles": ((*larm, "quantile", "subject", "request", "channel", *sp), quantiles.astype(np.float32)),
        "scan_spread": ((*larm, "subject", "request", "channel", *sp), spread),
        "reference_scan": (("subject", "request", "channel", *sp), rng.random((S, R, C, *space)).astype(np.float32)),
        "reference_time": (("subject", "request"), REFERENCE_TIME),
        "volume_mean": ((*larm, "subject", "request", "structure"), volume_mean),
        "volume_quantiles": ((*larm, "quantile", "subject", "request", "structure"), volume_q),
        "scan_flags": ((*larm, "scan_check", "subject", "request"), flags),
        "scan_affine": (("subject", "affine_row", "affine_col"), affine),
        "scan_mask": (("subject", *sp), np.ones((S, *space), bool)),
    }
    if samples:
        draws = mean[(slice(None),) * len(lead) + (None,)] + rng.normal(size=(samples, *mean.shape[len(lead):]))
        data["scan_samples"] = ((*larm, "scan_sample", "subject", "request", "channel", *sp), draws.astype(np.float32))
    coords = {"channel": np.array(channels, dtype=object), "structure": np.array(STRUCTURES, dtype=object),
              "structure_unit": ("structure", np.array(["mL"] * N, dtype=object)),
              "scan_check": np.array(CHECKS, dtype=object), **{d: np.arange(n) for d, n in zip(sp, space)}}
    return result.assign(data).assign_coords(coords).assign_attrs(scan_flag_reasons="[]")


def image_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.images]


def panels(fig) -> tuple[dict, list]:
    """({(row, column): axes} of the figure's grid cells, [(rows, colour bar axes)] of its last column)."""
    cells, bars = {}, []
    for ax in fig.axes:
        spec = ax.get_subplotspec()
        if spec.colspan.start == spec.get_gridspec().ncols - 1:
            bars.append((tuple(spec.rowspan), ax))
        else:
            cells[spec.rowspan.start, spec.colspan.start] = ax
    return cells, bars


def assert_nothing_overlaps(fig):
    """No two axes (images or colour bars) share pixels, and the title fits across the figure."""
    fig.draw_without_rendering()
    boxes = [ax.get_window_extent() for ax in fig.axes if ax.axison or ax.images]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert min(a.x1, b.x1) <= max(a.x0, b.x0) + 1 or min(a.y1, b.y1) <= max(a.y0, b.y0) + 1, \
                (a.bounds, b.bounds)
    title = fig._suptitle.get_window_extent()
    assert 0 <= title.x0 and title.x1 <= fig.bbox.width


# ---------------------------------------------------------------- figures

def test_timeline_without_cohort_is_a_grid_from_the_reference_scan():
    result = scan_result()
    fig = scan_timeline(result, "a-1")
    cells, bars = panels(fig)
    mean, spread = result["scan_mean"].values[0, :, 0], result["scan_spread"].values[0, :, 0]
    reference = result["reference_scan"].values[0, :, 0]
    # column 0: the latest scan a request started from (request 2's, at 70.20); then a column per request
    assert cells[0, 0].get_title() == "reference 70.20"
    np.testing.assert_array_equal(cells[0, 0].images[0].get_array(), reference[2])
    assert all(not cells[0, c].images and not cells[0, c].texts for c in (1, 2, 3))  # no cohort: blank
    assert not any(cells[row, 0].images for row in (1, 2, 3))
    assert [cells[1, c].get_title() for c in (1, 2, 3)] == ["70.00 (-0.20 y)", "70.50 (+0.30 y)", "71.25 (+1.05 y)"]
    for r in range(3):
        np.testing.assert_array_equal(cells[1, 1 + r].images[0].get_array(), mean[r])
        np.testing.assert_array_equal(cells[2, 1 + r].images[0].get_array(), spread[r])
        # change from the scan that request started from, which for a fill need not be column 0's
        np.testing.assert_allclose(cells[3, 1 + r].images[0].get_array(), mean[r] - reference[r], rtol=1e-6)
    assert cells[3, 1].get_title() == "vs 69.00" and cells[3, 3].get_title() == ""
    low, high = cells[3, 1].images[0].get_clim()
    assert low == -high and high > 0  # diverging scale centred on no change
    assert cells[0, 0].images[0].get_clim() == cells[1, 2].images[0].get_clim()  # observed and mean share a scale
    # three colour bars in their own column: intensity beside rows 0-1, sd, change
    assert sorted(rows for rows, _ in bars) == [(0, 1), (2,), (3,)]
    assert_nothing_overlaps(fig)
    # width grows with the columns shown: b_2 has one request fewer (its third is padding)
    assert fig.get_figwidth() - scan_timeline(result, "b_2").get_figwidth() == pytest.approx(2.2)


def test_timeline_with_cohort_shows_the_observed_scan_at_each_requested_time():
    result = scan_result(channels=("t1c", "flair"))
    # a-1 (baseline 68.0) requested at 70.0, 70.5, 71.25; b_2 (58.8) at 60.0, 61.0 and padding
    time = np.array([[0.0, 2.05, 2.5, 3.0], [0.0, 1.2, 2.2, np.nan]])
    observed = np.isfinite(time)
    observed[0, 2] = False  # a-1 missed the visit at 70.5
    image = np.random.default_rng(1).random((2, 4, 2, 6, 5)).astype(np.float32)
    ds = cohort(subject=list(SUBJECTS), time=time, observed=observed, image=image, channel=["t1c", "flair"],
                baseline_time=[68.0, 58.8], clock="age (years)")
    cells, _ = panels(scan_timeline(result, "a-1", cohort=ds))
    assert cells[0, 1].get_title() == "observed 70.05"  # within 0.1 years of 70.0
    np.testing.assert_array_equal(cells[0, 1].images[0].get_array(), image[0, 1, 0])
    for c in (2, 3):  # 70.5 was missed; the nearest scan to 71.25 (71.0) is too far
        assert not cells[0, c].images and [t.get_text() for t in cells[0, c].texts] == ["not observed"]
    fig = scan_timeline(result, "b_2", cohort=ds, channel="flair")
    cells, _ = panels(fig)
    assert len([c for (row, c) in cells if row == 0]) == 1 + 2  # the padding request gets no column
    assert [cells[0, c].get_title() for c in (1, 2)] == ["observed 60.00", "observed 61.00"]
    np.testing.assert_array_equal(cells[0, 2].images[0].get_array(), image[1, 2, 1])
    np.testing.assert_array_equal(cells[1, 2].images[0].get_array(), result["scan_mean"].values[1, 1, 1])
    assert_nothing_overlaps(fig)
    with pytest.raises(ValueError, match="channel"):
        scan_timeline(result, "a-1", channel="t2")
    with pytest.raises(ValueError, match="not in the result"):
        scan_timeline(result, "nobody")


def test_timeline_3d_draws_the_middle_axial_slice():
    result = scan_result(space=(8, 8, 8))
    fig = scan_timeline(result, "a-1")
    cells, _ = panels(fig)
    np.testing.assert_array_equal(cells[1, 1].images[0].get_array(), result["scan_mean"].values[0, 0, 0, 4])
    assert "z = 4 of 8" in fig.get_suptitle()


def test_volume_fan_draws_mean_bands_and_flags():
    result = scan_result()
    fig = volume_fan(result, "a-1", "hippocampus", cohort_volumes=([69.0, 70.2], [22.0, 21.5]))
    (ax,) = fig.axes
    means = [line for line in ax.lines if line.get_label() == "mean"]
    np.testing.assert_allclose(means[0].get_ydata(), result["volume_mean"].values[0, :, 1])
    assert len(ax.collections) == 2  # the 90% and 50% bands
    flagged = [line for line in ax.lines if line.get_label() == "scan flagged implausible"]
    np.testing.assert_allclose(flagged[0].get_xdata(), [70.5])
    assert "[mL]" in ax.get_ylabel()
    fig = volume_fan(result, "b_2", "ventricles")
    assert len(fig.axes[0].lines[0].get_xdata()) == 2  # padding dropped


def test_scenario_figures():
    arms = ["factual", "untreated", "alternative"]
    result = scan_result(channels=("t1c", "flair"), arms=arms)
    fig = scenario_scans(result, "a-1", 2)
    cells, bars = panels(fig)
    assert len(image_axes(fig)) == 2 * 2 * 3 and len(bars) == 2 * 2
    assert sorted(rows for rows, _ in bars) == [(0,), (1,), (2,), (3,)]  # one colour bar per row, beside it
    assert [cells[0, a].get_title() for a in range(3)] == arms
    assert cells[3, 2].get_title() == "alternative - factual"  # second channel's differences
    mean = result["scan_mean"].values
    np.testing.assert_allclose(cells[3, 2].images[0].get_array(), mean[2, 0, 2, 1] - mean[0, 0, 2, 1], rtol=1e-6)
    np.testing.assert_array_equal(cells[1, 0].images[0].get_array(), result["reference_scan"].values[0, 2, 0])
    assert_nothing_overlaps(fig)
    two = scenario_scans(scan_result(channels=("t1c", "flair"), arms=arms[:2]), "a-1", 2)
    assert_nothing_overlaps(two)
    assert fig.get_figwidth() - two.get_figwidth() == pytest.approx(2.2)  # width grows with the arms
    one = scenario_scans(result, "b_2", 1, channel="t1c")
    assert len(image_axes(one)) == 6 and len(panels(one)[1]) == 2
    with pytest.raises(ValueError, match="out of range"):
        scenario_scans(result, "b_2", 2)  # the padding request
    fig = volume_fan(result, "a-1", "ventricles")
    assert len([line for line in fig.axes[0].lines if line.get_label().startswith("mean: ")]) == 3
    cells, _ = panels(scan_timeline(result, "a-1", arm="untreated"))
    np.testing.assert_array_equal(cells[1, 1].images[0].get_array(), result["scan_mean"].values[1, 0, 0, 0])
    with pytest.raises(ValueError, match="scenario"):
        scenario_scans(scan_result(), "a-1", 0)


# ---------------------------------------------------------------- report

class Balanced(HTMLParser):
    """Checks that every non-void element is closed, in order."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_report_is_one_self_contained_page(tmp_path):
    result = scan_result()
    figures = [scan_timeline(result, "a-1"), volume_fan(result, "a-1", "ventricles")]
    sections = [("Scans & volumes", figures),
                ("Notes", ["Bands are <b>calibrated</b> & central.",
                           [["structure", "mean"], ["ventricles", 21.123456], ["hippocampus", 3]]])]
    path = write_report(tmp_path / "out" / "report.html", title="Scan <forecast>", sections=sections,
                        figures_dir=tmp_path / "out" / "figures")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["figures", "report.html"]
    assert sorted(p.name for p in (tmp_path / "out" / "figures").iterdir()) == ["scans-volumes-2.png",
                                                                              "scans-volumes.png"]
    page = path.read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(figures) == page.count("<img")
    pngs = [base64.b64decode(i) for i in images]
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") and b"http" not in p for p in pngs)
    assert "&lt;b&gt;calibrated&lt;/b&gt; &amp; central" in page and "<title>Scan &lt;forecast&gt;</title>" in page
    assert "<th>structure</th>" in page and '<td class="num">21.12</td>' in page
    parser = Balanced()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    with pytest.raises(ValueError, match="report item"):
        write_report(tmp_path / "bad.html", title="x", sections=[("x", [42])])
    assert not (tmp_path / "bad.html").exists()


def test_save_figure_is_atomic(tmp_path, monkeypatch):
    fig = volume_fan(scan_result(), "a-1", "ventricles")
    path = save_figure(fig, tmp_path / "fan.png")
    assert path.read_bytes().startswith(b"\x89PNG")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError):
        save_figure(fig, tmp_path / "other.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fan.png"]


# ---------------------------------------------------------------- NIfTI export

def names(files, root) -> set[str]:
    return {str(f.relative_to(root)) for f in files}


def test_nifti_export_2d_two_channels_with_samples(tmp_path):
    result = scan_result(channels=("t1c", "flair"), samples=3)
    out = tmp_path / "export"
    files = export_result_nifti(result, out)
    stems = {"sub-a1/sub-a1_time-70.00", "sub-a1/sub-a1_time-70.50", "sub-a1/sub-a1_time-71.25",
             "sub-b2/sub-b2_time-60.00", "sub-b2/sub-b2_time-61.00"}
    expected = {f"{stem}_{c}_{stat}.nii.gz" for stem in stems for c in ("t1c", "flair")
                for stat in ("mean", "q05", "q95", "sd", "samples")}
    assert names(files, out) == expected
    assert {str(p.relative_to(out)) for p in out.rglob("*.nii.gz")} == expected
    # subject b_2, request 1 (61.00), channel flair: (y, x) -> NIfTI (X, Y, 1) with the subject's affine
    image = nib.load(out / "sub-b2" / "sub-b2_time-61.00_flair_mean.nii.gz")
    np.testing.assert_array_equal(image.affine, result["scan_affine"].values[1])
    np.testing.assert_array_equal(image.header.get_sform(), result["scan_affine"].values[1])
    data = np.asarray(image.dataobj)
    assert data.shape == (5, 6, 1)
    np.testing.assert_array_equal(data[..., 0].T, result["scan_mean"].values[1, 1, 1])
    upper = np.asarray(nib.load(out / "sub-b2" / "sub-b2_time-61.00_flair_q95.nii.gz").dataobj)
    np.testing.assert_array_equal(upper[..., 0].T, result["scan_quantiles"].values[4, 1, 1, 1])
    sd = np.asarray(nib.load(out / "sub-a1" / "sub-a1_time-70.50_t1c_sd.nii.gz").dataobj)
    np.testing.assert_array_equal(sd[..., 0].T, result["scan_spread"].values[0, 1, 0])
    draws = np.asarray(nib.load(out / "sub-a1" / "sub-a1_time-70.50_t1c_samples.nii.gz").dataobj)
    assert draws.shape == (5, 6, 1, 3)
    np.testing.assert_array_equal(draws[:, :, 0, 2].T, result["scan_samples"].values[2, 0, 1, 0])


def test_nifti_2d_reimports_as_the_same_slice(tmp_path):
    """The cohort importer's reading of an (X, Y, 1) file gives back the result's (y, x) scan and affine."""
    from twin.data.bids import _to_cohort_grid
    from twin.data.nifti import read_nifti

    result = scan_result()
    export_result_nifti(result, tmp_path / "e")
    data, affine = read_nifti(tmp_path / "e" / "sub-a1" / "sub-a1_time-71.25_t1_mean.nii.gz")
    (scans,), (back,) = _to_cohort_grid([None], [data[None, None]], [affine])
    np.testing.assert_array_equal(scans[0, 0], result["scan_mean"].values[0, 2, 0])
    np.testing.assert_array_equal(back, result["scan_affine"].values[0])


def test_nifti_export_3d_scenario(tmp_path):
    arms = ["factual", "no-drug"]
    result = scan_result(space=(8, 8, 8), arms=arms)
    out = tmp_path / "e"
    files = export_result_nifti(result, out)
    assert len(files) == 5 * 2 * 4  # real requests x arms x (mean, q05, q95, sd)
    image = nib.load(out / "sub-a1" / "sub-a1_time-70.50_arm-nodrug_t1_q05.nii.gz")
    np.testing.assert_array_equal(image.affine, result["scan_affine"].values[0])
    np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0),
                                  result["scan_quantiles"].values[1, 0, 0, 1, 0])
    with open(out / "volumes.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["subject", "arm", "time", "structure", "mean", "q05", "q25", "q50", "q75", "q95"]
    assert len(rows) - 1 == 5 * 2 * len(STRUCTURES)
    row = next(r for r in rows if r[:4] == ["b_2", "no-drug", "61.0", "hippocampus"])
    np.testing.assert_array_equal([float(x) for x in row[4:]],
                                  [result["volume_mean"].values[1, 1, 1, 1],
                                   *result["volume_quantiles"].values[1, :, 1, 1, 1]])


def test_volumes_csv_forecast(tmp_path):
    result = scan_result()
    export_result_nifti(result, tmp_path / "e")
    with open(tmp_path / "e" / "volumes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * len(STRUCTURES)
    for row in rows:
        s, structure = SUBJECTS.index(row["subject"]), STRUCTURES.index(row["structure"])
        r = int(np.flatnonzero(TIME[s] == float(row["time"]))[0])
        assert float(row["mean"]) == result["volume_mean"].values[s, r, structure]
        assert float(row["q95"]) == result["volume_quantiles"].values[4, s, r, structure]


def test_nifti_export_refuses_overwrite_and_replaces_when_asked(tmp_path):
    result = scan_result()
    out = tmp_path / "e"
    out.mkdir()  # an empty folder, made ready for the export, is used as it is
    export_result_nifti(result, out)
    (out / "stale.txt").write_text("old")
    with pytest.raises(InputError, match=re.escape(str(out))):
        export_result_nifti(result, out)
    assert (out / "stale.txt").exists()
    export_result_nifti(result, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "volumes.csv").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["e"]


def test_nifti_export_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    import twin.result_nifti as module

    real, calls = module.write_nifti, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "write_nifti", failing)
    with pytest.raises(OSError, match="disk full"):
        export_result_nifti(scan_result(), tmp_path / "e")
    assert list(tmp_path.iterdir()) == []  # no folder, no hidden partial
    # an existing export stays whole when its replacement fails
    monkeypatch.setattr(module, "write_nifti", real)
    first = export_result_nifti(scan_result(), tmp_path / "e")
    calls.clear()
    monkeypatch.setattr(module, "write_nifti", failing)
    with pytest.raises(OSError):
        export_result_nifti(scan_result(seed=1), tmp_path / "e", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
    out = tmp_path / "e"
    assert names(first, out) == {str(p.relative_to(out)) for p in out.rglob("*.nii.gz")}
    kept = np.asarray(nib.load(out / "sub-a1" / "sub-a1_time-70.00_t1_mean.nii.gz").dataobj)
    np.testing.assert_array_equal(kept[..., 0].T, scan_result()["scan_mean"].values[0, 0, 0])  # the old one


def test_nifti_export_needs_scans(tmp_path):
    scans = [n for n in scan_result().data_vars if n.startswith(("scan_", "reference_", "volume_"))]
    with pytest.raises(InputError, match="has no scans") as err:
        export_result_nifti(scan_result().drop_vars(scans), tmp_path / "e")
    assert err.value.field == "scan_mean"
    with pytest.raises(InputError, match="sub") as err:  # subject ids a-1 and a1 collide as labels
        export_result_nifti(scan_result().assign_coords(subject=np.array(["a-1", "a1"], dtype=object)), tmp_path / "f")
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()
