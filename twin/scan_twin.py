"""The scan twin: the biomarker twin's dynamics, decoded into scans with calibrated voxel bands.

    twin = ScanTwin.fit(cohort, ScanConfig(), checkpoint_dir="model")
    twin.forecast(cohort, horizons=[1, 2])          # scans and biomarkers, years after the last visit
    twin.fill(cohort)                               # each subject's missed planned visits
    twin.simulate(cohort, "arms.yaml", horizons=[1, 2])
    ScanTwin.load("model")

How an answer is made, per request (subject, time t):
1. The dynamics (`BiomarkerTwin`) draw K noise-free state trajectories y(t) from the subject's
   posterior (standardised biomarker units), evaluated at t and at t_ref, the time of the
   subject's observed scan nearest to t (the reference: the last scan for a forecast).
2. The decoder (`ScanDecoder`) turns each draw into a change code (mean change from the state
   change, residual from the diffusion model) and the code into a scan: a diffeomorphic
   deformation of the reference plus a bounded residual, unchanged outside the brain mask.
3. The K scans give a mean, quantile bands, a spread map, and volumes measured on each scan
   (`twin.segment`) with their own bands. Bands are scaled by split-conformal factors fitted on
   held-out subjects (their later observed scans forecast from their first visits), voxel by
   voxel and volume by volume, so that a 90% band holds about 90% of what a scanner measures.
4. Plausibility flags per request, on the point forecast (`twin.scan_checks`): folding or
   extreme local volume change, a volume changing faster than any training pair did, a state
   far from the training cohort's, draws that disagree, a region off the prediction, tissue
   intensities no training scan has; thresholds fitted on honest held-out outputs.

Cohorts with images and no biomarkers get biomarkers measured on their scans (the volumes of
`twin.segment`), and the dynamics run on those. Training data for the decoder: every ordered
pair of a training subject's observed scans, registered into a change code (`twin.registration`).

Model directory: MODEL_DIR/dynamics (the biomarker twin's checkpoint), MODEL_DIR/codes (the
registered pairs, so that an interrupted training resumes without registering again) and
MODEL_DIR/decoder (the decoder's tensors and everything else, JSON); safetensors, no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from twin.errors import InputError
from twin.settings import known_settings

from .biomarker_twin import BiomarkerTwin, Draws, TwinConfig, cohort_fingerprint
from .checkpoint import has_checkpoint, read_checkpoint, write_checkpoint
from .metrics import conformal_scale, conformal_scores, holdout_subjects
from .scan_checks import CHECKS, explain, fit_thresholds, flags, requests_of, smooth_log_jacobian, statistics
from .scan_decoder import DecoderConfig, Pairs, ScanDecoder

MODEL_FORMAT = "twin-scan-model/2"  # /2: plausibility thresholds fitted at calibration
SCAN_CHECKS = CHECKS
CHECKED_OUTPUTS = 800  # honest calibration outputs that fit the check thresholds (about; registration's cost)
MAX_SCORES = 400_000  # voxel scores kept for calibration (a random subset; the quantile barely moves)


@dataclass(frozen=True)
class ScanConfig:
    """How to fit and sample the scan twin.

    n_samples: scans drawn per request; registration_iterations: Adam steps per registered pair;
    max_pairs: most training pairs (a seeded random subset beyond that); calibration_fraction:
    subjects held out of the decoder's training to calibrate the bands (0: calibrate in-sample);
    state_draws: dynamics draws averaged into a training pair's state; chunk: decoder items per
    batch at sampling (memory); seed: splits, subsets and default draws. `dynamics` and
    `decoder` configure the two parts.
    """

    n_samples: int = 16
    registration_iterations: int = 150
    max_pairs: int = 2000
    calibration_fraction: float = 0.2
    state_draws: int = 32
    chunk: int = 256
    seed: int = 0
    dynamics: TwinConfig = field(default_factory=TwinConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self):
        for name, low in (("n_samples", 2), ("registration_iterations", 1), ("max_pairs", 2), ("state_draws", 2),
                          ("chunk", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise InputError(f"expected an integer >= {low}, got {value!r}", source="ScanConfig", field=name)
        f = self.calibration_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
            raise InputError(f"expected a number in [0, 1), got {f!r}", source="ScanConfig", field="calibration_fraction")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**d, "dynamics": self.dynamics.to_dict(), "decoder": self.decoder.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping, *, source: str = "ScanConfig") -> ScanConfig:
        """From a mapping (JSON); unknown keys raise (in the nested parts too), missing ones take defaults."""
        d = known_settings(cls, d, source=source)
        if "dynamics" in d:
            d["dynamics"] = TwinConfig.from_dict(d["dynamics"], source=f"{source}: dynamics")
        if "decoder" in d:
            d["decoder"] = DecoderConfig.from_dict(d["decoder"], source=f"{source}: decoder")
        return cls(**d)


@dataclass(frozen=True)
class ScanDraws:
    """Scans drawn for requests: the dynamics' draws and, per arm, K scans (K, S, R, C, *space).

    reference (S, R, C, *space) the observed scan each request starts from, at reference_since
    (S, R) years since baseline; folded (arm list of (K, S, R) bool): det J <= 0 somewhere in the
    brain; codes (arm list of (S, R, code channels, *grid)): the mean over draws of the change
    their states explain (mu, without the diffusion's residual); point (arm
    list of (S, R, C, *space)): the scan of the mean code times the calibrated shrinkage, the
    point forecast; log_jacobian_sd (arm list of (S, R, *space)): the sd over draws of log det J
    of their deformations, how much the draws disagree about local volume (`twin.scan_checks`);
    reference_volumes (S, R, structures): the reference scans' measured volumes, mL, shared by
    every arm and every check; NaN pads missing requests everywhere.
    """

    dynamics: Draws
    scans: list
    folded: list
    point: list
    codes: list
    reference: np.ndarray
    reference_since: np.ndarray
    mask: np.ndarray
    log_jacobian_sd: list
    reference_volumes: np.ndarray


class ScanTwin:
    """A fitted scan twin: the dynamics, the decoder, band calibration and plausibility limits."""

    def __init__(self, dynamics: BiomarkerTwin, decoder: ScanDecoder, config: ScanConfig, *, calibration: dict,
                 limits: dict, derived_biomarkers: bool, channels: Sequence[str], structures: Sequence[str],
                 record: dict | None = None, cohort_fingerprint: str = ""):
        self.dynamics, self.decoder, self.config = dynamics, decoder, config
        self.calibration, self.limits, self.derived_biomarkers = calibration, limits, derived_biomarkers
        self.channels, self.structures = tuple(channels), tuple(structures)
        self.record, self.cohort_fingerprint = record or {}, cohort_fingerprint

    # ---- fitting ------------------------------------------------------------------------------

    @classmethod
    def fit(cls, ds: xr.Dataset, config: ScanConfig = ScanConfig(), *, checkpoint_dir: str | os.PathLike | None = None,
            overwrite: bool = False, progress: bool = True) -> ScanTwin:
        """Fit on a cohort with scans (and biomarkers, or volumes measured on the scans stand in).

        With `checkpoint_dir`, the dynamics and the registered training pairs are saved as they
        are made and reused when the same cohort and config are fitted again there (an
        interrupted training resumes at the last finished stage); the finished twin is saved there.
        """
        from .segment import structures_for

        ds = _with_mask(ds)
        fingerprint = cohort_fingerprint(ds)
        root = None if checkpoint_dir is None else Path(checkpoint_dir)
        if root is not None:
            done = _finished(root, fingerprint, config, overwrite)
            if done is not None:
                return done
            root.mkdir(parents=True, exist_ok=True)
        channels = [str(c) for c in ds["channel"].values]
        derived = "biomarkers" not in ds
        if derived:
            ds = with_scan_biomarkers(ds)
        ids = [str(s) for s in ds["subject"].values]
        held = holdout_subjects(ids, config.calibration_fraction, config.seed)
        if held.all() or held.sum() == 0:
            held[:] = False
        train = ds.isel(subject=np.flatnonzero(~held))

        clock = {"start": time.perf_counter()}
        dynamics = BiomarkerTwin.fit(ds, config.dynamics, progress=progress, overwrite=overwrite,
                                     checkpoint_dir=None if root is None else root / "dynamics")
        clock["dynamics"] = time.perf_counter()
        pairs = _training_pairs(dynamics, train, config, fingerprint, root, progress)
        clock["registration"] = time.perf_counter()
        dims = len(pairs.reference.shape) - 2
        decoder = ScanDecoder(len(channels), dims, pairs.state_change.shape[1], config.decoder)
        record = decoder.fit(pairs, progress=progress)
        clock["decoder"] = time.perf_counter()
        limits = _limits(pairs, train, channels)
        twin = cls(dynamics, decoder, config, calibration={}, limits=limits, derived_biomarkers=derived,
                   channels=channels, structures=structures_for(channels), record=record,
                   cohort_fingerprint=fingerprint)
        twin.calibration = twin._calibrate(ds.isel(subject=np.flatnonzero(held)) if held.any() else train,
                                           in_sample=not held.any())
        clock["calibration"] = time.perf_counter()
        stages = list(clock)
        twin.record["seconds"] = {b: round(clock[b] - clock[a], 2) for a, b in zip(stages, stages[1:])}
        if root is not None:
            twin.save(root)
        return twin

    # ---- checkpoints --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write MODEL_DIR/dynamics and MODEL_DIR/decoder (safetensors + JSON, each atomically)."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self.dynamics.save(root / "dynamics")
        tensors = {f"decoder.{k}": v.detach().contiguous() for k, v in self.decoder.state_dict().items()}
        write_checkpoint(root / "decoder", tensors, self._meta())
        return root

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScanTwin:
        """A saved scan twin; anything else at `path` is an InputError naming it."""
        root = Path(path)
        if not has_checkpoint(root / "decoder"):
            raise InputError("no scan twin here (expected MODEL_DIR/decoder from `twin train` on a cohort with scans)",
                             source=str(root))
        tensors, meta = read_checkpoint(root / "decoder")
        return cls._from_checkpoint(BiomarkerTwin.load(root / "dynamics"), tensors, meta, str(root))

    @classmethod
    def _from_checkpoint(cls, dynamics: BiomarkerTwin, tensors: dict, meta: dict, source: str) -> ScanTwin:
        if meta.get("format") == "twin-scan-model/1":
            raise InputError("a scan twin of an earlier version (format twin-scan-model/1, without the fitted "
                             "plausibility checks); train it again", source=source, field="format")
        if meta.get("format") != MODEL_FORMAT or not meta.get("complete"):
            raise InputError(f"not a complete scan twin (expected format {MODEL_FORMAT!r})", source=source,
                             field="format")
        config = ScanConfig.from_dict(meta["config"], source=source)
        decoder = ScanDecoder(len(meta["channels"]), int(meta["dims"]), int(meta["state_dim"]), config.decoder)
        try:
            decoder.load_state_dict({k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")})
        except RuntimeError as err:
            raise InputError(f"decoder tensors do not fit the config ({err})", source=source, field="decoder") from None
        for p in decoder.parameters():
            p.requires_grad_(False)
        return cls(dynamics, decoder, config, calibration=meta["calibration"], limits=meta["limits"],
                   derived_biomarkers=bool(meta["derived_biomarkers"]), channels=meta["channels"],
                   structures=meta["structures"], record=meta.get("record"),
                   cohort_fingerprint=meta.get("cohort_fingerprint", ""))

    def _meta(self) -> dict:
        return {"format": MODEL_FORMAT, "complete": True, "config": self.config.to_dict(),
                "channels": list(self.channels), "dims": self.decoder.dims, "state_dim": self.decoder.state_dim,
                "structures": list(self.structures), "derived_biomarkers": self.derived_biomarkers,
                "calibration": self.calibration, "limits": self.limits, "record": self.record,
                "cohort_fingerprint": self.cohort_fingerprint}

    @property
    def fingerprint(self) -> str:
        """A short hash of everything the answers depend on."""
        digest = hashlib.sha256(json.dumps(self._meta(), sort_keys=True, default=str).encode())
        digest.update(self.dynamics.fingerprint.encode())
        for name, value in sorted(self.decoder.state_dict().items()):
            digest.update(name.encode() + value.detach().numpy().tobytes())
        return digest.hexdigest()[:16]

    # ---- answers ------------------------------------------------------------------------------

    def forecast(self, ds: xr.Dataset, subjects: Sequence[str] | None = None, *, horizons=None, at=None,
                 n_samples: int | None = None, samples: bool = False, seed: int | None = None) -> xr.Dataset:
        """Scans and biomarkers at `horizons` (years after each subject's last visit) or `at` (times on
        the cohort's clock per subject), as `BiomarkerTwin.forecast`; see docs/results-format.md."""
        if (horizons is None) == (at is None):
            raise InputError("give exactly one of horizons (years after the last visit) and at (times on the "
                             "cohort's clock)", source="forecast", field="horizons")
        return self._answer("forecast", ds, subjects, horizons, at, n_samples, samples, seed)

    def fill(self, ds: xr.Dataset, subjects: Sequence[str] | None = None, *, at=None, n_samples: int | None = None,
             samples: bool = False, seed: int | None = None) -> xr.Dataset:
        """Scans and biomarkers at each subject's missed planned visits (or `at`), from the nearest scan."""
        if at is None:
            at = self.dynamics.missed_visits(ds, subjects)
            subjects = list(at)
        return self._answer("fill", ds, subjects, None, at, n_samples, samples, seed)

    def simulate(self, ds: xr.Dataset, scenario, subjects: Sequence[str] | None = None, *,
                 horizons=(0.5, 1.0, 2.0), at=None, n_samples: int | None = None, samples: bool = False,
                 seed: int | None = None) -> xr.Dataset:
        """Each subject under its own schedule and under each arm of `scenario` (as
        `BiomarkerTwin.simulate`), with scans per arm and `scan_effect_mean` = arm - factual."""
        scenario = self.dynamics.scenario(scenario)
        return self._answer("scenario", ds, subjects, None if at is not None else horizons, at, n_samples,
                            samples, seed, scenario=scenario)

    def draw_scans(self, ds: xr.Dataset, subjects=None, *, horizons=None, at=None, n_samples: int | None = None,
                   seed: int | None = None, scenario=None, source: str = "forecast", progress: bool = False
                   ) -> ScanDraws:
        """The uncalibrated draws behind an answer: K scans per request and arm (see `ScanDraws`)."""
        ds = _with_mask(ds)
        if self.derived_biomarkers:
            ds = with_scan_biomarkers(ds)
        missing = [c for c in self.channels if c not in [str(c) for c in ds["channel"].values]]
        if missing:
            raise InputError(f"the cohort lacks channel(s) {missing} the twin was trained on", source="cohort",
                             field="channel")
        ds = ds.sel(channel=list(self.channels))
        n = self.config.n_samples if n_samples is None else int(n_samples)
        seed = self.config.seed if seed is None else int(seed)
        if n < 2:
            raise InputError(f"need at least 2 samples, got {n}", source=source, field="n_samples")
        # the biomarker bands keep the dynamics' own number of draws; the first n of them become scans
        d = self.dynamics.draws(ds, subjects, horizons=horizons, at=at, n_samples=max(n, self.dynamics.config.n_samples),
                                seed=seed, scenario=scenario, also=_nearest_scan_time, source=source)
        one = d.one
        ref_since = _nearest_scan_time(one, d.since)
        reference = _reference_scans(one, ref_since)
        mask = one["mask"].values.astype(bool)
        valid = np.isfinite(d.since)
        s_idx, r_idx = np.nonzero(valid)
        items = len(s_idx)
        grid = _grid_shape(reference.shape[3:], self.decoder.config.factor)
        generator = torch.Generator().manual_seed(seed)
        # one x_T per (draw, request), shared by every arm: arms differ by their treatment only
        x_T = torch.randn((n, items, self.decoder.code_channels, *grid), generator=generator)
        scans, folded, point, codes, log_jacobian_sd = [], [], [], [], []
        for a in range(len(d.arms)):
            state_t, state_ref = d.standardised[a]
            out = np.full((n, *valid.shape, *reference.shape[2:]), np.nan, np.float32)
            fold = np.zeros((n, *valid.shape), bool)
            ref_t = torch.as_tensor(reference[s_idx, r_idx], dtype=torch.float32)
            mask_t = torch.as_tensor(mask[s_idx])
            gap = torch.as_tensor(d.since[s_idx, r_idx] - ref_since[s_idx, r_idx], dtype=torch.float32)
            code_sum = torch.zeros((items, *x_T.shape[2:]))
            log_j = torch.zeros((2, items, *reference.shape[3:]), dtype=torch.float64)  # sum, sum of squares
            for k in _progress(range(n), progress, f"drawing scans ({d.arms[a]})"):
                y_ref = torch.as_tensor(state_ref[k, s_idx, r_idx], dtype=torch.float32)
                dy = torch.as_tensor(state_t[k, s_idx, r_idx], dtype=torch.float32) - y_ref
                for lo in range(0, items, self.config.chunk):
                    sl = slice(lo, lo + self.config.chunk)
                    code, mu = self.decoder.sample_codes(ref_t[sl], mask_t[sl], y_ref[sl], dy[sl], gap[sl],
                                                         generator, x_T=x_T[k, sl])
                    code_sum[sl] += mu
                    with torch.no_grad():
                        decoded = self.decoder.decode(ref_t[sl], code, mask_t[sl])
                    out[k, s_idx[sl], r_idx[sl]] = decoded.scan.numpy()
                    det = torch.where(mask_t[sl], decoded.jacobian, torch.ones_like(decoded.jacobian))
                    fold[k, s_idx[sl], r_idx[sl]] = (det.flatten(1).amin(1) <= 0).numpy()
                    log_det = smooth_log_jacobian(det)
                    log_j[0, sl] += log_det
                    log_j[1, sl] += log_det ** 2
            # the point forecast: the scan of the mean change the draws' states explain. The voxelwise
            # mean of the draws would blur every edge the draws move by different amounts (no change
            # at all), and the residual draws average to noise, not to a change.
            mean_code = np.full((*valid.shape, *code_sum.shape[1:]), np.nan, np.float32)
            mean_code[s_idx, r_idx] = (code_sum / n).numpy()
            scans.append(out)
            folded.append(fold)
            sd = np.full((*valid.shape, *reference.shape[3:]), np.nan, np.float32)
            sd[s_idx, r_idx] = torch.sqrt(torch.clamp(log_j[1] / n - (log_j[0] / n) ** 2, min=0.0)).numpy()
            log_jacobian_sd.append(sd)
            codes.append(mean_code)
            point.append(self._point(reference, mean_code, mask, self.calibration.get("shrink", 1.0)))
        return ScanDraws(d, scans, folded, point, codes, reference, ref_since, mask, log_jacobian_sd,
                         _measured(reference, mask, one, self.channels))

    def _point(self, reference: np.ndarray, mean_code: np.ndarray, mask: np.ndarray, shrink: float) -> np.ndarray:
        """The point forecasts (S, R, C, *space): the scans of shrink x the mean codes (S, R, k, *grid)."""
        valid = np.isfinite(mean_code.reshape(*mean_code.shape[:2], -1)).all(-1)
        s_idx, r_idx = np.nonzero(valid)
        best = np.full(reference.shape, np.nan, np.float32)
        with torch.no_grad():
            for lo in range(0, len(s_idx), self.config.chunk):
                i, j = s_idx[lo:lo + self.config.chunk], r_idx[lo:lo + self.config.chunk]
                code = shrink * torch.as_tensor(mean_code[i, j])
                best[i, j] = self.decoder.decode(torch.as_tensor(reference[i, j]), code, torch.as_tensor(mask[i])).scan.numpy()
        return best

    @property
    def subjects(self) -> tuple[str, ...]:
        """Every subject the twin was fitted on (calibration subjects too)."""
        return self.dynamics.subjects

    def _answer(self, kind, ds, subjects, horizons, at, n_samples, samples, seed, scenario=None) -> xr.Dataset:
        return self._answer_with_draws(kind, ds, subjects, horizons, at, n_samples, samples, seed, scenario)[0]

    def _answer_with_draws(self, kind, ds, subjects, horizons, at, n_samples, samples, seed, scenario=None
                           ) -> tuple[xr.Dataset, ScanDraws]:
        """The answer and the draws behind it (`twin.evaluation` checks corrupted copies against them)."""
        draws = self.draw_scans(ds, subjects, horizons=horizons, at=at, n_samples=n_samples, seed=seed,
                                scenario=scenario, source=kind)
        if self.derived_biomarkers:
            ds = with_scan_biomarkers(ds)
        result = self.dynamics._summary(kind, draws.dynamics, ds, samples, scenario)
        return _with_scans(result, self, draws, samples, scenario is not None), draws

    # ---- calibration --------------------------------------------------------------------------

    def _calibrate(self, ds: xr.Dataset, *, in_sample: bool) -> dict:
        """Conformal band factors for voxels and volumes from history cuts of `ds`'s subjects.

        Each subject with 2+ observed scans keeps the first half of them (at least one) and is
        forecast at the rest; the scores of the observed scans there against the raw bands give
        one factor per band level (all voxels inside the brain pooled, and per structure).
        """
        cut, at = _history_cuts(ds)
        levels = self.dynamics.config.band_levels
        if not at:
            return {"levels": list(levels), "voxel": [1.0] * len(levels),
                    "volume": {s: [1.0] * len(levels) for s in self.structures}, "cases": 0, "in_sample": in_sample,
                    "shrink": 1.0, "checks": {}}
        draws = self.draw_scans(cut, list(at), at=at, seed=self.config.seed, source="calibration")
        one = draws.dynamics.one
        target, target_ok = _observed_at(ds.sel(subject=one["subject"].values), draws.dynamics.since)
        scans = draws.scans[0]
        qs = self.dynamics.config.quantiles
        rng = np.random.default_rng(self.config.seed)
        shrink, errors = _fit_shrink(self, draws, target, target_ok)
        draws.point[0] = self._point(draws.reference, draws.codes[0], draws.mask, shrink)
        voxel, volume = [], {s: [] for s in self.structures}
        dims = draws.mask.ndim - 1
        ok = target_ok.reshape(*target_ok.shape, *[1] * (dims + 1))
        inside = np.broadcast_to(draws.mask[:, None, None] & ok, target.shape)  # (S, R, C, *space)
        q = np.quantile(scans, qs, axis=0)  # (Q, S, R, C, *space)
        point = draws.point[0]  # bands sit about the point forecast, with the draws' spread
        q = point[None] + (q - q[qs.index(0.5)][None])
        vols = _volumes(scans, draws.mask, one, self.channels)  # (K, S, R, structures)
        vol_q = np.quantile(vols, qs, axis=0)
        vol_target = _measured(target, draws.mask, one, self.channels)  # (S, R, structures)
        for level in levels:
            lo, hi = qs.index(round((1 - level) / 2, 12)), qs.index(round((1 + level) / 2, 12))
            score = conformal_scores(point, q[lo], q[hi], target)
            flat = score[inside & np.isfinite(score)]
            if flat.size > MAX_SCORES:
                flat = rng.choice(flat, MAX_SCORES, replace=False)
            voxel.append(_finite_or_none(conformal_scale(flat, level)))
            vs = conformal_scores(vol_q[qs.index(0.5)], vol_q[lo], vol_q[hi], vol_target)
            for j, s in enumerate(self.structures):
                volume[s].append(_finite_or_none(conformal_scale(vs[..., j][target_ok], level)))
        return {"levels": list(levels), "voxel": voxel, "volume": volume, "cases": int(target_ok.sum()),
                "in_sample": in_sample, "shrink": shrink, "shrink_code_error": errors,
                "checks": self._fit_checks(draws, shrink, rng)}

    def _fit_checks(self, draws: ScanDraws, shrink: float, rng: np.random.Generator) -> dict[str, float]:
        """Thresholds of the fitted plausibility checks from honest outputs of the calibration requests:
        each one's point forecast and some of its draws (`twin.scan_checks`), about CHECKED_OUTPUTS
        in all: a small cohort's few requests give several draws each, so that a 98% quantile is
        a quantile and not the largest value seen."""
        req = requests_of(self, draws, shrink=shrink)
        K = draws.scans[0].shape[0]
        per_case = int(np.clip(CHECKED_OUTPUTS // max(len(req.s_idx), 1) - 1, 1, K))
        pick = np.sort(rng.choice(len(req.s_idx), min(len(req.s_idx), CHECKED_OUTPUTS // (per_case + 1)),
                                  replace=False))
        req = req.take(pick)
        outputs = [req.centre] + [draws.scans[0][k, req.s_idx, req.r_idx] for k in rng.permutation(K)[:per_case]]
        stats = [statistics(self, o, req) for o in outputs]
        return fit_thresholds({name: np.concatenate([s[name] for s in stats]) for name in stats[0]})

    def check(self, draws: ScanDraws, scans: np.ndarray, arm: int = 0) -> tuple[np.ndarray, dict, list[str]]:
        """Check outputs `scans` (S, R, C, *space) of the requests of `draws` (any scans: the twin's own
        or another's) -> (flags (checks, S, R), statistics {check: (S, R)}, reasons); see twin.scan_checks."""
        req = requests_of(self, draws, arm)
        stats = statistics(self, scans[req.s_idx, req.r_idx], req)
        failed = flags(stats, self.calibration.get("checks", {}))
        shape = draws.dynamics.since.shape
        out = np.zeros((len(CHECKS), *shape), bool)
        out[:, req.s_idx, req.r_idx] = failed
        full = {}
        for name, v in stats.items():
            full[name] = np.full(shape, np.nan)
            full[name][req.s_idx, req.r_idx] = v
        one = draws.dynamics.one
        ids = [str(s) for s in one["subject"].values]
        clock = one["baseline_time"].values[:, None] + draws.dynamics.since
        where = [f"subject {ids[s]} at {clock[s, r]:g}" for s, r in zip(req.s_idx, req.r_idx)]
        return out, full, explain(failed, stats, where)


def _finite_or_none(factor: float) -> float | None:
    """A band factor for JSON: None where too few calibration cases bound the band (conformal_scale's inf)."""
    return factor if np.isfinite(factor) else None


SHRINKS = tuple(round(0.1 * i, 1) for i in range(11))


def _fit_shrink(twin: ScanTwin, draws: ScanDraws, target: np.ndarray, found: np.ndarray) -> tuple[float, dict]:
    """The multiple of the mean change code that best predicts held-out subjects' later scans.

    The decoder's mean change is learned from registrations of noisy scans; where the true change
    is small against that noise (a year of atrophy) its estimate can be mostly noise, and a
    forecast is better with less of it. Each calibration case's own change is registered (its
    reference to the acquired scan at t, head position removed, as for training) and the
    multiples are ranked by the squared error of their codes against it, each code channel in
    units of its spread. Code space, not voxels: against a noisy scan any blur of the reference
    lowers the voxel error, so voxel errors would reward blurring as if it were change. The
    registration noise is independent of the forecast, so it adds a constant to every multiple.
    Grid 0, 0.1, ..., 1; 0 is copy-last. The smallest multiple not worse than the best by more than
    one standard error of the paired difference (over subjects, whose cases share a course) wins:
    with ten-odd calibration subjects the best multiple is itself noisy, and a change the evidence
    cannot tell from none is not worth drawing.
    """
    from .registration import remove_rigid

    s_idx, r_idx = np.nonzero(found & np.isfinite(draws.codes[0].reshape(*found.shape, -1)).all(-1))
    if s_idx.size == 0:
        return 1.0, {}
    mask = torch.as_tensor(draws.mask[s_idx])
    observed = _register_coarse(torch.as_tensor(draws.reference[s_idx, r_idx]), torch.as_tensor(target[s_idx, r_idx]),
                                mask, twin.config, progress=False)
    observed = remove_rigid(observed, mask, twin.decoder.config.factor).numpy()
    predicted = draws.codes[0][s_idx, r_idx]
    scale = observed.transpose(1, 0, *range(2, observed.ndim)).reshape(observed.shape[1], -1).std(axis=1) + 1e-6
    shape = (1, -1, *[1] * (observed.ndim - 2))
    per_case = {shrink: (((shrink * predicted - observed) / scale.reshape(shape)) ** 2).reshape(len(s_idx), -1).mean(1)
                for shrink in SHRINKS}
    return _one_se_choice(per_case, s_idx), {str(k): float(e.mean()) for k, e in per_case.items()}


def _one_se_choice(per_case: dict[float, np.ndarray], group: np.ndarray) -> float:
    """The smallest key whose errors (N,) exceed the lowest mean error's by at most one standard
    error of their paired difference, the N cases averaged within `group` (N,) first."""
    best = min(per_case, key=lambda k: per_case[k].mean())
    groups = np.unique(group)
    for key in sorted(per_case):
        d = per_case[key] - per_case[best]
        by_group = np.asarray([d[group == g].mean() for g in groups])
        se = by_group.std(ddof=1) / np.sqrt(len(groups)) if len(groups) > 1 else 0.0
        if by_group.mean() <= se:
            return key
    return best


def load_twin(path: str | os.PathLike) -> ScanTwin | BiomarkerTwin:
    """The twin saved at `path`: a scan twin (MODEL_DIR/decoder) or a biomarker twin."""
    root = Path(path)
    return ScanTwin.load(root) if (root / "decoder").is_dir() else BiomarkerTwin.load(root)


# ---- cohort helpers ---------------------------------------------------------------------------


def _with_mask(ds: xr.Dataset) -> xr.Dataset:
    """The cohort, checked to have scans, with a brain mask: its own, or (imported without one) each
    subject's `twin.segment.brain_mask` of its first observed scan, which every history keeps."""
    from .segment import brain_mask

    if "image" not in ds:
        raise InputError("the cohort has no 'image'; the scan twin needs scans (use the biomarker twin for tables)",
                         source="cohort", field="image")
    if "mask" in ds:
        return ds
    scan_t = _observed_scan_times(ds)
    masks = []
    for s in range(ds.sizes["subject"]):
        if not np.isfinite(scan_t[s]).any():
            raise InputError(f"subject {ds['subject'].values[s]} has no observed scan", source="cohort", field="image")
        masks.append(brain_mask(ds["image"].values[s, int(np.nanargmin(scan_t[s]))]))
    space = [d for d in ds["image"].dims if d in ("z", "y", "x")]
    return ds.assign(mask=(("subject", *space), np.stack(masks),
                           {"long_name": "brain mask", "source": "twin.segment.brain_mask of the first scan"}))


def with_scan_biomarkers(ds: xr.Dataset) -> xr.Dataset:
    """The cohort with `biomarkers` measured on its scans (`twin.segment`), for image-only cohorts."""
    from .segment import structures_for

    channels = [str(c) for c in ds["channel"].values]
    names = structures_for(channels)
    image = ds["image"].values
    observed = ds["observed"].values & np.isfinite(image).reshape(*image.shape[:2], -1).all(-1)
    values = np.full((*image.shape[:2], len(names)), np.nan)
    for i in range(image.shape[0]):
        v = np.flatnonzero(observed[i])
        if v.size:
            values[i, v] = _measured(image[i, v][None], ds["mask"].values[i][None], ds.isel(subject=[i]), channels)[0]
    out = ds.assign(biomarkers=(("subject", "visit", "biomarker"), values,
                                {"long_name": "volumes measured on the scans (twin.segment)"}))
    return out.assign_coords(biomarker=np.asarray(names, dtype=object),
                             biomarker_unit=("biomarker", np.asarray(["mL"] * len(names), dtype=object)))


def _measured(scans: np.ndarray, mask: np.ndarray, one: xr.Dataset, channels) -> np.ndarray:
    """Volumes (mL) of scans (S, R, C, *space) with masks (S, *space) -> (S, R, structures); NaN scans give NaN."""
    from twin.data.geometry import voxel_volume_ml

    from .segment import measure_volumes

    out = []
    for i in range(scans.shape[0]):
        ok = np.isfinite(scans[i]).reshape(scans.shape[1], -1).all(1)
        vox = voxel_volume_ml(one["affine"].values[i])
        values = np.full((scans.shape[1], len(_structures(channels))), np.nan)
        if ok.any():
            measured = measure_volumes(scans[i][ok], mask[i], channels, vox)
            values[ok] = np.stack([measured[s] for s in _structures(channels)], axis=-1)
        out.append(values)
    return np.stack(out)


def _volumes(scans: np.ndarray, mask: np.ndarray, one: xr.Dataset, channels) -> np.ndarray:
    """Volumes of K draws (K, S, R, C, *space) -> (K, S, R, structures)."""
    return np.stack([_measured(k, mask, one, channels) for k in scans])


def _structures(channels) -> tuple[str, ...]:
    from .segment import structures_for

    return structures_for(list(channels))


def _observed_scan_times(one: xr.Dataset) -> np.ndarray:
    """(S, V) times since baseline of visits with a scan, NaN elsewhere."""
    image = one["image"].values
    has = one["observed"].values & np.isfinite(image).reshape(*image.shape[:2], -1).all(-1)
    return np.where(has, one["time"].values, np.nan)


def _nearest_scan_time(one: xr.Dataset, since: np.ndarray) -> np.ndarray:
    """(S, R) time of the observed scan nearest each request (the earlier on a tie), NaN for padding."""
    scan_t = _observed_scan_times(one)
    if not np.isfinite(scan_t).any(axis=1).all():
        empty = [str(s) for s, t in zip(one["subject"].values, scan_t) if not np.isfinite(t).any()]
        raise InputError(f"subject(s) {empty[:5]} have no observed scan to start from", source="cohort", field="image")
    dist = np.abs(since[:, :, None] - scan_t[:, None, :])
    dist = np.where(np.isfinite(dist), dist + 1e-9 * (since[:, :, None] < scan_t[:, None, :]), np.inf)
    best = np.argmin(dist, axis=2)
    t = np.take_along_axis(np.broadcast_to(scan_t[:, None, :], dist.shape), best[..., None], 2)[..., 0]
    return np.where(np.isfinite(since), t, np.nan)


def _reference_scans(one: xr.Dataset, ref_since: np.ndarray) -> np.ndarray:
    """The observed scans at `ref_since` (S, R) -> (S, R, C, *space); NaN where the request is padding."""
    image = one["image"].values
    scan_t = _observed_scan_times(one)
    out = np.full((*ref_since.shape, *image.shape[2:]), np.nan, np.float32)
    for s in range(ref_since.shape[0]):
        for r in np.flatnonzero(np.isfinite(ref_since[s])):
            v = int(np.nanargmin(np.abs(scan_t[s] - ref_since[s, r])))
            out[s, r] = image[s, v]
    return out


def _observed_at(ds: xr.Dataset, since: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The observed scans at request times (S, R): (scans (S, R, C, *space), found (S, R) bool)."""
    image = ds["image"].values
    scan_t = _observed_scan_times(ds)
    out = np.full((*since.shape, *image.shape[2:]), np.nan, np.float32)
    found = np.zeros(since.shape, bool)
    for s in range(since.shape[0]):
        for r in np.flatnonzero(np.isfinite(since[s])):
            hit = np.flatnonzero(np.abs(scan_t[s] - since[s, r]) < 1e-6)
            if hit.size:
                out[s, r], found[s, r] = image[s, hit[0]], True
    return out, found


def _history_cuts(ds: xr.Dataset) -> tuple[xr.Dataset, dict[str, list[float]]]:
    """Each subject keeps the first half of its observed scans (at least one); the rest become requests."""
    scan_t = _observed_scan_times(ds)
    observed = ds["observed"].values.copy()
    image = ds["image"].values.copy()
    biomarkers = ds["biomarkers"].values.copy()
    base = ds["baseline_time"].values
    at = {}
    for s, subject in enumerate(map(str, ds["subject"].values)):
        v = np.flatnonzero(np.isfinite(scan_t[s]))
        if v.size < 2:
            continue
        later = v[max(1, v.size // 2):]
        observed[s, later] = False
        image[s, later] = np.nan
        biomarkers[s, later] = np.nan
        at[subject] = [float(base[s] + scan_t[s, i]) for i in later]
    cut = ds.assign(observed=(ds["observed"].dims, observed), image=(ds["image"].dims, image, ds["image"].attrs),
                    biomarkers=(ds["biomarkers"].dims, biomarkers, ds["biomarkers"].attrs))
    return cut, at


def _training_pairs(dynamics: BiomarkerTwin, train: xr.Dataset, config: ScanConfig, fingerprint: str,
                    root: Path | None, progress: bool) -> Pairs:
    """Every ordered pair of a subject's observed scans, its states from the dynamics, registered."""
    from .registration import remove_rigid

    scan_t = _observed_scan_times(train)
    base = train["baseline_time"].values
    at = {str(s): [float(base[i] + t) for t in scan_t[i][np.isfinite(scan_t[i])]]
          for i, s in enumerate(train["subject"].values) if np.isfinite(scan_t[i]).sum() >= 2}
    if not at:
        raise InputError("no subject has two observed scans to learn change from", source="cohort", field="image")
    d = dynamics.draws(train, list(at), at=at, n_samples=config.state_draws, seed=config.seed, source="training")
    state = d.standardised[0][0].mean(0)  # (S, R, B): the posterior mean state at each scan
    one = d.one
    image = one["image"].values
    mask = one["mask"].values.astype(bool)
    own_t = _observed_scan_times(one)
    rows = []  # (subject, visit a, visit b, request a, request b), a before b
    for s in range(len(one["subject"])):
        visits = np.flatnonzero(np.isfinite(own_t[s]))
        visits = visits[np.argsort(own_t[s, visits])]
        req = {int(v): int(np.nanargmin(np.abs(d.since[s] - own_t[s, v]))) for v in visits}
        rows += [(s, a, b, req[a], req[b]) for i, a in enumerate(visits) for b in visits[i + 1:]]
    rows = np.asarray(rows)
    if len(rows) > config.max_pairs // 2:
        keep = np.sort(np.random.default_rng(config.seed).choice(len(rows), config.max_pairs // 2, replace=False))
        rows = rows[keep]
    s, a, b, ra, rb = rows.T
    pair_mask = torch.as_tensor(mask[s])
    key = hashlib.sha256(json.dumps([fingerprint, config.to_dict(), rows.tolist()], default=str).encode()).hexdigest()
    code = None
    if root is not None and has_checkpoint(root / "codes"):
        tensors, meta = read_checkpoint(root / "codes")
        if meta.get("key") == key:
            code = tensors["code"]
    if code is None:
        code = _register_coarse(torch.as_tensor(image[s, a], dtype=torch.float32),
                                torch.as_tensor(image[s, b], dtype=torch.float32), pair_mask, config, progress)
        if root is not None:
            write_checkpoint(root / "codes", {"code": code.contiguous()}, {"key": key, "pairs": len(rows)})
    code = remove_rigid(code, pair_mask, config.decoder.factor)  # head position is acquisition, not disease
    # Each pair also serves backwards (a later scan as the reference, as when filling a visit):
    # exp(-v) is exactly the inverse deformation, and -residual undoes the residual to first order.
    both = lambda x, y: np.concatenate([x, y])  # noqa: E731
    s2, ref_v, tgt_v, ref_r, tgt_r = both(s, s), both(a, b), both(b, a), both(ra, rb), both(rb, ra)
    return Pairs(reference=torch.as_tensor(image[s2, ref_v], dtype=torch.float32), mask=torch.as_tensor(mask[s2]),
                 gap=torch.as_tensor(own_t[s2, tgt_v] - own_t[s2, ref_v], dtype=torch.float32),
                 state_ref=torch.as_tensor(state[s2, ref_r], dtype=torch.float32),
                 state_change=torch.as_tensor(state[s2, tgt_r] - state[s2, ref_r], dtype=torch.float32),
                 code=torch.cat([code, -code]).float())


def _register_coarse(reference: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, config: ScanConfig,
                     progress: bool) -> torch.Tensor:
    """Codes fitted on scans averaged over 2 x 2 (x 2) voxels when the code grid allows it.

    The code is coarser than the scans anyway (`DecoderConfig.factor` voxels per cell), and
    fitting at half resolution costs a quarter (an eighth in 3D) of the warps. The velocity,
    fitted in coarse voxels, is doubled into full-resolution ones.
    """
    from .registration import register
    from .scan_decoder import pool_to_grid

    factor, dims = config.decoder.factor, reference.dim() - 2
    if factor % 2 or any(n % 2 for n in reference.shape[2:]):
        return register(reference, target, mask, factor=factor, residual_bound=config.decoder.residual_bound,
                        iterations=config.registration_iterations, progress=progress)
    coarse_mask = pool_to_grid(mask[:, None].float(), 2)[:, 0] >= 0.5
    code = register(pool_to_grid(reference, 2), pool_to_grid(target, 2), coarse_mask, factor=factor // 2,
                    residual_bound=config.decoder.residual_bound, iterations=config.registration_iterations,
                    progress=progress)
    return torch.cat([2.0 * code[:, :dims], code[:, dims:]], dim=1)


def _limits(pairs: Pairs, train: xr.Dataset, channels) -> dict:
    """Plausibility limits from training: the state's mean and covariance, the fastest volume change."""
    y = pairs.state_ref.double().numpy()
    mean = y.mean(0)
    cov = np.cov(y, rowvar=False).reshape(y.shape[1], y.shape[1]) + 1e-6 * np.eye(y.shape[1])
    scan_t = _observed_scan_times(train)
    vols = _measured(train["image"].values, train["mask"].values.astype(bool), train, channels)  # (S, V, structures)
    rates = []
    for i in range(vols.shape[0]):
        v = np.flatnonzero(np.isfinite(scan_t[i]))
        for a in v:
            for b in v:
                gap = scan_t[i, b] - scan_t[i, a]
                if gap >= 0.5:
                    rates.append(np.abs(vols[i, b] - vols[i, a]) / gap)
    fastest = np.nanmax(np.stack(rates), axis=0) if rates else np.full(vols.shape[-1], np.inf)
    from scipy.stats import chi2

    # every tissue's intensity in the training scans: 0.01-99.99th percentiles in the brain, widened by a
    # tenth of the range for the tail a few thousand more scans would show
    image = train["image"].values
    inside = np.broadcast_to(train["mask"].values.astype(bool)[:, None, None], image.shape) & np.isfinite(image)
    lo, hi = (np.stack([np.percentile(image[:, :, c][inside[:, :, c]], p) for c in range(image.shape[2])])
              for p in (0.01, 99.99))
    return {"state_mean": mean.tolist(), "state_cov": cov.tolist(),
            "state_distance": float(chi2.ppf(0.999, y.shape[1])),
            "volume_rate": [float(2 * r) if np.isfinite(r) else None for r in fastest],
            "intensity_low": (lo - 0.1 * (hi - lo)).tolist(), "intensity_high": (hi + 0.1 * (hi - lo)).tolist()}


def _finished(root: Path, fingerprint: str, config: ScanConfig, overwrite: bool) -> ScanTwin | None:
    """A finished twin of the same cohort and config in `root`, or None; another one is an error."""
    if not has_checkpoint(root / "decoder"):
        return None
    _, meta = read_checkpoint(root / "decoder")
    same = meta.get("cohort_fingerprint") == fingerprint and meta.get("config") == config.to_dict()
    if same:
        return ScanTwin.load(root)
    if not overwrite:
        raise InputError("holds a model of another cohort or config; choose another directory or overwrite it",
                         source=str(root))
    return None


def _grid_shape(space, factor: int) -> tuple[int, ...]:
    from .change_code import code_grid

    return code_grid(tuple(int(n) for n in space), factor)


def _progress(it, progress: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, disable=not progress, leave=False)


# ---- results ----------------------------------------------------------------------------------


def _with_scans(result: xr.Dataset, twin: ScanTwin, draws: ScanDraws, samples: bool, scenario: bool) -> xr.Dataset:
    """The biomarker result plus the scan variables of docs/results-format.md ("Scan results")."""
    qs = list(twin.dynamics.config.quantiles)
    one = draws.dynamics.one
    space = ("y", "x") if draws.mask.ndim == 3 else ("z", "y", "x")
    cal = twin.calibration
    unbounded = lambda fs: [np.inf if f is None else f for f in fs]  # noqa: E731
    factors = dict(zip([round(v, 12) for v in cal["levels"]], unbounded(cal["voxel"])))
    outer = factors[max(factors)] if factors else 1.0
    per_arm: dict[str, list] = {k: [] for k in ("mean", "q", "spread", "vmean", "vq", "flags", "effect", "veffect")}
    reasons = []
    factual_vols = None
    for a, arm in enumerate(draws.dynamics.arms):
        scans = draws.scans[a]
        per_arm["mean"].append(draws.point[a])
        per_arm["q"].append(_calibrated(scans, qs, factors, centre=draws.point[a]))
        per_arm["spread"].append((np.std(scans, axis=0) * outer).astype(np.float32))
        vols = _volumes(scans, draws.mask, one, twin.channels)  # (K, S, R, structures)
        per_arm["vmean"].append(vols.mean(0))
        vq = np.stack([_calibrated(vols[..., j], qs, dict(zip(factors, unbounded(cal["volume"][s]))))
                       for j, s in enumerate(twin.structures)], axis=-1)
        vq = np.maximum(vq, 0.0)  # a widened band stops at no volume at all
        per_arm["vq"].append(vq)
        if a == 0:
            factual_vols = vols
        else:
            per_arm["effect"].append(draws.point[a] - draws.point[0])
            per_arm["veffect"].append((vols - factual_vols).mean(0))
        flagged, _, why = twin.check(draws, draws.point[a], a)
        per_arm["flags"].append(flagged)
        reasons += [f"arm {arm}: {w}" for w in why] if scenario else why
    lead = ("arm",) if scenario else ()
    cell = ("subject", "request")
    pick = (lambda x: np.stack(x)) if scenario else (lambda x: x[0])
    data = {
        "scan_mean": ((*lead, *cell, "channel", *space), pick(per_arm["mean"]).astype(np.float32),
                      {"long_name": "point forecast: the scan of the mean change code over the draws"}),
        "scan_quantiles": ((*lead, "quantile", *cell, "channel", *space), pick(per_arm["q"]).astype(np.float32),
                           {"long_name": "calibrated voxel-wise predictive quantiles of a measured scan"}),
        "scan_spread": ((*lead, *cell, "channel", *space), pick(per_arm["spread"]),
                        {"long_name": "voxel-wise sd of the drawn scans times the outer band's calibration factor"}),
        "reference_scan": ((*cell, "channel", *space), draws.reference.astype(np.float32),
                           {"long_name": "the observed scan each request starts from"}),
        "reference_time": (cell, one["baseline_time"].values[:, None] + draws.reference_since,
                           {"long_name": "time of the reference scan", "clock": result.attrs.get("clock", "")}),
        "volume_mean": ((*lead, *cell, "structure"), pick(per_arm["vmean"]),
                        {"long_name": "mean volume measured on the drawn scans", "units": "mL"}),
        "volume_quantiles": ((*lead, "quantile", *cell, "structure"), pick(per_arm["vq"]),
                             {"long_name": "calibrated quantiles of the volume measured on a scan", "units": "mL"}),
        "scan_flags": ((*lead, "scan_check", *cell), pick(per_arm["flags"]),
                       {"long_name": "scan plausibility check failed (True = implausible)"}),
        "scan_affine": (("subject", "affine_row", "affine_col"), one["affine"].values,
                        {"long_name": "voxel-to-world affine (RAS, mm)"}),
        "scan_mask": (("subject", *space), draws.mask, {"long_name": "brain mask"}),
    }
    if samples:
        data["scan_samples"] = ((*lead, "scan_sample", *cell, "channel", *space), pick(draws.scans),
                                {"long_name": "drawn scans (uncalibrated)"})
    if scenario:
        zeros = np.zeros_like(per_arm["mean"][0])
        data["scan_effect_mean"] = (("arm", *cell, "channel", *space),
                                    np.stack([zeros, *per_arm["effect"]]).astype(np.float32),
                                    {"long_name": "point forecast of the arm minus that of factual (shared draws)"})
        data["volume_effect_mean"] = (("arm", *cell, "structure"),
                                      np.stack([np.zeros_like(per_arm["vmean"][0]), *per_arm["veffect"]]),
                                      {"long_name": "mean of the paired volume differences arm - factual",
                                       "units": "mL"})
    out = result.assign({k: xr.Variable(d, v, a) for k, (d, v, a) in data.items()})
    out = out.assign_coords(channel=np.asarray(twin.channels, dtype=object),
                            structure=np.asarray(twin.structures, dtype=object),
                            structure_unit=("structure", np.asarray(["mL"] * len(twin.structures), dtype=object)),
                            scan_check=np.asarray(SCAN_CHECKS, dtype=object))
    out.attrs.update({"scan_flag_reasons": json.dumps(reasons), "scan_model": twin.fingerprint,
                      "scan_calibration": json.dumps(twin.calibration),
                      "scan_n_samples": int(draws.scans[0].shape[0])})
    return out


def _calibrated(draws: np.ndarray, qs: list[float], factors: dict, centre: np.ndarray | None = None) -> np.ndarray:
    """Quantiles over the draws' first axis, each band pair widened about the median by its factor;
    with `centre`, the bands are moved to sit about it instead of the draws' median. Bands nest: the
    factors are fitted level by level, and an outer band is never let inside an inner one."""
    q = np.quantile(draws, qs, axis=0)
    m = qs.index(0.5)
    median = q[m]
    centre = median if centre is None else centre
    out = np.empty_like(q)
    for i, level in enumerate(qs):
        f = 0.0 if level == 0.5 else factors.get(round(abs(1 - 2 * level), 12), 1.0)
        # an unbounded band (too few calibration cases for its level) is unbounded even where the draws agree
        unbounded = np.full_like(centre, np.inf if level > 0.5 else -np.inf)
        out[i] = centre + f * (q[i] - median) if np.isfinite(f) else unbounded
    for i in range(m - 1, -1, -1):
        out[i] = np.minimum(out[i], out[i + 1])
    for i in range(m + 1, len(qs)):
        out[i] = np.maximum(out[i], out[i - 1])
    return out
