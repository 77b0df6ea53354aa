"""The `glioma` simulator: tumour growth under chemo- and radiotherapy on real anatomy.

Model (units: mm, years; u is tumour cell density as a fraction of carrying capacity):

    du/dt = div(D(x) grad u) + rho(x) u (1 - u) - k_c E(C(t)) u        in the brain
    D grad u . n = 0                                                     on the brain boundary
    u(t_f+) = S(d_f) u(t_f-),   S(d) = exp(-alpha d - beta d^2)          at each fraction d_f Gy

- D(x) = D_white p_wm(x) + D_grey p_gm(x) (tissue probabilities), 0 in CSF and outside the
  brain; D_white is 5-10x D_grey. rho(x) = rho (p_wm + p_gm): no proliferation in CSF.
- C(t) is temozolomide's concentration (one-compartment bolus superposition) and
  E = Emax C / (EC50 + C), both from `twin.data.treatment`; k_c is the subject's chemo
  sensitivity, higher when the MGMT promoter is methylated.
- Solved by operator splitting on the voxel grid: explicit flux-form diffusion (face
  diffusivity = harmonic mean of the two voxels, zero across the brain boundary, so the
  tumour never leaves the brain and sum(u) is conserved by diffusion), the exact logistic
  solution for the reaction, and the exact chemo kill exp(-k_c int E dt) over each step
  (closed form, see `treatment.effect_integral`). Steps stay under the explicit stability limit
  dt <= 1 / (2 D_max sum_i 1/h_i^2), end exactly at every event and visit time, and fractions
  are applied at their exact times. Values at an event time are taken after it (right-continuous).
- Mass effect: anatomy is pushed away from the tumour by the displacement
  v(x) = -gamma w(x) grad(G_sigma * u)(x) (w tapers to 0 at the brain boundary), scaled down
  if needed so |grad v| <= 1/2 and the map x -> x - v(x) is diffeomorphic (Jacobian > 0).
  The tumour density itself stays on the reference grid.
- Imaging (Swanson's visibility thresholds): T1c enhances where u >= 0.8 and FLAIR is
  hyperintense where u >= 0.16. Biomarkers: enhancing_volume = vol(u >= 0.8),
  oedema_volume = vol(0.16 <= u < 0.8), in mL.

Schedules (years since baseline, the post-operative scan): factual = Stupp standard of care
(radiotherapy 30 x 2 Gy Mon-Fri with daily concomitant temozolomide, then 6 adjuvant 5-day
cycles every 28 days) starting 3-5 weeks after baseline, except for a fraction
`p_radiotherapy_alone` of subjects who receive the radiotherapy alone, as frail patients
often do (without that variety a cohort could not tell the drug's effect from the
radiotherapy's); untreated = no treatment; alternative = for subjects treated by radiotherapy
alone, the full Stupp schedule; for the others `GliomaConfig.alternative`:
"radiotherapy_alone" (same start, no temozolomide) or "delayed" (the factual schedule shifted
`alternative_delay` years later). Before baseline
the tumour grows untreated from a small white-matter seed for `onset` years.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from twin.errors import InputError

from . import treatment as tx
from .subject_sim import SimulatorSpec, SubjectSim, config_from_dict

VISIBLE_FLAIR = 0.16  # Swanson's detection threshold of FLAIR abnormality
VISIBLE_T1C = 0.8  # ... and of T1 gadolinium enhancement

GLIOMA = SimulatorSpec(
    kind="glioma",
    channel=("t1c", "flair"),
    biomarker=("enhancing_volume", "oedema_volume"),
    biomarker_units=("mL", "mL"),
    covariate=("age", "sex", "mgmt_methylated"),
    parameter=("d_white", "d_grey", "rho", "chemo_kill", "alpha_rt", "beta_rt", "onset", "mass_effect",
               "seed_x", "seed_y", "seed_z"),
    labels=("csf", "grey_matter", "white_matter", "oedema", "enhancing"),
    clock="years since baseline",
)
# units of GLIOMA.parameter: mm^2/yr, mm^2/yr, 1/yr, 1/yr, 1/Gy, 1/Gy^2, yr, mm^2, mm, mm, mm (world, RAS)

ALTERNATIVES = ("radiotherapy_alone", "delayed")


@dataclass(frozen=True)
class Response:
    """How a tumour responds to treatment: temozolomide PK/PD, chemo kill rate, LQ radiosensitivity."""

    pk: tx.OneCompartment
    emax: float = 1.0
    ec50: float = 5.0  # mg/L
    kill: float = 0.0  # k_c, 1/yr at full effect
    alpha: float = 0.0  # 1/Gy
    beta: float = 0.0  # 1/Gy^2


@dataclass(frozen=True)
class GliomaConfig:
    """Everything `glioma_subject` draws from; population means and spreads of the parameters."""

    visit_every: float = 0.2  # years between planned visits (~2.4 months)
    n_visits: int = 9  # planned visits, baseline included: 0 .. 1.6 years
    visit_jitter: float = 2.0 / 52  # years
    p_missed: float = 0.15
    onset: tuple[float, float] = (0.8, 1.5)  # years of untreated growth before baseline (uniform)
    d_white: float = 40.0  # mm^2/yr, population median
    white_grey_ratio: tuple[float, float] = (5.0, 10.0)  # uniform
    rho: float = 4.0  # 1/yr, population median
    log_sd: float = 0.2  # log-normal spread of d_white, rho and chemo_kill
    chemo_kill: float = 60.0  # 1/yr, unmethylated median; x mgmt_factor when methylated
    mgmt_factor: float = 2.5
    p_mgmt_methylated: float = 0.45
    alpha_rt: tuple[float, float] = (0.02, 0.035)  # 1/Gy, uniform
    alpha_beta_ratio: float = 10.0  # Gy
    tmz_half_life: float = 1.8 * tx.HOUR  # years
    tmz_volume: float = 30.0  # L
    tmz_emax: float = 1.0
    tmz_ec50: float = 5.0  # mg/L
    rt_start: tuple[float, float] = (3.0 * 7 * tx.DAY, 5.0 * 7 * tx.DAY)  # after baseline, uniform
    alternative: str = "radiotherapy_alone"  # one of ALTERNATIVES
    p_radiotherapy_alone: float = 0.3  # received radiotherapy without temozolomide (frail, elderly, unmethylated)
    alternative_delay: float = 0.25  # years, for "delayed"
    mass_effect: tuple[float, float] = (20.0, 60.0)  # gamma in mm^2, uniform
    mass_sigma: float = 6.0  # mm, smoothing of u for the mass effect
    max_dt: float = 0.01  # years, splitting step
    noise_sigma: float = 0.02  # Rician noise, relative to the white-matter intensity
    bias_strength: float = 0.1
    max_rotation_deg: float = 2.0
    max_shift_vox: float = 1.0
    biomarker_cv: float = 0.05  # multiplicative measurement noise of the volumes
    biomarker_sd: float = 0.05  # mL, additive measurement noise

    def __post_init__(self):
        if self.alternative not in ALTERNATIVES:
            raise InputError(f"expected one of {list(ALTERNATIVES)}, got {self.alternative!r}",
                             source="GliomaConfig", field="alternative")
        if self.n_visits < 1 or self.visit_every <= 0 or not 0 <= self.p_missed < 1 or self.max_dt <= 0 \
                or not 0 <= self.p_radiotherapy_alone <= 1:
            raise InputError("need n_visits >= 1, visit_every > 0, 0 <= p_missed < 1, max_dt > 0, "
                             "0 <= p_radiotherapy_alone <= 1",
                             source="GliomaConfig")

    @classmethod
    def from_dict(cls, values: dict) -> GliomaConfig:
        """From a parsed YAML/JSON mapping; unknown keys raise `InputError`."""
        return config_from_dict(cls, values)


# ---------------------------------------------------------------- physics on the voxel grid


def diffusivity(wm: np.ndarray, gm: np.ndarray, mask: np.ndarray, d_white: float, d_grey: float) -> np.ndarray:
    """D(x) = D_white p_wm + D_grey p_gm inside the brain, 0 outside (and in pure CSF). (*space)."""
    return np.where(mask, d_white * wm + d_grey * gm, 0.0).astype(np.float64)


def face_diffusivity(D: np.ndarray) -> list[np.ndarray]:
    """Per axis, the diffusivity on the faces between neighbours: harmonic mean, 0 if either is 0.

    Harmonic, because flux through two half-cells in series adds resistances; it also makes
    every face touching the outside (D = 0) closed, which is the zero-flux boundary condition.
    """
    out = []
    for axis in range(D.ndim):
        a = np.take(D, np.arange(D.shape[axis] - 1), axis=axis)
        b = np.take(D, np.arange(1, D.shape[axis]), axis=axis)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where((a > 0) & (b > 0), 2 * a * b / (a + b), 0.0))
    return out


def stable_dt(D: np.ndarray, spacing: Sequence[float]) -> float:
    """Largest explicit diffusion step that keeps the scheme monotone: 1 / (2 D_max sum 1/h^2)."""
    d_max = float(np.max(D)) if D.size else 0.0
    if d_max <= 0:
        return np.inf
    return 1.0 / (2.0 * d_max * sum(1.0 / h**2 for h in spacing))


def diffuse(u: np.ndarray, faces: list[np.ndarray], spacing: Sequence[float], dt: float) -> np.ndarray:
    """One explicit flux-form step of div(D grad u); sum(u) is conserved exactly (fluxes cancel)."""
    out = u.copy()
    for axis, (Df, h) in enumerate(zip(faces, spacing)):
        lo = [slice(None)] * u.ndim
        hi = [slice(None)] * u.ndim
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        flux = dt / h**2 * Df * (u[tuple(hi)] - u[tuple(lo)])  # from hi into lo
        out[tuple(lo)] += flux
        out[tuple(hi)] -= flux
    return out


def logistic(u: np.ndarray, rho, dt: float) -> np.ndarray:
    """Exact solution of du/dt = rho u (1 - u) after dt."""
    g = np.exp(np.asarray(rho) * dt)
    return u * g / (1.0 - u + u * g)


def kpp(u0: np.ndarray, D: np.ndarray, rho, spacing: Sequence[float], times: Sequence[float],
        events: Sequence[tx.Event] = (), response: Response | None = None, t0: float = 0.0,
        max_dt: float = 0.01, safety: float = 0.9) -> np.ndarray:
    """Fisher-KPP with treatment from u(t0) = u0 to each of `times`; returns (T, *space).

    u0, D: (*space); rho: scalar or (*space); spacing: mm per axis; times >= t0, any order.
    Events before t0 are ignored; events at a time t act before u(t) is reported. Radiotherapy
    fractions multiply u by S(d) at their exact time; temozolomide doses enter C(t).
    """
    times = np.asarray(times, dtype=np.float64)
    if times.size and times.min() < t0:
        raise InputError(f"requested times must be >= t0 = {t0}, got {times.min()}", source="kpp", field="times")
    if len(spacing) != u0.ndim or D.shape != u0.shape:
        raise InputError(f"u0 {u0.shape}, D {D.shape} and spacing {tuple(spacing)} disagree", source="kpp")
    events = [e for e in events if e[0] >= t0]
    if response is None and events:
        raise InputError("events given without a Response to them", source="kpp", field="response")
    faces = face_diffusivity(D)
    dt_max = min(max_dt, safety * stable_dt(D, spacing))
    kill = response.kill if response is not None else 0.0
    k = response.pk.k if response is not None else 0.0

    fractions: dict[float, float] = {}  # time -> total surviving fraction of the fractions then
    drug: dict[float, float] = {}  # time -> concentration jump
    for t, agent, dose in events:
        if agent == tx.RADIOTHERAPY:
            fractions[t] = fractions.get(t, 1.0) * float(tx.lq_survival(dose, response.alpha, response.beta))
        elif agent == tx.TEMOZOLOMIDE:
            drug[t] = drug.get(t, 0.0) + dose / response.pk.volume
        else:
            raise InputError(f"unknown agent {agent!r}; expected {tx.RADIOTHERAPY!r} or {tx.TEMOZOLOMIDE!r}",
                             source="kpp", field="events")
    stops = np.unique(np.concatenate([[t0], times, list(fractions), list(drug)]))

    u = np.asarray(u0, dtype=np.float64).copy()
    conc = 0.0
    out = np.empty((len(times), *u.shape))
    for i, t in enumerate(stops):
        if i > 0:  # integrate (stops[i-1], t]: no event strictly inside
            span = t - stops[i - 1]
            n = max(1, int(np.ceil(span / dt_max)))
            dt = span / n
            for _ in range(n):
                u = diffuse(u, faces, spacing, dt)
                u = logistic(u, rho, dt)
                if kill > 0 and conc > 0:
                    effect = response.emax / k * np.log((response.ec50 + conc) / (response.ec50 + conc * np.exp(-k * dt)))
                    u = u * np.exp(-kill * effect)
                conc *= np.exp(-k * dt)
        if t in fractions:
            u = u * fractions[t]
        conc += drug.get(t, 0.0)
        out[times == t] = u
    return out


def mass_effect(u: np.ndarray, mask: np.ndarray, spacing: Sequence[float], gamma: float,
                sigma_mm: float = 6.0, taper_mm: float = 6.0, max_gradient: float = 0.5) -> np.ndarray:
    """Displacement (ndim, *space), in voxels, pushing anatomy away from the tumour.

    v = -gamma w grad(G_sigma * u), with w = 0 outside the brain rising smoothly to 1 over
    `taper_mm` inside it; scaled down so the Frobenius norm of grad v (voxel units) stays below
    `max_gradient` < 1, which keeps det(I - grad v) > 0: the warp x -> x - v(x) is diffeomorphic.
    """
    return _displacement(u, mask, _taper(mask, spacing, taper_mm), spacing, gamma, sigma_mm, max_gradient)


def _taper(mask: np.ndarray, spacing: Sequence[float], taper_mm: float) -> np.ndarray:
    """0 outside the brain, smoothstep up to 1 at `taper_mm` inside: the boundary never moves."""
    depth = ndimage.distance_transform_edt(mask, sampling=spacing)  # mm to the outside, 0 outside
    s = np.clip(depth / taper_mm, 0.0, 1.0)
    return s * s * (3 - 2 * s)  # no kink where the taper ends


def _displacement(u, mask, w, spacing, gamma, sigma_mm, max_gradient):
    spacing = np.asarray(spacing, dtype=np.float64)
    smooth = ndimage.gaussian_filter(np.where(mask, u, 0.0), sigma_mm / spacing, mode="constant")
    grad = np.gradient(smooth, *spacing)  # 1/mm per axis
    v = np.stack([-gamma * w * g / h for g, h in zip(grad, spacing)])  # voxels
    worst = float(np.sqrt(sum(np.square(np.gradient(v[i])[j]) for i in range(u.ndim) for j in range(u.ndim))).max())
    if worst > max_gradient:
        v *= max_gradient / worst
    return v


def jacobian_determinant(v: np.ndarray) -> np.ndarray:
    """det(I - grad v) of the map x -> x - v(x), v (ndim, *space) in voxels; returns (*space)."""
    ndim = v.shape[0]
    J = np.empty((*v.shape[1:], ndim, ndim))
    for i in range(ndim):
        g = np.gradient(v[i])
        for j in range(ndim):
            J[..., i, j] = (i == j) - g[j]
    return np.linalg.det(J)


def _ramp(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Smoothstep from 0 at lo to 1 at hi: exactly 0 below lo, so tumour-free tissue is untouched."""
    s = np.clip((u - lo) / (hi - lo), 0.0, 1.0)
    return s * s * (3 - 2 * s)


def channels(t1: np.ndarray, wm: np.ndarray, gm: np.ndarray, csf: np.ndarray, u: np.ndarray,
             mask: np.ndarray, wm_level: float) -> np.ndarray:
    """The two noise-free channels (2, *space): T1c-like and FLAIR-like, from (warped) anatomy and u.

    T1c: the T1 image, mildly hypointense in oedema, enhancing to 1.4x white matter where
    u >= 0.8. FLAIR: tissue contrast with CSF suppressed, hyperintense (1.3x white matter)
    where u >= 0.16. Both ramps are smooth over +-0.04 around the thresholds.
    """
    oedema = _ramp(u, VISIBLE_FLAIR - 0.04, VISIBLE_FLAIR + 0.04) * mask
    enhancing = _ramp(u, VISIBLE_T1C - 0.04, VISIBLE_T1C + 0.04) * mask
    t1c = t1 * (1 - 0.15 * oedema)
    t1c = t1c * (1 - enhancing) + 1.4 * wm_level * enhancing
    flair = wm_level * (0.7 * wm + 0.85 * gm + 0.1 * csf) * mask
    flair = flair * (1 - oedema) + 1.3 * wm_level * oedema
    return np.stack([t1c, flair]).astype(np.float32)


def volumes(u: np.ndarray, mask: np.ndarray, voxel_ml: float) -> np.ndarray:
    """(enhancing_volume, oedema_volume) in mL: vol(u >= 0.8), vol(0.16 <= u < 0.8), in the brain."""
    visible = (u >= VISIBLE_FLAIR) & mask
    enhancing = (u >= VISIBLE_T1C) & mask
    return np.array([enhancing.sum(), (visible & ~enhancing).sum()], dtype=np.float64) * voxel_ml


def labels(wm: np.ndarray, gm: np.ndarray, csf: np.ndarray, u: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 label map, values per GLIOMA.labels (k+1 is labels[k]; 0 background)."""
    tissue = np.argmax(np.stack([csf, gm, wm]), axis=0).astype(np.uint8) + 1
    out = np.where(mask, tissue, 0).astype(np.uint8)
    out[mask & (u >= VISIBLE_FLAIR)] = 4
    out[mask & (u >= VISIBLE_T1C)] = 5
    return out


# ---------------------------------------------------------------- one subject


def _draw_seed(wm: np.ndarray, mask: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> tuple[int, ...]:
    """A random voxel deep in white matter (>= 10 mm inside the brain where possible)."""
    depth = ndimage.distance_transform_edt(mask, sampling=spacing)
    for wm_min, depth_min in ((0.6, 10.0), (0.5, 6.0), (0.0, 0.0)):
        candidates = np.argwhere(mask & (wm > wm_min) & (depth >= depth_min))
        if len(candidates):
            return tuple(int(i) for i in candidates[rng.integers(len(candidates))])
    raise InputError("the anatomy's brain mask is empty", source="glioma_subject", field="mask")


def schedules(rt_start: float, cfg: GliomaConfig, chemo: bool = True) -> tuple[list[tx.Event], list[tx.Event]]:
    """(factual, alternative) event lists for a subject whose radiotherapy would start at rt_start.

    chemo=False: the subject received radiotherapy alone; its alternative is the full Stupp schedule.
    """
    if not chemo:
        return tx.stupp(rt_start, chemo=False), tx.stupp(rt_start)
    factual = tx.stupp(rt_start)
    if cfg.alternative == "radiotherapy_alone":
        return factual, tx.stupp(rt_start, chemo=False)
    return factual, tx.stupp(rt_start + cfg.alternative_delay)


def event_capacity(cfg: GliomaConfig) -> int:
    """Most events one subject receives under either schedule (their counts do not depend on the start)."""
    return max(len(events) for events in schedules(0.0, cfg))


def glioma_subject(anatomy, rng: np.random.Generator, cfg: GliomaConfig = GliomaConfig()) -> SubjectSim:
    """One simulated glioma patient on `anatomy` (a `twin.data.anatomy.Anatomy`), from `rng` alone."""
    from .acquisition import bias_field, misregister, rician_noise, visit_schedule
    from .anatomy import warp

    mask = np.asarray(anatomy.mask, dtype=bool)
    wm, gm, csf, t1 = (np.asarray(a, dtype=np.float64) for a in (anatomy.wm, anatomy.gm, anatomy.csf, anatomy.t1))
    spacing = np.asarray(anatomy.spacing, dtype=np.float64)[: mask.ndim]
    voxel_ml = float(anatomy.voxel_volume)

    # covariates, then parameters (fixed draw order: same rng state => same subject)
    age = float(np.clip(rng.normal(58.0, 10.0), 25.0, 85.0))
    sex = float(rng.integers(2))
    mgmt = float(rng.random() < cfg.p_mgmt_methylated)
    d_white = cfg.d_white * np.exp(cfg.log_sd * rng.normal())
    d_grey = d_white / rng.uniform(*cfg.white_grey_ratio)
    rho = cfg.rho * np.exp(cfg.log_sd * rng.normal() + 0.01 * (age - 58.0))  # older tumours grow a little faster
    kill = cfg.chemo_kill * (cfg.mgmt_factor if mgmt else 1.0) * np.exp(cfg.log_sd * rng.normal())
    alpha = rng.uniform(*cfg.alpha_rt)
    beta = alpha / cfg.alpha_beta_ratio
    onset = rng.uniform(*cfg.onset)
    gamma = rng.uniform(*cfg.mass_effect)
    seed = _draw_seed(wm, mask, spacing, rng)
    rt_start = round(rng.uniform(*cfg.rt_start) / tx.DAY) * tx.DAY
    chemo = bool(rng.random() >= cfg.p_radiotherapy_alone)
    time, observed = visit_schedule(rng, np.arange(cfg.n_visits) * cfg.visit_every, cfg.visit_jitter, cfg.p_missed)
    time, observed = np.asarray(time, dtype=np.float64), np.asarray(observed, dtype=bool)

    # growth: untreated from a small seed until baseline, then three schedules from the same state
    D = diffusivity(wm, gm, mask, d_white, d_grey)
    rho_field = rho * np.clip(wm + gm, 0.0, 1.0) * mask
    grid = np.indices(mask.shape, dtype=np.float64)
    r2 = sum(((g - s) * h) ** 2 for g, s, h in zip(grid, seed, spacing))
    u_seed = 0.5 * np.exp(-r2 / (2 * 3.0**2)) * (D > 0)
    u_base = kpp(u_seed, D, rho_field, spacing, [onset], max_dt=cfg.max_dt)[0]
    response = Response(pk=tx.OneCompartment.from_half_life(cfg.tmz_half_life, cfg.tmz_volume),
                        emax=cfg.tmz_emax, ec50=cfg.tmz_ec50, kill=kill, alpha=alpha, beta=beta)
    factual, alternative = schedules(rt_start, cfg, chemo)
    u = np.stack([kpp(u_base, D, rho_field, spacing, time, events, response, max_dt=cfg.max_dt)
                  for events in (factual, [], alternative)])  # (3, V, *space)

    # noise-free images, labels, biomarkers
    wm_level = float(np.median(t1[mask & (wm > 0.9)])) if (mask & (wm > 0.9)).any() else float(t1[mask].max())
    taper = _taper(mask, spacing, 6.0)
    truth_image = np.empty((3, len(time), 2, *mask.shape), dtype=np.float32)
    truth_biomarkers = np.empty((3, len(time), 2))
    truth_labels = np.empty((len(time), *mask.shape), dtype=np.uint8)
    for s in range(3):
        for v in range(len(time)):
            disp = _displacement(u[s, v], mask, taper, spacing, gamma, cfg.mass_sigma, 0.5)
            # the warp is the identity outside the brain (disp = 0 there); keep it bit-exact
            moved = [np.where(mask, warp(a, disp, order=1), a) for a in (t1, wm, gm, csf)]
            truth_image[s, v] = channels(*moved, u[s, v], mask, wm_level)
            truth_biomarkers[s, v] = volumes(u[s, v], mask, voxel_ml)
            if s == 0:
                truth_labels[v] = labels(moved[1], moved[2], moved[3], u[s, v], mask)

    # as acquired: misregistration, bias field, Rician noise; biomarkers with measurement noise
    image = np.full((len(time), 2, *mask.shape), np.nan, dtype=np.float32)
    biomarkers = np.full((len(time), 2), np.nan)
    for v in np.flatnonzero(observed):
        scan = misregister(truth_image[0, v], rng, cfg.max_rotation_deg, cfg.max_shift_vox)
        scan = scan * bias_field(mask.shape, cfg.bias_strength, rng)
        image[v] = rician_noise(scan, cfg.noise_sigma * wm_level, rng)
        truth = truth_biomarkers[0, v]
        noisy = truth * (1 + cfg.biomarker_cv * rng.normal(size=2)) + cfg.biomarker_sd * rng.normal(size=2)
        biomarkers[v] = np.maximum(noisy, 0.0)

    idx3 = np.zeros(3)
    idx3[: len(seed)] = seed[::-1]  # the affine maps the reversed array index (x, y, z)
    seed_world = np.asarray(anatomy.affine)[:3, :3] @ idx3 + np.asarray(anatomy.affine)[:3, 3]
    return SubjectSim(
        time=time, observed=observed, image=image, truth_image=truth_image, truth_labels=truth_labels,
        biomarkers=biomarkers, truth_biomarkers=truth_biomarkers,
        covariates=np.array([age, sex, mgmt]),
        parameters=np.array([d_white, d_grey, rho, kill, alpha, beta, onset, gamma, *seed_world]),
        mask=mask, affine=np.asarray(anatomy.affine, dtype=np.float64), baseline_time=0.0,
        events=factual, alternative_events=alternative,
    )
