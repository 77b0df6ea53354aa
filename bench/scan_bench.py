"""How well the scan twin forecasts and fills held-out scans, against copy-last and voxelwise linear baselines.

    python bench/scan_bench.py [--cohorts atrophy,glioma] [--subjects 80] [--seed 0] [--quick] [--json PATH]

Cohorts: `atrophy` and `glioma` simulated in 2D, 64 x 64 (`--subjects` each, seed `--seed`;
atrophy's protocol visits at 0, 0.5, 1, 2, 3, 4 years; glioma every 0.2 years to 2.4 years, as
in bench/biomarker_bench.py). A quarter of the subjects (`holdout_subjects`) are held out; the
twin (`ScanTwin.fit`, default config: it keeps 20% of its training subjects apart to calibrate
its bands) trains on every observed visit of the others.

Two tasks on the held-out subjects:

    forecast  each subject is conditioned on its observed visits up to `CUT` years (atrophy 1.5,
              glioma 1.0) and forecast at every later planned visit, missed ones included.
              Baselines: copy the last observed scan; voxelwise linear extrapolation through
              the last two observed scans.
    fill      the middle observed visit of each subject with observed visits on both sides is
              removed and filled from all the others. Baselines: copy the nearest observed scan;
              voxelwise linear interpolation between the neighbouring observed scans.

Every score is against the simulator's noise-free truth (`truth_image`, factual), inside the
brain mask:

    change     RMSE of the predicted change against the true change since the reference visit
               (the observed scan a prediction starts from: the last one for a forecast, the
               nearest one for a fill), each measured from its own image of that visit:
               (pred - observed_ref) - (truth_t - truth_ref). The acquisition noise of the
               reference cancels, so this scores change and nothing else; copy-last scores the
               RMS of the true change. Reported absolute and relative to copy-last (per target,
               then averaged).
    MSE, PSNR, SSIM    of the predicted scan against truth_t; data range R = the 99.9th
               percentile of the cohort's truth intensities inside the brain (printed).
    volume     |V(pred) - V(truth_t)| per structure, both measured by `twin.segment` (the
               same measurement on both sides), mL.
    coverage   share of brain voxels of truth_t inside the twin's 90% voxel band, and of
               truth volumes inside the 90% volume bands.
    time       seconds per patient and time point of drawing the scans (default 16 draws,
               20 DPM-Solver++ steps), single process on this machine.

A fourth row, `skyline`, applies the simulator's true change to the observed reference scan,
obs_ref + (truth_t - truth_ref): no method that starts from one observed scan can beat its
volume error or SSIM, as it keeps exactly that scan's acquisition noise, bias and head position
(its change RMSE is 0 by construction). Where its volume error is above 0.5x the baseline's,
or its SSIM below the baseline's, that criterion cannot be met by predicting change alone.

Horizon = years from the reference visit. A final block prints each done-when criterion of the
scan issue at horizons of a year or more, the numbers behind it and whether it is met.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

CUT = {"atrophy": 1.5, "glioma": 1.0}
LONG = 1.0  # years: the done-when horizon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohorts", default="atrophy,glioma")
    parser.add_argument("--subjects", type=int, default=None, help="per cohort (default 80; --quick 24)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--factor", type=int, default=None, help="image voxels per change-code cell (default DecoderConfig's)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    subjects = args.subjects or (24 if args.quick else 80)
    print(f"scan bench: {subjects} subjects per cohort, seed {args.seed}, {platform.processor() or platform.machine()}, "
          f"torch threads {torch.get_num_threads()}")
    out = {}
    for name in args.cohorts.split(","):
        out[name] = run_cohort(name, subjects, args.seed, args.quick, args.factor)
    criteria(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))


def simulate(name: str, n: int, seed: int):
    from twin.data.simulate import simulate_cohort

    config = None
    if name == "glioma":
        from twin.data.glioma import GliomaConfig

        config = GliomaConfig(n_visits=13)
    return simulate_cohort(name, n, 2, seed, config=config, progress=False)


def run_cohort(name: str, n: int, seed: int, quick: bool, factor: int | None = None) -> dict:
    from twin import ScanConfig, ScanTwin, TwinConfig
    from twin.metrics import holdout_subjects
    from twin.scan_decoder import DecoderConfig

    t0 = time.perf_counter()
    ds = simulate(name, n, seed)
    ids = [str(s) for s in ds["subject"].values]
    test = holdout_subjects(ids, 0.25, seed)
    train = ds.isel(subject=np.flatnonzero(~test))
    held = ds.isel(subject=np.flatnonzero(test))
    print(f"\n[{name}] {n} subjects simulated in {time.perf_counter() - t0:.0f} s; training on {int((~test).sum())}, "
          f"{int(train['observed'].sum())} observed visits; {int(test.sum())} held out")
    config = ScanConfig(dynamics=TwinConfig(iterations=200 if quick else 600),
                        decoder=DecoderConfig(basis_iterations=300 if quick else 1000,
                                              iterations=300 if quick else 1500,
                                              **({"factor": factor} if factor else {})))
    t0 = time.perf_counter()
    twin = ScanTwin.fit(train, config, progress=False)
    fit_s = time.perf_counter() - t0
    print(f"fit: {fit_s:.0f} s; decoder: {twin.record}; shrink {twin.calibration['shrink']}")
    truth = ds["truth_image"].sel(scenario="factual").values[np.flatnonzero(test)]  # (S, V, C, y, x)
    inside = held["mask"].values.astype(bool)
    R = float(np.percentile(truth[np.broadcast_to(inside[:, None, None], truth.shape)], 99.9))
    print(f"data range R = {R:.3f} (99.9th percentile of truth intensities in the brain)")
    result = {"fit_s": fit_s, "data_range": R, "record": twin.record}
    for task in ("forecast", "fill"):
        result[task] = run_task(task, twin, held, truth, R, CUT[name])
    return result


def run_task(task: str, twin, held, truth: np.ndarray, R: float, cut: float) -> dict:
    """Predict the task's targets with the twin and the baselines; score them (see the module notes)."""
    from twin.image_metrics import psnr, ssim

    times = held["time"].values
    observed = held["observed"].values & np.isfinite(held["image"].values).reshape(*times.shape, -1).all(-1)
    base = held["baseline_time"].values
    history, targets = observed.copy(), {}
    for s, subject in enumerate(map(str, held["subject"].values)):
        if task == "forecast":
            history[s] = observed[s] & (times[s] <= cut)
            later = np.flatnonzero(np.isfinite(times[s]) & (times[s] > cut))
            if history[s].sum() >= 2 and later.size:
                targets[subject] = later
        else:
            v = np.flatnonzero(observed[s])
            if v.size >= 3:
                middle = v[v.size // 2]
                history[s, middle] = False
                targets[subject] = np.asarray([middle])
    cohort = _conditioned(held, history)
    at = {s: [float(base[i] + times[i, v]) for v in targets[s]] for i, s in enumerate(map(str, held["subject"].values))
          if s in targets}
    t0 = time.perf_counter()
    answer = (twin.forecast(cohort, list(at), at=at) if task == "forecast" else twin.fill(cohort, list(at), at=at))
    n_points = int(np.isfinite(answer["time"].values).sum())
    per_point = (time.perf_counter() - t0) / max(n_points, 1)

    rows = []  # one per target: horizon and scores per method
    image = held["image"].values
    idx = {s: i for i, s in enumerate(map(str, held["subject"].values))}
    structures = [str(s) for s in answer["structure"].values]
    from twin.scan_twin import _measured

    for a, subject in enumerate(map(str, answer["subject"].values)):
        i = idx[subject]
        mask = held["mask"].values[i].astype(bool)
        h_t = np.where(history[i], times[i], np.nan)
        for r, v in enumerate(targets[subject]):
            t = times[i, v]
            ref_t = float(answer["reference_time"].values[a, r] - base[i])
            ref_v = int(np.nanargmin(np.abs(h_t - ref_t)))
            obs_ref, truth_t, truth_ref = image[i, ref_v], truth[i, v], truth[i, ref_v]
            preds = {"twin": answer["scan_mean"].values[a, r], "copy_last": obs_ref,
                     "linear": _linear(image[i], h_t, t, task),
                     "skyline": obs_ref + (truth_t - truth_ref)}  # the true change, on the observed reference
            lo, hi = answer["scan_quantiles"].sel(quantile=0.05).values[a, r], \
                answer["scan_quantiles"].sel(quantile=0.95).values[a, r]
            vol_truth = _measured(truth_t[None, None], mask[None], held.isel(subject=[i]), twin.channels)[0, 0]
            row = {"horizon": float(t - ref_t)}
            m = np.broadcast_to(mask, truth_t.shape)
            for method, p in preds.items():
                change = (p - obs_ref) - (truth_t - truth_ref)
                vol = _measured(p[None, None], mask[None], held.isel(subject=[i]), twin.channels)[0, 0]
                row[method] = {
                    "change_rmse": float(np.sqrt(np.mean(change[m] ** 2))),
                    "mse": float(np.mean((p - truth_t)[m] ** 2)),
                    "psnr": float(psnr(p, truth_t, R, m, spatial_dims=2).mean()),
                    "ssim": float(ssim(p, truth_t, R, spatial_dims=2, mask=m).mean()),
                    "volume_error": np.abs(vol - vol_truth).tolist()}
            row["true_change_rms"] = float(np.sqrt(np.mean((truth_t - truth_ref)[m] ** 2)))
            row["coverage_90"] = float(np.mean((lo[m] <= truth_t[m]) & (truth_t[m] <= hi[m])))
            vlo = answer["volume_quantiles"].sel(quantile=0.05).values[a, r]
            vhi = answer["volume_quantiles"].sel(quantile=0.95).values[a, r]
            row["volume_coverage_90"] = ((vlo <= vol_truth) & (vol_truth <= vhi)).tolist()
            rows.append(row)
    return report(task, rows, structures, per_point)


def _linear(image: np.ndarray, h_t: np.ndarray, t: float, task: str) -> np.ndarray:
    """Voxelwise linear extrapolation through the last two history scans (forecast) or interpolation
    between the neighbouring ones (fill); a single history scan is copied."""
    v = np.flatnonzero(np.isfinite(h_t))
    if task == "forecast":
        if v.size < 2:
            return image[v[-1]]
        a, b = v[-2], v[-1]
    else:
        before, after = v[h_t[v] < t], v[h_t[v] > t]
        if not before.size or not after.size:
            return image[v[np.argmin(np.abs(h_t[v] - t))]]
        a, b = before[-1], after[0]
    w = (t - h_t[a]) / (h_t[b] - h_t[a])
    return image[a] + w * (image[b] - image[a])


def _conditioned(ds, keep: np.ndarray):
    """The cohort as if only the visits in `keep` (S, V) had been observed."""
    image = ds["image"].values.copy()
    image[~keep] = np.nan
    out = ds.assign(observed=(ds["observed"].dims, keep), image=(ds["image"].dims, image, ds["image"].attrs))
    if "biomarkers" in ds:
        b = ds["biomarkers"].values.copy()
        b[~keep] = np.nan
        out = out.assign(biomarkers=(ds["biomarkers"].dims, b, ds["biomarkers"].attrs))
    return out


def report(task: str, rows: list, structures: list, per_point: float) -> dict:
    """Print and return the scores per horizon bin (< 1 year, >= 1 year)."""
    bins = {"<1y": [r for r in rows if abs(r["horizon"]) < LONG], ">=1y": [r for r in rows if abs(r["horizon"]) >= LONG],
            "all": rows}
    methods = ("twin", "copy_last", "linear", "skyline")
    print(f"  {task}: {len(rows)} targets; sampling {per_point:.2f} s per patient and time point")
    print(f"    {'horizon':8s} {'n':>3s} {'method':10s} {'change':>8s} {'rel':>6s} {'MSE':>9s} {'PSNR':>6s} {'SSIM':>6s} "
          + " ".join(f"{s[:12]:>12s}" for s in structures) + "   cov90 vol-cov90")
    out = {"sampling_s_per_point": per_point, "targets": len(rows)}
    for label, part in bins.items():
        if not part:
            continue
        out[label] = {"n": len(part)}
        for method in methods:
            rel = [p[method]["change_rmse"] / p["copy_last"]["change_rmse"] for p in part
                   if p["copy_last"]["change_rmse"] > 0]
            vol = np.mean([p[method]["volume_error"] for p in part], axis=0)
            m = {"change_rmse": float(np.mean([p[method]["change_rmse"] for p in part])),
                 "change_relative": float(np.mean(rel)) if rel else math.nan,
                 "mse": float(np.mean([p[method]["mse"] for p in part])),
                 "psnr": float(np.mean([p[method]["psnr"] for p in part])),
                 "ssim": float(np.mean([p[method]["ssim"] for p in part])),
                 "volume_mae": dict(zip(structures, vol.tolist()))}
            extra = ""
            if method == "twin":
                m["coverage_90"] = float(np.mean([p["coverage_90"] for p in part]))
                m["volume_coverage_90"] = dict(zip(structures, np.mean([p["volume_coverage_90"] for p in part],
                                                                       axis=0).tolist()))
                extra = f"   {m['coverage_90']:.3f} " + " ".join(f"{v:.2f}" for v in m["volume_coverage_90"].values())
            out[label][method] = m
            print(f"    {label:8s} {len(part):3d} {method:10s} {m['change_rmse']:8.4f} {m['change_relative']:6.2f} "
                  f"{m['mse']:9.5f} {m['psnr']:6.2f} {m['ssim']:6.3f} "
                  + " ".join(f"{v:12.3f}" for v in vol) + extra)
    return out


def criteria(out: dict) -> None:
    """The scan issue's done-when criteria at horizons >= 1 year (fills: all), met or not."""
    print("\ndone-when (held-out patients, against the noise-free truth):")
    for name, res in out.items():
        for task in ("forecast", "fill"):
            part = res[task].get(">=1y" if task == "forecast" else "all")
            if not part:
                print(f"  {name} {task}: no targets")
                continue
            tw, cp = part["twin"], part["copy_last"]
            base = part["linear"] if task == "fill" else cp
            vol_ratio = _volume_ratio(tw, base)
            change_ratio = tw["change_rmse"] / base["change_rmse"]
            checks = [(f"change RMSE {tw['change_rmse']:.4f} <= 0.5 x {'linear' if task == 'fill' else 'copy-last'} "
                       f"{base['change_rmse']:.4f} ({change_ratio:.2f}x)", change_ratio <= 0.5),
                      (f"volume error {vol_ratio:.2f}x of the baseline <= 0.5x", vol_ratio <= 0.5),
                      (f"SSIM {tw['ssim']:.4f} >= {base['ssim']:.4f}", tw["ssim"] >= base["ssim"]),
                      (f"90% voxel band covers {tw['coverage_90']:.3f} in [0.80, 0.97]", 0.8 <= tw["coverage_90"] <= 0.97),
                      ("90% volume bands cover " + ", ".join(f"{v:.2f}" for v in tw["volume_coverage_90"].values())
                       + " in [0.80, 0.97]", all(0.8 <= v <= 0.97 for v in tw["volume_coverage_90"].values()))]
            for text, ok in checks:
                print(f"  {name:8s} {task:8s} {'MET ' if ok else 'NOT '} {text}")
            sky = part["skyline"]
            print(f"  {name:8s} {task:8s}      skyline (true change on the observed reference): volume error "
                  f"{_volume_ratio(sky, base):.2f}x, SSIM {sky['ssim']:.4f}")


def _volume_ratio(method: dict, base: dict) -> float:
    """A method's volume error over the baseline's, averaged over the structures the baseline misses at all."""
    return float(np.mean([method["volume_mae"][s] / base["volume_mae"][s] for s in method["volume_mae"]
                          if base["volume_mae"][s] > 0]))


if __name__ == "__main__":
    main()
