"""`twin demo` end to end at small sizes: one self-contained report that embeds every figure it draws."""

from __future__ import annotations

import base64
import html
import re
import struct
from html.parser import HTMLParser

import numpy as np
import pytest

from twin import ScanConfig, TwinConfig, open_result
from twin.demo import run_demo
from twin.errors import InputError
from twin.scan_decoder import DecoderConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_SCANS = ScanConfig(n_samples=4, registration_iterations=10, max_pairs=60, state_draws=4,
                        dynamics=TwinConfig(iterations=30, prior_steps=10, prior_draws=8, n_samples=20),
                        decoder=DecoderConfig(basis_width=8, basis_iterations=10, width=8, iterations=10, batch=16,
                                              sampler_steps=4))


class _Links(HTMLParser):
    """Every src and href value in a page."""

    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.links += [(tag, name, value or "") for name, value in attrs if name in ("src", "href", "srcset")]


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, which must come first."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _section(page: str, heading: str) -> str:
    match = re.search(rf"<h2>{re.escape(html.escape(heading))}</h2>(.*?)</section>", page, re.S)
    assert match, f"no section {heading!r}"
    return match.group(1)


def _tables(part: str) -> list[list[list[str]]]:
    """Each table of an HTML fragment as rows of cell texts (header row first)."""
    return [[[html.unescape(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)]
             for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
            for table in re.findall(r"<table>(.*?)</table>", part, re.S)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    (out / "scan-twin-forecasts-of-held-out-patients-7.png").write_bytes(b"an earlier run's")
    report = run_demo(out, seed=0, progress=False, cohorts=(("atrophy", 2), ("glioma", 1)), twin_subjects=20,
                      held_out=4, fan_charts=2, iterations=30, prior_steps=10, n_samples=20, scan_subjects=9, scan_held_out=3,
                      scan_config=TINY_SCANS)
    return out, report


def test_report_is_self_contained_and_embeds_every_figure(demo):
    out, report = demo
    assert report == out / "report.html" and report.is_file()
    page = report.read_text()
    links = _Links()
    links.feed(page)
    assert links.links, "the report has no images"
    external = [link for link in links.links if not link[2].startswith("data:")]
    assert not external, f"links out of the report: {external}"
    assert "url(" not in page and "@import" not in page and "<script" not in page
    assert not re.search(r"https?://", page)

    figures = sorted(out.glob("*.png"))
    assert [p.name for p in figures] == sorted([
        "atrophy-cohort.png", "glioma-cohort.png", "biomarker-twin-forecasts-of-held-out-patients.png",
        "biomarker-twin-forecasts-of-held-out-patients-2.png", "biomarker-twin-filling-a-missed-visit.png",
        "biomarker-twin-treatment-scenarios.png", "scan-twin-forecasts-of-held-out-patients.png",
        "scan-twin-forecasts-of-held-out-patients-2.png", "scan-twin-tumour-volume.png",
        "scan-twin-filling-a-visit.png", "scan-twin-treatment-scenarios.png",
        "scan-twin-evaluation-calibration.png", "scan-twin-evaluation-hallucination-detection.png"])  # the stale one is gone
    embedded = [v for tag, name, v in links.links if tag == "img" and v.startswith("data:image/png;base64,")]
    assert len(embedded) == len(figures)
    decoded = {base64.b64decode(v.split(",", 1)[1]) for v in embedded}
    for figure in figures:
        data = figure.read_bytes()
        width, height = _png_size(data)
        assert len(data) > 10_000 and width > 300 and height > 200, (figure.name, len(data), width, height)
        assert data in decoded, f"{figure.name} is not embedded in the report"


def test_report_states_the_biomarker_scores_it_computed(demo):
    _, report = demo
    page = report.read_text()
    part = _section(page, "Biomarker twin")
    (table,) = _tables(part)
    assert table[0] == ["biomarker", "values", "twin", "copy-last", "twin / copy-last"]
    assert [r[0] for r in table[1:]] == ["ventricle_volume [mL]", "grey_matter_volume [mL]",
                                         "hippocampal_volume [mL]", "cognitive_score [points]", "all, in training SDs"]
    for _, n, twin, copy, ratio in table[1:]:
        assert int(n) > 0 and float(twin) > 0 and float(copy) > 0
        assert abs(float(ratio) - float(twin) / float(copy)) < 0.01 + 0.01 * float(ratio)
    assert sum(int(r[1]) for r in table[1:-1]) == int(table[-1][1])
    flags = _section(page, "Biomarker twin: plausibility flags")
    assert re.search(r"forecast: \d+ of \d+ values, fill: \d+ of \d+ values, scenario: \d+ of \d+ values", flags)
    (effects,) = _tables(_section(page, "Biomarker twin: treatment scenarios"))
    assert [r[0] for r in effects[1:]] == ["alternative - own schedule", "untreated - own schedule"]


def test_scan_section_scores_flags_and_timings(demo):
    _, report = demo
    page = report.read_text()
    (scores,) = _tables(_section(page, "Scan twin: held-out forecast scores"))
    assert scores[0][:5] == ["horizon after the last seen scan", "scans", "change RMSE: twin",
                             "change RMSE: copy-last", "twin / copy-last"] and scores[0][5].endswith("band coverage")
    assert scores[-1][0] == "all" and int(scores[-1][1]) == sum(int(r[1]) for r in scores[1:-1]) > 0
    for _, n, twin, copy, ratio, coverage in scores[1:]:
        assert float(twin) > 0 and float(copy) > 0 and 0 <= float(coverage) <= 1
        assert abs(float(ratio) - float(twin) / float(copy)) < 0.01 + 0.01 * float(ratio)

    fill = _section(page, "Scan twin: filling a visit")
    assert re.search(r"twin \d\.\d{4}, copy-nearest \d\.\d{4}", fill)
    scenario = _section(page, "Scan twin: treatment scenarios")
    assert "under the alternative" in scenario and "counterfactual truth" in scenario
    (effects,) = _tables(scenario)
    assert {r[0] for r in effects[1:]} == {"enhancing", "oedema"}
    for row in effects[1:]:  # each effect is its arms' difference
        own, alt, effect, true_own, true_alt, true_effect = map(float, row[2:])
        assert abs(true_alt - true_own - true_effect) < 1e-3 * max(1.0, abs(true_effect)) + 1e-3

    (flags,) = _tables(_section(page, "Scan twin: plausibility flags"))
    assert flags[0][:3] == ["result", "scans", "flagged"] and len(flags[0]) > 3
    assert [r[0] for r in flags[1:]][0] == "forecast, scored" and [r[0] for r in flags[1:]][-2:] == ["fill", "scenario"]
    for row in flags[1:]:
        assert 0 <= int(row[2]) <= int(row[1]) and all(int(c) <= int(row[1]) for c in row[3:])

    (timings,) = _tables(_section(page, "Timings"))
    stages = {(p, s): float(v) for p, s, v in timings[1:]}
    for stage in ("simulate", "fit", "forecast held-out patients", "fill", "scenario"):
        assert stages["scan twin", stage] > 0
    assert stages["all", ""] >= stages["scan twin", "fit"]


def test_scan_results_written_are_readable(demo):
    out, _ = demo
    forecast = open_result(out / "scan-forecast.zarr")
    assert forecast.attrs["kind"] == "forecast" and forecast.sizes["subject"] >= 1
    valid = np.isfinite(forecast["time"].values)
    assert valid.any() and (forecast["time"].values[valid] > 1.0).all()  # asked after the 1-year cut
    assert np.isfinite(forecast["scan_mean"].values[valid]).all()
    scenario = open_result(out / "scan-scenario.zarr")
    assert list(scenario["arm"].values) == ["factual", "alternative"] and "scan_effect_mean" in scenario
    fill = open_result(out / "scan-fill.zarr")
    assert fill.sizes["subject"] == 1 and "reference_scan" in fill


def test_demo_evaluates_the_scan_twin_on_its_held_out_patients(demo):
    import json

    out, report = demo
    m = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert m["subjects"] == 3 and m["split"] == "test" and not m["in_sample"]
    assert (out / "evaluation" / "report.html").is_file()
    part = _section(report.read_text(), "Scan twin evaluation: calibration")
    voxel = next(row for row in _tables(part)[0] if row[0] == "voxel")
    assert [float(v) for v in voxel[1:5]] == pytest.approx(
        [m["calibration"]["voxel"][f"coverage_{v}"] for v in (50, 80, 90, 95)], rel=1e-3)


def test_too_many_held_out_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="demo: held_out: expected 1 <= held_out <= twin_subjects - 5"):
        run_demo(tmp_path, progress=False, cohorts=(), twin_subjects=6, held_out=2)
    with pytest.raises(InputError, match="demo: scan_held_out: expected 1 <= scan_held_out"):
        run_demo(tmp_path, progress=False, cohorts=(), scan_subjects=8, scan_held_out=4)
    assert not list(tmp_path.iterdir())  # refused before anything is written
