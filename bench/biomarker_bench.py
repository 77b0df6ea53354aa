"""How well the biomarker twin forecasts held-out data, against honest baselines, on simulated and real-format cohorts.

    python bench/biomarker_bench.py [--cohorts atrophy,glioma,leaspy] [--subjects N] [--iterations N]
                                    [--seed 0] [--quick] [--json PATH]

Cohorts: `atrophy` and `glioma` simulated in 2D (1000 and 500 subjects, or `--subjects` each;
seed `--seed`), and leaspy's `alzheimer` table (tests/data/leaspy/alzheimer.csv: 200 subjects,
7 scores, noisy). The atrophy cohort is the larger because with 200 subjects estimating the
population cost split B 13-19% even on cohorts drawn from the twin itself (bench/refit_bench.py);
glioma's fit costs five times as much per subject. With 200 glioma subjects a band bin's
coverage had a standard error of 0.024-0.037 from its 40 held-out subjects alone (seed 0), half
to three quarters of the 85-95% window's half-width, so the window could not tell a calibrated
band from a miscalibrated one; 500 gives 100 held-out subjects. The simulators' default
protocols: atrophy visits at 0, 0.5, 1, 2, 3, 4 years; glioma every 0.2 years, followed here to
2.4 years instead of the simulator's default 1.6 so that forecasts a year or more ahead exist.

Two held-out splits per cohort, each with its own fit, so no target ever reaches training:

    A  held-out subjects: 20% of subjects (`holdout_subjects`, seed `--seed`) are left out;
       the models train on every observed visit of the others. Each held-out subject is
       conditioned on the first half of its observed visits (ceil(n / 2), as the twin's own
       calibration does) and forecast at every later visit.
    B  held-out last visits: every subject's last 2 observed visits (`holdout_last(k=2)`) are
       removed before training; each subject is conditioned on the rest and forecast.

The twin (`BiomarkerTwin.fit`, which itself keeps 20% of its training subjects apart to
calibrate the bands) and the linear mixed-effects model (`MixedEffects`, ML, baseline age as
a covariate where the cohort's baseline_time varies) train on exactly the same data, and
every method gets the same conditioning history. Point errors are scored on simulated cohorts against the noise-free
`truth_biomarkers` (factual) at every planned visit after the history, missed visits
included; on leaspy against the held-out observations. Bands (50% and 90%) and CRPS are
scored against held-out *observations* (measured values; a band is for a measurement), for
the twin from its draws (`samples=True`) and for the LME from its Gaussian predictive. Each
coverage comes with its standard error counted by subject (`clustered_proportion`: a subject's
readings miss a band together), the spread to expect from other held-out subjects alone.

The twin's point forecast is its median (the 0.5 quantile of its answer): MAE is scored, and
the median is the point that minimises the expected absolute error (its predictive mean is
scored too, as `twin_mean` in the JSON). Scales: the headline MAE is on the standardised scale
(each biomarker divided by its SD in the training data, then pooled over biomarkers), since
raw units differ (mL and points); raw MAE per biomarker follows. Horizon = years after the
last conditioning visit.

Treatment effect (simulated, split A): each held-out subject, known from all its observed
visits, is replayed under the cohort's alternative schedule (`alternative_event_*`, given
to `BiomarkerTwin.simulate` as explicit per-subject events). The twin's effect = under the
received schedule minus under the alternative, at every planned visit, against
truth_biomarkers[factual] - truth_biomarkers[alternative]. A model that ignores treatment
predicts no effect, so its error is the mean |true effect|.

Skyline (atrophy, both splits): a Bayes-optimal forecast of the cognitive score from its
history and the simulator's own priors, course and measurement model (`bench/atrophy_oracle.py`),
which no model reading the score alone can beat on average (the twin, which reads the volumes
too, can). It integrates over each history numerically, about a second a subject, so it scores a
seeded subset of at most `ORACLE_SUBJECTS` subjects per split, every method on the same ones.
Pooled over every biomarker, the skyline adds for each volume its noise-free course placed by
the history's measurements (`level_oracle`, a bound: it is handed the course itself).

Times are wall-clock seconds on this machine, single process; a final block prints each
done-when criterion of the dynamics issue, the numbers behind it, and whether it is met.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

EDGES = (0.0, 0.5, 1.0, 2.0, math.inf)
LONG = 1.0  # years: the done-when horizon for simulated cohorts
MIN_BIN = 30  # held-out values a bin needs before a criterion is judged on it
SUBJECTS = {"atrophy": 1000, "glioma": 500}  # per simulated cohort, unless --subjects
ORACLE_SUBJECTS = 200  # the skyline's subset per split
NEGLIGIBLE = 0.1  # |true effect| below this many training SDs counts as no effect
LEASPY = Path(__file__).resolve().parents[1] / "tests" / "data" / "leaspy" / "alzheimer.csv"
CODE = ("twin", "dynamics", "priors", "scenarios", "data", "bench", "pyproject.toml")  # what a run's numbers depend on
DROP = ("image", "mask", "affine", "truth_image", "truth_labels")  # the twin reads biomarkers only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohorts", default="atrophy,glioma,leaspy")
    parser.add_argument("--subjects", type=int, default=None,
                        help=f"per simulated cohort (default {SUBJECTS}; --quick 40)")
    parser.add_argument("--iterations", type=int, default=None, help="twin fit steps (default TwinConfig's; --quick 150)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inference", default="laplace", choices=["laplace", "amortised"],
                        help="how the twin reads a history: Laplace posterior, or the Mamba history encoder")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run (~1-2 minutes)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = parser.parse_args()
    unknown = set(args.cohorts.split(",")) - {*SUBJECTS, "leaspy"}
    if unknown:
        parser.error(f"unknown cohorts {sorted(unknown)}; choose from {[*SUBJECTS, 'leaspy']}")

    import torch

    from twin import TwinConfig

    subjects = {name: args.subjects or (40 if args.quick else n) for name, n in SUBJECTS.items()}
    iterations = args.iterations or (150 if args.quick else TwinConfig().iterations)
    config = TwinConfig(iterations=iterations, seed=args.seed, n_samples=100 if args.quick else TwinConfig().n_samples,
                        inference=args.inference)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch threads {torch.get_num_threads()}")
    print(f"twin: {iterations} + {config.prior_steps} fit steps (joint, then the prior's), {config.n_samples} draws, "
          f"{config.inference} inference, seed {args.seed}; horizon bins {_labels()}; MAE standardised by training SD",
          flush=True)
    start = time.perf_counter()
    report = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(), "commit": _commit(),
              "config": config.to_dict(), "subjects": subjects, "quick": args.quick, "cohorts": {}}
    for name in args.cohorts.split(","):
        ds, simulated = load_cohort(name, subjects.get(name, 0), args.seed, quick=args.quick)
        report["cohorts"][name] = run_cohort(name, ds, simulated, config, args.seed)
    report["done_when"] = done_when(report["cohorts"])
    report["total_seconds"] = time.perf_counter() - start
    print(f"\ntotal {report['total_seconds']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=_json))
        print(f"wrote {args.json}")


# ---- cohorts and splits ------------------------------------------------------------------------

def load_cohort(name: str, subjects: int, seed: int, *, quick: bool):
    """(cohort without images, simulated?) for "atrophy", "glioma" (2D) or "leaspy"."""
    if name == "leaspy":
        from twin.data import import_table

        ds = import_table(LEASPY)
        if quick:  # a smoke run: the first 60 subjects
            ds = ds.isel(subject=slice(0, 60))
        return ds, False
    from twin.data.simulate import simulate_cohort

    t0 = time.perf_counter()
    config = None
    if name == "glioma":  # followed for 2.4 years, so that forecasts a year or more ahead exist
        from twin.data.glioma import GliomaConfig

        config = GliomaConfig(n_visits=13)
    ds = simulate_cohort(name, subjects, 2, seed, config=config, progress=False)
    print(f"[{name}] simulated {subjects} subjects in {time.perf_counter() - t0:.0f} s", flush=True)
    return ds.drop_vars([v for v in DROP if v in ds.variables]), True


def conditioned(ds, keep: np.ndarray):
    """The cohort as if only the visits in `keep` (S, V) had been observed."""
    out = ds.copy()
    out["observed"] = (("subject", "visit"), ds["observed"].values & keep)
    out["biomarkers"] = ds["biomarkers"].where(out["observed"])
    return out


def first_half(times: np.ndarray) -> np.ndarray:
    """(S, V) observed times (NaN = not observed) -> the first ceil(n / 2) observed visits of each subject."""
    finite = np.isfinite(times)
    rank = np.argsort(np.argsort(np.where(finite, times, np.inf), axis=1), axis=1)
    return finite & (rank < np.ceil(finite.sum(1, keepdims=True) / 2))


# ---- one cohort --------------------------------------------------------------------------------

def run_cohort(name: str, ds, simulated: bool, config, seed: int) -> dict:
    """Both splits of one cohort: each fits the twin and the LME on its own training data, then scores."""
    from twin.metrics import holdout_last, holdout_subjects

    ids = [str(s) for s in ds["subject"].values]
    held = holdout_subjects(ids, 0.2, seed)
    times = np.where(ds["observed"].values, ds["time"].values, np.nan)
    history_b, target_b = holdout_last(times, k=2)
    units = [str(u) for u in ds["biomarker_unit"].values] if "biomarker_unit" in ds.coords else [""] * ds.sizes["biomarker"]
    out = {"subjects": len(ids), "held_out": int(held.sum()), "biomarkers": [str(b) for b in ds["biomarker"].values],
           "units": units}
    print(f"[{name}] {len(ids)} subjects, {int(ds['observed'].sum())} observed visits, {len(units)} biomarkers",
          flush=True)
    rest, out_a = np.flatnonzero(~held), np.flatnonzero(held)
    splits = {
        "A": (f"{len(out_a)} held-out subjects (never trained on), conditioned on the first half of their observed "
              f"visits", ds.isel(subject=rest), ds.isel(subject=out_a), first_half(times[out_a]), None),
        "B": ("every subject's last 2 observed visits held out of training", conditioned(ds, history_b), ds,
              history_b, target_b),
    }
    for key, (what, train, part, history, target) in splits.items():
        print(f"\n== {name}, split {key}: {what}; "
              f"{'scored against noise-free truth at every later planned visit' if simulated else 'scored against held-out observations'}")
        twin, lme, sd, fit = train_models(train, config)
        out[key] = {"what": what, **fit, "train_sd": sd.tolist(),
                    **evaluate(twin, lme, part, history, target, simulated, sd, effect=simulated and key == "A",
                               oracle=name == "atrophy")}
        print_split(out[key], out["biomarkers"], units)
    return out


def train_models(train, config):
    """(twin, LME, training SD per biomarker (B,), times) fitted on one training cohort."""
    from twin import BiomarkerTwin
    from twin.baselines import MixedEffects, cohort_arrays

    y = np.where(train["observed"].values[..., None], train["biomarkers"].values, np.nan)
    t0 = time.perf_counter()
    twin = BiomarkerTwin.fit(train, config, progress=False)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lme = MixedEffects.fit(*cohort_arrays(train, baseline_time=_varies(train)))
    lme_s = time.perf_counter() - t0
    print(f"training on {int(train['observed'].sum())} visits of {train.sizes['subject']} subjects: "
          f"twin fit {fit_s:.1f} s, LME fit {lme_s:.2f} s", flush=True)
    return twin, lme, np.nanstd(y, axis=(0, 1)), {"fit_seconds": fit_s, "lme_fit_seconds": lme_s}


def _varies(ds) -> bool:
    """Baseline age is an LME covariate where the cohort's baseline_time varies (an age clock)."""
    return bool(np.ptp(ds["baseline_time"].values) > 0)


def evaluate(twin, lme, ds, history: np.ndarray, target: np.ndarray | None, simulated: bool, sd: np.ndarray, *,
             effect: bool, oracle: bool = False) -> dict:
    """Every method's forecasts of one split, scored; `target` (S, V) picks the held-out observed
    visits (None: every observed visit after the history); simulated cohorts are scored at every
    planned visit after the history."""
    from twin.baselines import copy_last, linear
    from twin.metrics import clustered_proportion, crps_from_samples, crps_gaussian

    planned = ds["time"].values
    observed = ds["observed"].values
    obs_t = np.where(observed, planned, np.nan)
    last = np.max(np.where(history, obs_t, -np.inf), axis=1)
    later = (planned > last[:, None]) & np.isfinite(planned)
    want = later if simulated else (observed & later if target is None else target)
    keep = np.flatnonzero(want.any(1) & history.any(1))
    ds, history, want, last = ds.isel(subject=keep), history[keep], want[keep], last[keep]
    planned, observed = planned[keep], observed[keep]
    ids = [str(s) for s in ds["subject"].values]

    # requests: each subject's scored visits in time order, padded with NaN to the longest list
    width = int(want.sum(1).max())
    visit = np.full((len(ids), width), -1)
    for i in range(len(ids)):
        v = np.flatnonzero(want[i])
        visit[i, :len(v)] = v[np.argsort(planned[i, v])]
    pad = visit < 0
    take = np.maximum(visit, 0)

    def at_visits(a):  # (S, V, ...) -> (S, R, ...), NaN at padding
        picked = np.take_along_axis(a, take.reshape(take.shape + (1,) * (a.ndim - 2)), axis=1).astype(np.float64)
        return np.where(pad.reshape(pad.shape + (1,) * (a.ndim - 2)), np.nan, picked)

    at = at_visits(planned)
    horizon = at - last[:, None]
    values = np.where(observed[..., None], ds["biomarkers"].values, np.nan)
    measured = at_visits(values)  # held-out observations (NaN at missed visits)
    truth = at_visits(ds["truth_biomarkers"].sel(scenario="factual").values) if simulated else measured

    # the twin, conditioned on the history alone
    hist_ds = conditioned(ds, history)
    base = ds["baseline_time"].values
    requests = {s: list(base[i] + at[i][~pad[i]]) for i, s in enumerate(ids)}
    t0 = time.perf_counter()
    result = twin.forecast(hist_ds, ids, at=requests, samples=True)
    forecast_s = (time.perf_counter() - t0) / len(ids)
    assert list(result["subject"].values) == ids and np.allclose(result["time"].values - base[:, None], at,
                                                                 equal_nan=True, atol=1e-6)
    level = {round(float(q), 6): k for k, q in enumerate(result["quantile"].values)}
    q = result["quantiles"].values
    twin_mean, draws = result["mean"].values, result["samples"].values

    # baselines, from the same history
    h_times = np.where(history, planned, np.nan)
    h_values = np.where(history[..., None], values, np.nan)
    covariate = base[:, None] if lme.n_covariates else None
    # MAE is scored, so the twin's point is its median forecast (the 0.5 quantile), the point that
    # minimises the expected absolute error; its predictive mean is kept in the JSON
    preds = {"twin": q[level[0.5]], "copy_last": copy_last(h_times, h_values, at), "linear": linear(h_times, h_values, at)}
    lme_mean, lme_sd = lme.predictive(h_times, h_values, at, covariate)
    preds["LME"] = lme_mean
    preds["twin_mean"] = twin_mean

    z = lambda a: a / sd  # noqa: E731  standardised scale
    bins = _bins(horizon)
    rows = {}
    for label, pick in bins.items():
        cell = pick[..., None] & np.isfinite(truth)
        seen = pick[..., None] & np.isfinite(measured)
        row = {"n": int(cell.sum()), "n_obs": int(seen.sum()), "mae_subjects": int(cell.any(axis=(1, 2)).sum())}
        for method, p in preds.items():
            row[method] = float(np.abs(z(p - truth))[cell].mean()) if cell.any() else math.nan
        for band, (lo, hi) in {"cov50": (0.25, 0.75), "cov90": (0.05, 0.95)}.items():
            inside = (q[level[lo]] <= measured) & (measured <= q[level[hi]])
            row[band], row[f"{band}_se"], row["n_subjects"] = clustered_proportion(inside, seen)
        lme_inside = np.abs(measured - lme_mean) <= 1.6448536269514722 * lme_sd
        row["cov90_LME"] = float(lme_inside[seen].mean()) if seen.any() else math.nan
        row["crps_twin"] = float(z(crps_from_samples(draws, measured))[seen].mean()) if seen.any() else math.nan
        row["crps_LME"] = float(z(crps_gaussian(lme_mean, lme_sd, measured))[seen].mean()) if seen.any() else math.nan
        rows[label] = row
    raw = {m: [float(np.nanmean(np.abs(p - truth)[..., b])) for b in range(truth.shape[-1])] for m, p in preds.items()}
    # one band factor serves every biomarker, so each biomarker's own coverage is worth seeing
    inside = (q[level[0.05]] <= measured) & (measured <= q[level[0.95]])
    seen = np.isfinite(measured)
    per_biomarker = {"cov90": [float(inside[..., b][seen[..., b]].mean()) if seen[..., b].any() else math.nan
                               for b in range(measured.shape[-1])],
                     "n_obs": [int(seen[..., b].sum()) for b in range(measured.shape[-1])]}
    out = {"subjects": len(ids), "forecast_seconds_per_subject": forecast_s, "bins": rows, "raw_mae": raw,
           "per_biomarker": per_biomarker}
    if oracle:
        out.update(skylines(ds, history, np.where(pad, np.nan, at), horizon, values, truth, preds, sd))

    if effect:
        # A scenario replays a held-out patient, as known from all its observed visits, under another
        # schedule: the effect is scored at every planned visit of the follow-up.
        alternative = {s: list(zip(ds["alternative_event_time"].values[i], ds["alternative_event_agent"].values[i],
                                   ds["alternative_event_dose"].values[i])) for i, s in enumerate(ids)}
        every = {s: list(base[i] + planned[i][np.isfinite(planned[i])]) for i, s in enumerate(ids)}
        t0 = time.perf_counter()
        arms = twin.simulate(ds, {"alternative": alternative}, ids, at=every)
        simulate_s = (time.perf_counter() - t0) / len(ids)
        predicted = z(-arms["effect_mean"].sel(arm="alternative").values)  # factual - alternative
        n = predicted.shape[1]
        tb = ds["truth_biomarkers"].values  # (scenario, S, V, B), planned visits first and in time order
        true_effect = z((tb[0] - tb[2])[:, :n])
        true_effect = np.where(np.isfinite(predicted), true_effect, np.nan)
        cell = np.isfinite(true_effect)
        strong = cell & (np.abs(true_effect) > NEGLIGIBLE)
        out["effect"] = {"simulate_seconds_per_subject": simulate_s}
        for scope, pick in (("all", cell), ("non-negligible", strong)):
            twin_err = float(np.abs(predicted - true_effect)[pick].mean()) if pick.any() else math.nan
            ignore_err = float(np.abs(true_effect)[pick].mean()) if pick.any() else math.nan
            out["effect"][scope] = {"n": int(pick.sum()), "twin": twin_err, "ignore_treatment": ignore_err,
                                    "ratio": twin_err / ignore_err if ignore_err > 0 else math.nan}
    return out


def skylines(ds, history: np.ndarray, at: np.ndarray, horizon: np.ndarray, values: np.ndarray, truth: np.ndarray,
             preds: dict[str, np.ndarray], sd: np.ndarray) -> dict:
    """The atrophy score's Bayes-optimal forecast from the simulator's own model (bench/atrophy_oracle.py),
    and every biomarker's skyline, on a seeded subset of at most ORACLE_SUBJECTS subjects.

    at, horizon, truth and preds (S, R, ...) are at each subject's requested times (NaN = padding);
    values (S, V, B) are the measured values at the planned visits."""
    from atrophy_oracle import SCORE, level_oracle, score_oracle

    n = len(ds["subject"])
    sub = np.sort(np.random.default_rng(0).choice(n, size=min(n, ORACLE_SUBJECTS), replace=False))
    ds = ds.isel(subject=sub)
    history, at, horizon, values, truth = history[sub], at[sub], horizon[sub], values[sub], truth[sub]
    preds = {m: p[sub] for m, p in preds.items()}
    t0 = time.perf_counter()
    b = [str(v) for v in ds["biomarker"].values].index(SCORE)
    cell = (horizon >= LONG) & np.isfinite(truth[..., b])
    best = score_oracle(ds, history, at, seed=0)
    out = {"oracle": {"subjects": len(sub), "n": int(cell.sum()), "seconds": time.perf_counter() - t0,
                      "biomarker": SCORE, "oracle": float(np.abs(best - truth[..., b])[cell].mean()),
                      **{m: float(np.abs(p[..., b] - truth[..., b])[cell].mean()) for m, p in preds.items()}}}
    # every biomarker: the score's Bayes-optimal forecast, each volume's noise-free course placed
    # by its history's measurements; pooled like the headline MAE
    truth_all = ds["truth_biomarkers"].sel(scenario="factual").values
    in_history = history[..., None] & np.isfinite(values)
    skyline = level_oracle(np.where(in_history, truth_all, np.nan), np.where(in_history, values, np.nan), truth)
    skyline[..., b] = best
    long = (horizon >= LONG)[..., None] & np.isfinite(truth)
    every = {"skyline": skyline, **preds}
    out["skyline"] = {"subjects": len(sub), "n": int(long.sum()),
                      **{m: float(np.abs((p - truth) / sd)[long].mean()) for m, p in every.items()},
                      "per_biomarker": {m: [float(np.abs((p - truth) / sd)[..., k][long[..., k]].mean())
                                            for k in range(truth.shape[-1])] for m, p in every.items()}}
    return out


def _bins(horizon: np.ndarray) -> dict[str, np.ndarray]:
    """Horizon bins of `EDGES`, then ">= 1 y" and "all" (pooled), as (S, R) masks."""
    out = {label: (horizon >= lo) & (horizon < hi) for label, lo, hi in zip(_labels(), EDGES[:-1], EDGES[1:])}
    out[f">= {LONG:g} y"] = horizon >= LONG
    out["all"] = horizon >= 0
    return out


def _labels() -> list[str]:
    return [f"[{lo:g}, {hi:g})" for lo, hi in zip(EDGES[:-1], EDGES[1:])]


# ---- printing ----------------------------------------------------------------------------------

def print_split(res: dict, biomarkers: list[str], units: list[str]) -> None:
    print(f"{res['subjects']} subjects; twin forecast {res['forecast_seconds_per_subject'] * 1000:.0f} ms/subject "
          f"(posterior + draws)")
    print(f"{'horizon':>10} {'n':>5} {'twin':>6} {'copy':>6} {'linear':>6} {'LME':>6} {'tw/copy':>7} "
          f"{'n obs':>5} {'subj':>4} {'cov50':>5} {'cov90':>5} {'se90':>5} {'LME90':>5} {'CRPS tw':>7} {'CRPS LME':>8}")
    for label, r in res["bins"].items():
        ratio = r["twin"] / r["copy_last"] if r["copy_last"] > 0 else math.nan
        print(f"{label:>10} {r['n']:>5} {r['twin']:>6.3f} {r['copy_last']:>6.3f} {r['linear']:>6.3f} {r['LME']:>6.3f} "
              f"{ratio:>7.2f} {r['n_obs']:>5} {r['n_subjects']:>4} {r['cov50']:>5.2f} {r['cov90']:>5.2f} "
              f"{r['cov90_se']:>5.3f} {r['cov90_LME']:>5.2f} {r['crps_twin']:>7.3f} {r['crps_LME']:>8.3f}")
    print("raw MAE per biomarker and the twin's 90% band coverage (all horizons):")
    print(f"  {'biomarker':<26} {'unit':<7} {'twin':>9} {'copy':>9} {'linear':>9} {'LME':>9} {'n obs':>5} {'cov90':>5}")
    per = res["per_biomarker"]
    for b, (name, unit) in enumerate(zip(biomarkers, units)):
        print(f"  {name:<26} {unit:<7} " + " ".join(f"{res['raw_mae'][m][b]:>9.4g}" for m in ("twin", "copy_last", "linear", "LME"))
              + f" {per['n_obs'][b]:>5} {per['cov90'][b]:>5.2f}")
    if "oracle" in res:
        o = res["oracle"]
        print(f"{o['biomarker']} >= {LONG:g} y ahead, MAE in points ({o['subjects']} subjects, n={o['n']}): "
              f"Bayes-optimal from its own history and the simulator's "
              f"model {o['oracle']:.2f} ({o['oracle'] / o['copy_last']:.2f}x copy-last), twin {o['twin']:.2f} "
              f"({o['twin'] / o['copy_last']:.2f}x), copy-last {o['copy_last']:.2f}, LME {o['LME']:.2f} "
              f"[{o['seconds']:.0f} s]")
    if "skyline" in res:
        k = res["skyline"]
        copy = k["copy_last"]
        print(f"all biomarkers >= {LONG:g} y ahead, standardised MAE (same subjects, n={k['n']}): skyline {k['skyline']:.3f} "
              f"({k['skyline'] / copy:.2f}x copy-last; the score's Bayes-optimal forecast, each volume's true course "
              f"placed by its measured history), twin {k['twin']:.3f} ({k['twin'] / copy:.2f}x), copy-last {copy:.3f}")
        per = k["per_biomarker"]
        print("  per biomarker, x copy-last:  " + ", ".join(
            f"{name} skyline {s / c:.2f} twin {t / c:.2f}"
            for name, s, t, c in zip(biomarkers, per["skyline"], per["twin"], per["copy_last"])))
    if "effect" in res:
        e = res["effect"]
        print(f"treatment effect (factual - alternative), standardised MAE; twin simulate "
              f"{e['simulate_seconds_per_subject'] * 1000:.0f} ms/subject:")
        for scope in ("all", "non-negligible"):
            s = e[scope]
            print(f"  {scope:<15} n={s['n']:<5} twin {s['twin']:.3f}  ignore-treatment {s['ignore_treatment']:.3f}  "
                  f"ratio {s['ratio']:.2f}" + (f"  (|true effect| > {NEGLIGIBLE} SD)" if scope != "all" else ""))
    print(flush=True)


def done_when(cohorts: dict) -> list[dict]:
    """Each criterion of the issue per cohort and split: the numbers and whether it is met."""
    checks = []

    def add(text, numbers, met, **extra):
        checks.append({"criterion": text, "numbers": numbers, "met": met, **extra})

    for name, c in cohorts.items():
        simulated = "effect" in c["A"]
        for key in ("A", "B"):
            bins = c[key]["bins"]
            if simulated:
                r = bins[f">= {LONG:g} y"]
                if r["n"] < MIN_BIN:
                    add(f"{name}/{key}: MAE >= {LONG:g} y ahead <= 0.5 x copy-last, < linear, < LME",
                        f"{r['n']} (< {MIN_BIN}) held-out values >= {LONG:g} y ahead, of {r['mae_subjects']} "
                        f"subjects; all horizons: twin "
                        f"{bins['all']['twin']:.3f}, copy {bins['all']['copy_last']:.3f}, linear "
                        f"{bins['all']['linear']:.3f}, LME {bins['all']['LME']:.3f}", None)
                else:
                    add(f"{name}/{key}: MAE >= {LONG:g} y ahead <= 0.5 x copy-last, < linear, < LME",
                        f"twin {r['twin']:.3f} vs 0.5 x copy {0.5 * r['copy_last']:.3f}, linear {r['linear']:.3f}, "
                        f"LME {r['LME']:.3f} (n={r['n']}, {r['mae_subjects']} subjects)",
                        r["twin"] <= 0.5 * r["copy_last"] and r["twin"] < r["linear"] and r["twin"] < r["LME"])
            else:
                r = bins["all"]
                add(f"{name}/{key}: MAE < copy-last, linear and LME",
                    f"twin {r['twin']:.3f} vs copy {r['copy_last']:.3f}, linear {r['linear']:.3f}, LME {r['LME']:.3f}",
                    r["twin"] < min(r["copy_last"], r["linear"], r["LME"]))
        for key in ("A", "B"):
            judged = {k: r for k, r in c[key]["bins"].items() if k in _labels() and r["n_obs"] >= MIN_BIN}
            small = [k for k, r in c[key]["bins"].items() if k in _labels() and 0 < r["n_obs"] < MIN_BIN]
            text = ", ".join(f"{k} {r['cov90']:.3f} (se {r['cov90_se']:.3f})" for k, r in judged.items())
            chance = _chance_a_bin_out(judged.values())
            add(f"{name}/{key}: 90% band covers 85-95% of held-out observations in every horizon bin",
                text + (f"; not judged (< {MIN_BIN} obs): {', '.join(small)}" if small else "")
                + (f"; bands holding exactly 90% would put one of these bins outside with chance {chance:.2f}"
                   if judged else ""),
                all(0.85 <= r["cov90"] <= 0.95 for r in judged.values()) if judged else None,
                chance_if_calibrated=chance)
        if simulated:
            for scope in ("all", "non-negligible"):
                e = c["A"]["effect"][scope]
                add(f"{name}/A: treatment-effect error <= 0.5 x ignoring treatment ({scope})",
                    f"twin {e['twin']:.3f} vs 0.5 x {e['ignore_treatment']:.3f} = {0.5 * e['ignore_treatment']:.3f} "
                    f"(n={e['n']})", e["twin"] <= 0.5 * e["ignore_treatment"] if e["n"] else None)
    print("\nDone-when (held-out data):")
    for c in checks:
        verdict = "n/a" if c["met"] is None else ("met" if c["met"] else "NOT met")
        print(f"  [{verdict:>7}] {c['criterion']}: {c['numbers']}")
    return checks


def _chance_a_bin_out(bins) -> float:
    """The chance that bands holding exactly 90% leave at least one of these bins outside 85-95%,
    from the held-out subjects alone (each bin's error by subject; where every reading was inside,
    that error is 0 and a subject-level binomial's stands in). The calibration's own randomness
    comes on top, so a verdict is worth less than this says."""
    from twin.metrics import chance_outside

    inside = 1.0
    for r in bins:
        se = r["cov90_se"] if r["cov90_se"] > 0 else math.sqrt(0.9 * 0.1 / r["n_subjects"])
        inside *= 1.0 - chance_outside(0.9, se, 0.85, 0.95)
    return 1.0 - inside


def _commit() -> str:
    """The checkout's commit, "-dirty" if its code has changes ("unknown" outside git): what a run measured."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _json(v):
    return v.item() if hasattr(v, "item") else str(v)


if __name__ == "__main__":
    main()
