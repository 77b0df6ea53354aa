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
sqrt(sum_s (se_s n_s)^2) / sum_s n_s (the runs are independent); MAE and the treatment effect's
error = the mean over all their values. The verdicts are the benchmark's own (`done_when`) on
the pooled numbers.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files of bench/biomarker_bench.py, one seed each")
    args = parser.parse_args()
    runs = [load(path) for path in args.runs]
    seeds = [r["config"]["seed"] for r in runs]
    if len(set(seeds)) < len(seeds):
        sys.exit(f"error: seed given twice among {seeds}: a run pooled twice would count its subjects twice")
    settings = {json.dumps({k: v for k, v in r["config"].items() if k != "seed"}, sort_keys=True) for r in runs}
    if len(settings) > 1:
        sys.exit("error: the runs differ in their twin's settings beyond the seed; pool runs of one configuration")

    commits = [r.get("commit", "unknown") for r in runs]
    print("commits: " + ", ".join(f"seed {s} {c}" for s, c in zip(seeds, commits)))
    if len(set(commits)) > 1 or any(c == "unknown" or c.endswith("-dirty") for c in commits):
        print("warning: not every run is of one clean commit; the pooled numbers mix what each measured")
    print("Each run's verdicts (seeds " + ", ".join(map(str, seeds)) + "):")
    verdicts = [{c["criterion"]: c["met"] for c in r["done_when"]} for r in runs]
    for criterion in dict.fromkeys(k for v in verdicts for k in v):
        marks = " ".join({True: "met", False: "NOT", None: "n/a"}[v[criterion]] if criterion in v else "-"
                         for v in verdicts)
        print(f"  {marks}  {criterion}")
    names = [n for n in runs[0]["cohorts"] if all(n in r["cohorts"] for r in runs)]
    print(f"\nPooled over seeds {', '.join(map(str, seeds))} ({', '.join(names)}):", end="")
    done_when({n: pool([r["cohorts"][n] for r in runs]) for n in names})


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
    """One cohort's results over runs -> the same structure, every bin and effect pooled."""
    out = {}
    for key in ("A", "B"):
        splits = [c[key] for c in cohorts]
        labels = [label for label in splits[0]["bins"] if all(label in s["bins"] for s in splits)]
        out[key] = {"bins": {label: pool_bin([s["bins"][label] for s in splits]) for label in labels}}
        if all("effect" in s for s in splits):
            out[key]["effect"] = {scope: pool_effect([s["effect"][scope] for s in splits])
                                  for scope in ("all", "non-negligible")}
    return out


def pool_bin(rows: list[dict]) -> dict:
    n, n_obs = sum(r["n"] for r in rows), sum(r["n_obs"] for r in rows)
    out = {"n": n, "n_obs": n_obs, "n_subjects": sum(r["n_subjects"] for r in rows),
           "mae_subjects": sum(r.get("mae_subjects", 0) for r in rows)}
    for m in METHODS:  # each run's mean over its n values, weighted back to sums
        out[m] = sum(r[m] * r["n"] for r in rows if r["n"]) / n if n else math.nan
    seen = [r for r in rows if r["n_obs"]]
    # hits = cov90 n_obs in each run; the runs are independent, so the variances of their hit
    # totals add (a run of one subject has no error estimate and adds none)
    hits = sum(r["cov90"] * r["n_obs"] for r in seen)
    variance = sum((r["cov90_se"] * r["n_obs"]) ** 2 for r in seen if not math.isnan(r["cov90_se"]))
    out["cov90"], out["cov90_se"] = (hits / n_obs, math.sqrt(variance) / n_obs) if n_obs else (math.nan, math.nan)
    return out


def pool_effect(rows: list[dict]) -> dict:
    n = sum(r["n"] for r in rows)
    return {"n": n, **{m: sum(r[m] * r["n"] for r in rows if r["n"]) / n if n else math.nan
                       for m in ("twin", "ignore_treatment")}}


if __name__ == "__main__":
    main()
