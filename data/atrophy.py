"""The `atrophy` simulator: neurodegeneration under a disease-modifying therapy on real anatomy.

Model (clock: age in years; time t in years since the subject's baseline visit at age a0):

    ds/dt = r s (1 - s) (1 - E(C(t)))            disease stage s in (0, 1)
    logit s(t) = r (a0 + t - t_onset) - r int_0^t E(C(u)) du          (exact solution)

- Untreated (E = 0) this is the logistic s(t) = sigmoid(r (a0 + t - t_onset)): t_onset is the age
  at s = 1/2 and r the rate. On the logit scale the treated equation is exactly integrable, and
  int E(C) is closed-form between doses (`treatment.effect_integral`), so the truth has no
  time-stepping error. Emax < 1 keeps ds/dt > 0: progression slows but never reverses.
- Covariates: age at baseline ~ N(72, 6) clipped to [55, 90]; sex (1 = female) ~ Bernoulli(0.5);
  apoe4 (carrier) ~ Bernoulli(0.35). t_onset ~ N(77, 4) - 5 apoe4 - 1 female;
  r = 0.5 exp(0.25 z) x 1.2^apoe4 x 1.1^female per year. With ~4 years of follow-up the cohort
  mixes pre-symptomatic (s ~ 0), progressing and late-stage subjects.
- Therapy ("dmt"): an infusion of 10 mg/kg every 28 days; one-compartment PK (half-life
  ~25 days, log-normal across subjects; V = 0.07 L/kg, so C is in mg/L) and
  E(C) = Emax C / (EC50 + C), Emax ~ U(0.5, 0.8) (the subject's sensitivity), EC50 ~ 40 mg/L
  log-normal; steady-state troughs sit above EC50, so the effect is sizeable but dose-dependent.

Anatomy at stage s, from the subject's own (s = 0) anatomy:

- Ventricular expansion: the displacement s v1(x), v1 = -gamma w(x) grad(G_sigma * p_vent)(x)
  (`glioma.mass_effect` of the ventricular CSF p_vent = csf * ventricles), scaled so that its
  largest displacement is the subject's `ventricle_expansion` mm (1.5-3 mm) and |grad v1| <= 0.6
  (Frobenius; smaller if need be): for every s in [0, 1] the map x -> x - s v1(x) is
  diffeomorphic. w tapers to 0 at the brain's edge, so the brain outline never moves; the tissue
  around the ventricles is compressed (tissue loss) as the ventricles grow, by ~1.3-1.8x (2D
  slice) or ~1.25-1.4x (3D) at s = 1.
- Cortical and hippocampal thinning: grey matter gives way to CSF in place, gm' = gm (1 - s L),
  with the loss map L = cortical_thinning x (1 near sulcal/outer CSF, smoothly 0 by `cortex_mm`
  away) + hippocampal_thinning x (smoothed hippocampus), both in the subject's (s = 0) frame;
  then everything is warped, and CSF fills the rest of the brain, csf' = 1 - gm' - wm' (as in
  the anatomy; so csf' gains exactly the grey matter lost, up to the warp's partial volume).
- T1 image: the subject's T1 (its real texture) plus the intensity of grey matter turned to
  CSF, s L gm (c_csf - c_gm), warped; c_csf and c_gm are the anatomy's own medians in nearly pure
  tissue. Outside the brain the image is the anatomy's T1, bit for bit, at every visit.

Biomarkers (noise-free, mL): ventricle_volume = sum W(p_vent), grey_matter_volume = sum gm',
hippocampal_volume = sum gm' x W(hippocampus), each times the voxel volume (W: the warp);
cognitive_score = 30 - 25 s^1.5 (MMSE-like points; a function of the disease state, not of the
images). Each is monotone in s: ventricles grow, grey matter, hippocampus and score fall.
Measured: volumes x (1 + 1.5% noise); score + N(0, 1), rounded, clipped to [0, 30].
Labels (truth_labels): argmax of (csf', gm', wm') in the brain; ventricles where W(p_vent) >= 1/2;
hippocampus where W(hippocampus) >= 1/2 and grey matter is the argmax: the hard-threshold
counterpart of the soft volumes (they agree to within partial-volume error, not exactly).

Schedules (years since baseline): half the subjects are treated; a treated subject starts at
baseline (30%) or on a uniformly drawn day in [0.1, 1.5] years. Infusions continue
every 28 days until the end of the nominal follow-up (4 years; capacity in `event_capacity`).
factual = what the subject received; untreated = no infusions; alternative = for a treated
subject the same therapy started `alternative_delay` (1) year later, for an untreated subject
the therapy from baseline.

Visits: nominal (0, 0.5, 1, 2, 3, 4) years, jittered, some missed (`acquisition.visit_schedule`).
Acquisition of each observed visit: small rigid misregistration, multiplicative bias field,
Rician noise. Images depend on t only through s(t), so each distinct stage is rendered once: an
untreated subject's factual truth *is* its untreated truth, and all scenarios agree until the
first infusion.

Random draws, in this order from the subject's generator (after `anatomy.subject_anatomy`):
age, sex, apoe4, onset z, rate z, Emax, EC50 z, half-life z, expansion, cortical thinning,
hippocampal thinning, treated, starts-at-baseline, start time (all always drawn, so one draw
never shifts another); then the visit schedule; then per observed visit in order: misregistration,
bias field, Rician noise, volume noise (3), score noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import expit

from twin.errors import InputError

from . import treatment as tx
from .glioma import mass_effect
from .subject_sim import SimulatorSpec, SubjectSim, config_from_dict

DMT = "dmt"  # disease-modifying therapy, dose in mg/kg

ATROPHY = SimulatorSpec(
    kind="atrophy",
    channel=("t1",),
    biomarker=("ventricle_volume", "grey_matter_volume", "hippocampal_volume", "cognitive_score"),
    biomarker_units=("mL", "mL", "mL", "points"),
    covariate=("age", "sex", "apoe4"),
    parameter=("onset_age", "rate", "emax", "ec50", "half_life", "ventricle_expansion", "cortical_thinning",
               "hippocampal_thinning", "treatment_start", "alternative_start"),
    labels=("csf", "grey_matter", "white_matter", "ventricles", "hippocampus"),
    clock="age (years)",
)
# units of ATROPHY.parameter: years (age), 1/yr, 1, mg/L, yr, mm (the largest displacement at s = 1, as
# applied), 1, 1, yr, yr (time of the first infusion since baseline; NaN: no therapy in that schedule)


@dataclass(frozen=True)
class Response:
    """How a subject's disease responds to the therapy: PK and the Emax effect on progression."""

    pk: tx.OneCompartment
    emax: float
    ec50: float  # mg/L


@dataclass(frozen=True)
class AtrophyConfig:
    """Everything `atrophy_subject` draws from; population means and spreads of the parameters."""

    visits: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0)  # nominal visit times, years
    visit_jitter: float = 0.08  # years
    p_missed: float = 0.15
    age: tuple[float, float] = (72.0, 6.0)  # baseline age, mean and sd
    age_range: tuple[float, float] = (55.0, 90.0)
    p_female: float = 0.5
    p_apoe4: float = 0.35
    onset: tuple[float, float] = (77.0, 4.0)  # age at s = 1/2 of a male non-carrier, mean and sd
    apoe4_onset_shift: float = 5.0  # years earlier in carriers
    female_onset_shift: float = 1.0  # years earlier in women
    rate: float = 0.5  # 1/yr, population median
    rate_log_sd: float = 0.25
    apoe4_rate_factor: float = 1.2
    female_rate_factor: float = 1.1
    p_treated: float = 0.5
    p_start_at_baseline: float = 0.3  # of the treated
    start_window: tuple[float, float] = (0.1, 1.5)  # years, uniform, for the others
    alternative_delay: float = 1.0  # years
    dose: float = 10.0  # mg/kg per infusion
    dose_every: float = 28 * tx.DAY  # years
    half_life: float = 25 * tx.DAY  # years, population median
    half_life_log_sd: float = 0.2
    pk_volume: float = 0.07  # L/kg
    emax: tuple[float, float] = (0.5, 0.8)  # uniform; must stay below 1
    ec50: float = 40.0  # mg/L, population median
    ec50_log_sd: float = 0.3
    ventricle_expansion: tuple[float, float] = (1.5, 3.0)  # mm, largest displacement at s = 1, uniform
    expansion_sigma: float = 8.0  # mm, smoothing of the ventricles for the expansion field
    taper_mm: float = 6.0  # the expansion fades to 0 over this depth inside the brain's edge
    cortical_thinning: tuple[float, float] = (0.15, 0.30)  # fraction of cortical GM lost at s = 1
    hippocampal_thinning: tuple[float, float] = (0.25, 0.45)  # ... of hippocampal GM
    cortex_mm: float = 10.0  # depth from sulcal / outer CSF over which cortical thinning fades
    score_drop: float = 25.0  # points lost at s = 1
    score_power: float = 1.5
    noise_sigma: float = 0.03  # Rician noise, relative to the white-matter intensity
    bias_strength: float = 0.1
    max_rotation_deg: float = 2.0
    max_shift_vox: float = 1.0
    volume_cv: float = 0.015  # multiplicative measurement noise of the volumes
    score_sd: float = 1.0  # points

    def __post_init__(self):
        v = np.asarray(self.visits, dtype=float)
        if v.size < 1 or v[0] != 0 or np.any(np.diff(v) <= 0):
            raise InputError(f"expected increasing visit times starting at 0, got {list(self.visits)}",
                             source="AtrophyConfig", field="visits")
        if not 0 <= self.emax[0] <= self.emax[1] < 1:
            raise InputError(f"expected 0 <= low <= high < 1 (therapy slows, never reverses), got {self.emax}",
                             source="AtrophyConfig", field="emax")
        for name in ("p_missed", "p_female", "p_apoe4", "p_treated", "p_start_at_baseline"):
            if not 0 <= getattr(self, name) <= (1 if name != "p_missed" else 0.999):
                raise InputError(f"expected a probability, got {getattr(self, name)}", source="AtrophyConfig",
                                 field=name)
        for name in ("age_range", "start_window", "ventricle_expansion", "cortical_thinning", "hippocampal_thinning"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise InputError(f"expected (low, high) with low <= high, got {(lo, hi)}", source="AtrophyConfig",
                                 field=name)
        if self.cortical_thinning[1] + self.hippocampal_thinning[1] > 1 or self.cortical_thinning[0] < 0:
            raise InputError("thinning fractions must be >= 0 and sum to at most 1", source="AtrophyConfig")
        if not (self.rate > 0 and self.dose_every > 0 and self.half_life > 0 and self.pk_volume > 0 and self.ec50 > 0
                and self.dose >= 0 and self.start_window[0] >= 0):
            raise InputError("need rate, dose_every, half_life, pk_volume, ec50 > 0 and dose, start_window >= 0",
                             source="AtrophyConfig")

    @classmethod
    def from_dict(cls, values: dict) -> AtrophyConfig:
        """From a parsed YAML/JSON mapping; unknown keys raise `InputError`."""
        return config_from_dict(cls, values)


# ---------------------------------------------------------------- disease course


def exposure(t, events, response: Response | None) -> np.ndarray:
    """int_0^t E(C(u)) du at each time, exact (closed form between doses); t (T,) >= 0 -> (T,).

    Only `DMT` events count; one at time t_i enters C from t_i on (right-continuous), so the
    exposure at t_i itself does not include it.
    """
    t = np.atleast_1d(np.asarray(t, dtype=np.float64))
    bad = sorted({a for _, a, _ in events} - {DMT})
    if bad:
        raise InputError(f"unknown agent(s) {bad}; expected {DMT!r}", source="exposure", field="events")
    if t.size and t.min() < 0:
        raise InputError(f"times must be >= 0 (since baseline), got {t.min()}", source="exposure", field="t")
    out = np.zeros_like(t)
    dose_times, dose_amounts = tx.doses(events, DMT)
    if not dose_times.size:
        return out
    if response is None:
        raise InputError("events given without a Response to them", source="exposure", field="response")
    order = np.argsort(t, kind="stable")
    total, last = 0.0, 0.0
    for i in order:  # cumulative over sorted times: each dose interval is integrated once
        if t[i] > last:
            total += tx.effect_integral(last, t[i], dose_times, dose_amounts, response.pk, response.emax, response.ec50)
            last = t[i]
        out[i] = total
    return out


def stage(t, age0: float, onset: float, rate: float, events=(), response: Response | None = None) -> np.ndarray:
    """Disease stage s(t) in (0, 1) at times t (T,) years since baseline; returns (T,).

    logit s(t) = r (a0 + t - t_onset) - r int_0^t E(C): the exact solution of
    ds/dt = r s (1 - s) (1 - E(C(t))). Without events it is the logistic sigmoid(r (a0 + t - t_onset)).
    """
    t = np.atleast_1d(np.asarray(t, dtype=np.float64))
    return expit(rate * (age0 + t - onset) - rate * exposure(t, events, response))


def cognitive_score(s, drop: float = 25.0, power: float = 1.5) -> np.ndarray:
    """MMSE-like score 30 - drop s^power (points, 30 = healthy), non-increasing in s."""
    return 30.0 - drop * np.asarray(s, dtype=np.float64) ** power


def infusions(start: float, end: float, every: float, dose: float) -> list[tx.Event]:
    """(t, "dmt", dose) at start, start + every, ... while t <= end; [] if start is NaN or > end."""
    if not np.isfinite(start) or start > end:
        return []
    count = int(np.floor((end - start) / every + 1e-9)) + 1
    return [(float(start + k * every), DMT, float(dose)) for k in range(count)]


def event_capacity(cfg: AtrophyConfig) -> int:
    """The most infusions one subject can receive under any schedule: from baseline to the end."""
    return len(infusions(0.0, float(cfg.visits[-1]), cfg.dose_every, cfg.dose))


# ---------------------------------------------------------------- anatomy at stage s


def expansion(ventricle: np.ndarray, mask: np.ndarray, spacing, amplitude_mm: float, sigma_mm: float = 8.0,
              taper_mm: float = 6.0, max_gradient: float = 0.6) -> np.ndarray:
    """The ventricular expansion field v1 (ndim, *space), in voxels, at stage s = 1.

    Away from the ventricles (`glioma.mass_effect` of the ventricular CSF), zero outside the
    brain; scaled so its largest displacement is `amplitude_mm`, then down if needed so the
    Frobenius norm of grad v1 stays <= `max_gradient` < 1: x -> x - s v1(x) is then
    diffeomorphic for every s in [0, 1], since |s grad v1| < 1. (0.6 rather than glioma's 0.5: the
    ventricles may then grow by up to ~1.5x at s = 1 in 3D, and the margin below 1 absorbs the
    finite differences.)
    """
    v = mass_effect(ventricle, mask, spacing, 1.0, sigma_mm, taper_mm, max_gradient=np.inf)
    largest = largest_mm(v, spacing)
    if largest == 0:
        return v
    v *= amplitude_mm / largest
    worst = _gradient_norm(v)
    if worst > max_gradient:
        v *= max_gradient / worst
    return v


def largest_mm(v: np.ndarray, spacing) -> float:
    """The largest displacement of v (ndim, *space), given in voxels, in mm."""
    h = np.asarray(spacing, dtype=np.float64).reshape(-1, *[1] * (v.ndim - 1))
    return float(np.sqrt(((v * h) ** 2).sum(0)).max()) if v.size else 0.0


def _gradient_norm(v: np.ndarray) -> float:
    """max over voxels of the Frobenius norm of grad v (voxel units)."""
    ndim = v.shape[0]
    return float(np.sqrt(sum(np.square(np.gradient(v[i])[j]) for i in range(ndim) for j in range(ndim))).max())


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def loss_map(csf: np.ndarray, ventricles: np.ndarray, hippocampus: np.ndarray, mask: np.ndarray, spacing,
             cortical: float, hippocampal: float, cortex_mm: float = 10.0) -> np.ndarray:
    """L(x) in [0, 1]: the fraction of grey matter that turns into CSF at s = 1. (*space), 0 outside.

    Cortical thinning happens next to sulcal and outer CSF (CSF that is not ventricular, and
    the outside of the brain): weight 1 there, fading smoothly to 0 at `cortex_mm` deep. The
    hippocampus (smoothed by a voxel, for partial volume) adds `hippocampal`.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    deep_ventricle = ndimage.binary_dilation(ventricles, iterations=1)
    outer = ~mask | ((csf > 0.5) & ~deep_ventricle)
    depth = ndimage.distance_transform_edt(~outer, sampling=spacing)  # mm to the nearest outer CSF
    cortex = 1.0 - _smoothstep(depth / cortex_mm)
    hippo = ndimage.gaussian_filter(hippocampus.astype(np.float64), 1.0, mode="constant")
    return np.clip(cortical * cortex + hippocampal * hippo, 0.0, 1.0) * mask


@dataclass(frozen=True, eq=False)
class Brain:
    """One subject's brain at s = 0 and how it changes; every array (*space) unless said otherwise."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    ventricle: np.ndarray  # ventricular CSF probability
    hippocampus: np.ndarray  # hippocampal region, 0/1 as float
    loss: np.ndarray  # L(x), see `loss_map`
    mask: np.ndarray  # bool
    v1: np.ndarray  # (ndim, *space) expansion at s = 1, voxels
    contrast: float  # T1 intensity of CSF minus that of grey matter
    voxel_ml: float


def render(brain: Brain, s: float) -> dict[str, np.ndarray]:
    """The brain at stage s: warped maps t1, gm, wm, csf, ventricle, hippocampus, each (*space).

    Thinning happens in the subject's own frame, then everything is warped by x -> x - s v1(x);
    csf = 1 - gm - wm inside the brain.
    Outside the mask every map is its s = 0 value, bit for bit (the warp is the identity there).
    """
    from .anatomy import warp

    lost = s * brain.loss * brain.gm
    maps = {"t1": brain.t1 + brain.contrast * lost, "gm": brain.gm - lost, "wm": brain.wm,
            "ventricle": brain.ventricle, "hippocampus": brain.hippocampus}
    reference = {"t1": brain.t1, "gm": brain.gm, "wm": brain.wm, "ventricle": brain.ventricle,
                 "hippocampus": brain.hippocampus}
    disp = s * brain.v1
    out = {k: np.where(brain.mask, warp(m, disp, order=1), reference[k]) for k, m in maps.items()}
    # CSF fills the rest of the brain (as in the anatomy): the grey matter lost, and the partial
    # volume that the brain's edge voxels would otherwise sample from outside the brain
    out["csf"] = np.where(brain.mask, np.clip(1.0 - out["gm"] - out["wm"], 0.0, 1.0), brain.csf)
    return out


def volumes(maps: dict[str, np.ndarray], brain: Brain, s: float, drop: float = 25.0, power: float = 1.5) -> np.ndarray:
    """(ventricle, grey matter, hippocampal) volumes in mL and the cognitive score: (4,)."""
    m = brain.mask
    return np.array([maps["ventricle"][m].sum() * brain.voxel_ml, maps["gm"][m].sum() * brain.voxel_ml,
                     (maps["gm"] * maps["hippocampus"])[m].sum() * brain.voxel_ml,
                     float(cognitive_score(s, drop, power))])


def labels(maps: dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
    """uint8 label map per ATROPHY.labels (k+1 is labels[k]; 0 background)."""
    out = np.argmax(np.stack([maps["csf"], maps["gm"], maps["wm"]]), axis=0).astype(np.uint8) + 1
    out[maps["ventricle"] >= 0.5] = 4
    out[(maps["hippocampus"] >= 0.5) & (out == 2)] = 5
    out[~mask] = 0
    return out


# ---------------------------------------------------------------- one subject


@dataclass(frozen=True)
class Draw:
    """One subject's covariates and true parameters (everything drawn before the visits)."""

    age: float
    sex: float  # 1 = female
    apoe4: float  # 1 = carrier
    onset: float  # age at s = 1/2
    rate: float  # 1/yr
    emax: float
    ec50: float  # mg/L
    half_life: float  # years
    ventricle_expansion: float  # mm at s = 1, as drawn (before the diffeomorphism cap)
    cortical_thinning: float
    hippocampal_thinning: float
    treatment_start: float  # years since baseline; NaN if untreated
    alternative_start: float

    def response(self, cfg: AtrophyConfig) -> Response:
        return Response(tx.OneCompartment.from_half_life(self.half_life, cfg.pk_volume), self.emax, self.ec50)

    @property
    def covariates(self) -> np.ndarray:
        return np.array([self.age, self.sex, self.apoe4])


def draw(rng: np.random.Generator, cfg: AtrophyConfig = AtrophyConfig()) -> Draw:
    """Covariates and parameters of one subject, in the module's fixed draw order (cheap: no images)."""
    age = float(np.clip(rng.normal(*cfg.age), *cfg.age_range))
    female = float(rng.random() < cfg.p_female)
    apoe4 = float(rng.random() < cfg.p_apoe4)
    onset = cfg.onset[0] + cfg.onset[1] * rng.normal() - cfg.apoe4_onset_shift * apoe4 - cfg.female_onset_shift * female
    rate = (cfg.rate * np.exp(cfg.rate_log_sd * rng.normal()) * cfg.apoe4_rate_factor**apoe4
            * cfg.female_rate_factor**female)
    emax = rng.uniform(*cfg.emax)
    ec50 = cfg.ec50 * np.exp(cfg.ec50_log_sd * rng.normal())
    half_life = cfg.half_life * np.exp(cfg.half_life_log_sd * rng.normal())
    amplitude = rng.uniform(*cfg.ventricle_expansion)
    cortical = rng.uniform(*cfg.cortical_thinning)
    hippocampal = rng.uniform(*cfg.hippocampal_thinning)
    treated = rng.random() < cfg.p_treated
    at_baseline = rng.random() < cfg.p_start_at_baseline
    first_day, last_day = int(np.ceil(cfg.start_window[0] / tx.DAY)), int(np.floor(cfg.start_window[1] / tx.DAY))
    later = rng.integers(first_day, last_day + 1) * tx.DAY
    start = (0.0 if at_baseline else later) if treated else np.nan
    alternative = start + cfg.alternative_delay if treated else 0.0
    end = float(cfg.visits[-1])
    return Draw(age, female, apoe4, float(onset), float(rate), float(emax), float(ec50), float(half_life),
                float(amplitude), float(cortical), float(hippocampal),
                start if start <= end else np.nan, alternative if alternative <= end else np.nan)


def schedules(d: Draw, cfg: AtrophyConfig) -> tuple[list[tx.Event], list[tx.Event]]:
    """(factual, alternative) infusions: every `dose_every` from the start to the nominal end."""
    end = float(cfg.visits[-1])
    return (infusions(d.treatment_start, end, cfg.dose_every, cfg.dose),
            infusions(d.alternative_start, end, cfg.dose_every, cfg.dose))


def _tissue_level(t1, tissue, mask, default):
    """Median T1 in nearly pure tissue (p > 0.9) inside the brain, or `default` if there is none."""
    pure = mask & (tissue > 0.9)
    return float(np.median(t1[pure])) if pure.any() else default


def brain_of(anatomy, d: Draw, cfg: AtrophyConfig) -> Brain:
    """The subject's s = 0 brain and its expansion / thinning fields, from an `anatomy.Anatomy`."""
    mask = np.asarray(anatomy.mask, dtype=bool)
    t1, gm, wm, csf = (np.asarray(a, dtype=np.float64) for a in (anatomy.t1, anatomy.gm, anatomy.wm, anatomy.csf))
    ventricles = np.asarray(anatomy.ventricles, dtype=bool) & mask
    hippocampus = np.asarray(anatomy.hippocampus, dtype=bool) & mask
    spacing = np.asarray(anatomy.spacing, dtype=np.float64)[: mask.ndim]
    ventricle = csf * ventricles
    wm_level = _tissue_level(t1, wm, mask, float(t1[mask].max()) if mask.any() else 1.0)
    contrast = _tissue_level(t1, csf, mask, 0.15 * wm_level) - _tissue_level(t1, gm, mask, 0.6 * wm_level)
    return Brain(
        t1=t1, gm=gm, wm=wm, csf=csf, ventricle=ventricle, hippocampus=hippocampus.astype(np.float64),
        loss=loss_map(csf, ventricles, hippocampus, mask, spacing, d.cortical_thinning, d.hippocampal_thinning,
                      cfg.cortex_mm),
        mask=mask, v1=expansion(ventricle, mask, spacing, d.ventricle_expansion, cfg.expansion_sigma, cfg.taper_mm),
        contrast=contrast, voxel_ml=float(anatomy.voxel_volume),
    )


def atrophy_subject(anatomy, rng: np.random.Generator, cfg: AtrophyConfig = AtrophyConfig()) -> SubjectSim:
    """One simulated subject on `anatomy` (a `twin.data.anatomy.Anatomy`, already the subject's own), from `rng`."""
    from .acquisition import bias_field, misregister, rician_noise, visit_schedule

    d = draw(rng, cfg)
    time, observed = visit_schedule(rng, np.asarray(cfg.visits, dtype=np.float64), cfg.visit_jitter, cfg.p_missed)
    time, observed = np.asarray(time, dtype=np.float64), np.asarray(observed, dtype=bool)
    factual, alternative = schedules(d, cfg)
    response = d.response(cfg)
    s = np.stack([stage(time, d.age, d.onset, d.rate, events, response)
                  for events in (factual, [], alternative)])  # (3, V)

    # images depend on time only through s: render each distinct stage once
    brain = brain_of(anatomy, d, cfg)
    V, shape = len(time), brain.mask.shape
    truth_image = np.empty((3, V, 1, *shape), dtype=np.float32)
    truth_biomarkers = np.empty((3, V, 4))
    truth_labels = np.empty((V, *shape), dtype=np.uint8)
    rendered: dict[float, tuple] = {}
    for k in range(3):
        for v in range(V):
            key = float(s[k, v])
            if key not in rendered:
                maps = render(brain, key)
                rendered[key] = (maps["t1"].astype(np.float32),
                                 volumes(maps, brain, key, cfg.score_drop, cfg.score_power),
                                 labels(maps, brain.mask) if k == 0 else None)
            image, bio, lab = rendered[key]
            truth_image[k, v, 0] = image
            truth_biomarkers[k, v] = bio
            if k == 0:
                truth_labels[v] = lab

    # as acquired: misregistration, bias field, Rician noise; biomarkers with measurement noise
    wm_level = _tissue_level(brain.t1, brain.wm, brain.mask, 1.0)
    image = np.full((V, 1, *shape), np.nan, dtype=np.float32)
    biomarkers = np.full((V, 4), np.nan)
    for v in np.flatnonzero(observed):
        scan = misregister(truth_image[0, v], rng, cfg.max_rotation_deg, cfg.max_shift_vox)
        scan = scan * bias_field(shape, cfg.bias_strength, rng)
        image[v] = rician_noise(scan, cfg.noise_sigma * wm_level, rng)
        truth = truth_biomarkers[0, v]
        vols = np.maximum(truth[:3] * (1 + cfg.volume_cv * rng.normal(size=3)), 0.0)
        score = np.clip(np.round(truth[3] + cfg.score_sd * rng.normal()), 0.0, 30.0)
        biomarkers[v] = [*vols, score]

    amplitude = largest_mm(brain.v1, np.asarray(anatomy.spacing)[: len(shape)])  # after the diffeomorphism cap
    return SubjectSim(
        time=time, observed=observed, image=image, truth_image=truth_image, truth_labels=truth_labels,
        biomarkers=biomarkers, truth_biomarkers=truth_biomarkers, covariates=d.covariates,
        parameters=np.array([d.onset, d.rate, d.emax, d.ec50, d.half_life, amplitude, d.cortical_thinning,
                             d.hippocampal_thinning, d.treatment_start, d.alternative_start]),
        mask=brain.mask, affine=np.asarray(anatomy.affine, dtype=np.float64), baseline_time=d.age,
        events=factual, alternative_events=alternative,
    )

