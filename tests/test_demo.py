"""`twin demo` end to end at small sizes: a self-contained report that embeds every figure it draws."""

from __future__ import annotations

import base64
import re
import struct
from html.parser import HTMLParser

import pytest

from twin.demo import run_demo
from twin.errors import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    report = run_demo(out, seed=0, progress=False, cohorts=(("atrophy", 2), ("glioma", 1)), twin_subjects=20,
                      held_out=4, fan_charts=2, iterations=30, n_samples=20)
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
    assert "url(" not in page and "@import" not in page  # no stylesheet fetches either

    figures = sorted(out.glob("*.png"))
    names = {p.stem.split("-sim-")[0] for p in figures}
    assert names == {"atrophy", "glioma", "forecast", "fill", "scenario"}, names
    assert len([p for p in figures if p.stem.startswith("forecast-")]) == 2
    embedded = [v for tag, name, v in links.links if tag == "img" and v.startswith("data:image/png;base64,")]
    assert len(embedded) == len(figures)
    decoded = {base64.b64decode(v.split(",", 1)[1]) for v in embedded}
    for figure in figures:
        data = figure.read_bytes()
        width, height = _png_size(data)
        assert len(data) > 10_000 and width > 300 and height > 200, (figure.name, len(data), width, height)
        assert data in decoded, f"{figure.name} is not embedded in the report"


def test_report_states_the_scores_it_computed(demo):
    _, report = demo
    page = report.read_text()
    table = re.search(r"Held-out forecast error.*?</table>", page, re.S).group(0)
    rows = re.findall(r"<tr><th>([^<]+)</th><td>(\d+)</td><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td></tr>", table)
    assert [r[0] for r in rows] == ["ventricle_volume [mL]", "grey_matter_volume [mL]", "hippocampal_volume [mL]",
                                    "cognitive_score [points]", "all, in training SDs"]
    for _, n, twin, copy, ratio in rows:
        assert int(n) > 0 and float(twin) > 0 and float(copy) > 0
        assert abs(float(ratio) - float(twin) / float(copy)) < 0.01 + 0.01 * float(ratio)
    assert sum(int(r[1]) for r in rows[:-1]) == int(rows[-1][1])
    assert re.search(r"forecast: \d+ of \d+ values, fill: \d+ of \d+ values, scenario: \d+ of \d+ values", page)
    effects = re.search(r"Effect at the last planned visit.*?</table>", page, re.S).group(0)
    assert "alternative - own schedule" in effects and "untreated - own schedule" in effects


def test_too_many_held_out_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="demo: held_out: expected 1 <= held_out <= twin_subjects - 5"):
        run_demo(tmp_path, progress=False, cohorts=(), twin_subjects=6, held_out=2)
