"""The biomarker twin: fit on a cohort, then forecast, fill missed visits and replay treatment scenarios.

    twin = BiomarkerTwin.fit(cohort, TwinConfig(iterations=600), checkpoint_dir="model")
    twin.forecast(cohort, horizons=[1, 2, 3])            # years after each subject's last visit
    twin.forecast(cohort, at={"GS-001": [80.0, 81.5]})   # times on the cohort's own clock
    twin.fill(cohort)                                     # each subject's missed planned visits
    twin.simulate(cohort, load_scenarios("arms.yaml"), horizons=[0.5, 1, 2])
    twin.simulate(cohort, {"delayed": {"GS-001": [(1.0, "dmt", 10.0)]}}, at=...)  # explicit events
    BiomarkerTwin.load("model")

The model is `twin.model.DiseaseCourse` fitted by `twin.inference`. Every answer conditions on
all of a subject's observed visits (the Laplace posterior of its personal effects, its draws
importance resampled towards the exact posterior), draws `n_samples` effects and
measurements at the requested times, and summarises them: `mean` of
the noise-free draws, `quantiles` of the measurement draws with conformally calibrated
bands, and plausibility `flags` on the mean. Results are xarray Datasets
(`twin.results`, `docs/results-format.md`).

Calibration: a `calibration_fraction` of the cohort's subjects (a keyed hash of their ids and
the seed, `holdout_subjects`) is left out of the fit. Each of them is conditioned on each
prefix of its observed visits and forecast at the rest; `MondrianCalibration` turns those
forecasts' errors into a band factor per group of history sizes (1, 2-3, 4-7, 8-15, 16+
visits: a posterior narrows as the history grows, onto the wrong shape where the model is
wrong), horizon bin and band level. Groups with fewer than 100 calibration cases and bins
with fewer than 30 are pooled with their neighbours, so a sparse cell does not give infinite
bands. The horizon of a request is its distance to the subject's nearest observed visit
(for a forecast: years after the last visit). calibration_fraction = 0 fits on every subject
and calibrates on them too: the patient part is still out of sample (the posterior sees only
a prefix), but the population parameters have seen the targets, so bands may be narrow.

Past the fitted follow-up (a request later, in years since baseline, than every visit the
population was fitted on) the course extrapolates, and those factors, all learned inside the
follow-up, under-cover (glioma's last two visits, past every training visit: 0.75-0.80 of
them in a 90% band). Such requests get factors of their own from a rehearsal
(`extrapolation_quantile`): the population fitted again on the readings up to a cut, and the
calibration subjects forecast from their visits before the cut at their visits past it.

Plausibility limits come from the fitting subjects: each biomarker's observed range widened
by a quarter of its width on each side; a rate limit of 3x the steepest per-subject
least-squares slope (subjects with 3+ visits over 1+ year); and, for a model that knows no
drugs, the direction the decoder says the disease moves the biomarker (a guard: the model's
untreated course is monotone by construction).

Randomness: the model's initialisation uses `config.seed`; the draws use `seed` (default
`config.seed`) through a `torch.Generator`, recorded in every result. Scenario arms share
their draws (common random numbers), so an arm's effect is not sampling noise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from twin.errors import InputError
from twin.settings import known_settings

from .amortise import Amortiser, AmortiserConfig, amortised_posterior, fit_amortiser
from .checkpoint import flatten_optimiser, has_checkpoint, read_checkpoint, unflatten_optimiser, write_checkpoint
from .inference import effect_draws, fit_population, orient_decoder, posterior, refine_prior, sample
from .metrics import MondrianCalibration, holdout_subjects
from .model import FAMILIES, Batch, DiseaseCourse
from .results import build_result
from .tensors import RADIOTHERAPY, Standardiser

# /2: instruments' ranges (censored readings at a score's ceiling); /3: sigma set by its EM step;
# /4: the prior refitted by the marginal likelihood after the joint fit (`prior_steps`);
# /5: band factors past the fitted follow-up (`extrapolation_quantile`), z's unit rescaled in the fit
MODEL_FORMAT = "twin-biomarker-model/5"
# /3 to /5 changed the fit (and what a partial fit holds), not the model: finished ones load
READABLE = ("twin-biomarker-model/2", "twin-biomarker-model/3", "twin-biomarker-model/4", MODEL_FORMAT)
INFERENCE = ("laplace", "amortised")


@dataclass(frozen=True)
class TwinConfig:
    """How to fit and sample the biomarker twin.

    inference: how a patient's effects are read from its visits: "laplace" (MAP by L-BFGS and
    the inverse Hessian, per request) or "amortised" (the time-aware Mamba history encoder,
    trained after the population on prefixes of the training histories, `amortiser_steps`
    Adam steps: one forward pass per request);
    family: "progression" (neurodegeneration: drugs can only slow it), "growth" (a tumour:
    drugs and radiotherapy kill) or "auto" (growth when the cohort has radiotherapy events);
    hidden: width of the learned bend of the disease course (0: the closed-form course);
    iterations, lr, spread_every: the population fit (Adam steps, step size, SAEM spread
    updates); prior_steps, prior_draws: then the prior of the personal effects refitted by the
    marginal likelihood (Adam steps; importance draws per patient; 0 steps: the joint fit's
    prior as it is); posterior_steps: L-BFGS iterations of a patient's posterior; proposals:
    candidates per kept draw, importance resampled towards the exact posterior (1: the Laplace
    draws as they are); n_samples: draws per answer; quantiles: levels reported, symmetric
    about and including 0.5 (each pair q, 1 - q is a calibrated central band);
    calibration_fraction: subjects held out of the fit to calibrate the bands (0: calibrate
    in-sample); extrapolation_quantile: where the rehearsal for requests past the fitted
    follow-up cuts the fitting visits, as a quantile of their times (0: no rehearsal, such
    requests get the ordinary factors; it fits the population a second time); seed:
    initialisation and default draws.
    """

    family: str = "auto"
    hidden: int = 0
    iterations: int = 600
    lr: float = 0.03
    spread_every: int = 25
    prior_steps: int = 300
    prior_draws: int = 64
    posterior_steps: int = 60
    proposals: int = 16
    n_samples: int = 200
    # the 50/80/90/95% central bands: the levels clinical papers report and `twin evaluate` scores
    quantiles: tuple[float, ...] = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.975)
    calibration_fraction: float = 0.2
    extrapolation_quantile: float = 0.8
    inference: str = "laplace"
    amortiser_steps: int = 600
    seed: int = 0

    def __post_init__(self):
        if self.inference not in INFERENCE:
            raise InputError(f"expected one of {list(INFERENCE)}, got {self.inference!r}", source="TwinConfig",
                             field="inference")
        if self.family not in ("auto", *FAMILIES):
            raise InputError(f"expected one of {['auto', *FAMILIES]}, got {self.family!r}", source="TwinConfig", field="family")
        for name, low in (("hidden", 0), ("iterations", 1), ("spread_every", 1), ("prior_steps", 0), ("prior_draws", 2),
                          ("posterior_steps", 1), ("proposals", 1), ("n_samples", 2), ("amortiser_steps", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise InputError(f"expected an integer >= {low}, got {value!r}", source="TwinConfig", field=name)
            object.__setattr__(self, name, int(value))
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"expected a finite number > 0, got {self.lr!r}", source="TwinConfig", field="lr")
        f = self.calibration_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
            raise InputError(f"expected a number in [0, 1), got {f!r}", source="TwinConfig", field="calibration_fraction")
        e = self.extrapolation_quantile
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 <= e < 1:
            raise InputError(f"expected a number in [0, 1), got {e!r}", source="TwinConfig",
                             field="extrapolation_quantile")
        try:
            q = tuple(float(v) for v in self.quantiles)
        except (TypeError, ValueError):
            raise InputError(f"expected a list of numbers, got {self.quantiles!r}", source="TwinConfig",
                             field="quantiles") from None
        symmetric = all(abs(a + b - 1) < 1e-9 for a, b in zip(q, reversed(q)))
        if not (all(0 < v < 1 for v in q) and all(np.diff(q) > 0) and 0.5 in q and symmetric):
            raise InputError(f"expected increasing levels in (0, 1), symmetric about and including 0.5, got {q}",
                             source="TwinConfig", field="quantiles")
        object.__setattr__(self, "quantiles", q)
        object.__setattr__(self, "lr", float(self.lr))
        object.__setattr__(self, "calibration_fraction", float(f))
        object.__setattr__(self, "extrapolation_quantile", float(e))

    @property
    def band_levels(self) -> tuple[float, ...]:
        """Nominal coverage of each central band, outermost first: (0.05, ..., 0.95) -> (0.9, 0.5)."""
        return tuple(round(1 - 2 * q, 12) for q in self.quantiles if q < 0.5)

    def to_dict(self) -> dict:
        return {**asdict(self), "quantiles": list(self.quantiles)}

    @classmethod
    def from_dict(cls, d: Mapping, *, source: str = "TwinConfig") -> TwinConfig:
        """From a mapping (JSON); unknown keys raise, missing ones take their defaults."""
        d = known_settings(cls, d, source=source)
        return cls(**{k: tuple(v) if k == "quantiles" and isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class Draws:
    """Predictive draws for requests (S subjects x R times), per arm; `BiomarkerTwin.draws` makes them.

    truth, observation: per arm (K, S, R, B) in the biomarkers' units (noise-free, and with
    measurement noise); standardised: per arm (noise-free at the requests, noise-free at the
    `also` times) standardised, (K, S, R, B) and (K, S, R2, B). NaN pads missing requests.
    since: (S, R) years since baseline; clock: the same on the cohort's clock; horizon: years
    after the last observed visit; nearest: years to the nearest observed visit.
    """

    one: xr.Dataset
    since: np.ndarray
    clock: np.ndarray
    horizon: np.ndarray
    nearest: np.ndarray
    arms: list
    truth: list
    observation: list
    standardised: list
    seed: int
    n: int


class BiomarkerTwin:
    """A fitted biomarker twin: the model, its standardisation, band calibration and plausibility limits.

    Build one with `fit` or `load`; ask it with `forecast`, `fill` and `simulate`.
    """

    def __init__(self, model: DiseaseCourse, standardiser: Standardiser, config: TwinConfig,
                 calibration: MondrianCalibration, limits, *, cohort_fingerprint: str = "", amortiser=None,
                 subjects: Sequence[str] = (), past: MondrianCalibration | None = None,
                 fitted_until: float = math.inf, ends: np.ndarray | None = None):
        self.model, self.standardiser, self.config = model, standardiser, config
        # (2, B) lowest and highest reading of each biomarker's instrument in its units, +-inf where
        # none: as read in the training cohort (`_exact_ends`), or as stored for models from before.
        # Where the model has no end there is none, whatever a file says (models saved before
        # 2026-11-27 stored each volume's lowest training reading as an end)
        stored = _stored_ends(model, standardiser)
        self.ends = stored if ends is None else np.where(np.isfinite(stored), np.asarray(ends, dtype=np.float64), stored)
        self.calibration, self.limits, self.cohort_fingerprint = calibration, limits, cohort_fingerprint
        # requests later than fitted_until (years since baseline) take the `past` factors (None: the ordinary ones)
        self.past, self.fitted_until = past, fitted_until
        self.amortiser = amortiser
        self.subjects = tuple(subjects)  # every subject fitted on (calibration ones too): what `evaluate` must not score

    # ---- fitting and checkpoints --------------------------------------------------------------

    @classmethod
    def fit(cls, ds: xr.Dataset, config: TwinConfig = TwinConfig(), *, checkpoint_dir: str | os.PathLike | None = None,
            checkpoint_every: int = 50, overwrite: bool = False, on_step: Callable[[int, float], None] | None = None,
            progress: bool = True) -> BiomarkerTwin:
        """Fit on a cohort with biomarkers; with `checkpoint_dir`, save there every `checkpoint_every`
        steps and at the end, and resume a partial training of the same cohort and config found there.

        A complete model of the same cohort and config there is loaded, not refitted; one of
        another cohort or config (or a partial fit of an older format) is an error unless
        `overwrite`. on_step(step, loss) is called after each step (after that step's
        checkpoint): raising there interrupts the fit.
        """
        fingerprint = cohort_fingerprint(ds)
        resume = None
        if checkpoint_dir is not None and has_checkpoint(checkpoint_dir):
            tensors, meta = read_checkpoint(checkpoint_dir)
            same = (meta.get("cohort_fingerprint") == fingerprint and meta.get("config") == config.to_dict()
                    and meta.get("format") == MODEL_FORMAT)
            if not same and not overwrite:
                raise InputError("holds a model of another cohort or config, or a partial fit of an older format; "
                                 "choose another directory or overwrite it",
                                 source=str(checkpoint_dir))
            if same and meta.get("complete"):
                return cls._from_checkpoint(tensors, meta, str(checkpoint_dir))
            if same:
                resume = (tensors, meta)

        ids = [str(s) for s in ds["subject"].values]
        held = holdout_subjects(ids, config.calibration_fraction, config.seed)
        if held.all():
            held[:] = False
        fit_ds = ds.isel(subject=np.flatnonzero(~held))
        calibration_ds = ds.isel(subject=np.flatnonzero(held)) if held.any() else fit_ds
        st = Standardiser.from_cohort(fit_ds)
        batch = st.batch(fit_ds)
        model = _new_model(st, batch, _units(fit_ds), config)
        if resume is None:
            orient_decoder(model, batch)
            eta, start, optimiser_state, state = None, 0, None, {}
        else:
            tensors, meta = resume
            model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
            state = {k[len("train."):]: v for k, v in tensors.items() if k.startswith("train.")}
            eta, start = state.pop("eta"), int(meta["step"])
            optimiser_state = unflatten_optimiser(tensors, meta["optimiser_groups"])
        total = config.iterations + config.prior_steps

        def hook(step: int, loss: float, saved: dict[str, torch.Tensor], optimiser: torch.optim.Optimizer) -> None:
            if checkpoint_dir is not None and (step % checkpoint_every == 0 or step == total):
                adam, groups = flatten_optimiser(optimiser.state_dict())
                tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
                           **{f"train.{k}": v for k, v in saved.items()}, **adam}
                write_checkpoint(checkpoint_dir, tensors, {
                    **_header(config, st, model, fingerprint), "complete": False, "step": step, "loss": loss,
                    "optimiser_groups": groups})
            if on_step is not None:
                on_step(step, loss)

        # steps 1..iterations: the joint fit; then prior_steps steps of the prior's marginal fit,
        # each phase with its own optimiser (a checkpoint holds the state of the phase it was in)
        if start < config.iterations:
            eta = fit_population(model, batch, iterations=config.iterations, lr=config.lr, eta=eta, start=start,
                                 spread_every=config.spread_every, optimiser_state=optimiser_state, on_step=hook,
                                 progress=progress)
        if start <= config.iterations:
            optimiser_state, state = None, {}
        if config.prior_steps:
            refine_prior(model, batch, eta, iterations=config.prior_steps, start=max(start - config.iterations, 0),
                         draws=config.prior_draws, refresh=config.spread_every, lr=config.lr, seed=config.seed,
                         state=state, optimiser_state=optimiser_state,
                         on_step=lambda step, loss, saved, opt: hook(config.iterations + step, loss, saved, opt),
                         progress=progress)
        for p in model.parameters():
            p.requires_grad_(False)
        amortiser = None
        if config.inference == "amortised":
            amortiser, _ = fit_amortiser(model, batch, st.dose_scale, _amortiser_config(config))
            for p in amortiser.parameters():
                p.requires_grad_(False)
        read = _reader(model, amortiser, config)
        ends = _exact_ends(model, st, fit_ds)
        calibration = _calibrate(model, st, calibration_ds, config, read, ends)
        past = _rehearse_past(fit_ds, calibration_ds, st, config, progress) if config.extrapolation_quantile else None
        twin = cls(model, st, config, calibration, _limits(fit_ds, model, st), cohort_fingerprint=fingerprint,
                   amortiser=amortiser, subjects=ids, past=past, fitted_until=float(np.nanmax(_follow_up(fit_ds))),
                   ends=ends)
        if checkpoint_dir is not None:
            twin.save(checkpoint_dir)
        return twin

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model directory: model.safetensors and config.json (atomically; no pickle)."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.amortiser is not None:
            tensors.update({f"amortiser.{k}": v for k, v in self.amortiser.state_dict().items()})
        return write_checkpoint(path, tensors, self._meta())

    @classmethod
    def load(cls, path: str | os.PathLike) -> BiomarkerTwin:
        """A twin from a model directory written by `fit` or `save`; anything else is an InputError."""
        tensors, meta = read_checkpoint(path)
        if not meta.get("complete"):
            steps = meta.get("config", {}).get("iterations", 0) + meta.get("config", {}).get("prior_steps", 0)
            raise InputError(f"holds an unfinished training (step {meta.get('step')} of {steps}); "
                             "run the training again to resume it",
                             source=str(path))
        return cls._from_checkpoint(tensors, meta, str(path))

    @classmethod
    def _from_checkpoint(cls, tensors: dict, meta: dict, source: str) -> BiomarkerTwin:
        if meta.get("format") not in READABLE:
            raise InputError(f"expected format {MODEL_FORMAT!r}, got {meta.get('format')!r}", source=source,
                             field="format")
        from twin.priors import Limits

        try:
            settings = dict(meta["config"])
            if meta.get("format") != MODEL_FORMAT:  # fitted before the prior's marginal fit or the rehearsal existed
                settings.setdefault("prior_steps", 0)
                settings.setdefault("extrapolation_quantile", 0.0)
            config = TwinConfig.from_dict(settings, source=f"{source}: config")
            st = Standardiser.from_dict(meta["standardiser"])
            calibration = MondrianCalibration.from_dict(meta["calibration"])
            past = meta.get("calibration_past")
            past = None if past is None else MondrianCalibration.from_dict(past)
            fitted_until = _number(meta.get("fitted_until", "inf"))
            ends = meta.get("instrument_ends")
            ends = None if ends is None else np.array([[_number(v) for v in row] for row in ends])
            limits = Limits(**{k: tuple(_number(v) for v in vals) if k in ("low", "high", "max_rate") else tuple(vals)
                               for k, vals in meta["limits"].items()})
            model = _model(st, config)
            model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
            amortiser = None
            if config.inference == "amortised":
                amortiser = Amortiser.for_model(model, st.dose_scale, _amortiser_config(config))
                amortiser.load_state_dict({k[len("amortiser."):]: v for k, v in tensors.items()
                                           if k.startswith("amortiser.")})
                amortiser.eval()
                for p in amortiser.parameters():
                    p.requires_grad_(False)
        except KeyError as err:
            raise InputError(f"missing entry {err}", source=source, field="config.json") from None
        except (TypeError, RuntimeError) as err:  # load_state_dict: missing, unexpected or misshapen tensors
            raise InputError(" ".join(str(err).split())[:300], source=source, field="model.safetensors") from None
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, st, config, calibration, limits, cohort_fingerprint=meta.get("cohort_fingerprint", ""),
                   amortiser=amortiser, subjects=meta.get("subjects", ()), past=past, fitted_until=fitted_until,
                   ends=ends)

    def _meta(self) -> dict:
        limits = {k: [_json_number(v) for v in vals] if k in ("low", "high", "max_rate") else list(vals)
                  for k, vals in asdict(self.limits).items()}
        return {**_header(self.config, self.standardiser, self.model, self.cohort_fingerprint), "complete": True,
                "step": self.config.iterations + self.config.prior_steps, "calibration": self.calibration.to_dict(),
                "calibration_past": None if self.past is None else self.past.to_dict(),
                "fitted_until": _json_number(float(self.fitted_until)), "limits": limits, "subjects": list(self.subjects),
                "instrument_ends": [[_json_number(float(v)) for v in row] for row in self.ends]}

    @property
    def fingerprint(self) -> str:
        """A short hash of everything the answers depend on (parameters, standardisation, calibration)."""
        digest = hashlib.sha256(json.dumps(self._meta(), sort_keys=True).encode())
        for name, value in sorted(self.model.state_dict().items()):
            digest.update(name.encode() + value.detach().numpy().tobytes())
        return digest.hexdigest()[:16]

    # ---- answers --------------------------------------------------------------------------------

    def forecast(self, ds: xr.Dataset, subjects: Sequence[str] | None = None, *, horizons: Sequence[float] | None = None,
                 at=None, n_samples: int | None = None, samples: bool = False, seed: int | None = None) -> xr.Dataset:
        """Biomarkers at `horizons` (years after each subject's last observed visit, the same for all)
        or `at` (times on the cohort's clock per subject: {subject: [times]}, a DataFrame with
        columns subject, time, or the path of such a CSV), given all observed visits. A time
        before the last visit is a fill; one before the subject's baseline is an error.
        """
        if (horizons is None) == (at is None):
            raise InputError("give exactly one of horizons (years after the last visit) and at (times on the "
                             "cohort's clock)", source="forecast", field="horizons")
        return self._answer("forecast", ds, subjects, horizons, at, n_samples, samples, seed)

    def fill(self, ds: xr.Dataset, subjects: Sequence[str] | None = None, *, at=None, n_samples: int | None = None,
             samples: bool = False, seed: int | None = None) -> xr.Dataset:
        """Biomarkers at each subject's missed planned visits (observed False, finite time), or `at`."""
        if at is None:
            at = self.missed_visits(ds, subjects)
            subjects = list(at)
        return self._answer("fill", ds, subjects, None, at, n_samples, samples, seed)

    def missed_visits(self, ds: xr.Dataset, subjects=None) -> dict[str, list[float]]:
        """{subject: clock times of its missed planned visits} (observed False, finite time)."""
        one = ds.isel(subject=self._subjects(ds, subjects))
        missed = ~one["observed"].values & np.isfinite(one["time"].values)
        base = one["baseline_time"].values
        at = {str(s): list(base[i] + one["time"].values[i][missed[i]])
              for i, s in enumerate(one["subject"].values) if missed[i].any()}
        if not at:
            raise InputError("no missed visits to fill in these subjects; give times to fill (at)",
                             source="cohort", field="observed")
        return at

    def simulate(self, ds: xr.Dataset, scenario, subjects: Sequence[str] | None = None, *,
                 horizons: Sequence[float] | None = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0), at=None,
                 n_samples: int | None = None, samples: bool = False, seed: int | None = None) -> xr.Dataset:
        """Each subject under its own schedule (arm "factual", first) and under each arm of `scenario`,
        at `horizons` or `at` as in `forecast`; with `effect_*` = arm - factual over paired draws
        (the same draws for every arm).

        scenario: a ScenarioSet, a path to a scenario file, or explicit per-subject schedules
        {arm: {subject: [(time since baseline, agent, dose), ...]}}, each the subject's whole
        treatment under that arm (a simulated cohort's `alternative_event_*`, a trial's arms);
        every asked subject needs an entry in every arm ([] for none).
        """
        scenario = self.scenario(scenario)
        return self._answer("scenario", ds, subjects, None if at is not None else horizons, at, n_samples, samples,
                            seed, scenario=scenario)

    def scenario(self, scenario):
        """A ScenarioSet or checked explicit arms from what `simulate` takes; agents the model
        never saw are an error naming the arm."""
        from twin.scenarios import ScenarioSet, load_scenarios

        if isinstance(scenario, Mapping):
            return _explicit_arms(scenario)
        if not isinstance(scenario, ScenarioSet):
            scenario = load_scenarios(scenario)
        for arm in scenario.arms:
            unknown = [a for a in arm.schedule.agents() if a not in self.standardiser.agents]
            if unknown:
                known = ", ".join(self.standardiser.agents) or "none"
                raise InputError(f"the model knows no effect of agent {unknown[0]!r} (it was trained on: {known})",
                                 source=scenario.name, field=f"arms.{arm.name}")
        return scenario

    def _answer(self, kind, ds, subjects, horizons, at, n_samples, samples, seed, scenario=None) -> xr.Dataset:
        d = self.draws(ds, subjects, horizons=horizons, at=at, n_samples=n_samples, seed=seed, scenario=scenario,
                       source=kind)
        return self._summary(kind, d, ds, samples, scenario)

    def draws(self, ds: xr.Dataset, subjects=None, *, horizons=None, at=None, n_samples: int | None = None,
              seed: int | None = None, scenario=None, also=None, source: str = "forecast") -> Draws:
        """The predictive draws behind an answer, per arm (the subject's own schedule first).

        also(one, since) -> (S, R2) extra times since baseline (NaN = none) at which the same
        draws are evaluated too (the scan twin asks for its reference visits there); their
        standardised noise-free values come back in `Draws.also`. `scenario` is a ScenarioSet
        or explicit schedules, as `simulate` passes them.
        """
        n = self.config.n_samples if n_samples is None else int(n_samples)
        if n < 2:
            raise InputError(f"need at least 2 samples, got {n}", source=source, field="n_samples")
        seed = self.config.seed if seed is None else int(seed)
        one, since, clock_times = self._requests(ds, subjects, horizons, at)
        st = self.standardiser
        batch = st.batch(one)
        eta, cov = _reader(self.model, self.amortiser, self.config)(batch)
        observed_t = np.where(one["observed"].values, one["time"].values, np.nan)
        last = np.nanmax(np.where(np.isfinite(observed_t), observed_t, -np.inf), axis=1)
        horizon = since - last[:, None]
        nearest = np.nanmin(np.abs(since[:, :, None] - observed_t[:, None, :]), axis=2, initial=np.inf)
        extra = np.zeros((len(last), 0)) if also is None else np.asarray(also(one, since), dtype=np.float64)
        asked = np.concatenate([since, extra], axis=1)
        query = torch.as_tensor(np.where(np.isfinite(asked), asked, 0.0), dtype=torch.float32)
        pad = ~np.isfinite(asked)[None, :, :, None]

        arms = [("factual", (batch.doses, batch.fractions))]
        ids = [str(s) for s in one["subject"].values]
        if isinstance(scenario, Mapping):  # explicit schedules, checked by _explicit_arms
            for name, schedules in scenario.items():
                missing = [s for s in ids if s not in schedules]
                if missing:
                    raise InputError(f"no schedule for subject(s) {missing[:5]}; give every asked subject one "
                                     f"([] for no treatment)", source="scenario", field=name)
            arms += [(name, _treatments([schedules[s] for s in ids], st)) for name, schedules in scenario.items()]
        elif scenario is not None:
            history = [list(zip(one["event_time"].values[i], one["event_agent"].values[i], one["event_dose"].values[i]))
                       for i in range(len(last))]
            per_subject = [scenario.events_for(float(last[i]), history[i]) for i in range(len(last))]
            arms += [(name, _treatments([e[name] for e in per_subject], st)) for name in scenario.names]
        R = since.shape[1]
        # the same effect draws and noise for every arm: arms differ by treatment only
        effects = effect_draws(self.model, batch, eta, cov, n, torch.Generator().manual_seed(seed),
                               proposals=self.config.proposals)
        truths, draws, also_std = [], [], []
        for _, (doses, fractions) in arms:
            truth, obs = sample(self.model, batch.with_times(query).with_doses(doses, fractions), effects,
                                torch.Generator().manual_seed(seed + 1))
            truth_std = np.where(pad, np.nan, truth.double().numpy())
            truths.append(st.values(truth_std[:, :, :R]))
            draws.append(np.where(pad[:, :, :R], np.nan, _readings(self.model, st, self.ends, obs[:, :, :R])))
            also_std.append((truth_std[:, :, :R], truth_std[:, :, R:]))
        return Draws(one=one, since=since, clock=clock_times, horizon=horizon, nearest=nearest,
                     arms=[name for name, _ in arms], truth=truths, observation=draws, standardised=also_std,
                     seed=seed, n=n)

    def _summary(self, kind: str, d: Draws, ds: xr.Dataset, samples: bool, scenario) -> xr.Dataset:
        """The biomarker result of `draws`: means, calibrated quantiles, flags (and effects per arm)."""
        from twin.priors.plausibility import CHECKS

        st, config, one, arms = self.standardiser, self.config, d.one, d.arms
        truths, draws, nearest, clock_times, horizon = d.truth, d.observation, d.nearest, d.clock, d.horizon
        seed, n = d.seed, d.n
        ids = [str(s) for s in one["subject"].values]

        mean, quantiles, flags, reasons = [], [], [], []
        bounds = self.ends
        for name, truth, obs in zip(arms, truths, draws):
            mean.append(truth.mean(0))
            quantiles.append(_calibrated_quantiles(obs, nearest, one["observed"].values.sum(1), self.calibration,
                                                   config.quantiles, bounds, past=(self.past, d.since > self.fitted_until)))
            f, r = _flags(mean[-1], clock_times, self.limits, [str(s) for s in one["subject"].values])
            flags.append(f)
            reasons += [f"arm {name}: {line}" for line in r] if scenario is not None else r
        attrs = {"model": self.fingerprint, "seed": seed, "n_samples": n, "twin_version": _version(),
                 "config": json.dumps(config.to_dict()), "calibration": json.dumps(self.calibration.to_dict()),
                 "calibration_past": json.dumps(None if self.past is None else self.past.to_dict()),
                 "fitted_until": _json_number(float(self.fitted_until)),
                 "calibration_horizon": "years from the subject's nearest observed visit"}
        common = dict(kind=kind, subjects=one["subject"].values, biomarkers=st.biomarker, units=_units(one),
                      clock=str(ds.attrs.get("clock", "years since baseline")), time=clock_times, horizon=horizon,
                      levels=config.quantiles, checks=CHECKS, reasons=reasons, attrs=attrs)
        if scenario is None:
            return build_result(mean=mean[0], quantiles=quantiles[0], flags=flags[0],
                                samples=draws[0] if samples else None, **common)
        effects = [t - truths[0] for t in truths]
        attrs["scenario"] = json.dumps(scenario.to_dict() if not isinstance(scenario, Mapping) else
                                       {"events": {name: {s: [list(e) for e in schedules[s]] for s in ids}
                                                   for name, schedules in scenario.items()}})
        return build_result(mean=np.stack(mean), quantiles=np.stack(quantiles), flags=np.stack(flags),
                            samples=np.stack(draws) if samples else None, arms=arms,
                            effect_mean=np.stack([e.mean(0) for e in effects]),
                            effect_quantiles=np.stack([_quantiles(e, config.quantiles) for e in effects]), **common)

    def _subjects(self, ds: xr.Dataset, subjects) -> np.ndarray:
        ids = [str(s) for s in ds["subject"].values]
        if subjects is None:
            return np.arange(len(ids))
        where = {s: i for i, s in enumerate(ids)}
        wanted = [str(s) for s in subjects]
        unknown = [s for s in wanted if s not in where]
        if unknown:
            raise InputError(f"unknown subject(s) {unknown[:5]}; the cohort has {len(ids)} subjects such as {ids[:3]}",
                             source="cohort", field="subject")
        return np.asarray(sorted({where[s] for s in wanted}), dtype=int)

    def _requests(self, ds, subjects, horizons, at):
        """(cohort of the asked subjects, request times since baseline (S, R), on the clock (S, R)), NaN-padded."""
        source = str(at) if isinstance(at, (str, os.PathLike)) else "requests"
        if at is not None:
            at = read_requests(at) if source != "requests" else _as_requests(at)
            pick = self._subjects(ds, list(at) if subjects is None else subjects)
            self._subjects(ds, list(at))  # every requested subject must exist
        else:
            pick = self._subjects(ds, subjects)
        one = ds.isel(subject=pick)
        ids = [str(s) for s in one["subject"].values]
        base = one["baseline_time"].values.astype(np.float64)
        observed_t = np.where(one["observed"].values, one["time"].values, np.nan)
        if at is None:
            h = np.asarray([float(v) for v in horizons], dtype=np.float64)
            if h.size == 0 or not np.all(np.isfinite(h)):
                raise InputError(f"expected finite horizons in years, got {list(horizons)}", source="requests",
                                 field="horizons")
            empty = [s for s, t in zip(ids, observed_t) if not np.isfinite(t).any()]
            if empty:
                raise InputError(f"subject(s) {empty[:5]} have no observed visit to count horizons from",
                                 source="cohort", field="observed")
            last = np.nanmax(observed_t, axis=1)
            requested = [base[i] + last[i] + h for i in range(len(ids))]
        else:
            requested = [np.asarray(at.get(s, []), dtype=np.float64) for s in ids]
        rows = [np.unique(r) for r in requested]  # sorted: the plausibility checks read them in time order
        width = max(1, max(len(r) for r in rows))
        clock = np.full((len(ids), width), np.nan)
        for i, r in enumerate(rows):
            clock[i, :len(r)] = r
        since = clock - base[:, None]
        early = np.flatnonzero(np.nanmin(np.where(np.isfinite(since), since, np.inf), axis=1) < -1e-9)
        if early.size:
            i = early[0]
            raise InputError(f"subject {ids[i]}: time {np.nanmin(clock[i]):g} is before the subject's baseline "
                             f"{base[i]:g} on the clock ({ds.attrs.get('clock', 'years since baseline')})",
                             source=source, field="time")
        return one, np.maximum(since, 0.0), clock


def read_requests(path: str | os.PathLike) -> dict[str, list[float]]:
    """A requests CSV, `subject,time` rows with times on the cohort's clock, as {subject: [times]}."""
    from twin.data.table import number, read_table

    table = read_table(path)
    for column in table.columns:
        if column not in ("subject", "time"):
            raise InputError("unknown column; expected exactly subject,time", source=str(path), field=column)
    for column in ("subject", "time"):
        if column not in table.columns:
            raise InputError("missing column; expected exactly subject,time", source=str(path), field=column)
    out: dict[str, list[float]] = {}
    i_s, i_t = table.index("subject"), table.index("time")
    for line, row in table.rows:
        if not row[i_s]:
            raise InputError(f"line {line}: empty subject id", source=str(path), field="subject")
        out.setdefault(row[i_s], []).append(number(row[i_t], source=table.path, line=line, field="time", required=True))
    if not out:
        raise InputError("no requests: the file has a header but no rows", source=str(path), field="subject")
    return out


def cohort_fingerprint(ds: xr.Dataset) -> str:
    """A hash of what a fit reads from a cohort: ids, visit times, biomarkers, covariates, events, clock."""
    digest = hashlib.sha256(str(ds.attrs.get("clock", "")).encode())
    for name in ("subject", "biomarker", "time", "observed", "baseline_time", "biomarkers", "covariates",
                 "event_time", "event_agent", "event_dose"):
        if name in ds.variables:
            values = np.asarray(ds[name].values)
            digest.update(name.encode())
            digest.update(("\x1f".join(map(str, values.ravel())).encode() if values.dtype == object
                           else np.ascontiguousarray(values).tobytes()))
    return digest.hexdigest()[:16]


# ---- pieces ---------------------------------------------------------------------------------------

def _model(st: Standardiser, config: TwinConfig) -> DiseaseCourse:
    """The disease-course model for a cohort standardised by `st`: its family, drugs and radiotherapy."""
    family = config.family if config.family != "auto" else ("growth" if st.radiotherapy else "progression")
    if st.radiotherapy and family != "growth":
        raise InputError("the cohort received radiotherapy, which only the growth family models",
                         source="TwinConfig", field="family")
    return DiseaseCourse(len(st.biomarker), len(st.covariate), len(st.agents), hidden=config.hidden,
                         dose_scale=st.dose_scale, family=family, radiotherapy=st.radiotherapy)


def _new_model(st: Standardiser, batch: Batch, units: list[str], config: TwinConfig) -> DiseaseCourse:
    """A fresh model for a cohort's batch: the seeded initialisation, and its instruments' ranges
    found in the readings (volumes, in mL, are no instruments)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = _model(st, config)
    model.set_ranges(batch.y, torch.tensor([u != "mL" for u in units]))
    return model


def _header(config: TwinConfig, st: Standardiser, model: DiseaseCourse, fingerprint: str) -> dict:
    return {"format": MODEL_FORMAT, "twin_version": _version(), "config": config.to_dict(),
            "standardiser": st.to_dict(), "cohort_fingerprint": fingerprint, "seed": config.seed,
            "dims": {"biomarkers": model.B, "covariates": model.K, "drugs": model.A, "hidden": config.hidden,
                     "family": model.family, "radiotherapy": bool(model.R)}}


def _amortiser_config(config: TwinConfig) -> AmortiserConfig:
    return AmortiserConfig(steps=config.amortiser_steps, seed=config.seed)


def _reader(model: DiseaseCourse, amortiser, config: TwinConfig) -> Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]:
    """How a batch of histories becomes posteriors of the effects, (mean (S, P), covariance (S, P, P))."""
    if config.inference == "amortised":
        return lambda batch: amortised_posterior(model, amortiser, batch)
    return lambda batch: posterior(model, batch, steps=config.posterior_steps)


def _calibrate(model: DiseaseCourse, st: Standardiser, ds: xr.Dataset, config: TwinConfig,
               read: Callable[[Batch], tuple[torch.Tensor, torch.Tensor]], ends: np.ndarray,
               after: float | None = None, whole: np.ndarray | None = None) -> MondrianCalibration | None:
    """Band factors from forecasting each calibration subject's later visits from its earlier ones.

    Every cut is used: a subject with n observed visits is conditioned on its first k and
    forecast at the rest, for k = 1 .. n-1. Users ask with short and with long histories, so
    the factors are learned for both: per group of history sizes k, binned by horizon within
    (`MondrianCalibration.fit`). With `after` (years since baseline), only histories that end
    by then and targets past it count (the rehearsal past the follow-up), and None is returned
    where there are none; the subjects marked in `whole` (S,) are asked from their whole
    history up to `after` only.
    """
    times = _follow_up(ds)
    rank = np.argsort(np.argsort(np.where(np.isfinite(times), times, np.inf), axis=1), axis=1)
    n_obs = np.isfinite(times).sum(1)
    cuts = [(i, k) for i in range(len(n_obs)) for k in range(1, int(n_obs[i]))]
    if not cuts and after is None:
        raise InputError("calibrating the bands needs subjects with at least two observed visits among the "
                         "calibration subjects", source="cohort", field="calibration_fraction")
    row, k = np.array([c[0] for c in cuts], dtype=int), np.array([c[1] for c in cuts], dtype=int)
    times, rank = times[row], rank[row]
    history = np.isfinite(times) & (rank < k[:, None])
    target = np.isfinite(times) & ~history
    if after is not None:
        target &= times > after
        use = target.any(1) & ~(history & (times > after)).any(1)
        if whole is not None:
            use &= ~whole[row] | (k == (np.isfinite(times) & (times <= after)).sum(1))
        if not use.any():
            return None
        row, k, times, history, target = row[use], k[use], times[use], history[use], target[use]
    batch = st.batch(ds).take(torch.as_tensor(row))
    seen = torch.as_tensor(history)
    hist = Batch(torch.where(seen, batch.times, torch.full_like(batch.times, float("nan"))),
                 torch.where(seen[..., None], batch.y, torch.full_like(batch.y, float("nan"))), batch.x, batch.doses,
                 batch.fractions)
    eta, cov = read(hist)
    query = torch.as_tensor(np.where(target, times, 0.0), dtype=torch.float32)
    effects = effect_draws(model, hist, eta, cov, config.n_samples, torch.Generator().manual_seed(config.seed),
                           proposals=config.proposals)
    _, obs = sample(model, hist.with_times(query), effects, torch.Generator().manual_seed(config.seed + 1))
    q = np.quantile(_readings(model, st, ends, obs), config.quantiles, axis=0)  # (Q, cuts, V, B)
    measured = np.where(ds["observed"].values[..., None], ds["biomarkers"].values, np.nan)[row]
    truth = np.where(target[..., None], measured, np.nan)
    last = np.nanmax(np.where(history, times, -np.inf), axis=1)
    horizon = np.where(target, times - last[:, None], np.nan)
    L = len(config.band_levels)
    return MondrianCalibration.fit(q[L], q[:L], q[::-1][:L], truth, horizon, k, config.band_levels)


def _rehearse_past(fit_ds: xr.Dataset, calibration_ds: xr.Dataset, st: Standardiser, config: TwinConfig,
                   progress: bool) -> MondrianCalibration | None:
    """Band factors for requests past the fitted follow-up, from a rehearsal of that extrapolation.

    The population is fitted again on the fitting subjects' readings up to the cut (the
    `extrapolation_quantile` of their visit times) and asked about visits past it
    (`_calibrate`): the calibration subjects' from every prefix of their visits up to the cut
    (new patients), the fitting subjects' from their whole history up to it (the future of a
    patient the population was fitted on, what most requests past the follow-up are). The
    fitting subjects make the cases five times as many as the calibration subjects alone, whose
    factors were unstable (glioma benchmark, split B: 0.87 and 0.83 of readings in the 90% band
    in one rehearsal, 0.91 and 0.93 in another that differed only in its standardisation). The
    rehearsal reads patients by their Laplace posterior, whatever `inference` says (an
    amortiser would need its own second training). None where nothing lies past the cut.
    """
    times = _follow_up(fit_ds)
    cut = float(np.nanquantile(times, config.extrapolation_quantile))
    if not (times > cut).any():
        return None
    kept = fit_ds["observed"] & (fit_ds["time"] <= cut)
    early = fit_ds.assign(observed=kept, biomarkers=fit_ds["biomarkers"].where(kept))
    batch = st.batch(early)
    model = _new_model(st, batch, _units(early), config)
    orient_decoder(model, batch)
    what = f"rehearsing past {cut:.2g} y"
    eta = fit_population(model, batch, iterations=config.iterations, lr=config.lr, spread_every=config.spread_every,
                         progress=progress, desc=f"{what}: the twin")
    if config.prior_steps:
        refine_prior(model, batch, eta, iterations=config.prior_steps, draws=config.prior_draws,
                     refresh=config.spread_every, lr=config.lr, seed=config.seed, progress=progress,
                     desc=f"{what}: the prior")
    for p in model.parameters():
        p.requires_grad_(False)
    laplace = replace(config, inference="laplace")
    if calibration_ds is fit_ds:  # calibrated in-sample: every subject from every prefix
        asked, whole = fit_ds, None
    else:
        asked = xr.concat([calibration_ds, fit_ds], dim="subject")
        whole = np.arange(asked.sizes["subject"]) >= calibration_ds.sizes["subject"]
    return _calibrate(model, st, asked, laplace, _reader(model, None, laplace), _exact_ends(model, st, early),
                      after=cut, whole=whole)


def _stored_ends(model: DiseaseCourse, st: Standardiser) -> np.ndarray:
    """(2, B) the instruments' ends as the model keeps them (standardised, float32), in units (+-inf: none)."""
    ends = torch.stack([model.lower_end, model.upper_end]).double().numpy()
    # only finite ends convert: through a volume's log scale -inf would come back finite (exp(-inf)
    # minus the shift), and `_exact_ends` then made the lowest training reading a floor of its bands
    finite = np.isfinite(ends)
    return np.where(finite, st.values(np.where(finite, ends, 0.0)), ends)


def _exact_ends(model: DiseaseCourse, st: Standardiser, ds: xr.Dataset) -> np.ndarray:
    """(2, B) each instrument's ends as read in ds: the reading nearest the stored end.

    The model keeps an end standardised in float32, which comes back a little inside (a score's
    ceiling of 30 as 29.9999999); draws at the end read so, and a band reaching the ceiling
    then ended just below every reading of 30 (atrophy benchmark, seed 0: the cognitive score's
    90% band held 0.74 of its readings, none of the 22% at 30 and 0.95 of the rest)."""
    ends = _stored_ends(model, st)
    y = np.where(ds["observed"].values[..., None], ds["biomarkers"].values, np.nan).reshape(-1, ends.shape[1])
    for i, b in np.argwhere(np.isfinite(ends)):
        v = y[:, b][np.isfinite(y[:, b])]
        if v.size:
            ends[i, b] = v[np.argmin(np.abs(v - ends[i, b]))]
    return ends


def _readings(model: DiseaseCourse, st: Standardiser, ends: np.ndarray, obs: torch.Tensor) -> np.ndarray:
    """Measurement draws (..., B) standardised -> in units, those at an instrument's end at its exact `ends`.

    `DiseaseCourse.observe` records a draw past a cut as the stored end itself, so it converts to
    exactly `_stored_ends` (the same float32 value through the same arithmetic)."""
    x = st.values(obs.double().numpy())
    stored = _stored_ends(model, st)
    for i in range(2):
        x = np.where(x == stored[i], ends[i], x)
    return x


def _follow_up(ds: xr.Dataset) -> np.ndarray:
    """(S, V) the observed visits' times in years since baseline, NaN where none."""
    return np.where(ds["observed"].values, ds["time"].values, np.nan)


def _calibrated_quantiles(obs: np.ndarray, horizon: np.ndarray, visits: np.ndarray, calibration: MondrianCalibration,
                          levels: tuple[float, ...], bounds: np.ndarray | None = None,
                          past: tuple[MondrianCalibration | None, np.ndarray] | None = None) -> np.ndarray:
    """(Q, S, R, B) quantiles of draws obs (K, S, R, B), each central band scaled by its calibration
    factor about the median (by horizon (S, R) and history size visits (S,)), then nested (an
    outer band never inside an inner one) and kept within `bounds` (2, B), the instruments'
    ranges (a widened band reaches no further than a reading can). past: (calibration, mask
    (S, R)), the factors of the requests past the fitted follow-up, where the mask is true."""
    q = _quantiles(obs, levels)
    L = len(levels) // 2
    median = q[L]
    args = (median, q[:L], q[::-1][:L], np.where(np.isfinite(horizon), horizon, 0.0),
            np.asarray(visits, dtype=np.float64)[:, None, None])
    lo, hi = calibration.apply(*args)
    if past is not None and past[0] is not None and past[1].any():
        past_lo, past_hi = past[0].apply(*args)
        lo, hi = np.where(past[1][..., None], past_lo, lo), np.where(past[1][..., None], past_hi, hi)
    for i in range(L - 1, -1, -1):
        inner_lo, inner_hi = (lo[i + 1], hi[i + 1]) if i + 1 < L else (median, median)
        lo[i], hi[i] = np.fmin(lo[i], inner_lo), np.fmax(hi[i], inner_hi)
    out = np.concatenate([lo, median[None], hi[::-1]])
    if bounds is not None:
        out = np.clip(out, bounds[0], bounds[1])
    return np.where(np.isfinite(median)[None], out, np.nan)


def _quantiles(x: np.ndarray, levels) -> np.ndarray:
    """Quantiles over the first axis, NaN where every draw is NaN (padding), without warnings."""
    finite = np.isfinite(x).all(0)
    return np.where(finite[None], np.quantile(np.where(finite[None], x, 0.0), levels, axis=0), np.nan)


def _flags(mean: np.ndarray, clock: np.ndarray, limits, subjects: list[str]) -> tuple[np.ndarray, list[str]]:
    """(check, S, R, B) flags of the mean trajectory and one sentence per flag."""
    from twin.priors.plausibility import CHECKS, check_trajectory, reasons

    y, t = torch.as_tensor(mean), torch.as_tensor(clock)
    flags = check_trajectory(y, t, limits, atol=1e-9)
    return np.stack([flags[c].numpy() for c in CHECKS]), reasons(flags, y, t, limits, subjects=subjects)


def _limits(ds: xr.Dataset, model: DiseaseCourse, st: Standardiser):
    """Plausibility limits from the fitting subjects (see the module docstring)."""
    from twin.priors import Limits

    y = np.where(ds["observed"].values[..., None], ds["biomarkers"].values, np.nan)
    t = np.where(ds["observed"].values, ds["time"].values, np.nan)
    low, high = np.nanmin(y, axis=(0, 1)), np.nanmax(y, axis=(0, 1))
    width = np.where(high > low, high - low, np.abs(high) + 1.0)
    steepest = np.zeros(y.shape[-1])
    for i in range(y.shape[0]):
        for b in range(y.shape[-1]):
            ok = np.isfinite(t[i]) & np.isfinite(y[i, :, b])
            if ok.sum() >= 3 and np.ptp(t[i][ok]) >= 1.0:
                steepest[b] = max(steepest[b], abs(np.polyfit(t[i][ok], y[i, ok, b], 1)[0]))
    max_rate = np.where(steepest > 0, 3 * steepest, np.inf)
    direction = np.sign(model.a.detach().numpy()).astype(int) if model.A == 0 else np.zeros(model.B, dtype=int)
    return Limits(names=st.biomarker, low=tuple(low - width / 4), high=tuple(high + width / 4),
                  direction=tuple(int(d) for d in direction), max_rate=tuple(max_rate), units=tuple(_units(ds)))


def _treatments(events: list[list[tuple[float, str, float]]], st: Standardiser):
    """(per drug (dose_time (S, E), dose (S, E)), radiotherapy (time, dose) or None), NaN-padded,
    from each subject's event list; an agent the model never saw is an error."""
    known = set(st.agents) | ({RADIOTHERAPY} if st.radiotherapy else set())
    unknown = sorted({a for subject in events for _, a, _ in subject} - known)
    if unknown:
        raise InputError(f"the model knows agents {sorted(known)}, the scenario gives {unknown}", source="scenario",
                         field="agent")

    def of(agent):
        mine = [[(t, d) for t, a, d in subject if a == agent] for subject in events]
        width = max(1, max(len(m) for m in mine))
        time, dose = np.full((len(events), width), np.nan), np.full((len(events), width), np.nan)
        for i, m in enumerate(mine):
            for k, (t, d) in enumerate(sorted(m)):
                time[i, k], dose[i, k] = t, d
        return torch.as_tensor(time, dtype=torch.float32), torch.as_tensor(dose, dtype=torch.float32)

    return tuple(of(a) for a in st.agents), (of(RADIOTHERAPY) if st.radiotherapy else None)


def _explicit_arms(scenario: Mapping) -> dict[str, dict[str, list[tuple[float, str, float]]]]:
    """{arm: {subject: [(time since baseline, agent, dose), ...]}} checked and cleaned: names,
    finite times >= 0, finite doses >= 0; an empty agent (cohort padding) is dropped. Agents
    the model does not know are refused later, by `_treatments`."""
    from twin.scenarios.files import _ARM_NAME, FACTUAL

    if not scenario:
        raise InputError("expected at least one arm {arm: {subject: [(time, agent, dose), ...]}}, got none",
                         source="scenario")
    out = {}
    for name, schedules in scenario.items():
        if not isinstance(name, str) or not _ARM_NAME.match(name) or name == FACTUAL:
            raise InputError(f"arm names are letters, digits, '_' and '-', not {FACTUAL!r}; got {name!r}",
                             source="scenario", field=str(name))
        if not isinstance(schedules, Mapping):
            raise InputError(f"expected {{subject: [(time, agent, dose), ...]}}, got {type(schedules).__name__}",
                             source="scenario", field=name)
        out[name] = {}
        for subject, events in schedules.items():
            clean = []
            for event in events:
                try:
                    t, agent, dose = event
                    t, agent, dose = float(t), str(agent), float(dose)
                except (TypeError, ValueError):
                    raise InputError(f"subject {subject}: expected (time, agent, dose), got {event!r}",
                                     source="scenario", field=name) from None
                if not agent:
                    continue
                if not (math.isfinite(t) and t >= 0 and math.isfinite(dose) and dose >= 0):
                    raise InputError(f"subject {subject}: expected a time >= 0 years since baseline and a dose >= 0, "
                                     f"got {event!r}", source="scenario", field=name)
                clean.append((t, agent, dose))
            out[name][str(subject)] = sorted(clean)
    return out


def _as_requests(at) -> dict[str, list[float]]:
    """{subject: [clock times]} from a mapping or a DataFrame with columns subject, time."""
    if hasattr(at, "columns"):
        missing = [c for c in ("subject", "time") if c not in at.columns]
        if missing:
            raise InputError(f"expected columns subject,time, got {list(at.columns)}", source="requests",
                             field=missing[0])
        out: dict[str, list[float]] = {}
        for s, t in zip(at["subject"], at["time"]):
            out.setdefault(str(s), []).append(t)
        at = out
    if not isinstance(at, Mapping):
        raise InputError(f"expected {{subject: [times]}} or a DataFrame, got {type(at).__name__}", source="requests")
    clean = {}
    for s, times in at.items():
        try:
            values = [float(v) for v in (times if isinstance(times, (list, tuple, np.ndarray)) else [times])]
        except (TypeError, ValueError):
            raise InputError(f"subject {s}: expected numbers, got {times!r}", source="requests", field="time") from None
        if not all(math.isfinite(v) for v in values):
            raise InputError(f"subject {s}: expected finite times, got {values}", source="requests", field="time")
        clean[str(s)] = values
    return clean


def _units(ds: xr.Dataset) -> list[str]:
    return [str(u) for u in ds["biomarker_unit"].values] if "biomarker_unit" in ds.coords else [""] * ds.sizes["biomarker"]


def _json_number(v: float):
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _number(v) -> float:
    return float(v)  # float("inf") and float("-inf") read the strings back


def _version() -> str:
    from twin import __version__

    return __version__
