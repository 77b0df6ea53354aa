"""`twin demo`: the main job end to end on simulated patients, with a report a person can open.

Today it simulates a small cohort of each kind on real anatomy, stores and validates it, and
draws one patient's visits; forecasting, filling and scenarios join as they are built.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

from twin.data import describe, open_cohort, write_cohort
from twin.data.simulate import simulate

from .figures import plot_visits

# Small enough for a couple of minutes on 2 CPU cores, large enough to show missed visits and treatment.
DEMO_COHORTS = (("atrophy", 8), ("glioma", 4))


def run_demo(out: Path, *, seed: int = 0, progress: bool = True) -> Path:
    """Simulate, store, validate and draw; return the path of the HTML report."""
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for kind, n in DEMO_COHORTS:
        start = time.perf_counter()
        store = write_cohort(simulate(kind, n_subjects=n, dims=2, seed=seed, progress=progress),
                             out / f"{kind}.zarr", overwrite=True, progress=False)
        ds = open_cohort(store)  # validates every rule of the format
        subject = _most_eventful(ds)
        figure = plot_visits(ds, subject, out / f"{kind}-{subject}.png")
        seconds = time.perf_counter() - start
        summary = describe(ds)
        if progress:
            print(f"{kind}: {n} subjects simulated, stored and validated in {seconds:.1f} s -> {store}")
        sections.append((kind, store, subject, figure, summary, seconds))
    return _write_report(out / "report.html", sections, seed)


def _most_eventful(ds) -> str:
    """The subject with treatment events and the most visits: the most instructive picture."""
    score = ds["observed"].sum("visit").values + 100 * (ds["event_agent"] != "").any("event").values
    return str(ds["subject"].values[int(score.argmax())])


def _write_report(path: Path, sections, seed: int) -> Path:
    parts = [f"<h1>Twin demo</h1><p>Simulated cohorts on MNI152 anatomy, seed {seed}. "
             "Each store below passed <code>twin validate</code>.</p>"]
    for kind, store, subject, figure, summary, seconds in sections:
        png = base64.b64encode(Path(figure).read_bytes()).decode()
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
        parts.append(f"<h2>{kind}</h2><p>Store <code>{html.escape(str(store))}</code>, built in {seconds:.1f} s. "
                     f"Patient <b>{subject}</b>:</p><img alt='{kind} patient visits' src='data:image/png;base64,{png}'>"
                     f"<table>{rows}</table>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>Twin demo</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:2em auto}img{max-width:100%}"
            "th{text-align:left;padding-right:1em;vertical-align:top}td{font-family:monospace}</style></head><body>"
            + "".join(parts) + "</body></html>")
    path.write_text(page)
    return path
