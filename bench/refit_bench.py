"""What the biomarker twin's fit costs, measured where the model is exactly right: a parametric bootstrap.

    python bench/refit_bench.py [--seeds 0,2] [--subjects 200]

Per seed: the twin fitted on the atrophy benchmark's split-B training data (`biomarker_bench.py`:
every subject's last 2 observed visits held out) is M0. A cohort is drawn from M0 itself: the
same subjects, covariates, treatments and planned visits, each subject's effects drawn from
M0's prior, readings with M0's noise and instrument ranges, observed where the simulator's
were. On that cohort M0's population is the truth and the twin's model class is exact. Both
of the biomarker benchmark's splits are scored there (B: every subject's last 2 visits held
out; A: 20% of subjects held out, conditioned on the first half of their visits), against M0's
noise-free values a year or more ahead, for

    truth  M0 itself (the true population: what the posterior and its sampling cost), and
    refit  a twin fitted, with the same config, on the drawn cohort's training data of the
           split (what estimating the population costs),

each as a multiple of copy-last's error, with the 90% band's coverage per horizon bin. Then
the course each implies: the mean change over 4 years of a patient drawn from the prior (the
subjects' covariates, in the biomarkers' units), which does not depend on the latent state's
arbitrary unit. About a minute and a half per seed on this machine (2 cores; each fit
includes the twin's rehearsal past the follow-up).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import biomarker_bench as bb

HORIZON = 4.0  # years: the prior course's change reported


def draw_cohort(twin, ds, seed: int):
    """A copy of cohort `ds` whose readings and factual noise-free truth are drawn from `twin`'s model:
    each subject's effects from its prior, readings with its noise at the visits `ds` observed."""
    model, st = twin.model, twin.standardiser
    planned = ds["time"].values
    b = st.batch(ds, times=np.where(np.isfinite(planned), planned, 0.0))  # padding read at 0, masked below
    g = torch.Generator().manual_seed(seed)
    eta = torch.randn(len(b), model.n_effects, generator=g)
    with torch.no_grad():
        truth = model.predict(eta, b)
        y = model.observe(truth, torch.randn(truth.shape, generator=g) * torch.exp(model.log_sigma))
    at = np.isfinite(planned)[..., None]
    truth_u = np.where(at, st.values(truth.numpy().astype(np.float64)), np.nan)
    y_u = np.where(at & ds["observed"].values[..., None], st.values(y.numpy().astype(np.float64)), np.nan)
    out = ds.copy(deep=True)
    out["biomarkers"] = (ds["biomarkers"].dims, y_u)
    scenario = [str(s) for s in ds["scenario"].values]
    tb = out["truth_biomarkers"].values.copy()
    tb[scenario.index("factual")] = truth_u  # the other scenarios are not scored here
    out["truth_biomarkers"] = (out["truth_biomarkers"].dims, tb)
    return out


@torch.no_grad()
def prior_change(twin, ds, n: int = 200, seed: int = 0) -> np.ndarray:
    """Mean change (B,) from baseline to HORIZON years, in units, of patients drawn from the prior."""
    model, st = twin.model, twin.standardiser
    times = np.tile([0.0, HORIZON], (ds.sizes["subject"], 1))
    b = st.batch(ds, times=times)
    g = torch.Generator().manual_seed(seed)
    y = torch.stack([model.predict(torch.randn(len(b), model.n_effects, generator=g), b) for _ in range(n)])
    y = st.values(y.numpy().astype(np.float64))  # (n, S, 2, B)
    return (y[:, :, 1] - y[:, :, 0]).mean((0, 1))


def score(twin, lme, sd, ds, history, target) -> dict:
    rows = bb.evaluate(twin, lme, ds, history, target, True, sd, effect=False)["bins"]
    long = rows[f">= {bb.LONG:g} y"]
    return {"ratio": long["twin"] / long["copy_last"], "lme": long["LME"] / long["copy_last"],
            "cov90": {k: rows[k]["cov90"] for k in bb._labels() if rows[k]["n_obs"] >= bb.MIN_BIN}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,2")
    parser.add_argument("--subjects", type=int, default=200)
    args = parser.parse_args()

    from twin import BiomarkerTwin, TwinConfig
    from twin.metrics import holdout_last, holdout_subjects

    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.perf_counter()
        ds, _ = bb.load_cohort("atrophy", args.subjects, seed, quick=False)
        times = np.where(ds["observed"].values, ds["time"].values, np.nan)
        history, target = holdout_last(times, k=2)
        config = TwinConfig(seed=seed)
        m0 = BiomarkerTwin.fit(bb.conditioned(ds, history), config, progress=False)
        drawn = draw_cohort(m0, ds, seed=1000 + seed)
        held = holdout_subjects([str(s) for s in ds["subject"].values], 0.2, seed)
        rest, out = np.flatnonzero(~held), np.flatnonzero(held)
        splits = {"B": (bb.conditioned(drawn, history), drawn, history, target),
                  "A": (drawn.isel(subject=rest), drawn.isel(subject=out), bb.first_half(times[out]), None)}
        print(f"\n== seed {seed}: a cohort of {args.subjects} subjects drawn from the twin fitted on the simulator's "
              f"split-B training data")
        print(f"{'':8} {'twin / copy-last':>17} {'LME / copy-last':>16}   90% band per horizon bin")
        for key, (train, part, hist, tgt) in splits.items():
            refit, lme, sd, _ = bb.train_models(train, config)
            for label, fitted in (("truth", m0), ("refit", refit)):
                r = score(fitted, lme, sd, part, hist, tgt)
                bands = ", ".join(f"{k} {v:.3f}" for k, v in r["cov90"].items())
                print(f"{key} {label:6} {r['ratio']:17.3f} {r['lme']:16.3f}   {bands}")
            if key == "B":
                course = {"truth": prior_change(m0, drawn), "refit (B)": prior_change(refit, drawn)}
        names = [str(b) for b in ds["biomarker"].values]
        units = [str(u) for u in ds["biomarker_unit"].values]
        print(f"mean change over {HORIZON:g} years of a patient drawn from the prior:")
        for label, change in course.items():
            print(f"{label:10} " + ", ".join(f"{n} {c:+.3f} {u}" for n, c, u in zip(names, change, units)))
        print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
