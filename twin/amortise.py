"""Amortised inference: the time-aware Mamba history encoder reads a patient's visits and returns q(eta | visits).

A patient's exact posterior (`twin.inference.posterior`: MAP by L-BFGS, then Laplace) is an
optimisation per patient. The `Amortiser` learns that map once per fitted population: each
visit becomes a token, a `HistoryEncoder` (time-aware Mamba blocks, the real gap since the
previous visit in the discretisation) reads the tokens and returns a diagonal Gaussian over the
whitened effects eta (S, P) of `DiseaseCourse`, so the initial state tau, the rate, the drug
sensitivities and the offsets.

Training (`fit_amortiser`) keeps the population frozen and matches the Laplace posteriors of
the training patients given prefixes of their histories (the first k visits, k drawn stratified
over 1..n_i, so short and long histories are both read). The loss is

    KL( N(m, Sigma) || N(mu, diag sigma^2) )        m, Sigma: Laplace given the prefix

whose minimiser over sigma is the Laplace marginal variance plus the squared mean error: the
encoder's bands cover what it does not know. Use it either alone (`amortised_posterior`,
one forward pass) or as the start of the exact fit, `posterior(model, batch, init=amortiser.mean(batch))`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import Tensor, nn

from twin.dynamics.mamba import HistoryEncoder, Posterior
from twin.errors import InputError

from .inference import posterior
from .model import Batch, DiseaseCourse

SINCE_DOSE_CAP = 2.0  # years: a dose longer ago than this (or none yet) reads the same
FRACTION_GY = 2.0  # a standard radiotherapy fraction: cumulative Gy / 2 reads as fractions so far


@dataclass(frozen=True)
class AmortiserConfig:
    """The encoder's size and how it is trained.

    prefixes: history prefixes per training patient (each a Laplace target); steps: Adam steps
    on minibatches of batch_size prefixes; seed: the initial weights, the prefix draws and the
    minibatches. backend: the selective scan's; "reference" because histories are tens of
    visits, where its loop over visits beats the chunked scan on CPU (about 3x at 6 visits,
    2x at 22, batch 128).
    """

    d_model: int = 32
    n_layers: int = 2
    d_state: int = 8
    time_scale: float = 1.0
    backend: str = "reference"
    prefixes: int = 4
    steps: int = 600
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> AmortiserConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown keys {unknown}; expected some of {sorted(known)}", source="amortiser config",
                             field=unknown[0])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def visit_tokens(batch: Batch, dose_scale: tuple[float, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """One token per visit: (tokens (S, L, F), gap (S, L), mask (S, L) bool), F = 2B + 1 + 2(A + R) + K.

    A token is (biomarkers with NaN -> 0 (B), measured mask (B), years since baseline, per drug:
    log1p(cumulative dose before the visit / dose_scale) and years since the last dose / cap
    (1 when none yet), the same two for radiotherapy fractions (R = 1 if batch.fractions is
    given, with FRACTION_GY as the dose scale), the covariates (K)). gap is the time since the previous visit (0 at the
    first). A visit is a finite time: NaN times are padding wherever they sit, and the visits
    are sorted by time and moved to the front, so L = the most visits any patient has (>= 1).
    Padding tokens and gaps are 0.
    """
    if len(dose_scale) != len(batch.doses):
        raise ValueError(f"visit_tokens: dose_scale needs one value per drug ({len(batch.doses)}), "
                         f"got {len(dose_scale)}")
    times, y = batch.times, batch.y
    if times.shape[1] == 0:  # no visit slots at all: one padding slot keeps L >= 1
        times, y = torch.full((len(batch), 1), torch.nan), torch.full((len(batch), 1, y.shape[-1]), torch.nan)
    real = torch.isfinite(times)
    # stable sort with padding as +inf: visits in time order at the front, padding after
    order = torch.sort(torch.where(real, times, torch.inf), dim=1, stable=True).indices
    order = order[:, :max(1, int(real.sum(1).max()))]
    times = torch.gather(times, 1, order)
    y = torch.gather(y, 1, order[..., None].expand(-1, -1, y.shape[-1]))
    L = times.shape[1]
    mask = torch.isfinite(times)
    t = torch.where(mask, times, torch.zeros_like(times))
    gap = torch.diff(t, dim=1, prepend=t[:, :1]).masked_fill(~mask, 0.0)

    measured = torch.isfinite(y) & mask[..., None]
    parts = [torch.where(measured, y, torch.zeros_like(y)), measured.to(t.dtype), t[..., None]]
    events = list(zip(batch.doses, dose_scale))
    if batch.fractions is not None:
        events.append((batch.fractions, FRACTION_GY))
    for (dose_time, dose), scale in events:
        parts += _exposure(t, dose_time, dose, scale)
    parts.append(batch.x[:, None, :].expand(-1, L, -1))
    tokens = torch.cat(parts, dim=-1).masked_fill(~mask[..., None], 0.0)
    return tokens, gap, mask


def _exposure(t: Tensor, dose_time: Tensor, dose: Tensor, scale: float) -> list[Tensor]:
    """log1p(cumulative dose / scale) and capped years since the last dose, before visits t (S, L): 2 x (S, L, 1)."""
    given = torch.isfinite(dose_time) & torch.isfinite(dose)
    # strictly before: a dose at the visit's time has no effect on X(t) yet (Exposure integrates from 0 to t)
    before = given[:, None, :] & (torch.where(given, dose_time, torch.inf)[:, None, :] < t[..., None])  # (S, L, E)
    cumulative = torch.where(before, dose[:, None, :], torch.zeros(())).sum(-1) / scale
    last = torch.where(before, dose_time[:, None, :], torch.full((), -torch.inf)).amax(-1) if dose_time.shape[1] \
        else torch.full_like(t, -torch.inf)
    since = (t - last).clamp(max=SINCE_DOSE_CAP) / SINCE_DOSE_CAP  # no dose yet: -inf -> 1
    return [torch.log1p(cumulative)[..., None], since[..., None]]


class Amortiser(nn.Module):
    """Visits of a Batch -> a diagonal Gaussian over the whitened effects eta (S, P).

    Rows without a single visit get the prior N(0, I): there is nothing to read.
    """

    def __init__(self, n_biomarkers: int, n_covariates: int, dose_scale: tuple[float, ...], n_effects: int,
                 config: AmortiserConfig = AmortiserConfig(), *, radiotherapy: bool = False):
        super().__init__()
        self.n_biomarkers, self.n_covariates, self.n_effects = n_biomarkers, n_covariates, n_effects
        self.dose_scale = tuple(float(s) for s in dose_scale)
        self.radiotherapy = bool(radiotherapy)
        self.config = config
        d_token = 2 * n_biomarkers + 1 + 2 * (len(self.dose_scale) + self.radiotherapy) + n_covariates
        # the weights come from the config's seed alone, without touching the caller's global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.encoder = HistoryEncoder(d_token, n_effects, d_model=config.d_model, n_layers=config.n_layers,
                                          d_state=config.d_state, time_scale=config.time_scale, backend=config.backend)

    @classmethod
    def for_model(cls, model: DiseaseCourse, dose_scale: tuple[float, ...],
                  config: AmortiserConfig = AmortiserConfig()) -> Amortiser:
        if len(dose_scale) != model.A:
            raise ValueError(f"Amortiser: dose_scale needs one value per drug of the model ({model.A}), "
                             f"got {len(dose_scale)}")
        return cls(model.B, model.K, dose_scale, model.n_effects, config, radiotherapy=bool(model.R))

    def posterior(self, batch: Batch) -> Posterior:
        """q(eta | batch's visits): mean, log_std (S, P)."""
        B, K = batch.y.shape[-1], batch.x.shape[-1]
        if (B, K) != (self.n_biomarkers, self.n_covariates):
            raise ValueError(f"Amortiser: expected a batch with {self.n_biomarkers} biomarkers and {self.n_covariates} "
                             f"covariates, got {B} and {K}")
        if (batch.fractions is not None) != self.radiotherapy:
            raise ValueError(f"Amortiser: built {'with' if self.radiotherapy else 'without'} radiotherapy fractions, "
                             f"got a batch {'without' if batch.fractions is None else 'with'} them")
        tokens, gap, mask = visit_tokens(batch, self.dose_scale)
        seen = mask[:, 0]
        mean = torch.zeros(len(batch), self.n_effects, dtype=tokens.dtype)
        log_std = torch.zeros_like(mean)
        if seen.any():
            q = self.encoder.posterior(tokens[seen], gap[seen], mask[seen])
            mean, log_std = mean.index_put((seen,), q.mean), log_std.index_put((seen,), q.log_std)
        return Posterior(mean, log_std)

    forward = posterior

    @torch.no_grad()
    def mean(self, batch: Batch) -> Tensor:
        """The encoder's guess of eta (S, P): a starting point for `posterior(model, batch, init=...)`."""
        return self.posterior(batch).mean


@torch.no_grad()
def amortised_posterior(model: DiseaseCourse, amortiser: Amortiser, batch: Batch) -> tuple[Tensor, Tensor]:
    """The encoder's Gaussian in `posterior`'s form: (mean (S, P), diagonal covariance (S, P, P)).

    One forward pass instead of an optimisation per patient; `twin.inference.effect_draws` takes it as is.
    """
    if amortiser.n_effects != model.n_effects:
        raise ValueError(f"amortised_posterior: the amortiser returns {amortiser.n_effects} effects, "
                         f"the model has {model.n_effects}")
    q = amortiser.posterior(batch)
    return q.mean, torch.diag_embed(q.std.square())


def history_prefixes(batch: Batch, n: int, generator: torch.Generator) -> tuple[Batch, Tensor]:
    """n prefixes per patient, stratified over lengths: (Batch of n S rows, patient index (n S,)).

    Copy r of patient i keeps the first k visits (in time order), k drawn uniformly from the
    r-th of n equal slices of 1..n_i, so every copy set spans short to full histories. Later
    visits become NaN times; doses stay (those after the prefix do not touch its likelihood).
    Patients without visits are left out.
    """
    real = torch.isfinite(batch.times)
    count = real.sum(1)  # n_i
    # rank of each visit in time order (padding ranks last)
    rank = torch.sort(torch.where(real, batch.times, torch.inf), dim=1, stable=True).indices.argsort(1)
    r = torch.arange(n)[:, None]
    u = torch.rand(n, len(batch), generator=generator)
    k = torch.ceil(count * (r + u) / n).clamp(min=1).long()  # (n, S), in 1..n_i
    keep = rank[None] < k[..., None]  # (n, S, V)
    patient = torch.arange(len(batch)).repeat(n)
    has = count.repeat(n) > 0
    times = torch.where(keep, batch.times[None], torch.nan).reshape(n * len(batch), -1)
    prefix = replace(batch.take(patient), times=times)
    return prefix.take(has), patient[has]


def fit_amortiser(model: DiseaseCourse, batch: Batch, dose_scale: tuple[float, ...],
                  config: AmortiserConfig = AmortiserConfig(), *,
                  lbfgs_steps: int = 60) -> tuple[Amortiser, list[float]]:
    """Train an Amortiser on `batch`'s patients, `model` frozen: (amortiser, minibatch KL per step).

    The targets, Laplace posteriors given `config.prefixes` prefixes of each history (L-BFGS
    `lbfgs_steps`), are computed once: all of them in one batched `posterior` call.
    """
    generator = torch.Generator().manual_seed(config.seed)
    prefix, _ = history_prefixes(batch, config.prefixes, generator)
    m, cov = posterior(model, prefix, steps=lbfgs_steps)
    variance = torch.linalg.diagonal(cov)
    logdet = torch.linalg.slogdet(cov.double()).logabsdet.to(m.dtype)  # the target's entropy: KL's constant
    tokens, gap, mask = visit_tokens(prefix, dose_scale)

    amortiser = Amortiser.for_model(model, dose_scale, config)
    optimiser = torch.optim.Adam(amortiser.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.steps)
    history = []
    n, size = len(prefix), min(config.batch_size, len(prefix))
    order, start = torch.randperm(n, generator=generator), 0
    for _ in range(config.steps):
        if start + size > n:  # a fresh pass over the prefixes, reshuffled
            order, start = torch.randperm(n, generator=generator), 0
        rows, start = order[start:start + size], start + size
        L = int(mask[rows].sum(1).max())  # trim the padding these rows all share
        optimiser.zero_grad()
        q = amortiser.encoder.posterior(tokens[rows, :L], gap[rows, :L], mask[rows, :L])
        loss = gaussian_kl(m[rows], variance[rows], logdet[rows], q.mean, q.log_std).mean()
        loss.backward()
        optimiser.step()
        schedule.step()
        history.append(float(loss.detach()))
    amortiser.eval()
    return amortiser, history


def gaussian_kl(m: Tensor, variance: Tensor, logdet: Tensor, mu: Tensor, log_std: Tensor) -> Tensor:
    """KL(N(m, Sigma) || N(mu, diag exp(2 log_std))) per row (S,).

    m, mu, log_std (S, P); variance (S, P) the diagonal of Sigma; logdet (S,) log det Sigma
    (only the diagonal and the determinant of the full Sigma enter).
    """
    precision = torch.exp(-2 * log_std)
    return 0.5 * ((variance + (m - mu).square()) * precision + 2 * log_std - 1).sum(-1) - 0.5 * logdet
