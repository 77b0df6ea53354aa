"""The output of `twin evaluate`: EVAL_DIR/metrics.json, EVAL_DIR/figures/*.png and EVAL_DIR/report.html.

The folder is written whole or not at all: everything goes to a hidden partial folder next to
it, which replaces EVAL_DIR only when complete (an existing one only with `overwrite`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from twin.errors import InputError

from .atomic import partial_folder
from .evaluation import Evaluation
from .report import write_report

METHODS = ("twin", "copy_last", "linear", "mixed_effects")
COLOURS = {"twin": "C0", "copy_last": "C1", "linear": "C2", "mixed_effects": "C3"}


def write_evaluation(ev: Evaluation, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `ev` to the folder `path` (see the module docstring); returns the report's path."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a folder", source=str(out), field="output")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError("already exists and is not empty; choose another folder or overwrite it", source=str(out),
                         field="output")
    out.parent.mkdir(parents=True, exist_ok=True)
    with partial_folder(out) as partial:
        partial.mkdir()
        (partial / "metrics.json").write_text(json.dumps(ev.metrics, indent=1) + "\n")
        write_report(partial / "report.html", title="Twin evaluation", sections=sections(ev),
                     figures_dir=partial / "figures")
    return out / "report.html"


def sections(ev: Evaluation) -> list:
    """The report's sections: (heading, [figures, paragraphs, tables])."""
    m = ev.metrics
    target = "noise-free simulator truth" if m["target"] == "truth" else "held-out observations"
    intro = (f"{m['subjects']} held-out subjects (split {m['split']}{', in-sample' if m['in_sample'] else ''}); "
             f"scored against the {target}; seed {m['seed']}; model {m['model']}. Every key is documented in "
             "docs/evaluation.md.")
    out = [("Summary", [intro, _summary_table(m)])]
    out.append(("Errors by horizon", [_horizon_figure(m), _horizon_table(m)]))
    cal = m["calibration"]
    rows = [["values", "coverage_50", "coverage_80", "coverage_90", "coverage_95", "CRPS"]]
    for kind in ("voxel", "biomarker", "volume"):
        if kind in cal:
            c = cal[kind]
            rows.append([kind, *(c[f"coverage_{v}"] for v in (50, 80, 90, 95)), c.get("crps", "")])
            if "raw" in c:
                rows.append([f"{kind} (raw draws)", *(c["raw"][f"coverage_{v}"] for v in (50, 80, 90, 95)), ""])
            if "against_truth" in c:
                truth = c["against_truth"]
                rows.append([f"{kind} (against truth)", *(truth[f"coverage_{v}"] for v in (50, 80, 90, 95)), ""])
    out.append(("Calibration", [_reliability_figure(ev.plots.get("reliability", {})), rows,
                                "Bands are recalibrated (split-conformal factors fitted at training on held-out "
                                "subjects, stored with the model) and scored against held-out observations: a "
                                "band is for a measurement. 'raw draws' are the uncalibrated draws' own bands."]))
    if "feature" in m:
        f = m["feature"]
        out.append(("Feature realism", [[["", "Frechet", "KID", "MS-SSIM between samples"],
                                         ["twin (one draw per target)", f["frechet"], f["kid"], f["ms_ssim_diversity"]],
                                         ["copy_last", f["copy_last"]["frechet"], f["copy_last"]["kid"], ""]],
                                        "Distances between the generated and the acquired scans at the targets over "
                                        "radiomics features (intensity, GLCM texture, gradient, shape), standardised "
                                        "by the acquired scans' spread; lower is closer. MS-SSIM between a request's "
                                        "draws: lower is more diverse."]))
    if "hallucination" in m:
        h = m["hallucination"]
        rows = [["check", "honest outputs flagged",
                 *(k.replace("_", " ") for k in h["by_corruption"])]]
        rows += [[c, v["honest"], *(v[k] for k in h["by_corruption"])] for c, v in h["by_check"].items()]
        out.append(("Hallucination detection", [
            f"{h['outputs']} honest outputs (point forecasts and single draws), each corrupted three ways: "
            f"detection rate {h['detection_rate']:.3f}, false-alarm rate {h['false_alarm_rate']:.3f}; per corruption "
            + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in h["by_corruption"].items())
            + f". The checks' thresholds were fitted on {h['calibration_cases']} held-out calibration scans.",
            _hallucination_figure(ev.plots.get("hallucination")), rows]))
    if m.get("scenario"):
        s = m["scenario"]
        rows = [["", "twin", "ignoring treatment"], ["effect error (biomarkers, in SDs)", s["effect_error"],
                                                     s["effect_error_ignore_treatment"]]]
        if "scan_effect_rmse" in s:
            rows.append(["effect RMSE (scans, in the brain)", s["scan_effect_rmse"],
                         s["scan_effect_rmse_ignore_treatment"]])
        out.append(("Treatment scenarios", [rows, "Each held-out subject, known from all its observed visits, replayed "
                                                  "under the cohort's alternative schedule; the effect (received minus "
                                                  "alternative) against the simulator's counterfactual truth."]))
    return out


def _summary_table(m: dict) -> list:
    rows = [["task", "horizon (years, up to)", "n", "metric", *METHODS]]
    for task in ("forecast", "fill"):
        for key, cell in m[task].items():
            for metric in ("change_rmse", "ssim", "biomarker_mae_sd"):
                if metric in cell.get("twin", {}):
                    rows.append([task, key, cell["n"], metric, *(cell.get(x, {}).get(metric, "") for x in METHODS)])
    return rows


def _horizon_table(m: dict) -> list:
    rows = [["task", "horizon", "metric", *METHODS]]
    for task in ("forecast", "fill"):
        for key, cell in m[task].items():
            for metric in ("mse", "psnr", "coverage_90", "biomarker_coverage_90"):
                if metric in cell.get("twin", {}):
                    rows.append([task, key, metric, *(cell.get(x, {}).get(metric, "") for x in METHODS)])
    return rows


def _horizon_figure(m: dict):
    from matplotlib.figure import Figure

    metric = "change_rmse" if any("change_rmse" in c.get("twin", {}) for c in m["forecast"].values()) \
        else "biomarker_mae_sd"
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    for ax, task in zip(fig.subplots(1, 2), ("forecast", "fill")):
        keys = list(m[task])
        for method in METHODS:
            y = [m[task][k].get(method, {}).get(metric) for k in keys]
            if any(v is not None for v in y):
                ax.plot(range(len(keys)), [np.nan if v is None else v for v in y], "o-", color=COLOURS[method],
                        label=method)
        ax.set_xticks(range(len(keys)), [f"<= {k}" for k in keys])
        ax.set_xlabel("horizon (years)")
        ax.set_ylabel(metric)
        ax.set_title(task)
        ax.legend(fontsize=8)
    fig.suptitle(f"{metric} by horizon")
    return fig


def _reliability_figure(plot: dict):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot([0.4, 1], [0.4, 1], color="0.6", lw=1, label="ideal")
    for i, (kind, p) in enumerate(plot.items()):
        ax.plot(p["nominal"], [np.nan if v is None else v for v in p["recalibrated"]], "o-", color=f"C{i}",
                label=f"{kind}, recalibrated")
        ax.plot(p["nominal"], [np.nan if v is None else v for v in p["raw"]], "x--", color=f"C{i}", alpha=0.6,
                label=f"{kind}, raw draws")
    ax.set_xlabel("stated coverage")
    ax.set_ylabel("observed coverage")
    ax.legend(fontsize=8)
    fig.suptitle("reliability of the bands")
    return fig


def _hallucination_figure(plot: dict | None):
    from matplotlib.figure import Figure

    if not plot:
        return "no example"
    examples = plot["examples"]
    fig = Figure(figsize=(2.4 * (len(examples) + 1), 2.9), layout="constrained")
    axes = fig.subplots(1, len(examples) + 1)
    mask = plot["mask"]
    shown = [("reference scan", plot["reference"], None), *((k, s, f) for k, (s, f) in examples.items())]
    lo, hi = np.percentile(plot["reference"][0][mask], [1, 99.5])
    for ax, (name, scan, failed) in zip(axes, shown):
        ax.imshow(scan[0] if scan.ndim == 3 else scan[0, scan.shape[1] // 2], cmap="gray", vmin=lo, vmax=hi)
        flagged = [c for c, f in zip(plot["checks"], failed) if f] if failed is not None else []
        title = name.replace("_", " ") + ("\nflagged: " + ", ".join(flagged) if flagged else
                                          ("\nnot flagged" if failed is not None else ""))
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.suptitle("an honest output and its corruptions (first channel)")
    return fig
