"""`twin evaluate` on simulated and imported cohorts: the trust issue's done-when figures.

    python bench/evaluate_bench.py [--cohorts atrophy,glioma,leaspy] [--subjects 64] [--seed 3] [--quick]
                                   [--out DIR]

Cohorts: `atrophy` and `glioma` simulated in 2D, 64 x 64 (`--subjects` each, seed `--seed`, the
simulators' default protocols), each trained as a scan twin (default ScanConfig) on 75% of its
subjects (`holdout_subjects`, seed `--seed`) and evaluated on the rest against the noise-free
truth; and leaspy's `alzheimer` table (tests/data/leaspy/alzheimer.csv, imported with
`twin.data.import_table`, 200 subjects), a biomarker twin trained on 75% and evaluated against
the held-out observations. Each evaluation's metrics.json and report.html are written to
`--out` (default ./evaluate-bench).

Printed per cohort: forecast and fill errors per horizon for the twin and the baselines (change
RMSE for scans, biomarker MAE in SDs), band coverage at 50/80/90/95% after recalibration and of
the raw draws, feature distances, hallucination detection and false alarms per corruption, the
scenario effect error, and times; then each done-when criterion of the trust issue, met or not.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

LEASPY = Path(__file__).resolve().parents[1] / "tests" / "data" / "leaspy" / "alzheimer.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohorts", default="atrophy,glioma,leaspy")
    parser.add_argument("--subjects", type=int, default=None, help="per simulated cohort (default 64; --quick 20)")
    # seed 3: the plausibility checks were developed on seed-0 cohorts, and their thresholds' design
    # settled while looking at seeds 1 and 2; the default scores them on cohorts none of that has seen
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--out", type=Path, default=Path("evaluate-bench"))
    args = parser.parse_args()

    import torch

    subjects = args.subjects or (20 if args.quick else 64)
    print(f"evaluate bench: seed {args.seed}, {platform.processor() or platform.machine()}, "
          f"torch threads {torch.get_num_threads()}")
    results = {name: run(name, subjects, args.seed, args.quick, args.out / name) for name in args.cohorts.split(",")}
    criteria(results)


def run(name: str, n: int, seed: int, quick: bool, out: Path) -> dict:
    from twin import BiomarkerTwin, ScanConfig, ScanTwin, TwinConfig
    from twin.evaluation import evaluate
    from twin.evaluation_report import write_evaluation
    from twin.metrics import holdout_subjects
    from twin.scan_decoder import DecoderConfig

    t0 = time.perf_counter()
    if name == "leaspy":
        from twin.data import import_table

        ds = import_table(LEASPY)
    else:
        from twin.data.simulate import simulate_cohort

        ds = simulate_cohort(name, n, 2, seed, progress=False)
    held = holdout_subjects([str(s) for s in ds["subject"].values], 0.25, seed)
    train = ds.isel(subject=np.flatnonzero(~held))
    print(f"\n[{name}] {ds.sizes['subject']} subjects ({time.perf_counter() - t0:.0f} s to make); training on "
          f"{int((~held).sum())}, evaluating {int(held.sum())}")
    dynamics = TwinConfig(iterations=150 if quick else 600)
    t0 = time.perf_counter()
    if name == "leaspy":
        twin = BiomarkerTwin.fit(train, dynamics, progress=False)
    else:
        config = ScanConfig(dynamics=dynamics, decoder=DecoderConfig(basis_iterations=200 if quick else 1000,
                                                                     iterations=200 if quick else 1500))
        twin = ScanTwin.fit(train, config, progress=False)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = evaluate(twin, ds, seed=seed, progress=False)
    eval_s = time.perf_counter() - t0
    write_evaluation(ev, out, overwrite=True)
    m = ev.metrics
    print(f"fit {fit_s:.0f} s, evaluate {eval_s:.0f} s; wrote {out}/metrics.json and report.html; "
          f"scored against the {m['target']}")
    show(m)
    return m


def show(m: dict) -> None:
    scans = "data_range" in m
    metric = "change_rmse" if scans else "biomarker_mae_sd"
    methods = ("twin", "copy_last", "linear") + (() if scans else ("mixed_effects",))
    for task in ("forecast", "fill"):
        print(f"  {task}: {metric} per horizon (years, up to)" + ("; SSIM; 90% voxel coverage of the target" if scans else
                                                              "; 90% band coverage of held-out observations"))
        for key, cell in m[task].items():
            values = " ".join(f"{x} {cell[x][metric]:.4f}" for x in methods if cell.get(x, {}).get(metric) is not None)
            extra = (f"  SSIM twin {cell['twin']['ssim']:.3f} copy {cell['copy_last']['ssim']:.3f}  "
                     f"cov90 {cell['twin']['coverage_90']:.3f}") if scans else \
                f"  cov90 {cell['twin']['biomarker_coverage_90']:.3f}"
            print(f"    <= {key:>4} n {cell['n']:3d}  {values}{extra}")
    cal = m["calibration"]
    for kind in ("voxel", "biomarker", "volume"):
        if kind in cal:
            c = cal[kind]
            line = " ".join(f"{v}% {c[f'coverage_{v}']:.3f}" for v in (50, 80, 90, 95))
            raw = (" | raw draws " + " ".join(f"{v}% {c['raw'][f'coverage_{v}']:.3f}" for v in (50, 80, 90, 95))
                   if "raw" in c else "")
            truth = (" | vs truth 90% " + f"{c['against_truth']['coverage_90']:.3f}" if "against_truth" in c else "")
            print(f"  {kind} bands (vs held-out observations): {line}{raw}{truth}"
                  + (f"; CRPS {c['crps']:.4f}" if "crps" in c else ""))
    if "feature" in m:
        f = m["feature"]
        print(f"  features: Frechet twin {f['frechet']:.2f} (copy-last {f['copy_last']['frechet']:.2f}), KID twin "
              f"{f['kid']:.3f} (copy-last {f['copy_last']['kid']:.3f}), MS-SSIM between draws {f['ms_ssim_diversity']:.3f}")
    if "hallucination" in m:
        h = m["hallucination"]
        print(f"  hallucination: {h['outputs']} honest outputs; detection {h['detection_rate']:.3f} ("
              + ", ".join(f"{k} {v:.3f}" for k, v in h["by_corruption"].items())
              + f"); false alarms {h['false_alarm_rate']:.3f}")
        print("    per check (honest flagged / newly flagged per corruption): " + "; ".join(
            f"{c} {v['honest']}/" + "/".join(str(v[k]) for k in h["by_corruption"]) for c, v in h["by_check"].items()))
    if m.get("scenario"):
        s = m["scenario"]
        print(f"  scenario effect error {s['effect_error']:.3f} SD vs ignoring treatment "
              f"{s['effect_error_ignore_treatment']:.3f} SD ({s['n']} values)")


def criteria(results: dict) -> None:
    print("\ndone-when (trust issue; held-out patients):")
    for name, m in results.items():
        c90 = m["calibration"]["coverage_90"]
        print(f"  {name:8s} {'MET ' if 0.85 <= c90 <= 0.95 else 'NOT '} stated 90% bands ({m['calibration']['values']}) "
              f"cover {c90:.3f} in [0.85, 0.95]")
        if "biomarker" in m["calibration"] and m["calibration"]["values"] != "biomarker":
            b90 = m["calibration"]["biomarker"]["coverage_90"]
            print(f"  {name:8s} {'MET ' if 0.85 <= b90 <= 0.95 else 'NOT '} biomarker 90% bands cover {b90:.3f} in "
                  f"[0.85, 0.95]")
        if "hallucination" in m:
            h = m["hallucination"]
            print(f"  {name:8s} {'MET ' if h['detection_rate'] >= 0.9 else 'NOT '} detection {h['detection_rate']:.3f} "
                  f">= 0.90")
            print(f"  {name:8s} {'MET ' if h['false_alarm_rate'] <= 0.1 else 'NOT '} false alarms "
                  f"{h['false_alarm_rate']:.3f} <= 0.10")


if __name__ == "__main__":
    main()
