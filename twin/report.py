"""One self-contained HTML page from figures, paragraphs and small tables, for a person to open or mail.

Everything the page needs is inside it: figures are PNGs embedded as base64 `data:` URIs, the
style sheet is inline, and there are no scripts and no links out, so the file can be opened
offline, attached to an email or archived beside a result. Files appear complete or not at all:
each is written to a hidden sibling and renamed into place (`os.replace`).

    write_report("out/report.html", title="Scan forecast", figures_dir="out/figures", sections=[
        ("Patient 001", [scan_timeline(result, "001"), "Bands are calibrated 90% intervals.",
                         [["structure", "mean [mL]"], ["ventricles", 31.2]]]),
    ])
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from pathlib import Path

import numpy as np

DPI = 110

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d2330;
background:#f6f7f9;margin:0;line-height:1.5}
main{max-width:1200px;margin:0 auto;padding:2em 1.5em 4em}
h1{font-size:1.7em;margin:0 0 .8em;border-bottom:3px solid #2f6fb0;padding-bottom:.3em}
section{background:#fff;border:1px solid #dfe3ea;border-radius:8px;padding:1em 1.5em;margin:1.2em 0}
h2{font-size:1.25em;margin:.2em 0 .6em;color:#24456b}
figure{margin:1em 0;text-align:center}
figure img{max-width:100%;height:auto;border:1px solid #eceff3;border-radius:4px}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}
th,td{padding:.3em .8em;border-bottom:1px solid #e3e7ed;text-align:left}
thead th{background:#eef2f7;border-bottom:2px solid #c9d2de}
tbody tr:nth-child(even){background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:ui-monospace,Menlo,Consolas,monospace}
"""


def save_figure(fig, path: str | os.PathLike, *, dpi: int = DPI) -> Path:
    """Write a matplotlib Figure as a PNG at `path`, atomically; returns the path."""
    path = Path(path)
    _write_atomic(path, _png(fig, dpi))
    return path


def write_report(path: str | os.PathLike, *, title: str, sections, figures_dir: str | os.PathLike | None = None,
                 dpi: int = DPI) -> Path:
    """Write one HTML page at `path`, atomically; returns the path.

    sections: a list of (heading, items); each item is a matplotlib Figure (embedded as a PNG;
    also saved as `<figures_dir>/<heading as a slug>[-<n>].png` when `figures_dir` is given),
    a string (a paragraph, HTML-escaped), or a table: a list of rows (lists), the first the
    header; numbers are right-aligned, floats shown to 4 significant digits. Figures are left
    open (they belong to the caller).
    """
    from matplotlib.figure import Figure

    path = Path(path)
    e = html.escape
    used: set[str] = set()
    parts = []
    for heading, items in sections:
        body = []
        for item in items:
            if isinstance(item, Figure):
                png = _png(item, dpi)
                alt = item.get_suptitle() or str(heading)
                if figures_dir is not None:
                    _write_atomic(Path(figures_dir) / _figure_name(str(heading), used), png)
                uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
                body.append(f'<figure><img alt="{e(alt)}" src="{uri}"></figure>')
            elif isinstance(item, str):
                body.append(f"<p>{e(item)}</p>")
            elif isinstance(item, (list, tuple)) and item and all(isinstance(r, (list, tuple)) for r in item):
                body.append(_table(item))
            else:
                raise ValueError(f"a report item must be a Figure, a string or a table (list of rows), "
                                 f"got {type(item).__name__} in section {heading!r}")
        parts.append(f"<section><h2>{e(str(heading))}</h2>\n" + "\n".join(body) + "\n</section>")
    page = (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{e(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<main>\n<h1>{e(title)}</h1>\n"
            + "\n".join(parts) + "\n</main>\n</body>\n</html>\n")
    _write_atomic(path, page.encode("utf-8"))
    return path


def _png(fig, dpi: int) -> bytes:
    buffer = io.BytesIO()
    # no "Software" text chunk: it carries matplotlib's URL, and the page promises no links out
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def _table(rows) -> str:
    e = html.escape
    head = "".join(f"<th>{e(_text(c))}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value) -> str:
    number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    return f'<td class="num">{html.escape(_text(value))}</td>' if number else f"<td>{html.escape(_text(value))}</td>"


def _text(value) -> str:
    return f"{float(value):.4g}" if isinstance(value, (float, np.floating)) else str(value)


def _figure_name(heading: str, used: set[str]) -> str:
    """`<slug>.png`, then `<slug>-2.png`, ...: one file per figure, named after its section."""
    slug = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "figure"
    name, n = f"{slug}.png", 1
    while name in used:
        n += 1
        name = f"{slug}-{n}.png"
    used.add(name)
    return name


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
