"""The biomarker twin's model: a disease-course mixed-effects model on a latent neural ODE.

Patient i has a latent disease state z_i(t) (`twin.dynamics.progression`) and biomarkers that
are sigmoid functions of it, on the standardised scale (value - mean_b) / scale_b:

    y_ib(t) = c_b + o_ib + a_b sigmoid(v_b (z_i(t) - g_b)) + noise_b,      noise_b ~ N(0, sigma_b^2)
    z_i(0) = tau_i,   rate r_i = exp(xi_i),   drug sensitivity s_ia = sigmoid(zeta_ia)

Two families of course (`family`): "progression" (neurodegeneration: a drug can only slow the
course, s in (0, 1), and radiotherapy plays no part) and "growth" (a tumour's log burden: a
drug can kill faster than the tumour grows, s = exp(zeta) in (0, inf), and each radiotherapy
fraction takes alpha_i (d + d^2 / 10) off z, alpha_i = exp(log-normal effect)). A growth
family's biomarkers need not be monotone in the burden (a tumour's oedema rim turns into
enhancing core as it grows), so its decoder adds a second sigmoid per biomarker,
a2_b sigmoid(v2_b (z - g2_b)), starting at a2 = 0.

A score read on an instrument with a range (a ceiling where many readings pile up, e.g. 30 on an
MMSE-like scale; found by `set_ranges`, never for volumes) is censored there: a reading at the
end only says the value lies past a cut half-way to the next value read, and drawn readings are
recorded at the end past the cut, so bands never leave the instrument's range.

Population parameters: the decoder (c, a, v, g), sigma, the drugs' elimination rates and EC50,
the fixed effects of the covariates (standardised, the baseline on the cohort's clock
included: age tells a patient's stage) on tau and xi, and the spread of the personal
effects. Personal effects (tau, xi, zeta, o) are Gaussian around the fixed effects:
tau ~ N(mu_tau + beta_tau x, 1) (its unit spread fixes the scale of z), xi ~ N(mu_xi +
beta_xi x, sd_xi^2), zeta_a ~ N(mu_zeta_a + beta_zeta_a x, sd_zeta_a^2) (a marker such as MGMT
methylation can make a drug work better), o_b ~ N(0, omega_b^2).

Fitting (`fit`) maximises the joint posterior of the population and the training patients'
effects; the spreads are updated from the effects' moments (as in SAEM), because a gradient
on them drives the joint mode to zero spread (tau's, pinned at 1, by rescaling z instead:
`rescale_state`), and so is the noise sigma
(`inference.noise_update`: at the joint mode the effects absorb part of the noise, and sigma
fitted there sits 12-25% low). Then the prior of the effects (their fixed effects and
spreads) is refitted by the marginal likelihood (`inference.refine_prior`): at the joint mode
a patient whose data only bound its effects pulls on nothing, and the prior fits the stages
seen declining. A new patient's effects get a Laplace posterior (MAP and inverse Hessian) given
the population: forecasts sample it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from twin.dynamics.progression import Exposure, Progression, Radiotherapy

FAMILIES = ("progression", "growth")


@dataclass(frozen=True)
class Batch:
    """Patients as tensors. S patients, V visit slots, B biomarkers, K covariates, A drugs, E dose slots.

    times (S, V) years since baseline, NaN-padded; y (S, V, B) standardised, NaN = not measured;
    x (S, K) standardised covariates; doses: per drug (dose_time (S, E), dose (S, E)) NaN-padded;
    fractions: radiotherapy (time (S, F), dose Gy (S, F)) NaN-padded, or None.
    """

    times: Tensor
    y: Tensor
    x: Tensor
    doses: tuple[tuple[Tensor, Tensor], ...]
    fractions: tuple[Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return self.times.shape[0]

    def take(self, index: Tensor) -> Batch:
        return self.map(lambda a: a[index])

    def repeat(self, n: int) -> Batch:
        """n copies of the batch stacked along patients (for n posterior draws at once)."""
        return self.map(lambda a: a.repeat(n, *([1] * (a.dim() - 1))))

    def map(self, f) -> Batch:
        """Apply f to every per-patient tensor."""
        fractions = None if self.fractions is None else (f(self.fractions[0]), f(self.fractions[1]))
        return Batch(f(self.times), f(self.y), f(self.x), tuple((f(t), f(d)) for t, d in self.doses), fractions)

    def with_times(self, times: Tensor) -> Batch:
        """The same patients asked about other times (nothing measured there)."""
        y = torch.full((*times.shape, self.y.shape[-1]), float("nan"), dtype=self.y.dtype)
        return Batch(times, y, self.x, self.doses, self.fractions)

    def with_doses(self, doses, fractions=None) -> Batch:
        return Batch(self.times, self.y, self.x, tuple(doses), fractions)


class DiseaseCourse(nn.Module):
    """Population model; personal effects are whitened: eta (S, P) with P = 2 + A + R + B.

    eta = (tau deviation, xi deviation in units of sd_xi, zeta deviations in units of sd_zeta,
    [log alpha deviation in units of sd_alpha, with radiotherapy], offsets in units of omega):
    the prior of eta is N(0, I), which makes MAP and Laplace simple.
    """

    def __init__(self, n_biomarkers: int, n_covariates: int, n_drugs: int, *, hidden: int = 16,
                 dose_scale: tuple[float, ...] = (), family: str = "progression", radiotherapy: bool = False):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        if radiotherapy and family != "growth":
            raise ValueError("radiotherapy acts on the growth family only (it kills cells; it does not slow neurodegeneration)")
        B, K, A = n_biomarkers, n_covariates, n_drugs
        self.B, self.K, self.A = B, K, A
        self.family, self.R = family, int(radiotherapy)
        self.c = nn.Parameter(torch.zeros(B))
        self.a = nn.Parameter(torch.ones(B))
        self.log_v = nn.Parameter(torch.zeros(B))
        self.g = nn.Parameter(torch.linspace(-1.0, 1.0, B))
        second = B if family == "growth" else 0
        self.a2 = nn.Parameter(torch.zeros(second))
        self.log_v2 = nn.Parameter(torch.zeros(second))
        self.g2 = nn.Parameter(torch.ones(second))
        self.log_sigma = nn.Parameter(torch.full((B,), math.log(0.3)))
        self.mu_tau = nn.Parameter(torch.zeros(()))
        self.beta_tau = nn.Parameter(torch.zeros(K))
        self.mu_xi = nn.Parameter(torch.tensor(math.log(0.5)))
        self.beta_xi = nn.Parameter(torch.zeros(K))
        self.mu_zeta = nn.Parameter(torch.zeros(A))
        self.beta_zeta = nn.Parameter(torch.zeros(A, K))
        # drugs: elimination rate k (per year, a month's half-life to start) and EC50 (dose units)
        self.log_k = nn.Parameter(torch.full((A,), math.log(math.log(2) / (30 / 365.25))))
        scale = torch.tensor(dose_scale if dose_scale else [1.0] * A, dtype=torch.float32)
        self.log_ec50 = nn.Parameter(torch.log(scale))
        self.mu_alpha = nn.Parameter(torch.full((self.R,), math.log(0.03)))  # 1/Gy, a typical glioma's
        # spreads: set from the effects' moments during fitting, not by gradient
        self.register_buffer("sd_xi", torch.tensor(0.3))
        self.register_buffer("sd_zeta", torch.ones(A))
        self.register_buffer("sd_alpha", torch.full((self.R,), 0.3))
        self.register_buffer("omega", torch.full((B,), 0.5))
        # an instrument's range (`set_ranges`): a reading past a cut is recorded at the range's end
        self.register_buffer("upper_cut", torch.full((B,), math.inf))
        self.register_buffer("upper_end", torch.full((B,), math.inf))
        self.register_buffer("lower_cut", torch.full((B,), -math.inf))
        self.register_buffer("lower_end", torch.full((B,), -math.inf))
        self.progression = Progression(hidden)

    @property
    def n_effects(self) -> int:
        return 2 + self.A + self.R + self.B

    def _columns(self) -> dict[str, slice]:
        A, R = self.A, self.R
        o = 2 + A + R
        return {"xi": slice(1, 2), "zeta": slice(2, 2 + A), "alpha": slice(2 + A, o), "offset": slice(o, None)}

    def personal(self, eta: Tensor, x: Tensor) -> dict[str, Tensor]:
        """Natural-scale personal parameters from whitened effects eta (S, P) and covariates x (S, K)."""
        c = self._columns()
        return {
            "tau": self.mu_tau + x @ self.beta_tau + eta[:, 0],
            "xi": self.mu_xi + x @ self.beta_xi + self.sd_xi * eta[:, 1],
            "zeta": self.mu_zeta + x @ self.beta_zeta.T + self.sd_zeta * eta[:, c["zeta"]],
            "log_alpha": self.mu_alpha + self.sd_alpha * eta[:, c["alpha"]],
            "offset": self.omega * eta[:, c["offset"]],
        }

    def sensitivity(self, zeta: Tensor) -> Tensor:
        """s from zeta: a fraction of the rate for neurodegeneration, any multiple of it for a tumour."""
        return torch.sigmoid(zeta) if self.family == "progression" else torch.exp(zeta)

    def state(self, eta: Tensor, batch: Batch, copies: int = 1) -> Tensor:
        """z (S, T) at batch.times; copies: batch is that many stacked copies of its first S / copies
        patients (`Batch.repeat`, one copy per posterior draw), so their drug exposure is shared."""
        p = self.personal(eta, batch.x)
        exposure = Exposure(list(batch.doses), list(torch.exp(self.log_k)), list(torch.exp(self.log_ec50)),
                            self.sensitivity(p["zeta"]), copies)
        radiotherapy = alpha = None
        if self.R and batch.fractions is not None:
            radiotherapy, alpha = Radiotherapy(*batch.fractions), torch.exp(p["log_alpha"][:, 0])
        return self.progression(p["tau"], torch.exp(p["xi"]), exposure, batch.times, radiotherapy, alpha)

    def decode(self, z: Tensor, offset: Tensor) -> Tensor:
        """Standardised biomarkers (S, T, B) from z (S, T) and offsets (S, B)."""
        v = torch.exp(self.log_v)
        y = self.c + offset[:, None, :] + self.a * torch.sigmoid(v * (z[..., None] - self.g))
        if self.a2.numel():
            y = y + self.a2 * torch.sigmoid(torch.exp(self.log_v2) * (z[..., None] - self.g2))
        return y

    def predict(self, eta: Tensor, batch: Batch, copies: int = 1) -> Tensor:
        """Noise-free standardised biomarkers (S, T, B) at batch.times (copies: as for `state`)."""
        p = self.personal(eta, batch.x)
        return self.decode(self.state(eta, batch, copies), p["offset"])

    def at_readings(self, eta: Tensor, batch: Batch, copies: int = 1) -> tuple[Tensor, Tensor]:
        """(seen, mean) (S, V, B): which readings were measured, and the noise-free values at their
        times (padding's NaN times read as 0: NaN must not enter the arithmetic at all, even masked,
        as its gradient would be NaN * 0)."""
        seen = torch.isfinite(batch.y) & torch.isfinite(batch.times)[..., None]
        times = torch.where(torch.isfinite(batch.times), batch.times, torch.zeros_like(batch.times))
        return seen, self.predict(eta, Batch(times, batch.y, batch.x, batch.doses, batch.fractions), copies)

    def log_joint(self, eta: Tensor, batch: Batch, copies: int = 1) -> Tensor:
        """log p(y, eta) per patient (S,): Gaussian likelihood of what was measured plus the prior."""
        seen, mean = self.at_readings(eta, batch, copies)
        y = torch.where(seen, batch.y, torch.zeros_like(batch.y))
        sigma = torch.exp(self.log_sigma)
        loglik = -0.5 * ((y - mean) / sigma).square() - self.log_sigma
        # A reading at an instrument's end says only that the value lies past the cut (censored).
        # Read as exact, a ceiling's pile-up (noise above 30 recorded as 30) pulls a patient who
        # has not declined below the ceiling, and the course forecast from there declines.
        upper = torch.where(torch.isfinite(self.upper_cut), self.upper_cut, torch.zeros_like(self.upper_cut))
        lower = torch.where(torch.isfinite(self.lower_cut), self.lower_cut, torch.zeros_like(self.lower_cut))
        loglik = torch.where(y > self.upper_cut, torch.special.log_ndtr((mean - upper) / sigma), loglik)
        loglik = torch.where(y < self.lower_cut, torch.special.log_ndtr((lower - mean) / sigma), loglik)
        return torch.where(seen, loglik, torch.zeros_like(loglik)).sum((1, 2)) - 0.5 * eta.square().sum(1)

    def observe(self, truth: Tensor, noise: Tensor) -> Tensor:
        """Readings (..., B) of noise-free values: truth + noise, recorded at a range's end past its cut."""
        y = truth + noise
        y = torch.where(y > self.upper_cut, self.upper_end.expand_as(y), y)
        return torch.where(y < self.lower_cut, self.lower_end.expand_as(y), y)

    @torch.no_grad()
    def set_ranges(self, y: Tensor, instrument: Tensor, pile_up: float = 0.05) -> None:
        """Find the ends of instruments' ranges in readings y (..., B) (NaN = none) of the biomarkers
        where `instrument` (B,) is true: an extreme value that at least `pile_up` of the readings sit
        on (a score's ceiling). Its cut lies half-way to the nearest other value read (30 -> 29.5
        for an integer score topping out at 30). Volumes are not instruments: a zero is measured."""
        for b in range(y.shape[-1]):
            v = y[..., b][torch.isfinite(y[..., b])]
            if not bool(instrument[b]) or v.numel() == 0:
                continue
            for end, cut, sign in ((self.upper_end, self.upper_cut, 1.0), (self.lower_end, self.lower_cut, -1.0)):
                extreme = sign * (sign * v).max()
                at = (v - extreme).abs() <= 1e-6 * max(1.0, float(extreme.abs()))
                if float(at.float().mean()) >= pile_up and bool((~at).any()):
                    end[b], cut[b] = extreme, (extreme + sign * (sign * v[~at]).max()) / 2

    @torch.no_grad()
    def update_spreads(self, eta: Tensor, variance: Tensor, floor: float = 0.02) -> Tensor:
        """The EM step for the personal effects' spreads: sd^2 <- mean over patients of E[effect^2].

        eta (S, P) whitened MAP effects and variance (S, P) their Laplace posterior variances
        (whitened). The variance term is what keeps a spread from collapsing: the MAP alone
        shrinks towards the prior mean, and spreads set from it alone shrink step after step.
        Returns eta re-whitened under the new spreads (and z's new unit), so predictions stay put.
        """
        c = self._columns()
        eta = eta.clone()
        # tau's spread is pinned at 1 (it is z's unit), so its EM step changes the unit instead.
        # Without it the joint mode shrinks the stages towards their mean and the decoder's
        # slopes grow to make up: on cohorts drawn from a fitted twin (bench/refit_bench.py) the
        # fit's rates came out at 0.44x the truth's and split B's forecast error 13-19% above the truth's.
        s = float((eta[:, 0].square() + variance[:, 0]).mean().sqrt().clamp(min=floor))
        eta[:, 0] = eta[:, 0] / s
        self.rescale_state(s)
        for sd, cols in ((self.sd_xi, c["xi"]), (self.sd_zeta, c["zeta"]), (self.sd_alpha, c["alpha"]), (self.omega, c["offset"])):
            if sd.numel() == 0:
                continue
            second_moment = (eta[:, cols].square() + variance[:, cols]).mean(0) * sd.reshape(-1).square()
            new = second_moment.sqrt().clamp(min=floor).reshape(sd.shape)
            eta[:, cols] = eta[:, cols] * sd / new
            sd.copy_(new)
        return eta

    @torch.no_grad()
    def rescale_state(self, s: float) -> None:
        """Measure z in units of s (z -> z / s), every parameter that reads z changed to match, so the
        same personal effects predict the same biomarkers; tau's whitened deviation eta[:, 0] is the
        caller's to divide by s.

        With z' = z / s: dz'/dt = (r / s) (1 + h(s z')) - (r / s) X'(t) - (alpha / s) R'(t), and
        v (z - g) = (s v) (z' - g / s); so tau's fixed effects and g divide by s, the log rate and
        log alpha lose log s, log v gains it, and h's input weights multiply by s.
        """
        log_s = math.log(s)
        for p in (self.mu_tau, self.beta_tau, self.g, self.g2):
            p.div_(s)
        for p in (self.mu_xi, self.mu_alpha):
            p.sub_(log_s)
        for p in (self.log_v, self.log_v2):
            p.add_(log_s)
        if self.progression.hidden:
            self.progression.h_net[0].weight.mul_(s)
