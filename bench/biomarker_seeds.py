"""The biomarker benchmark's criteria over several seeds at once: each run's verdicts, then the pooled ones.

    python bench/biomarker_seeds.py RUN.json [RUN.json ...]

Each RUN.json is written by `bench/biomarker_bench.py --seed S --json RUN.json`, one seed per
file, all with the same settings otherwise. A seed draws its own simulated cohorts, held-out
subjects and fits, so the runs are independent replications, and a horizon bin pooled over them
estimates the same coverage (or error) from all their held-out subjects together. One run's bin
can hold few subjects: atrophy's split-B bin under half a year holds about 30 of 1000 (visits
less than half a year apart come from the schedule's jitter), leaspy's bins 11-34; there a
band holding exactly 90% lands outside 85-95% with a chance of 0.1-0.2 per bin, so a single
run's verdict on such a bin says little (the benchmark prints that chance with each verdict).

Pooled, per cohort, split and bin: coverage = all hits / all readings, its error by subject
sqrt(sum_s (se_s n_s)^2) / sum_s n_s (independent runs); MAE and the treatment effect's error =
the mean over all their values. Leaspy's table is the same 200 subjects in every run (a seed
picks split A's held-out fifth and the fits), so its runs are not independent: its subjects
count once and its error is sum_s se_s n_s / sum_s n_s, the bound for runs that miss together.
Each cohort pools the runs that hold it (glioma's runs may be separate files). The verdicts are
the benchmark's own (`done_when`) on the pooled numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from biomarker_bench import done_when  # noqa: E402  the benchmark's criteria, applied to the pooled runs

METHODS = ("twin", "copy_last", "linear", "LME")
MARK = {True: "met", False: "NOT", None: "n/a", "missing": "-"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files of bench/biomarker_bench.py, one seed each")
    args = parser.parse_args()
    runs = [load(path) for path in args.runs]
    seeds = [r["config"]["seed"] for r in runs]
    names = list(dict.fromkeys(n for r in runs for n in r["cohorts"]))
    held = {n: [s for s, r in zip(seeds, runs) if n in r["cohorts"]] for n in names}
    for name, held_by in held.items():
        if len(set(held_by)) < len(held_by):
            sys.exit(f"error: {name}: seed given twice among {held_by}: a run pooled twice would count its "
                     f"subjects twice")
        sizes = {r["cohorts"][name].get("subjects") for r in runs if name in r["cohorts"]}
        if len(sizes) > 1:
            sys.exit(f"error: {name}: the runs hold cohorts of different sizes {sorted(sizes)}; pool runs of one size")
    settings = {json.dumps({k: v for k, v in r["config"].items() if k != "seed"}, sort_keys=True) for r in runs}
    if len(settings) > 1:
        sys.exit("error: the runs differ in their twin's settings beyond the seed; pool runs of one configuration")

    commits = [r.get("commit", "unknown") for r in runs]
    print("runs: " + ", ".join(f"{path.name} (seed {s}, commit {c})" for path, s, c in zip(args.runs, seeds, commits)))
    if len(set(commits)) > 1 or any(c == "unknown" or c.endswith("-dirty") for c in commits):
        print("warning: not every run is of one clean commit; the pooled numbers mix what each measured")
    print("Each run's verdicts, by seed:")
    for name in names:
        verdicts = [{c["criterion"]: c["met"] for c in r["done_when"]} for r in runs if name in r["cohorts"]]
        print(f"  {name}: seeds {' '.join(f'{s:>3}' for s in held[name])}")
        for criterion in dict.fromkeys(k for v in verdicts for k in v if k.startswith(f"{name}/")):
            marks = " ".join(f"{MARK[v.get(criterion, 'missing')]:>3}" for v in verdicts)
            print(f"  {' ' * len(name)}        {marks}  {criterion[len(name) + 1:]}")
    print("\nPooled: " + "; ".join(f"{n} over seeds {', '.join(map(str, held[n]))}" for n in names), end="")
    done_when({n: pool([r["cohorts"][n] for r in runs if n in r["cohorts"]]) for n in names})


def load(path: Path) -> dict:
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        sys.exit(f"error: {path}: {err}")
    if not (isinstance(run, dict) and {"config", "cohorts", "done_when"} <= run.keys() and "seed" in run["config"]):
        sys.exit(f"error: {path}: not a JSON written by bench/biomarker_bench.py --json (needs config.seed, "
                 f"cohorts, done_when)")
    return run


def pool(cohorts: list[dict]) -> dict:
    """One cohort's results over runs -> the same structure, every bin and effect pooled.

    A simulated cohort (scored with a treatment effect) is drawn afresh by each seed; a table
    (leaspy's) is the same subjects in every run, so its runs are not independent."""
    shared = "effect" not in cohorts[0]["A"]
    out = {}
    for key in ("A", "B"):
        splits = [c[key] for c in cohorts]
        labels = [label for label in splits[0]["bins"] if all(label in s["bins"] for s in splits)]
        out[key] = {"bins": {label: pool_bin([s["bins"][label] for s in splits], shared=shared) for label in labels}}
        if all("effect" in s for s in splits):
            out[key]["effect"] = {scope: pool_effect([s["effect"][scope] for s in splits])
                                  for scope in ("all", "non-negligible")}
    return out


def pool_bin(rows: list[dict], *, shared: bool = False) -> dict:
    """One bin's rows over runs -> one row. shared: the runs score the same subjects (a table), so
    the subjects count once and the error is the bound for runs that miss together."""
    n, n_obs = sum(r["n"] for r in rows), sum(r["n_obs"] for r in rows)
    count = max if shared else sum
    out = {"n": n, "n_obs": n_obs, "n_subjects": count(r["n_subjects"] for r in rows),
           "mae_subjects": count(r.get("mae_subjects", 0) for r in rows)}
    for m in METHODS:  # each run's mean over its n values, weighted back to sums
        out[m] = sum(r[m] * r["n"] for r in rows if r["n"]) / n if n else math.nan
    seen = [r for r in rows if r["n_obs"]]
    # hits = cov90 n_obs in each run. Independent runs: the variances of their hit totals add;
    # shared subjects: their standard deviations do (the most two runs can vary together). A run
    # of one subject has no error estimate and adds none.
    hits = sum(r["cov90"] * r["n_obs"] for r in seen)
    sd = [r["cov90_se"] * r["n_obs"] for r in seen if not math.isnan(r["cov90_se"])]
    total_sd = sum(sd) if shared else math.sqrt(sum(v * v for v in sd))
    out["cov90"], out["cov90_se"] = (hits / n_obs, total_sd / n_obs) if n_obs else (math.nan, math.nan)
    return out


def pool_effect(rows: list[dict]) -> dict:
    n = sum(r["n"] for r in rows)
    return {"n": n, **{m: sum(r[m] * r["n"] for r in rows if r["n"]) / n if n else math.nan
                       for m in ("twin", "ignore_treatment")}}


if __name__ == "__main__":
    main()
