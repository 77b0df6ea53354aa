"""Plausibility checks of generated scans: every output is checked, and a flagged output says why.

    jacobian          the twin's own deformation of the reference folds (det J <= 0) in the point
                      forecast or in a draw, or changes local volume faster than for honest
                      requests (max |log det J| in the brain of the point forecast's deformation,
                      per year from the reference scan: a rate, as physiology limits rates)
    volume_rate       a measured volume changes faster than twice the fastest change seen
                      between the training scans
    state_distance    the state lies outside the training cohort's (Mahalanobis distance beyond
                      the chi-square 99.9% level)
    samples_disagree  the draws disagree with each other more than for honest requests (their mean
                      sd in the brain per year from the reference scan, as uncertainty grows with
                      the horizon): the twin is unsure here, and says so
    deformation       the output's anatomy departs from the twin's prediction: the deformation that
                      takes the point forecast to the output (found by registration) changes local
                      volume by more of the draws' own spreads of log det J (max over the brain)
                      than honest outputs do: tissue created or destroyed where the twin's draws
                      agree that none is
    off_prediction    a connected region leaves the twin's own prediction by more than Z spreads,
                      larger than honest outputs have (`twin.hallucination`)
    tissue_intensity  brain voxels brighter or darker than any tissue of the training scans, more
                      than honest outputs have

volume_rate and state_distance are rules from the training cohort. The other thresholds are
fitted on honest outputs (point forecasts and draws) of the subjects held out for calibration:
each is the conformal (1 - BUDGET) quantile of its statistic there, so each check falsely flags
about BUDGET of honest outputs of new patients, and no corrupted scan is ever seen in fitting
them. jacobian, state_distance and samples_disagree judge the request (the
twin's prediction); the others judge the output itself, so any scan can be checked against the
twin's prediction, not only the twin's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import hallucination

CHECKS = ("jacobian", "volume_rate", "state_distance", "samples_disagree", "deformation", "off_prediction",
          "tissue_intensity")
FITTED = ("jacobian", "samples_disagree", "deformation", "off_prediction", "tissue_intensity")
BUDGET = 0.02  # honest outputs falsely flagged, per fitted check: the 10% allowance shared by the 5 (Bonferroni)
FLOOR_SHARE = 0.02  # spread floor of off_prediction, as a share of the training intensity range
LOG_J_FLOOR = 0.02  # spread floor of deformation: a 2% local volume change is never resolved
LOG_J_SMOOTH = 2.0  # voxels: deformation compares log det J maps blurred this much (`smooth_log_jacobian`)
REASONS = {
    "jacobian": "the twin's deformation of the reference {}",
    "deformation": "local volume changes by {:.1f} of the draws' spreads, where they agree it does not",
    "volume_rate": "a measured volume changes faster than twice the fastest change between training scans",
    "state_distance": "the state lies outside the training cohort's (Mahalanobis distance beyond the 99.9% level)",
    "samples_disagree": f"the drawn scans disagree more than for {100 * (1 - BUDGET):g}% of held-out requests "
                        "(mean sd {:.3g} per year)",
    "off_prediction": "a region of {:.0f} voxels departs from the twin's prediction by more than 4 spreads",
    "tissue_intensity": "{:.0f} brain voxels lie outside every tissue's intensity in the training scans",
}


@dataclass(frozen=True)
class Requests:
    """What the checks need of N outputs, one per answered request (s_idx, r_idx index (S, R)).

    reference, centre, spread (N, C, *space): the scan each starts from, the point forecast, the
    draws' sd; mask (N, *space); gap (N,) years from the reference scan; state_d2 (N,) squared
    Mahalanobis distance of the state; reference_volumes (N, structures) mL; voxel_ml (N,);
    jacobian (N,) max |log det J| of the point forecast's deformation, inf where it or a draw's folds;
    log_jacobian_sd (N, *space) the draws' sd of log det J.
    """

    s_idx: np.ndarray
    r_idx: np.ndarray
    reference: np.ndarray
    mask: np.ndarray
    centre: np.ndarray
    spread: np.ndarray
    gap: np.ndarray
    state_d2: np.ndarray
    reference_volumes: np.ndarray
    voxel_ml: np.ndarray
    jacobian: np.ndarray
    log_jacobian_sd: np.ndarray

    def take(self, i: np.ndarray) -> Requests:
        return Requests(**{k: getattr(self, k)[i] for k in self.__dataclass_fields__})


def requests_of(twin, draws, arm: int = 0, shrink: float | None = None) -> Requests:
    """The answered requests of a `ScanDraws` for arm `arm`, in (s, r) order; `shrink`: the point
    forecast's multiple of the mean code (default: the twin's calibrated one)."""
    import torch

    from twin.data.geometry import voxel_volume_ml

    valid = np.isfinite(draws.dynamics.since)
    s_idx, r_idx = np.nonzero(valid)
    scans = draws.scans[arm][:, s_idx, r_idx]  # (K, N, C, *space)
    one = draws.dynamics.one
    state = draws.dynamics.standardised[arm][0][:, s_idx, r_idx].mean(0)  # (N, B)
    centred = state - np.asarray(twin.limits["state_mean"])
    inv = np.linalg.inv(np.asarray(twin.limits["state_cov"]))
    shrink = twin.calibration.get("shrink", 1.0) if shrink is None else shrink
    with torch.no_grad():
        det = twin.decoder.decode(torch.as_tensor(draws.reference[s_idx, r_idx]),
                                  shrink * torch.as_tensor(draws.codes[arm][s_idx, r_idx]),
                                  torch.as_tensor(draws.mask[s_idx])).jacobian.numpy()
    jacobian = np.where(draws.folded[arm][:, s_idx, r_idx].any(0), np.inf,
                        hallucination.jacobian_extent(det, draws.mask[s_idx]))
    return Requests(s_idx=s_idx, r_idx=r_idx, reference=draws.reference[s_idx, r_idx], mask=draws.mask[s_idx],
                    centre=draws.point[arm][s_idx, r_idx], spread=scans.std(axis=0),
                    gap=np.abs(draws.dynamics.since - draws.reference_since)[s_idx, r_idx],
                    state_d2=np.einsum("nb,bc,nc->n", centred, inv, centred),
                    reference_volumes=draws.reference_volumes[s_idx, r_idx],
                    voxel_ml=np.asarray([voxel_volume_ml(a) for a in one["affine"].values])[s_idx], jacobian=jacobian,
                    log_jacobian_sd=draws.log_jacobian_sd[arm][s_idx, r_idx])


def statistics(twin, scans: np.ndarray, req: Requests) -> dict[str, np.ndarray]:
    """Each check's statistic for outputs `scans` (N, C, *space) of `req` -> {check: (N,)}.

    jacobian: max |log det J| per year; volume_rate and state_distance: the value over its rule's
    limit; samples_disagree: the draws' mean sd in the brain per year; deformation: spreads;
    off_prediction, tissue_intensity: voxels. Years are from the reference scan, at least a quarter.
    """
    import torch

    from .scan_twin import _register_coarse
    from .segment import measure_volumes

    mask = req.mask
    centre_t, mask_t = torch.as_tensor(req.centre, dtype=torch.float32), torch.as_tensor(mask)
    code = _register_coarse(centre_t, torch.as_tensor(scans, dtype=torch.float32), mask_t, twin.config, progress=False)
    with torch.no_grad():
        log_det = smooth_log_jacobian(twin.decoder.decode(centre_t, code, mask_t).jacobian).numpy()
    volumes = np.stack([np.stack(list(measure_volumes(scans[i], mask[i], twin.channels, req.voxel_ml[i]).values()))
                        for i in range(len(scans))])
    limit = np.asarray([math.inf if v is None else v for v in twin.limits["volume_rate"]])
    years = np.maximum(req.gap, 0.25)
    rate = np.abs(volumes - req.reference_volumes) / years[:, None]
    floor = FLOOR_SHARE * (np.max(twin.limits["intensity_high"]) - np.min(twin.limits["intensity_low"]))
    inside = mask[:, None] & np.ones_like(req.spread, dtype=bool)
    return {
        "jacobian": req.jacobian / years,
        "deformation": hallucination.largest_z(log_det, req.log_jacobian_sd, mask, LOG_J_FLOOR),
        "volume_rate": (rate / limit).max(axis=1),
        "state_distance": req.state_d2 / twin.limits["state_distance"],
        "samples_disagree": np.asarray([s[m].mean() for s, m in zip(req.spread, inside)]) / years,
        "off_prediction": hallucination.off_prediction(scans, req.centre, req.spread, mask, floor),
        "tissue_intensity": hallucination.tissue_intensity(scans, mask, twin.limits["intensity_low"],
                                                           twin.limits["intensity_high"]),
    }


def smooth_log_jacobian(det):
    """log det J (B, *space), folds clamped at 1e-3, blurred by LOG_J_SMOOTH voxels: the scale at which a
    registration resolves a deformation, so a registered output and the twin's own draws compare alike."""
    import torch

    from .registration import _blur

    return _blur(torch.log(det.clamp_min(1e-3)).double()[:, None], LOG_J_SMOOTH)[:, 0]


def fit_thresholds(stats: dict[str, np.ndarray], budget: float = BUDGET) -> dict[str, float | None]:
    """The fitted checks' thresholds from honest outputs' statistics: the ceil((n + 1)(1 - budget))-th
    smallest of the n finite values (split-conformal), so a new honest output exceeds it with
    probability <= budget; with too few outputs for that, the largest (probability about 1 / (n + 1)).
    None (never flags) without any."""
    out = {}
    for name in FITTED:
        v = np.sort(np.asarray(stats[name], dtype=np.float64))
        v = v[np.isfinite(v)]
        k = min(math.ceil((len(v) + 1) * (1 - budget)), len(v))
        out[name] = float(v[k - 1]) if k > 0 else None
    return out


def flags(stats: dict[str, np.ndarray], thresholds: dict[str, float | None]) -> np.ndarray:
    """(checks, N) True where an output fails a check: a fitted statistic above its threshold (a fold
    always fails jacobian), a rule's value above 1."""
    out = []
    for name in CHECKS:
        v = np.asarray(stats[name])
        limit = thresholds.get(name) if name in FITTED else 1.0
        failed = v > (math.inf if limit is None else limit)
        out.append(failed | np.isposinf(v) if name == "jacobian" else failed)
    return np.stack(out)


def explain(flagged: np.ndarray, stats: dict[str, np.ndarray], where: list[str]) -> list[str]:
    """One sentence per failed check: `where[n]` names output n ("subject s at t")."""
    out = []
    for c, n in zip(*np.nonzero(flagged)):
        name, v = CHECKS[c], float(stats[CHECKS[c]][n])
        if name == "jacobian":
            text = REASONS[name].format("folds (det J <= 0)" if math.isinf(v) else
                                        f"changes local volume at {v:.2f} (|log det J|) a year, faster than "
                                        "its calibration")
        else:
            text = REASONS[name].format(v)
        out.append(f"{where[n]}: {text}")
    return out
