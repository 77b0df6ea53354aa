"""`twin demo`: the main job end to end on simulated patients, with a report a person can open.

Three parts. First a small cohort of each kind is simulated on real anatomy, stored, validated,
and one patient's visits drawn. Then the biomarker twin at work: a larger 2D atrophy cohort is
simulated, a few subjects are held out, and the twin, fitted on the rest, forecasts each
held-out patient's later visits from the first half of its visits (scored against the
simulator's noise-free truth, beside copy-last), fills one patient's missed visit and replays
that patient under the cohort's alternative schedule and untreated, beside the simulator's
counterfactual truths. Then the scan twin at work on a 2D glioma cohort, where the tumour's
growth and its response to treatment show in the scans: fitted on all but a few subjects, it
forecasts each held-out patient's scans from its visits up to `SCAN_CUT` (scored on the change
since the last seen scan against the noise-free truth images, beside copy-last, with the
coverage of its voxel bands), fills one patient's missed visit, and replays one patient under
the cohort's alternative schedule beside the simulator's counterfactual scans.

Everything lands in one folder: report.html, one self-contained page (`twin.report`: every
figure embedded as a PNG, no links out, so it can be mailed on its own), each figure beside it
as a PNG, the simulated cohorts as zarr stores, and the scan twin's answers as result stores
(`twin.open_result`).
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
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

# The scan part: a glioma cohort with visits every 0.2 years to 2.4 years (as bench/scan_bench.py).
SCAN_SUBJECTS, SCAN_HELD_OUT = 40, 6
SCAN_VISITS = 13
SCAN_CUT = 1.0  # years since baseline: a held-out forecast sees the visits up to the one planned here
SCAN_AHEAD = (1.0, 2.0)  # years after the cut at which the drawn forecasts show scans
SCAN_TIMELINES = 2  # held-out patients whose forecast scans are drawn
SCAN_SCENARIO_AT = (1.0, 2.0)  # years since baseline: the scenarios are asked at the planned visits nearest these


def demo_scan_config(seed: int = 0):
    """The scan twin's settings in `twin demo`: `ScanConfig`'s defaults cut down so that the whole
    demo runs in about five minutes on 2 CPU cores (fewer registration steps and training pairs,
    a shorter decoder training)."""
    from twin import ScanConfig, TwinConfig
    from twin.scan_decoder import DecoderConfig

    return ScanConfig(registration_iterations=100, max_pairs=1200, seed=seed, dynamics=TwinConfig(seed=seed),
                      decoder=DecoderConfig(basis_iterations=600, iterations=600, seed=seed))


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
    forecasts: list = field(default_factory=list)  # Figures: fan charts of held-out patients
    fill: object = None  # Figure
    scenario: object = None  # Figure
    effects: list[tuple[str, str, float, float]] = field(default_factory=list)  # (arm, biomarker, twin, truth)
    chart_samples: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def run_demo(out: Path, *, seed: int = 0, progress: bool = True, cohorts=DEMO_COHORTS,
             twin_subjects: int = TWIN_SUBJECTS, held_out: int = HELD_OUT, fan_charts: int = FAN_CHARTS,
             iterations: int | None = None, prior_steps: int | None = None, n_samples: int | None = None,
             scan_subjects: int = SCAN_SUBJECTS,
             scan_held_out: int = SCAN_HELD_OUT, scan_config=None, threads: int | None = 1) -> Path:
    """Simulate, store, validate and draw; fit the biomarker twin and the scan twin and show them
    forecast, fill and replay treatment; return the path of the HTML report, `out`/report.html.

    cohorts: ((kind, n_subjects), ...) simulated with images for the pictures. twin_subjects:
    the atrophy cohort for the biomarker twin, of which the last `held_out` are never trained
    on; fan_charts: held-out patients drawn. iterations, prior_steps, n_samples: the biomarker
    twin's fit steps (joint, then the prior's) and draws (default: TwinConfig's). scan_subjects:
    the glioma cohort for the scan twin, of which the last `scan_held_out` are never trained
    on; scan_config: its `ScanConfig` (default `demo_scan_config(seed)`). threads: torch
    threads for the run, restored after (None: leave torch's setting): the demo's small 2D
    models gain little from a second thread and lose many times over when another process
    holds a core. Every random draw follows `seed`.
    """
    if not 1 <= held_out <= twin_subjects - 5:
        raise InputError(f"expected 1 <= held_out <= twin_subjects - 5 (the twin needs subjects to fit on), got "
                         f"held_out={held_out} of {twin_subjects}", source="demo", field="held_out")
    if not 1 <= scan_held_out <= scan_subjects - 5:
        raise InputError(f"expected 1 <= scan_held_out <= scan_subjects - 5 (the scan twin needs subjects to fit "
                         f"and calibrate on), got scan_held_out={scan_held_out} of {scan_subjects}", source="demo",
                         field="scan_held_out")
    start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*-sim-*.png"):  # figures of an earlier version of the demo, named after patients
        old.unlink()
    with _torch_threads(threads):
        parts, seconds = [], {}
        for kind, n in cohorts:
            t0 = time.perf_counter()
            store = write_cohort(simulate(kind, n_subjects=n, dims=2, seed=seed, progress=progress),
                                 out / f"{kind}.zarr", overwrite=True, progress=False)
            ds = open_cohort(store)  # validates every rule of the format
            subject = _most_eventful(ds)
            figure = plot_visits(ds, subject)
            built = seconds[f"{kind} cohort", "simulate, store, validate"] = time.perf_counter() - t0
            if progress:
                print(f"{kind}: {n} subjects simulated, stored and validated in {built:.1f} s -> {store}")
            parts.append((f"{kind.capitalize()} cohort",
                          [f"Store {store}, built and validated in {built:.1f} s. Patient {subject}, the one with "
                           "the most visits among the treated:", figure,
                           [["property", "value"], *([str(k), str(v)] for k, v in describe(ds).items())]]))
        twin = _biomarker_twin(seed=seed, n_subjects=twin_subjects, held_out=held_out, fan_charts=fan_charts,
                               iterations=iterations, prior_steps=prior_steps, n_samples=n_samples, progress=progress)
        parts += _biomarker_sections(twin)
        seconds.update({("biomarker twin", k): v for k, v in twin.seconds.items()})
        config = demo_scan_config(seed) if scan_config is None else scan_config
        scan_parts, scan_seconds = _scan_twin(out, seed=seed, n_subjects=scan_subjects, held_out=scan_held_out,
                                              config=config, progress=progress)
        parts += scan_parts
        seconds.update({("scan twin", k): v for k, v in scan_seconds.items()})
        total = time.perf_counter() - start
        intro = ("Overview", [
            f"Simulated cohorts on MNI152 anatomy, seed {seed}; {total:.0f} s in all on this machine "
            f"({os.cpu_count()} CPU cores, load average {load:.2f} at the start, torch threads: {_threads()}). Each "
            "cohort store passed twin validate. Every score below is measured on patients the twins never trained "
            "on, against the simulator's noise-free truth."])
        timings = ("Timings", [
            "Seconds per stage on this machine; the figures are drawn when the report is written, after these.",
            [["part", "stage", "seconds"], *([p, s, round(v, 1)] for (p, s), v in seconds.items()),
             ["all", "", round(total, 1)]]])
        report = _write_report(out, [intro, *parts, timings])
    if progress:
        print(f"demo: {total:.1f} s, then figures drawn and the report written in "
              f"{time.perf_counter() - start - total:.1f} s -> {report}")
    return report


@contextmanager
def _torch_threads(n: int | None):
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _write_report(out: Path, sections) -> Path:
    """out/report.html, each figure also saved in `out` as `<section heading>[-n].png`; an earlier
    run's figures of these sections go first (fewer patients drawn leave no stale numbered files)."""
    from matplotlib.figure import Figure

    from .report import write_report

    for heading, items in sections:
        if any(isinstance(item, Figure) for item in items):
            slug = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")
            for old in out.glob(f"{slug}*.png"):
                if re.fullmatch(rf"{re.escape(slug)}(-\d+)?\.png", old.name):
                    old.unlink()
    return write_report(out / "report.html", title="Twin demo", sections=sections, figures_dir=out)


def _biomarker_twin(*, seed: int, n_subjects: int, held_out: int, fan_charts: int,
                   iterations: int | None, prior_steps: int | None, n_samples: int | None,
                   progress: bool) -> TwinSection:
    """Fit the twin on an atrophy cohort less its last `held_out` subjects; forecast, fill and replay them."""
    from twin import BiomarkerTwin, TwinConfig
    from twin.baselines import copy_last

    defaults = TwinConfig()
    config = TwinConfig(seed=seed, iterations=iterations or defaults.iterations,
                        prior_steps=defaults.prior_steps if prior_steps is None else prior_steps,
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
        print(f"twin: fitted in {seconds['fit']:.1f} s ({config.iterations} + {config.prior_steps} steps)")

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
        section.forecasts.append(plot_forecast(test, dense, s, seen=seen[i],
                                               reference={"copy-last": (grid[keep], reference[keep])},
                                               title=f"{s}: forecast from the first {int(seen[i].sum())} of its "
                                                     f"{int(observed[i].sum())} observed visits (held out of "
                                                     "training)"))

    # Fill and scenarios: one held-out patient known from all its observed visits.
    i, fillable = _showcase(test)
    s, grid = ids[i], base[i] + _grid(planned[i])
    if fillable:
        filled = twin.fill(test, [s])
        _count_flags(section, "fill", filled)
        dense = twin.forecast(test, [s], at={s: grid}, n_samples=draws)
        missed = [f"{t:.2f}" for t in filled["time"].values[0] - base[i] if np.isfinite(t)]
        section.fill = plot_forecast(test, dense, s, fill=filled,
                                     title=f"{s}: every observed visit seen; missed visit{'s' * (len(missed) > 1)} "
                                           f"at {', '.join(missed)} y filled")
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
    section.scenario = plot_scenario(test, arms, s,
                                     title=f"{s} ({received} in the cohort): its own schedule (factual), the "
                                           f"cohort's alternative ({alt}), and no treatment (untreated)")
    seconds["answers for the figures"] = time.perf_counter() - t0
    if progress:
        flagged = sum(f for f, _ in section.flags.values())
        drawn = len(section.forecasts) + (section.fill is not None) + (section.scenario is not None)
        print(f"twin: answers for {drawn} figures (forecast, fill, scenarios) in "
              f"{seconds['answers for the figures']:.1f} s; {flagged} values flagged implausible")
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
    """The cohort as if only the visits in `keep` (S, V) had been observed: the others' biomarkers and scans go."""
    out = ds.copy()
    out["observed"] = (("subject", "visit"), ds["observed"].values & keep)
    for name in ("biomarkers", "image"):
        if name in ds:
            out[name] = ds[name].where(out["observed"])
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


def _biomarker_sections(twin: TwinSection) -> list:
    """The biomarker twin's part of the report: (heading, items) as `twin.report.write_report` takes them."""
    c, sec = twin.config, twin.seconds
    flags = ", ".join(f"{kind}: {f} of {n} values" for kind, (f, n) in twin.flags.items())
    reasons = twin.reasons[:5] + ([f"... and {len(twin.reasons) - 5} more."] if len(twin.reasons) > 5 else [])
    parts = [
        ("Biomarker twin", [
            f"A 2D atrophy cohort of {twin.n_subjects} simulated subjects ({sec['simulate']:.1f} s). The twin was "
            f"fitted on the first {twin.n_fit} ({c['iterations']} + {c.get('prior_steps', 0)} steps, "
            f"{sec['fit']:.1f} s; "
            f"{c['calibration_fraction']:.0%} of them held apart to calibrate its bands); the last "
            f"{len(twin.held_out)} ({twin.held_out[0]} to {twin.held_out[-1]}) were never trained on. Each held-out "
            "patient is conditioned on the first half of its observed visits and forecast at every later planned "
            f"visit, missed ones included, against the simulator's noise-free truth ({c['n_samples']} draws, seed "
            f"{c['seed']}). Held-out forecast error (mean absolute error on the truth):",
            [["biomarker", "values", "twin", "copy-last", "twin / copy-last"],
             *([label, n, tw, cp, tw / cp] for label, n, tw, cp in twin.mae)],
            "Copy-last carries each patient's last seen measurement forward; below 1 in the last column, the twin "
            "is closer to the truth."]),
        ("Biomarker twin: plausibility flags", [
            "Means outside the limits learnt from the training cohort (range, steepest trend, direction of the "
            f"disease): {flags}.", *reasons]),
        ("Biomarker twin: forecasts of held-out patients", [FORECAST_HOW, *twin.forecasts]),
    ]
    if twin.fill is None:
        parts.append(("Biomarker twin: filling a missed visit",
                      ["No held-out patient missed a visit between two observed ones."]))
    else:
        parts.append(("Biomarker twin: filling a missed visit", [FILL_HOW, twin.fill]))
    if twin.scenario is not None:
        arms = list(dict.fromkeys(arm for arm, *_ in twin.effects))
        names = list(dict.fromkeys(name for _, name, *_ in twin.effects))
        cells = {(arm, name): (tw, tr) for arm, name, tw, tr in twin.effects}
        parts.append(("Biomarker twin: treatment scenarios", [
            SCENARIO_HOW, twin.scenario, "Effect at the last planned visit, twin / simulator's truth:",
            [["", *names], *([f"{arm} - own schedule", *(f"{cells[arm, n][0]:+.3g} / {cells[arm, n][1]:+.3g}"
                                                         for n in names)] for arm in arms)],
            f"The curves are drawn from {twin.chart_samples} draws each, so that their bands are smooth; the tables "
            f"use the twin's own number ({c['n_samples']})."]))
    return parts


def _scan_twin(out: Path, *, seed: int, n_subjects: int, held_out: int, config, progress: bool) -> tuple[list, dict]:
    """Fit the scan twin on a glioma cohort less its last `held_out` subjects; forecast, fill and
    replay them. Returns the report's sections and the seconds per stage; writes the answers to
    `out`/scan-{forecast,fill,scenario}.zarr."""
    from twin import ScanTwin, write_result
    from twin.data.glioma import GliomaConfig
    from twin.scan_figures import scan_timeline, volume_fan

    seconds = {}
    t0 = time.perf_counter()
    glioma = GliomaConfig(n_visits=SCAN_VISITS)
    ds = simulate_cohort("glioma", n_subjects, 2, seed, config=glioma, progress=progress).load()
    seconds["simulate"] = time.perf_counter() - t0
    n_fit = n_subjects - held_out
    if progress:
        print(f"scans: {n_subjects} glioma subjects simulated in {seconds['simulate']:.1f} s; fitting the scan twin "
              f"on the first {n_fit}, holding out the last {held_out}")
    t0 = time.perf_counter()
    twin = ScanTwin.fit(ds.isel(subject=slice(0, n_fit)), config, progress=progress)
    seconds["fit"] = time.perf_counter() - t0
    seconds.update({f"fit: {k}": float(v) for k, v in twin.record.get("seconds", {}).items()})
    if progress:
        print(f"scans: fitted in {seconds['fit']:.1f} s")

    # Forecast: each held-out patient sees its visits up to the one planned at SCAN_CUT and is asked
    # at every later planned visit, missed ones included (the truth exists there). Cut by the
    # protocol's visit rather than the jittered time, every patient is asked equally often: a scan
    # twin answer with padded requests fails (it measures volumes on the padding's blank reference).
    t0 = time.perf_counter()
    test = ds.isel(subject=slice(n_fit, None))
    ids = [str(s) for s in test["subject"].values]
    base, planned, observed = test["baseline_time"].values, test["time"].values, test["observed"].values
    visit = np.arange(planned.shape[1])
    cut = int(round(SCAN_CUT / glioma.visit_every))
    seen, later = observed & (visit <= cut), np.isfinite(planned) & (visit > cut)
    asked = [i for i in range(len(ids)) if seen[i].any() and later[i].any()]
    if not asked:
        raise InputError(f"no held-out subject has a scan up to {_years(SCAN_CUT)} and a planned visit after; "
                         "hold out more", source="demo", field="scan_held_out")
    history = _conditioned(test, seen)
    forecast = twin.forecast(history, [ids[i] for i in asked],
                             at={ids[i]: list(base[i] + planned[i][later[i]]) for i in asked})
    seconds["forecast held-out patients"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    truth = test["truth_image"].sel(scenario="factual").values  # (S, V, C, *space)
    scores = _scan_scores(forecast, test, truth)
    table, nominal = _score_table(scores, forecast)
    seconds["score"] = time.perf_counter() - t0
    if progress:
        print(f"scans: forecast {len(asked)} held-out patients at {len(scores)} visits in "
              f"{seconds['forecast held-out patients']:.1f} s; change RMSE on the noise-free truth: twin "
              f"{table[-1][2]:.4f}, copy-last {table[-1][3]:.4f}; {nominal:.0%} band covers {table[-1][5]:.1%} of "
              "the truth's brain voxels")

    # Pictures: the patients whose tumours changed most, at SCAN_AHEAD years after the cut.
    t0 = time.perf_counter()
    change = {}
    for row in scores:
        change[row["subject"]] = max(change.get(row["subject"], 0.0), row["copy_last"])
    shown = sorted(change, key=lambda s: -change[s])[:SCAN_TIMELINES]
    ahead = twin.forecast(history, shown, at={s: [base[ids.index(s)] + SCAN_CUT + h for h in SCAN_AHEAD]
                                              for s in shown})
    timelines = [scan_timeline(ahead, s, cohort=test) for s in shown]
    structure = twin.structures[0]
    i = ids.index(shown[0])
    fan = volume_fan(forecast, shown[0], structure, cohort_volumes=_measured_volumes(test, i, structure))
    seconds["forecast for the figures"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fill_part, filled = _scan_fill(twin, test, truth)
    seconds["fill"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scenario_part, arms = _scan_scenario(twin, test)
    seconds["scenario"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stores = [write_result(r, out / f"scan-{kind}.zarr", overwrite=True)
              for kind, r in (("forecast", forecast), ("fill", filled), ("scenario", arms)) if r is not None]
    seconds["write results"] = time.perf_counter() - t0
    ahead_words = " and ".join(f"{h:g}" for h in SCAN_AHEAD) + (" year" if list(SCAN_AHEAD) == [1] else " years")
    results = [("forecast, scored", forecast), (f"forecast, {ahead_words} after the cut", ahead), ("fill", filled),
               ("scenario", arms)]
    flag_table, reasons = _scan_flag_summary([(k, r) for k, r in results if r is not None])
    if progress:
        print(f"scans: forecasts for the figures, fill and scenario in {seconds['forecast for the figures']:.1f} + "
              f"{seconds['fill']:.1f} + {seconds['scenario']:.1f} s; {sum(row[2] for row in flag_table[1:])} of "
              f"{sum(row[1] for row in flag_table[1:])} predicted scans flagged implausible; results -> "
              f"{', '.join(str(p) for p in stores)}")

    c, dyn, dec, cal = config, config.dynamics, config.decoder, twin.calibration
    held = ids[0] if len(ids) == 1 else f"{ids[0]} to {ids[-1]}"
    sections = [
        ("Scan twin", [
            f"A 2D glioma cohort of {n_subjects} simulated subjects (T1c and FLAIR, visits every "
            f"{_years(glioma.visit_every)} to {np.nanmax(planned):.1f} years, some missed; "
            f"{seconds['simulate']:.1f} s), where the tumour's growth and its response to radiotherapy and "
            f"temozolomide show in the scans. The scan twin was fitted on the first {n_fit} ({seconds['fit']:.1f} s): "
            f"the dynamics ({dyn.iterations} steps), pairs of a training "
            f"subject's scans registered into a change code (at most {c.max_pairs // 2} pairs, "
            f"{c.registration_iterations} steps each), the decoder's mean change ({dec.basis_iterations} steps) and "
            f"its diffusion model ({dec.iterations} steps); {c.calibration_fraction:.0%} of the training subjects "
            f"were held apart to calibrate its voxel and volume bands ({cal.get('cases', 0)} scans). The last "
            f"{held_out} ({held}) were never trained on. Each answer draws {c.n_samples} scans per time (seed "
            f"{c.seed}). Decoder training record: "
            + ", ".join(f"{k.replace('_', ' ')} {v:.3g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                        for k, v in twin.record.items() if isinstance(v, (int, float))) + "."]),
        ("Scan twin: held-out forecast scores", [
            f"Each held-out patient sees its scans up to the visit planned at {_years(SCAN_CUT)} and is forecast at "
            "every later planned visit, missed ones included. Scores against the simulator's noise-free truth "
            "images, inside the brain, per forecast scan and then averaged. Change RMSE is the error of the "
            "predicted change since the last seen scan, (prediction - seen scan) - (truth now - truth then): the "
            "seen scan's acquisition noise cancels and only change is scored; copy-last predicts no change, so its "
            "score is the size of the true change. Coverage is the share of brain voxels whose truth lies inside "
            f"the twin's {nominal:.0%} voxel band (calibrated for a measured scan, which is noisier than the "
            "truth).", table]),
        ("Scan twin: forecasts of held-out patients", [
            f"The {len(shown)} held-out patients whose tumours changed most, forecast {ahead_words} after "
            f"the cut at {_years(SCAN_CUT)} (from their scans up to the visit planned then). Top row: every scan "
            f"acquired, those after {_years(SCAN_CUT)} unseen by the twin; then the point forecast, the per-voxel "
            "predictive sd, and the predicted change from the last seen scan. Channel T1c: the enhancing tumour is "
            "bright.", *timelines]),
        ("Scan twin: tumour volume", [
            f"{shown[0]}: the {structure} volume measured on the predicted scans at the later planned visits, with its "
            "bands, beside the volumes measured the same way on the acquired scans (black dots; those after "
            f"{_years(SCAN_CUT)} unseen by the twin).", fan]),
        *fill_part,
        *scenario_part,
        ("Scan twin: plausibility flags", [
            "Each predicted scan is checked (docs/results-format.md): the twin's deformation folding or changing "
            "local volume beyond its calibration, a measured volume changing faster than twice the fastest change "
            "between training scans, a state far from the training cohort's, draws that disagree, and a scan whose "
            "anatomy, intensities or tissue contrast depart from the twin's own prediction. Flagged scans are "
            "returned and marked, never hidden.", flag_table,
            *reasons[:5], *([f"... and {len(reasons) - 5} more."] if len(reasons) > 5 else [])]),
    ]

    # Trust: the same held-out patients through `twin evaluate` (its own page in evaluation/)
    from twin.evaluation import evaluate
    from twin.evaluation_report import sections as evaluation_sections
    from twin.evaluation_report import write_evaluation

    t0 = time.perf_counter()
    ev = evaluate(twin, ds, seed=seed, progress=progress)
    page = write_evaluation(ev, out / "evaluation", overwrite=True)
    seconds["evaluate"] = time.perf_counter() - t0
    if progress:
        print(f"scans: evaluated on the {held_out} held-out patients in {seconds['evaluate']:.1f} s -> {page}")
    sections += [(f"Scan twin evaluation: {heading.lower()}",
                  ([f"From `twin evaluate` on the {held_out} held-out patients; every number in "
                    f"{page.relative_to(out)} and evaluation/metrics.json."] if heading == "Calibration" else []) + items)
                 for heading, items in evaluation_sections(ev) if heading in ("Calibration", "Hallucination detection")]
    return sections, seconds


def _years(t: float) -> str:
    return f"{t:g} year{'' if t == 1 else 's'}"


def _scan_scores(result, ds, truth: np.ndarray) -> list[dict]:
    """Per requested scan of `result` (forecast or fill) of `ds`'s subjects, at planned visits: the
    subject, its horizon (years from the reference scan), the change RMSE inside the brain of the
    twin's mean and of copy-last against the truth (S, V, C, *space), and the share of truth voxels
    inside the outermost band."""
    ids = [str(s) for s in ds["subject"].values]
    base, planned, mask = ds["baseline_time"].values, ds["time"].values, ds["mask"].values.astype(bool)
    levels = [float(q) for q in result["quantile"].values]
    lo, hi = levels.index(min(levels)), levels.index(max(levels))
    times, ref_times, horizon = result["time"].values, result["reference_time"].values, result["horizon"].values
    mean, reference = result["scan_mean"].values, result["reference_scan"].values
    bands = result["scan_quantiles"].values
    rows = []
    for s, subject in enumerate(str(x) for x in result["subject"].values):
        i = ids.index(subject)
        inside = np.broadcast_to(mask[i], truth.shape[2:])
        for r in np.flatnonzero(np.isfinite(times[s])):
            v, ref = _visit(planned[i], times[s, r] - base[i]), _visit(planned[i], ref_times[s, r] - base[i])
            true_change = (truth[i, v] - truth[i, ref])[inside]
            predicted = (mean[s, r] - reference[s, r])[inside]
            t = truth[i, v][inside]
            rows.append({"subject": subject, "time": float(planned[i, v]), "reference": float(planned[i, ref]),
                         "horizon": float(horizon[s, r]),
                         "twin": float(np.sqrt(np.mean((predicted - true_change) ** 2))),
                         "copy_last": float(np.sqrt(np.mean(true_change ** 2))),
                         "coverage": float(np.mean((bands[lo, s, r][inside] <= t) & (t <= bands[hi, s, r][inside])))})
    return rows


def _visit(planned: np.ndarray, since: float) -> int:
    """The visit planned at `since` years after baseline; results ask at planned times exactly."""
    hit = np.flatnonzero(np.abs(planned - since) < 1e-6)
    assert hit.size, f"no planned visit at {since} years"
    return int(hit[0])


def _score_table(scores: list[dict], result) -> tuple[list, float]:
    """Rows (header first) per horizon bin of the mean change RMSE (twin, copy-last, their ratio) and
    band coverage; and the band's nominal coverage."""
    levels = [float(q) for q in result["quantile"].values]
    nominal = max(levels) - min(levels)
    h = np.asarray([row["horizon"] for row in scores])
    table = [["horizon after the last seen scan", "scans", "change RMSE: twin", "change RMSE: copy-last",
              "twin / copy-last", f"{nominal:.0%} band coverage"]]
    for label, pick in (("under 1 year", h < 1), ("1 year or more", h >= 1), ("all", np.ones(len(h), bool))):
        part = [row for row, p in zip(scores, pick) if p]
        if part:
            twin, copy = (float(np.mean([row[k] for row in part])) for k in ("twin", "copy_last"))
            table.append([label, len(part), twin, copy, twin / copy, float(np.mean([row["coverage"] for row in part]))])
    return table, nominal


def _measured_volumes(ds, i: int, structure: str) -> tuple[np.ndarray, np.ndarray]:
    """(clock times (T,), volumes in mL (T,)) of one structure measured on subject i's acquired scans,
    as the scan twin measures its predictions (`twin.segment`)."""
    from twin.data.geometry import voxel_volume_ml

    from .segment import measure_volumes

    seen = np.flatnonzero(ds["observed"].values[i])
    channels = [str(c) for c in ds["channel"].values]
    volumes = measure_volumes(ds["image"].values[i, seen], ds["mask"].values[i].astype(bool), channels,
                              voxel_volume_ml(ds["affine"].values[i]))
    return ds["baseline_time"].values[i] + ds["time"].values[i, seen], volumes[structure]


def _scan_fill(twin, test, truth: np.ndarray) -> tuple[list, object]:
    """Fill one held-out patient's missed visit between two seen ones (or, without one, remove its
    middle observed visit and fill that) from all its other scans; the report's section and the result."""
    from twin.scan_figures import scan_timeline

    planned, observed = test["time"].values, test["observed"].values
    target = None
    for i in range(len(planned)):
        seen_t = planned[i][observed[i]]
        inner = np.flatnonzero(~observed[i] & np.isfinite(planned[i]) & (planned[i] > seen_t.min(initial=np.inf))
                               & (planned[i] < seen_t.max(initial=-np.inf)))
        if inner.size:
            target = (i, int(inner[0]), False)
            break
    if target is None:
        for i in range(len(planned)):
            v = np.flatnonzero(observed[i])
            if v.size >= 3:
                target = (i, int(v[v.size // 2]), True)
                break
    if target is None:
        return [("Scan twin: filling a visit", ["No held-out patient has a visit to fill between two scans."])], None
    i, v, removed = target
    keep = observed[[i]].copy()
    keep[0, v] = False
    one = _conditioned(test.isel(subject=[i]), keep)
    s = str(test["subject"].values[i])
    filled = twin.fill(one, [s], at={s: [float(test["baseline_time"].values[i] + planned[i, v])]})
    score = _scan_scores(filled, test, truth)[0]
    nominal = float(filled["quantile"].max() - filled["quantile"].min())
    how = "removed from its scans" if removed else "missed"
    text = (f"{s}'s visit at {planned[i, v]:.2f} years ({how}), filled from its other scans, starting from the "
            f"nearest seen scan at {score['reference']:.2f} years. Change RMSE inside the brain against the "
            f"noise-free truth: twin {score['twin']:.4f}, copy-nearest {score['copy_last']:.4f}; the "
            f"{nominal:.0%} band holds {score['coverage']:.1%} of the truth's brain voxels.")
    return [("Scan twin: filling a visit", [text, scan_timeline(filled, s, cohort=one)])], filled


def _scan_scenario(twin, test) -> tuple[list, object]:
    """One held-out patient, known from its scans before its first treatment, under its own schedule
    and the cohort's alternative: the report's section (scans, volume effects beside the simulator's
    counterfactual truth) and the result."""
    from twin.data.geometry import voxel_volume_ml
    from twin.scan_figures import scenario_scans

    from .segment import measure_volumes

    planned, observed = test["time"].values, test["observed"].values
    heading = "Scan twin: treatment scenarios"
    for i in range(len(planned)):
        own = _schedule(test, i, "event")
        alternative = _schedule(test, i, "alternative_event")
        first = min([t for t, _, _ in own + alternative], default=np.inf)
        before = observed[i] & (planned[i] < first)
        if alternative != own and before.any():
            break
    else:
        return [(heading, ["No held-out patient has an alternative schedule and a scan before treatment."])], None
    s, base = str(test["subject"].values[i]), float(test["baseline_time"].values[i])
    one = _conditioned(test.isel(subject=[i]), before[None])
    visits = sorted({int(np.nanargmin(np.abs(planned[i] - t))) for t in SCAN_SCENARIO_AT})
    arms = twin.simulate(one, {"alternative": {s: alternative}}, [s], at={s: [base + planned[i, v] for v in visits]})

    channels = [str(c) for c in test["channel"].values]
    mask, vox = test["mask"].values[i].astype(bool), voxel_volume_ml(test["affine"].values[i])
    names = [str(n) for n in arms["structure"].values]
    mean, effect = arms["volume_mean"], arms["volume_effect_mean"].sel(arm="alternative").values[0]
    table = [["structure", "years since baseline", "twin: own", "twin: alternative", "twin: effect",
              "truth: own", "truth: alternative", "truth: effect"]]
    for r, v in enumerate(visits):
        truth = {arm: measure_volumes(test["truth_image"].sel(scenario=arm).values[i, v][None], mask, channels, vox)
                 for arm in ("factual", "alternative")}
        for k, name in enumerate(names):
            own_v, alt_v = (float(mean.sel(arm=a).values[0, r, k]) for a in ("factual", "alternative"))
            true_own, true_alt = float(truth["factual"][name][0]), float(truth["alternative"][name][0])
            table.append([name, float(planned[i, v]), own_v, alt_v, float(effect[r, k]), true_own, true_alt,
                          true_alt - true_own])
    last = table[-len(names)]  # the first structure at the last time
    n_seen = int(before.sum())
    text = (f"{s}, seen only before its treatment began ({n_seen} scan{'s' * (n_seen > 1)}), "
            f"under its own schedule ({_describe(own)}) and the cohort's alternative ({_describe(alternative)}), "
            f"with the same draws. At {last[1]:.2f} years the twin puts the {last[0]} volume at {last[3]:.2f} mL "
            f"under the alternative against {last[2]:.2f} mL under its own schedule, an effect of {last[4]:+.2f} mL; "
            f"the simulator's counterfactual truth, measured the same way on its noise-free scans: {last[6]:.2f} "
            f"against {last[5]:.2f} mL, {last[7]:+.2f} mL. Volumes in mL at the planned visits asked:")
    return [(heading, [text, scenario_scans(arms, s, len(visits) - 1), table])], arms


def _schedule(ds, i: int, prefix: str) -> list[tuple[float, str, float]]:
    """Subject i's treatment events [(years since baseline, agent, dose)], from `{prefix}_time/_agent/_dose`."""
    return [(float(t), str(a), float(d)) for t, a, d in zip(ds[f"{prefix}_time"].values[i],
                                                             ds[f"{prefix}_agent"].values[i],
                                                             ds[f"{prefix}_dose"].values[i]) if a]


def _describe(schedule: list[tuple[float, str, float]]) -> str:
    """'radiotherapy (30 fractions) and temozolomide (72 doses) from 0.08 years', or 'no treatment'."""
    if not schedule:
        return "no treatment"
    agents = list(dict.fromkeys(a for _, a, _ in schedule))
    counts = [f"{a} ({sum(x == a for _, x, _ in schedule)} {'fractions' if a == 'radiotherapy' else 'doses'})"
              for a in agents]
    return f"{' and '.join(counts)} from {min(t for t, _, _ in schedule):.2f} years"


def _scan_flag_summary(results) -> tuple[list, list[str]]:
    """A table (header first) of predicted scans flagged per result and check, and the reasons given."""
    table = [["result", "scans", "flagged", *(str(c) for c in results[0][1]["scan_check"].values)]]
    reasons = []
    for kind, result in results:
        flags = result["scan_flags"].transpose(..., "scan_check", "subject", "request").values
        valid = np.broadcast_to(np.isfinite(result["time"].values), flags.shape[:-3] + flags.shape[-2:])
        table.append([kind, int(valid.sum()), int(flags.any(-3).sum()),
                      *(int(flags[..., c, :, :].sum()) for c in range(flags.shape[-3]))])
        reasons += [f"{kind}: {why}" for why in json.loads(result.attrs.get("scan_flag_reasons", "[]"))]
    return table, reasons
