"""`twin demo`: the main job end to end on simulated patients, with a report a person can open.

Two parts. First a small cohort of each kind is simulated on real anatomy, stored, validated,
and one patient's visits drawn. Then the biomarker twin at work: a larger 2D atrophy cohort is
simulated, a few subjects are held out, and the twin, fitted on the rest, forecasts each
held-out patient's later visits from the first half of its visits (scored against the
simulator's noise-free truth, beside copy-last), fills one patient's missed visit and replays
that patient under the cohort's alternative schedule and untreated, beside the simulator's
counterfactual truths. The scan decoder joins later.

Every figure is embedded in the report (base64), so report.html can be mailed on its own.
"""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from twin.data import describe, open_cohort, write_cohort
from twin.data.simulate import simulate, simulate_cohort
from twin.errors import InputError

from .figures import plot_forecast, plot_scenario, plot_visits

# Small enough for a couple of minutes on 2 CPU cores, large enough to show missed visits and treatment.
DEMO_COHORTS = (("atrophy", 8), ("glioma", 4))
TWIN_SUBJECTS, HELD_OUT, FAN_CHARTS = 80, 10, 3
GRID = 61  # times per drawn curve
CHART_DRAWS = 5  # x n_samples for the drawn curves: bands from 200 draws look ragged on a dense grid
IMAGES = ("image", "mask", "affine", "truth_image", "truth_labels")  # the biomarker twin reads none of them


@dataclass
class TwinSection:
    """What the report says about the biomarker twin: sizes, scores, flags, figures and times."""

    n_subjects: int
    n_fit: int
    held_out: list[str]
    config: dict
    mae: list[tuple[str, int, float, float]]  # (biomarker [unit] or "all, standardised", n, twin, copy-last)
    flags: dict[str, tuple[int, int]]  # result kind -> (values flagged, values)
    reasons: list[str]
    forecasts: list[Path] = field(default_factory=list)  # fan charts of held-out patients
    fill: Path | None = None
    scenario: Path | None = None
    effects: list[tuple[str, str, float, float]] = field(default_factory=list)  # (arm, biomarker, twin, truth)
    chart_samples: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def run_demo(out: Path, *, seed: int = 0, progress: bool = True, cohorts=DEMO_COHORTS,
             twin_subjects: int = TWIN_SUBJECTS, held_out: int = HELD_OUT, fan_charts: int = FAN_CHARTS,
             iterations: int | None = None, n_samples: int | None = None) -> Path:
    """Simulate, store, validate and draw; fit the biomarker twin and show it forecast, fill and
    replay treatment; return the path of the HTML report.

    cohorts: ((kind, n_subjects), ...) simulated with images for the pictures. twin_subjects:
    the atrophy cohort for the twin, of which the last `held_out` are never trained on;
    fan_charts: held-out patients drawn. iterations, n_samples: the twin's fit steps and draws
    (default: TwinConfig's). Every random draw follows `seed`.
    """
    if not 1 <= held_out <= twin_subjects - 5:
        raise InputError(f"expected 1 <= held_out <= twin_subjects - 5 (the twin needs subjects to fit on), got "
                         f"held_out={held_out} of {twin_subjects}", source="demo", field="held_out")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*-sim-*.png"):  # an earlier run's figures, of patients this run may not draw
        old.unlink()
    sections = []
    for kind, n in cohorts:
        t0 = time.perf_counter()
        store = write_cohort(simulate(kind, n_subjects=n, dims=2, seed=seed, progress=progress),
                             out / f"{kind}.zarr", overwrite=True, progress=False)
        ds = open_cohort(store)  # validates every rule of the format
        subject = _most_eventful(ds)
        figure = plot_visits(ds, subject, out / f"{kind}-{subject}.png")
        seconds = time.perf_counter() - t0
        summary = describe(ds)
        if progress:
            print(f"{kind}: {n} subjects simulated, stored and validated in {seconds:.1f} s -> {store}")
        sections.append((kind, store, subject, figure, summary, seconds))
    twin = _biomarker_twin(out, seed=seed, n_subjects=twin_subjects, held_out=held_out, fan_charts=fan_charts,
                          iterations=iterations, n_samples=n_samples, progress=progress)
    total = time.perf_counter() - start
    if progress:
        print(f"demo: {total:.1f} s in all")
    return _write_report(out / "report.html", sections, twin, seed, total)


def _biomarker_twin(out: Path, *, seed: int, n_subjects: int, held_out: int, fan_charts: int,
                   iterations: int | None, n_samples: int | None, progress: bool) -> TwinSection:
    """Fit the twin on an atrophy cohort less its last `held_out` subjects; forecast, fill and replay them."""
    from twin import BiomarkerTwin, TwinConfig
    from twin.baselines import copy_last

    defaults = TwinConfig()
    config = TwinConfig(seed=seed, iterations=iterations or defaults.iterations,
                        n_samples=n_samples or defaults.n_samples)
    seconds = {}
    t0 = time.perf_counter()
    ds = simulate_cohort("atrophy", n_subjects, 2, seed, progress=progress)
    ds = ds.drop_vars([v for v in IMAGES if v in ds.variables]).load()
    seconds["simulate"] = time.perf_counter() - t0
    if progress:
        print(f"twin: {n_subjects} atrophy subjects simulated in {seconds['simulate']:.1f} s; fitting on the first "
              f"{n_subjects - held_out}, holding out the last {held_out}")

    t0 = time.perf_counter()
    twin = BiomarkerTwin.fit(ds.isel(subject=slice(0, n_subjects - held_out)), config, progress=progress)
    seconds["fit"] = time.perf_counter() - t0
    if progress:
        print(f"twin: fitted in {seconds['fit']:.1f} s ({config.iterations} steps)")

    # Forecast: each held-out patient conditioned on the first half of its observed visits,
    # asked at every later planned visit (missed ones too: the truth exists there).
    t0 = time.perf_counter()
    test = ds.isel(subject=slice(n_subjects - held_out, None))
    ids = [str(s) for s in test["subject"].values]
    base = test["baseline_time"].values.astype(np.float64)
    planned, observed = test["time"].values, test["observed"].values
    obs_t = np.where(observed, planned, np.nan)
    seen = _first_half(obs_t)
    last_seen = np.max(np.where(seen, obs_t, -np.inf), axis=1)
    later = np.isfinite(planned) & (planned > last_seen[:, None])
    asked = [i for i in range(len(ids)) if later[i].any() and seen[i].any()]
    if not asked:
        raise InputError("no held-out subject has a planned visit after the first half of its visits; hold out more",
                         source="demo", field="held_out")
    history = _conditioned(test, seen)
    forecast = twin.forecast(history, at={ids[i]: list(base[i] + planned[i][later[i]]) for i in asked})
    width = max(int(later[i].sum()) for i in asked)
    at = np.full((len(asked), width), np.nan)  # years since baseline, in the result's (sorted) order
    for row, i in enumerate(asked):
        at[row, : later[i].sum()] = planned[i][later[i]]
    assert np.allclose(forecast["time"].values - base[asked, None], at, equal_nan=True, atol=1e-9)
    values = np.where(observed[..., None], test["biomarkers"].values, np.nan)
    h_times, h_values = np.where(seen, planned, np.nan)[asked], np.where(seen[..., None], values, np.nan)[asked]
    truth = np.full(forecast["mean"].shape, np.nan)
    factual = test["truth_biomarkers"].sel(scenario="factual").values
    for row, i in enumerate(asked):
        truth[row, : later[i].sum()] = factual[i][later[i]]
    train_sd = np.nanstd(np.where(ds["observed"].values[..., None], ds["biomarkers"].values, np.nan)
                         [: n_subjects - held_out], axis=(0, 1))
    mae = _mae_table(forecast["mean"].values, copy_last(h_times, h_values, at), truth, train_sd, test)
    seconds["forecast"] = time.perf_counter() - t0
    if progress:
        print(f"twin: forecast {len(asked)} held-out patients from the first half of their visits in "
              f"{seconds['forecast']:.1f} s; MAE on the noise-free truth, standardised: twin {mae[-1][2]:.3f}, "
              f"copy-last {mae[-1][3]:.3f}")

    t0 = time.perf_counter()
    section = TwinSection(n_subjects=n_subjects, n_fit=n_subjects - held_out, held_out=ids, config=config.to_dict(),
                          mae=mae, flags={}, reasons=[], seconds=seconds, chart_samples=CHART_DRAWS * config.n_samples)
    _count_flags(section, "forecast", forecast)
    draws = section.chart_samples
    for i in asked[:fan_charts]:
        s = ids[i]
        grid = base[i] + _grid(planned[i])
        dense = twin.forecast(history, [s], at={s: grid}, n_samples=draws)
        keep = grid - base[i] >= last_seen[i]  # copy-last forecasts from the last seen visit on
        reference = copy_last(h_times[[asked.index(i)]], h_values[[asked.index(i)]], (grid - base[i])[None])[0]
        path = plot_forecast(test, dense, s, out / f"forecast-{s}.png", seen=seen[i],
                             reference={"copy-last": (grid[keep], reference[keep])},
                             title=f"{s}: forecast from the first {int(seen[i].sum())} of its "
                                   f"{int(observed[i].sum())} observed visits (held out of training)")
        section.forecasts.append(path)

    # Fill and scenarios: one held-out patient known from all its observed visits.
    i, fillable = _showcase(test)
    s, grid = ids[i], base[i] + _grid(planned[i])
    if fillable:
        filled = twin.fill(test, [s])
        _count_flags(section, "fill", filled)
        dense = twin.forecast(test, [s], at={s: grid}, n_samples=draws)
        missed = [f"{t:.2f}" for t in filled["time"].values[0] - base[i] if np.isfinite(t)]
        path = plot_forecast(test, dense, s, out / f"fill-{s}.png", fill=filled,
                             title=f"{s}: every observed visit seen; missed visit{'s' * (len(missed) > 1)} at "
                                   f"{', '.join(missed)} y filled")
        section.fill = path
    alternative = [(float(t), str(a), float(d)) for t, a, d in
                   zip(test["alternative_event_time"].values[i], test["alternative_event_agent"].values[i],
                       test["alternative_event_dose"].values[i]) if a]
    schedules = {"alternative": {s: alternative}, "untreated": {s: []}}
    arms = twin.simulate(test, schedules, [s], at={s: grid}, n_samples=draws)
    _count_flags(section, "scenario", arms)
    # the effects at the last planned visit, where the simulator's counterfactuals are; a call of its own,
    # since a visit time on the drawn grid would notch the bands (their width follows the nearest visit)
    last_visit = base[i] + np.nanmax(planned[i])
    section.effects = _effects_at(twin.simulate(test, schedules, [s], at={s: [last_visit]}), test.isel(subject=i),
                                  last_visit)
    received = "treated" if (test["event_agent"].values[i] != "").any() else "untreated"
    alt = f"therapy from {alternative[0][0]:.1f} y" if alternative else "no therapy"
    section.scenario = plot_scenario(test, arms, s, out / f"scenario-{s}.png",
                                     title=f"{s} ({received} in the cohort): its own schedule (factual), the "
                                           f"cohort's alternative ({alt}), and no treatment (untreated)")
    seconds["answers and figures"] = time.perf_counter() - t0
    if progress:
        flagged = sum(f for f, _ in section.flags.values())
        drawn = len(section.forecasts) + (section.fill is not None) + (section.scenario is not None)
        print(f"twin: {drawn} figures (forecast, fill, scenarios) in "
              f"{seconds['answers and figures']:.1f} s; {flagged} values flagged implausible")
    return section


FORECAST_HOW = ("Black dots are the visits the twin saw, hollow circles the later measurements it did not see, "
                "and the thin black line the simulator's noise-free truth; the blue line is the twin's mean with "
                "its 50% (dark) and 90% (light) bands for a new measurement (changing in steps with the distance "
                "to the nearest seen visit: the calibration has one factor per horizon bin), and the dashed orange "
                "line copies the last seen value forward from the dotted line.")
FILL_HOW = ("The twin has seen every observed visit of this patient; each red diamond at a missed visit is its "
            "fill with the 90% band as an error bar, to be read against the truth line at that time.")
SCENARIO_HOW = ("Each colour is one treatment schedule replayed on the same patient with the same draws: thick "
                "lines are the twin's means between the thin edges of its 90% bands, dashed lines with dots the "
                "simulator's truth under that schedule at the planned visits, and ticks along the bottom each "
                "schedule's infusions.")


def _grid(planned: np.ndarray) -> np.ndarray:
    """(GRID,) years since baseline, from the baseline a little past the last planned visit."""
    return np.linspace(0.0, np.nanmax(planned) + 0.25, GRID)


def _first_half(times: np.ndarray) -> np.ndarray:
    """(S, V) observed times (NaN = not observed) -> the first ceil(n / 2) observed visits of each
    subject, as the twin's own calibration conditions its held-out subjects."""
    finite = np.isfinite(times)
    rank = np.argsort(np.argsort(np.where(finite, times, np.inf), axis=1), axis=1)
    return finite & (rank < np.ceil(finite.sum(1, keepdims=True) / 2))


def _conditioned(ds, keep: np.ndarray):
    """The cohort as if only the visits in `keep` (S, V) had been observed."""
    out = ds.copy()
    out["observed"] = (("subject", "visit"), ds["observed"].values & keep)
    out["biomarkers"] = ds["biomarkers"].where(out["observed"])
    return out


def _mae_table(twin: np.ndarray, copy: np.ndarray, truth: np.ndarray, sd: np.ndarray, ds) -> list:
    """Rows (label, n, twin MAE, copy-last MAE) per biomarker in its unit, then pooled over
    biomarkers with each divided by its training SD; predictions and truth (S, R, B)."""
    ok = np.isfinite(truth) & np.isfinite(twin) & np.isfinite(copy)
    units = [str(u) for u in ds["biomarker_unit"].values]
    rows = []
    for b, name in enumerate(str(n) for n in ds["biomarker"].values):
        cell = ok[..., b]
        rows.append((f"{name} [{units[b]}]", int(cell.sum()), float(np.abs(twin - truth)[..., b][cell].mean()),
                     float(np.abs(copy - truth)[..., b][cell].mean())))
    rows.append(("all, in training SDs", int(ok.sum()), float((np.abs(twin - truth) / sd)[ok].mean()),
                 float((np.abs(copy - truth) / sd)[ok].mean())))
    return rows


def _count_flags(section: TwinSection, kind: str, result) -> None:
    """Add a result's flagged values (any check failed) and its reasons to the section."""
    flagged = result["flags"].any("check")
    done, total = section.flags.get(kind, (0, 0))
    section.flags[kind] = (done + int(flagged.sum()), total + int(np.isfinite(result["mean"].values).sum()))
    section.reasons += json.loads(result.attrs.get("flag_reasons", "[]"))


def _showcase(ds) -> tuple[int, bool]:
    """(subject index, has a fill to show) of the patient for the fill and the scenarios: first one
    with a missed visit between two observed ones, then treated (three distinct courses), then the
    fewest missed visits (an uncrowded chart), then the first."""
    t, observed = ds["time"].values, ds["observed"].values
    obs_t = np.where(observed, t, np.nan)
    with np.errstate(invalid="ignore"):
        inside = (~observed & (t > np.nanmin(obs_t, axis=1, keepdims=True))
                  & (t < np.nanmax(obs_t, axis=1, keepdims=True))).any(1)
    treated = (ds["event_agent"].values != "").any(1)
    missed = (~observed & np.isfinite(t)).sum(1)
    i = max(range(len(t)), key=lambda i: (bool(inside[i]), bool(treated[i]), -int(missed[i]), -i))
    return i, bool(inside[i])


def _effects_at(arms, one, clock_time: float) -> list[tuple[str, str, float, float]]:
    """(arm, biomarker, twin's effect, true effect) of each arm against the own schedule at one
    planned visit on the clock: the twin's `effect_mean` beside the simulator's truth difference."""
    row = int(np.flatnonzero(np.isclose(arms["time"].values[0], clock_time, rtol=0, atol=1e-9))[0])
    visit = int(np.flatnonzero(np.isclose(one["time"].values + float(one["baseline_time"]), clock_time,
                                          rtol=0, atol=1e-9))[0])
    truth = one["truth_biomarkers"]
    out = []
    for arm in (str(a) for a in arms["arm"].values[1:]):
        for b, name in enumerate(str(n) for n in arms["biomarker"].values):
            true = float(truth.sel(scenario=arm).values[visit, b] - truth.sel(scenario="factual").values[visit, b])
            out.append((arm, name, float(arms["effect_mean"].sel(arm=arm).values[0, row, b]), true))
    return out


def _most_eventful(ds) -> str:
    """The subject with treatment events and the most visits: the most instructive picture."""
    score = ds["observed"].sum("visit").values + 100 * (ds["event_agent"] != "").any("event").values
    return str(ds["subject"].values[int(score.argmax())])


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _write_report(path: Path, sections, twin: TwinSection, seed: int, total: float) -> Path:
    e = html.escape
    parts = [f"<h1>Twin demo</h1><p>Simulated cohorts on MNI152 anatomy, seed {seed}, {total:.0f} s in all. "
             "Each store below passed <code>twin validate</code>.</p>"]
    for kind, store, subject, figure, summary, seconds in sections:
        rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in summary.items())
        parts.append(f"<h2>{kind}</h2><p>Store <code>{e(str(store))}</code>, built in {seconds:.1f} s. "
                     f"Patient <b>{subject}</b>:</p><img alt='{kind} patient visits' src='{_png(figure)}'>"
                     f"<table>{rows}</table>")
    c, sec = twin.config, twin.seconds
    parts.append(
        f"<h2>The biomarker twin</h2><p>A 2D atrophy cohort of {twin.n_subjects} simulated subjects "
        f"({sec['simulate']:.1f} s). The twin was fitted on the first {twin.n_fit} ({c['iterations']} steps, "
        f"{sec['fit']:.1f} s; {c['calibration_fraction']:.0%} of them held apart to calibrate its bands); the last "
        f"{len(twin.held_out)} ({e(twin.held_out[0])} to {e(twin.held_out[-1])}) were never trained on. Each "
        f"held-out patient is conditioned on the first half of its observed visits and forecast at every later "
        f"planned visit, missed ones included, against the simulator's noise-free truth ({c['n_samples']} draws, "
        f"seed {c['seed']}).</p>")
    rows = "".join(f"<tr><th>{e(label)}</th><td>{n}</td><td>{tw:.4g}</td><td>{cp:.4g}</td><td>{tw / cp:.2f}</td></tr>"
                   for label, n, tw, cp in twin.mae)
    parts.append("<h3>Held-out forecast error (mean absolute error on the truth)</h3><table class='grid'>"
                 "<tr><th>biomarker</th><th>values</th><th>twin</th><th>copy-last</th><th>twin / copy-last</th></tr>"
                 f"{rows}</table><p>Copy-last carries each patient's last seen measurement forward; below 1 in the "
                 "last column, the twin is closer to the truth.</p>")
    flags = ", ".join(f"{kind}: {f} of {n} values" for kind, (f, n) in twin.flags.items())
    reasons = "".join(f"<li>{e(r)}</li>" for r in twin.reasons[:5])
    more = f"<p>... and {len(twin.reasons) - 5} more.</p>" if len(twin.reasons) > 5 else ""
    parts.append(f"<h3>Plausibility flags</h3><p>Means outside the limits learnt from the training cohort "
                 f"(range, steepest trend, direction of the disease): {flags}.</p>"
                 + (f"<ul>{reasons}</ul>{more}" if reasons else ""))
    parts.append(f"<h3>Forecasts of held-out patients</h3><p>{e(FORECAST_HOW)}</p>"
                 + "".join(f"<img alt='forecast {e(p.stem)}' src='{_png(p)}'>" for p in twin.forecasts))
    if twin.fill is None:
        parts.append("<h3>Filling a missed visit</h3><p>No held-out patient missed a visit between two observed "
                     "ones.</p>")
    else:
        parts.append(f"<h3>Filling a missed visit</h3><p>{e(FILL_HOW)}</p><img alt='fill' src='{_png(twin.fill)}'>")
    if twin.scenario is not None:
        arms = list(dict.fromkeys(arm for arm, *_ in twin.effects))
        names = list(dict.fromkeys(name for _, name, *_ in twin.effects))
        cells = {(arm, name): (tw, tr) for arm, name, tw, tr in twin.effects}
        rows = "".join(f"<tr><th>{e(arm)} - own schedule</th>"
                       + "".join(f"<td>{cells[arm, n][0]:+.3g} / {cells[arm, n][1]:+.3g}</td>" for n in names)
                       + "</tr>" for arm in arms)
        parts.append(f"<h3>Treatment scenarios</h3><p>{e(SCENARIO_HOW)}</p>"
                     f"<img alt='scenarios' src='{_png(twin.scenario)}'><p>Effect at the last planned visit, "
                     "twin / simulator's truth:</p><table class='grid'><tr><th></th>"
                     + "".join(f"<th>{e(n)}</th>" for n in names) + f"</tr>{rows}</table>")
    parts.append(f"<p>The curves are drawn from {twin.chart_samples} draws each, so that their bands are smooth; "
                 f"the tables use the twin's own number ({twin.config['n_samples']}).</p>")
    times = ", ".join(f"{k} {v:.1f} s" for k, v in sec.items())
    parts.append(f"<p>Times on this machine: {times}.</p>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>Twin demo</title><style>"
            "body{font-family:sans-serif;max-width:1400px;margin:2em auto}img{max-width:100%}"
            "th{text-align:left;padding-right:1em;vertical-align:top}td{font-family:monospace;padding-right:1em}"
            "table.grid td{text-align:right}</style></head><body>" + "".join(parts) + "</body></html>")
    path.write_text(page)
    return path
