"""`twin evaluate`: a trained twin scored on held-out patients at three levels, against honest baselines.

    ev = evaluate(load_twin("model"), open_cohort("cohort.zarr"), split="test")
    ev.metrics["forecast"]["1"]["twin"]["change_rmse"]

The held-out tasks are `twin.holdout_tasks` (forecast: the last half of each subject's visits;
fill: inner visits). Every method sees the same history:

    twin          the model's answer (`forecast` / `fill`, with its draws)
    copy_last     the last observed value or scan before the target
    linear        forecast: per-subject least-squares line through the history (voxel by voxel
                  for scans); fill: linear interpolation between the neighbouring visits
    mixed_effects biomarkers only: a linear mixed-effects model (`twin.baselines.MixedEffects`)
                  fitted on every visit the twin could have seen (the other subjects' visits and
                  the evaluated subjects' histories)

Targets are the simulator's noise-free truth where the cohort has it (`truth_image`,
`truth_biomarkers`, factual) and the held-out observations otherwise; bands are scored against
observations too, since a band is for a measurement. docs/evaluation.md documents every key of
`metrics`; `twin.evaluation_report` draws the figures and the page.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from twin.errors import InputError

from .holdout_tasks import TASKS, Task, at_targets, make_task

FORMAT = "twin-evaluation/1"
EDGES = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, math.inf)  # horizon bins, keyed by their upper edge
LEVELS = (0.5, 0.8, 0.9, 0.95)
SPLITS = ("test", "all")


@dataclass
class Evaluation:
    """metrics: the JSON of docs/evaluation.md; plots: the arrays `twin.evaluation_report` draws."""

    metrics: dict
    plots: dict = field(default_factory=dict)


def evaluate(model, ds: xr.Dataset, *, split: str = "test", seed: int | None = None, n_samples: int | None = None,
             progress: bool = True) -> Evaluation:
    """Score `model` (a ScanTwin or BiomarkerTwin) on the held-out tasks of `ds`'s evaluated subjects.

    split "test": the subjects the model was not fitted on (an error if none); "all": every
    subject (in-sample for those it was fitted on; `metrics["in_sample"]` says so). seed: the
    draws' and the corruptions' (default: the model's). Deterministic for a seed.
    """
    from tqdm.auto import tqdm

    from .scan_twin import ScanTwin, _with_mask

    scans = isinstance(model, ScanTwin)
    if scans:
        ds = _with_mask(ds)
    dynamics = model.dynamics if scans else model
    seed = dynamics.config.seed if seed is None else int(seed)
    chosen = _split(model, ds, split)
    held = ds.isel(subject=np.flatnonzero(chosen)).load()  # read once: every stage reads it again
    context = ds.isel(subject=np.flatnonzero(~chosen))
    metrics = {"format": FORMAT, "model": model.fingerprint, "split": split, "seed": seed,
               "subjects": int(chosen.sum()), "in_sample": bool(set(_ids(held)) & set(model.subjects)),
               "target": "truth" if _simulated(held, scans) else "observed", "levels": list(LEVELS)}
    if scans:
        metrics["data_range"] = _data_range(held)
    stages = [*TASKS, "calibration", *(("feature", "hallucination") if scans else ()), "scenario"]
    bar = tqdm(total=len(stages), desc="evaluating", disable=not progress)
    answers, plots = {}, {}
    for name in TASKS:
        bar.set_postfix_str(name)
        task = make_task(held, name)
        if not task.subjects:
            metrics[name] = {}
            answers[name] = None
        else:
            answers[name] = _answer(model, scans, task, held, seed, n_samples)
            metrics[name] = _score_task(model, scans, task, held, context, answers[name], metrics.get("data_range"))
        bar.update()
    answered = [a for a in answers.values() if a is not None]
    if not answered:
        raise InputError("no evaluated subject has two observed visits: nothing to hold out", source="cohort",
                         field="observed")
    bar.set_postfix_str("calibration")
    metrics["calibration"], plots["reliability"] = _calibration(scans, held, answered, context)
    bar.update()
    if scans:
        bar.set_postfix_str("features")
        metrics["feature"] = _feature(held, answered, metrics["data_range"], seed)
        bar.update()
        bar.set_postfix_str("hallucination")
        metrics["hallucination"], plots["hallucination"] = _hallucination(model, answers["forecast"] or answered[0],
                                                                          seed)
        bar.update()
    bar.set_postfix_str("scenario")
    metrics["scenario"] = _scenario(model, scans, held, context, seed, n_samples)
    bar.update()
    bar.close()
    return Evaluation(metrics=_jsonable(metrics), plots=plots)


# ---- the split -----------------------------------------------------------------------------------


def _split(model, ds: xr.Dataset, split: str) -> np.ndarray:
    """(S,) bool: the subjects to evaluate."""
    if split not in SPLITS:
        raise InputError(f"expected one of {list(SPLITS)}, got {split!r}", source="evaluate", field="split")
    ids = _ids(ds)
    if split == "all":
        return np.ones(len(ids), bool)
    if not model.subjects:
        raise InputError("the model does not record the subjects it was fitted on (it predates `twin evaluate`); "
                         "retrain it, or evaluate in-sample with --split all", source="model", field="subjects")
    chosen = np.asarray([s not in set(model.subjects) for s in ids])
    if not chosen.any():
        raise InputError("the model was fitted on every subject of this cohort, so none is held out; train with "
                         "`twin train --holdout 0.25` (or on another cohort), or evaluate in-sample with --split all",
                         source="cohort", field="subject")
    return chosen


def _ids(ds: xr.Dataset) -> list[str]:
    return [str(s) for s in ds["subject"].values]


def _simulated(ds: xr.Dataset, scans: bool) -> bool:
    return ("truth_image" if scans else "truth_biomarkers") in ds


# ---- answers ------------------------------------------------------------------------------------


@dataclass
class _Answer:
    """A task's twin answer with draws, lined up with the task: rows (S',) index the evaluated cohort."""

    task: Task
    result: xr.Dataset
    draws: object  # ScanDraws for a scan twin, None otherwise
    rows: np.ndarray


def _answer(model, scans: bool, task: Task, held: xr.Dataset, seed: int, n_samples) -> _Answer:
    at = task.at(held)
    if scans:
        result, draws = model._answer_with_draws(task.name, task.cohort, list(at), None, at, n_samples, True, seed)
    else:
        ask = model.forecast if task.name == "forecast" else model.fill
        result, draws = ask(task.cohort, list(at), at=at, n_samples=n_samples, samples=True, seed=seed), None
    ids = _ids(held)
    rows = np.asarray([ids.index(str(s)) for s in result["subject"].values])
    expected = held["baseline_time"].values[rows, None] + at_targets(held["time"].values[rows], task.visit[rows])
    if not np.allclose(result["time"].values, expected, atol=1e-6, equal_nan=True):
        raise AssertionError("the answer's requests are not the task's targets in order")
    return _Answer(task, result, draws, rows)


# ---- pixel, task and biomarker scores per horizon -----------------------------------------------


def _score_task(model, scans: bool, task: Task, held: xr.Dataset, context: xr.Dataset, ans: _Answer,
                data_range: float | None) -> dict:
    """{horizon key: {method: M}} for one task (docs/evaluation.md)."""
    rows, visit = ans.rows, task.visit[ans.rows]
    valid = visit >= 0
    per_target: dict[str, dict[str, np.ndarray]] = {}  # method -> metric -> (S', R[, k]) arrays
    if "biomarkers" in held:
        for method, values in _biomarker_scores(task, held, context, ans).items():
            per_target.setdefault(method, {}).update(values)
    if scans:
        for method, values in _scan_scores(model, task, held, ans, data_range).items():
            per_target.setdefault(method, {}).update(values)
    keys, which = _bins(task.horizon[rows])
    out = {}
    for b, key in enumerate(keys):
        pick = valid & (which == b)
        if not pick.any():
            continue
        out[key] = {"n": int(pick.sum())}
        for method, values in per_target.items():
            out[key][method] = {name: _mean_over(v, pick, names) for name, (v, names) in values.items()}
    return out


def _biomarker_scores(task: Task, held: xr.Dataset, context: xr.Dataset, ans: _Answer) -> dict:
    """Per target and biomarker |error| of every method, and the twin's 90% band hits."""
    from .baselines import copy_last, interpolate, linear

    rows, visit = ans.rows, task.visit[ans.rows]
    names = [str(b) for b in held["biomarker"].values]
    result = ans.result.sel(biomarker=names)
    times = held["time"].values[rows]
    history = task.history[rows]
    values = _observed_biomarkers(held)[rows]
    h_times, h_values = np.where(history, times, np.nan), np.where(history[..., None], values, np.nan)
    at = at_targets(times, visit)
    target = at_targets(_biomarker_truth(held)[rows], visit)
    lme, x = _mixed_effects(task, held, context)
    preds = {"twin": result["mean"].values,
             "copy_last": copy_last(h_times, h_values, at),
             "linear": (linear if task.name == "forecast" else interpolate)(h_times, h_values, at),
             "mixed_effects": lme.predictive(h_times, h_values, at, None if x is None else x[rows])[0]}
    sd = _cohort_sd(held, context)
    out = {}
    for method, p in preds.items():
        err = np.abs(p - target)
        out[method] = {"biomarker_mae": (err, names), "biomarker_mae_sd": (_nanmean(err / sd, axis=-1), None)}
    q = result["quantiles"]
    lo, hi = q.sel(quantile=0.05).values, q.sel(quantile=0.95).values
    observed = at_targets(values, visit)
    inside = np.where(np.isfinite(observed), (lo <= observed) & (observed <= hi), np.nan)
    out["twin"]["biomarker_coverage_90"] = (_nanmean(inside, axis=-1), None)
    return out


def _mixed_effects(task: Task, held: xr.Dataset, context: xr.Dataset):
    """The LME fitted on every visit the twin could have seen, and the evaluated subjects' covariate."""
    from .baselines import MixedEffects, cohort_arrays

    varies = bool(np.ptp(np.concatenate([held["baseline_time"].values, context["baseline_time"].values])) > 0)
    t_h, y_h, x_h = cohort_arrays(task.cohort, baseline_time=varies)
    if context.sizes["subject"]:
        t_c, y_c, x_c = cohort_arrays(context, baseline_time=varies)
        V = max(t_h.shape[1], t_c.shape[1])
        pad = lambda a: np.pad(a, [(0, 0), (0, V - a.shape[1])] + [(0, 0)] * (a.ndim - 2),  # noqa: E731
                               constant_values=np.nan)
        t_all, y_all = np.concatenate([pad(t_h), pad(t_c)]), np.concatenate([pad(y_h), pad(y_c)])
        x_all = None if x_h is None else np.concatenate([x_h, x_c])
    else:
        t_all, y_all, x_all = t_h, y_h, x_h
    return MixedEffects.fit(t_all, y_all, x_all), x_h


def _cohort_sd(held: xr.Dataset, context: xr.Dataset) -> np.ndarray:
    """(B,) SD of every observed biomarker value of the cohort: the scale of the pooled MAE."""
    y = np.concatenate([_observed_biomarkers(d).reshape(-1, d.sizes["biomarker"])
                        for d in (held, context) if d.sizes["subject"]])
    sd = np.nanstd(y, axis=0)
    return np.where(sd > 0, sd, 1.0)


def _observed_biomarkers(ds: xr.Dataset) -> np.ndarray:
    """(S, V, B) the measured biomarkers, NaN at visits that did not take place."""
    return np.where(ds["observed"].values[..., None], ds["biomarkers"].values, np.nan)


def _biomarker_truth(ds: xr.Dataset) -> np.ndarray:
    """(S, V, B): the noise-free truth where simulated, the observations otherwise."""
    if "truth_biomarkers" in ds:
        return ds["truth_biomarkers"].sel(scenario="factual").transpose("subject", "visit", "biomarker").values
    return _observed_biomarkers(ds)


def _image_truth(ds: xr.Dataset) -> np.ndarray:
    """(S, V, C, *space): the noise-free scans where simulated, the acquired ones otherwise."""
    return ds["truth_image"].sel(scenario="factual").values if "truth_image" in ds else ds["image"].values


def _scan_scores(model, task: Task, held: xr.Dataset, ans: _Answer, data_range: float) -> dict:
    """Per target: mse, psnr, ssim, change_rmse, volume_mae (per structure), dice (per mapped structure)
    of every method, and the twin's voxel and volume 90% band hits."""
    from twin.data.geometry import voxel_volume_ml

    from .baselines import copy_last, interpolate, linear
    from .image_metrics import dice, psnr, ssim
    from .scan_twin import _measured
    from .segment import structure_maps

    rows, visit = ans.rows, task.visit[ans.rows]
    dims = held["mask"].ndim - 1
    image, truth = held["image"].values[rows], _image_truth(held)[rows]
    times, history = held["time"].values[rows], task.history[rows]
    mask = held["mask"].values[rows].astype(bool)
    one = held.isel(subject=rows)
    S, R = visit.shape
    target = at_targets(truth, visit)  # (S, R, C, *space)
    ref_visit = task.reference[rows]
    observed_ref = at_targets(image, ref_visit)
    truth_ref = at_targets(truth, ref_visit)
    at = at_targets(times, visit)
    h_times = np.where(history, times, np.nan)
    flat = image.reshape(S, image.shape[1], -1)
    preds = {"twin": ans.result["scan_mean"].values.astype(np.float64),
             "copy_last": copy_last(h_times, np.where(history[..., None], flat, np.nan), at).reshape(target.shape),
             "linear": (linear if task.name == "forecast" else interpolate)(
                 h_times, np.where(history[..., None], flat, np.nan), at).reshape(target.shape)}
    inside = np.broadcast_to(mask[:, None, None], target.shape)
    structures = list(model.structures)
    vol_truth = _measured(target, mask, one, model.channels)
    voxel_ml = [voxel_volume_ml(a) for a in one["affine"].values]
    labels = json.loads(held["truth_labels"].attrs.get("labels", "[]")) if "truth_labels" in held else []
    truth_labels = at_targets(held["truth_labels"].values[rows], visit) if labels else None
    out = {}
    for method, p in preds.items():
        change = (p - observed_ref) - (target - truth_ref)
        def psnr_ij(i, j):
            return psnr(p[i, j], target[i, j], data_range, mask[i], spatial_dims=dims).mean()

        def ssim_ij(i, j):
            inside_ij = np.broadcast_to(mask[i], p[i, j].shape)
            return ssim(p[i, j], target[i, j], data_range, spatial_dims=dims, mask=inside_ij).mean()

        m = {"mse": (_masked(lambda a: np.mean(a ** 2), p - target, inside), None),
             "psnr": (_per_target(psnr_ij, visit), None),
             "ssim": (_per_target(ssim_ij, visit), None),
             "change_rmse": (np.sqrt(_masked(lambda a: np.mean(a ** 2), change, inside)), None),
             "volume_mae": (np.abs(_measured(p, mask, one, model.channels) - vol_truth), structures)}
        if truth_labels is not None:
            maps = {(i, j): structure_maps(p[i, j], mask[i], model.channels, voxel_ml[i])
                    for i, j in zip(*np.nonzero(visit >= 0))}
            mapped = [s for s in structures if s in labels and s in next(iter(maps.values()))]
            scores = np.full((S, R, len(mapped)), np.nan)
            for (i, j), found in maps.items():
                for k, s in enumerate(mapped):
                    scores[i, j, k] = dice(found[s] >= 0.5, truth_labels[i, j] == labels.index(s) + 1,
                                           spatial_dims=dims)
            m["dice"] = (scores, mapped)
        out[method] = m
    q = ans.result["scan_quantiles"]
    lo, hi = q.sel(quantile=0.05).values, q.sel(quantile=0.95).values
    out["twin"]["coverage_90"] = (_masked(np.mean, (lo <= target) & (target <= hi), inside), None)
    vq = ans.result["volume_quantiles"]
    vlo, vhi = vq.sel(quantile=0.05).values, vq.sel(quantile=0.95).values
    out["twin"]["volume_coverage_90"] = (((vlo <= vol_truth) & (vol_truth <= vhi)).astype(float), structures)
    return out


def _masked(f, a: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """f over the inside voxels of each target: (S, R, C, *space) -> (S, R), NaN for padding."""
    out = np.full(a.shape[:2], np.nan)
    for i, j in zip(*np.nonzero(inside.reshape(*a.shape[:2], -1).any(-1))):
        v = a[i, j][inside[i, j]]
        if np.isfinite(v).all():
            out[i, j] = f(v.astype(np.float64))
    return out


def _per_target(f, visit: np.ndarray) -> np.ndarray:
    out = np.full(visit.shape, np.nan)
    for i, j in zip(*np.nonzero(visit >= 0)):
        out[i, j] = f(i, j)
    return out


def _mean_over(v: np.ndarray, pick: np.ndarray, names):
    """Mean of per-target values v (S, R) or (S, R, k) over the picked targets: a number, or {name: number}."""
    sel = v[pick]
    if names is None:
        return _number(_nanmean(sel)) if np.isfinite(sel).any() else None
    return {n: (_number(_nanmean(sel[:, k])) if np.isfinite(sel[:, k]).any() else None) for k, n in enumerate(names)}


def _bins(horizon: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Bin keys (the upper edge in years, "inf" for the last) and each horizon's bin (-1: none)."""
    keys = [f"{hi:g}" for hi in EDGES[1:]]
    which = np.full(horizon.shape, -1)
    for b, (lo, hi) in enumerate(zip(EDGES[:-1], EDGES[1:])):
        which[(horizon > lo) & (horizon <= hi)] = b
    return keys, which


# ---- calibration --------------------------------------------------------------------------------


def _calibration(scans: bool, held: xr.Dataset, answered: list, context: xr.Dataset) -> tuple[dict, dict]:
    """Coverage of the recalibrated bands at LEVELS (and of the raw draws' bands), CRPS, per horizon."""
    from .metrics import crps_from_samples

    hits = {"voxel": [], "biomarker": [], "volume": [], "voxel_truth": []}
    raw = {"voxel": [], "biomarker": []}
    crps = {"voxel": [], "biomarker": []}
    horizons = {"voxel": [], "biomarker": []}
    for ans in answered:
        rows, visit = ans.rows, ans.task.visit[ans.rows]
        h = ans.task.horizon[rows]
        result = ans.result
        if "biomarkers" in held:
            names = [str(b) for b in held["biomarker"].values]
            r = result.sel(biomarker=names)
            obs = at_targets(_observed_biomarkers(held)[rows], visit)
            samples = r["samples"].transpose("sample", ...).values
            hits["biomarker"].append(_band_hits(r["quantiles"], obs))
            raw["biomarker"].append(_raw_hits(samples, obs))
            crps["biomarker"].append((crps_from_samples(samples, obs) / _cohort_sd(held, context)).reshape(-1))
            horizons["biomarker"].append(np.broadcast_to(h[..., None], obs.shape).reshape(-1))
        if scans:
            image = at_targets(held["image"].values[rows], visit)
            mask = held["mask"].values[rows].astype(bool)
            inside = np.broadcast_to(mask[:, None, None], image.shape) & np.isfinite(image)
            samples = result["scan_samples"].transpose("scan_sample", ...).values
            hits["voxel"].append(_band_hits(result["scan_quantiles"], image, inside))
            raw["voxel"].append(_raw_hits(samples, image, inside))
            crps["voxel"].append(crps_from_samples(samples[:, inside], image[inside]))
            horizons["voxel"].append(np.broadcast_to(h.reshape(*h.shape, *[1] * (image.ndim - 2)), image.shape)[inside])
            if "truth_image" in held:
                truth = at_targets(_image_truth(held)[rows], visit)
                hits["voxel_truth"].append(_band_hits(result["scan_quantiles"], truth, inside))
            from .scan_twin import _measured

            vol = _measured(image, mask,
                            held.isel(subject=rows), [str(c) for c in result["channel"].values])
            vol = np.where((visit >= 0)[..., None], vol, np.nan)
            hits["volume"].append(_band_hits(result["volume_quantiles"], vol))
    out, plot = {}, {}
    for kind in ("voxel", "biomarker", "volume", "voxel_truth"):
        if not hits[kind]:
            continue
        h = {level: np.concatenate([x[level] for x in hits[kind]]) for level in LEVELS}
        out[kind] = {f"coverage_{round(100 * level)}": _number(_nanmean(h[level])) for level in LEVELS}
        if kind in raw and raw[kind]:
            r = {level: np.concatenate([x[level] for x in raw[kind]]) for level in LEVELS}
            out[kind]["raw"] = {f"coverage_{round(100 * level)}": _number(_nanmean(r[level])) for level in LEVELS}
            out[kind]["crps"] = _number(_nanmean(np.concatenate(crps[kind])))
            hz = np.concatenate(horizons[kind])
            keys, which = _bins(hz)
            out[kind]["per_horizon"] = {
                key: {f"coverage_{round(100 * level)}": _number(_nanmean(h[level][which == b])) for level in LEVELS}
                for b, key in enumerate(keys) if np.isfinite(h[LEVELS[0]][which == b]).any()}
            plot[kind] = {"nominal": list(LEVELS),
                          "recalibrated": [out[kind][f"coverage_{round(100 * v)}"] for v in LEVELS],
                          "raw": [out[kind]["raw"][f"coverage_{round(100 * v)}"] for v in LEVELS]}
    if "voxel_truth" in out:
        out["voxel"]["against_truth"] = out.pop("voxel_truth")
    primary = "voxel" if scans else "biomarker"
    top = {k: out[primary][k] for k in [f"coverage_{round(100 * v)}" for v in LEVELS] + ["crps"]}
    return {**top, "values": primary, **out}, plot


def _band_hits(quantiles: xr.DataArray, obs: np.ndarray, inside: np.ndarray | None = None) -> dict:
    """{level: 1/0 (NaN where unobserved) per value}: obs inside the result's central band at each level."""
    out = {}
    for level in LEVELS:
        lo = quantiles.sel(quantile=round((1 - level) / 2, 12), method="nearest").values
        hi = quantiles.sel(quantile=round((1 + level) / 2, 12), method="nearest").values
        hit = np.where(np.isfinite(obs), (lo <= obs) & (obs <= hi), np.nan)
        out[level] = hit[inside] if inside is not None else hit.reshape(-1)
    return out


def _raw_hits(samples: np.ndarray, obs: np.ndarray, inside: np.ndarray | None = None) -> dict:
    """As `_band_hits` for the central bands of the raw draws (K, ...), before recalibration."""
    sel = (lambda a: a[:, inside]) if inside is not None else (lambda a: a.reshape(a.shape[0], -1))
    x, y = sel(samples), obs[inside] if inside is not None else obs.reshape(-1)
    ok = np.isfinite(x).all(0) & np.isfinite(y)
    out = {}
    for level in LEVELS:
        lo, hi = np.full(y.shape, np.nan), np.full(y.shape, np.nan)
        lo[ok], hi[ok] = np.quantile(x[:, ok], [(1 - level) / 2, (1 + level) / 2], axis=0)
        out[level] = np.where(ok, (lo <= y) & (y <= hi), np.nan)
    return out


# ---- feature realism ----------------------------------------------------------------------------


def _feature(held: xr.Dataset, answered: list, data_range: float, seed: int) -> dict:
    """Frechet and kernel distances between generated and acquired scans at the targets over radiomics
    features (realism is likeness to what a scanner gives, noise and all, also on simulated cohorts);
    diversity."""
    from .image_metrics import frechet_distance, kid, pairwise_ms_ssim, radiomics_features

    real, generated, copied, masks, diversity = [], [], [], [], []
    for ans in answered:
        rows, visit = ans.rows, ans.task.visit[ans.rows]
        acquired = at_targets(held["image"].values[rows], visit)
        samples = ans.result["scan_samples"].transpose("scan_sample", ...).values
        reference = ans.result["reference_scan"].values
        mask = held["mask"].values[rows].astype(bool)
        for i, j in zip(*np.nonzero(visit >= 0)):
            real.append(acquired[i, j])
            generated.append(samples[0, i, j])
            copied.append(reference[i, j])
            masks.append(mask[i])
            diversity.append(float(np.mean(pairwise_ms_ssim(samples[:, i, j], data_range,
                                                             spatial_dims=mask.ndim - 1))))
    real, generated, copied, masks = map(np.stack, (real, generated, copied, masks))
    dims = masks.ndim - 1
    inside = np.broadcast_to(masks[:, None], real.shape)
    ranges = [tuple(np.percentile(real[:, c][inside[:, c]], (0.5, 99.5))) for c in range(real.shape[1])]

    def features(x):
        return np.concatenate([radiomics_features(x[:, c], masks, spatial_dims=dims, intensity_range=ranges[c])
                               for c in range(x.shape[1])], axis=1)

    f_real, f_gen, f_copy = features(real), features(generated), features(copied)
    return {"frechet": _number(frechet_distance(f_real, f_gen)), "kid": _number(kid(f_real, f_gen, seed=seed)[0]),
            "ms_ssim_diversity": _number(np.mean(diversity)), "n": len(real),
            "copy_last": {"frechet": _number(frechet_distance(f_real, f_copy)),
                          "kid": _number(kid(f_real, f_copy, seed=seed)[0])}}


# ---- hallucination ------------------------------------------------------------------------------


def _hallucination(model, ans: _Answer, seed: int) -> tuple[dict, dict]:
    """Detection of corrupted outputs and false alarms on honest ones (docs/evaluation.md)."""
    from .hallucination import CORRUPTIONS, corrupt
    from .scan_checks import CHECKS

    draws = ans.draws
    valid = np.isfinite(draws.dynamics.since)
    honest = {"point": draws.point[0], "draw": draws.scans[0][0]}
    rng = np.random.default_rng(seed)
    first = next(zip(*np.nonzero(valid)))  # the request whose point forecast the report shows
    failed, examples = {}, {}
    for name, scans in honest.items():
        failed[name], _, _ = model.check(draws, scans)
        if name == "point":
            examples["honest"] = (scans[first], failed[name][(slice(None), *first)])
        for kind in CORRUPTIONS:
            bad = scans.copy()
            for s, r in zip(*np.nonzero(valid)):
                bad[s, r] = corrupt(scans[s, r], draws.mask[s], kind, rng)
            failed[(name, kind)], _, _ = model.check(draws, bad)
            if name == "point":
                examples[kind] = (bad[first], failed[(name, kind)][(slice(None), *first)])
    n_honest = 2 * int(valid.sum())
    false_alarm = sum(int(failed[name].any(0)[valid].sum()) for name in honest) / n_honest
    per_kind, detected_total = {}, 0
    for kind in CORRUPTIONS:
        # detected: fails a check its honest original passes (a request-level flag such as the
        # state's distance fails both, and says nothing about the corruption)
        hit = sum(int((failed[(name, kind)] & ~failed[name]).any(0)[valid].sum()) for name in honest)
        per_kind[kind] = hit / n_honest
        detected_total += hit
    by_check = {c: {"honest": int(sum(failed[n][i][valid].sum() for n in honest)),
                    **{kind: int(sum((failed[(n, kind)][i] & ~failed[n][i])[valid].sum() for n in honest))
                       for kind in CORRUPTIONS}} for i, c in enumerate(CHECKS)}
    metrics = {"detection_rate": detected_total / (n_honest * len(CORRUPTIONS)), "false_alarm_rate": false_alarm,
               "outputs": n_honest, "by_corruption": per_kind, "by_check": by_check,
               "thresholds": model.calibration.get("checks", {}),
               "calibration_cases": model.calibration.get("cases", 0)}
    plot = {"reference": draws.reference[first], "mask": draws.mask[first[0]], "examples": examples,
            "checks": list(CHECKS)}
    return metrics, plot


# ---- counterfactual scenarios -------------------------------------------------------------------


def _scenario(model, scans: bool, held: xr.Dataset, context: xr.Dataset, seed: int, n_samples) -> dict | None:
    """Error of the predicted treatment effect (factual - alternative) against the simulator's, where
    the cohort carries an alternative schedule and its counterfactual truth; None otherwise."""
    if "alternative_event_time" not in held or "truth_biomarkers" not in held or \
            "alternative" not in [str(s) for s in held["scenario"].values]:
        return None
    ids = _ids(held)
    alternative = {s: [(float(t), str(a), float(d)) for t, a, d in zip(held["alternative_event_time"].values[i],
                                                                     held["alternative_event_agent"].values[i],
                                                                     held["alternative_event_dose"].values[i])
                       if np.isfinite(t)] for i, s in enumerate(ids)}
    planned = held["time"].values
    base = held["baseline_time"].values
    at = {s: [float(base[i] + t) for t in planned[i][np.isfinite(planned[i])]] for i, s in enumerate(ids)}
    result = model.simulate(held, {"alternative": alternative}, ids, at=at, n_samples=n_samples, seed=seed)
    names = [str(b) for b in held["biomarker"].values]
    predicted = -result["effect_mean"].sel(arm="alternative", biomarker=names).values  # factual - alternative
    tb = held["truth_biomarkers"].transpose("scenario", "subject", "visit", "biomarker")
    true = (tb.sel(scenario="factual") - tb.sel(scenario="alternative")).values[:, :predicted.shape[1]]
    sd = _cohort_sd(held, context)
    cell = np.isfinite(predicted) & np.isfinite(true)
    out = {"effect_error": _number(np.mean((np.abs(predicted - true) / sd)[cell])),
           "effect_error_ignore_treatment": _number(np.mean((np.abs(true) / sd)[cell])),
           "units": "SD of each biomarker over the cohort's observations", "n": int(cell.sum())}
    if scans and "truth_image" in held:
        ti = held["truth_image"]
        true_scan = (ti.sel(scenario="factual") - ti.sel(scenario="alternative")).values[:, :predicted.shape[1]]
        pred_scan = -result["scan_effect_mean"].sel(arm="alternative").values
        inside = np.broadcast_to(held["mask"].values.astype(bool)[:, None, None], pred_scan.shape) & \
            np.isfinite(pred_scan) & np.isfinite(true_scan)
        out["scan_effect_rmse"] = _number(np.sqrt(np.mean((pred_scan - true_scan)[inside] ** 2)))
        out["scan_effect_rmse_ignore_treatment"] = _number(np.sqrt(np.mean(true_scan[inside] ** 2)))
    return out


# ---- helpers ------------------------------------------------------------------------------------


def _data_range(held: xr.Dataset) -> float:
    """R for PSNR and SSIM: the 99.9th percentile of the target scans' intensities inside the brain."""
    truth = _image_truth(held)
    inside = np.broadcast_to(held["mask"].values.astype(bool)[:, None, None], truth.shape) & np.isfinite(truth)
    return float(np.percentile(truth[inside], 99.9))


def _nanmean(a: np.ndarray, axis=None):
    """np.nanmean, NaN (silently) where a slice has no finite value: the padding of a task."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def _number(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _jsonable(x):
    """Plain JSON types all the way down: numpy scalars to numbers, NaN and inf to None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return _number(x)
    return x
