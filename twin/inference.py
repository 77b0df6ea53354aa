"""Fitting the disease-course model to a cohort, and a patient's posterior given the population.

- `fit_population`: joint MAP of the population parameters and the training patients'
  whitened effects (Adam), with the spreads and the noise sigma updated from the effects'
  moments every few steps (`noise_update`). Full batch: cohorts of biomarker tables are small.
- `posterior`: a patient's effects given the population: MAP (L-BFGS on all patients at once;
  their objectives are independent, so the sum's optimum is each one's), then a Laplace
  approximation, N(MAP, H^-1), from the block-diagonal Hessian (P Hessian-vector products for
  the whole batch, P = effects per patient).
- `refine_prior`: after the joint fit, the prior of the personal effects (their fixed effects
  and spreads) refitted by the marginal likelihood of the data, the effects integrated out by
  importance sampling.
- `effect_draws`: K draws of each patient's effects from the Laplace posterior, importance
  resampled towards the exact one; `sample`: the noise-free biomarkers and new observations
  of those draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .model import Batch, DiseaseCourse


def fit_population(model: DiseaseCourse, batch: Batch, *, iterations: int, lr: float = 0.03,
                   eta: Tensor | None = None, start: int = 0, spread_every: int = 25,
                   optimiser_state: dict | None = None,
                   on_step: Callable[[int, float, dict[str, Tensor], torch.optim.Optimizer], None] | None = None,
                   progress: bool = True, desc: str = "fitting the twin") -> Tensor:
    """Train `model` on `batch` from step `start` to `iterations`; return the patients' effects eta (S, P).

    on_step(step, loss, {"eta": eta}, optimiser) is called after each step (checkpoints hook
    in there: the optimiser's state_dict is what `optimiser_state` takes back to resume exactly).
    """
    from tqdm.auto import tqdm

    eta = torch.zeros(len(batch), model.n_effects) if eta is None else eta.clone()
    eta.requires_grad_(True)
    # sigma is set by its EM step with the spreads, not by gradient: the joint mode lets the
    # effects absorb noise, and sigma fitted there sits 12-25% low (17% on the atrophy cohort)
    population = [p for name, p in model.named_parameters() if name != "log_sigma"]
    optimiser = torch.optim.Adam([{"params": population}, {"params": [eta]}], lr=lr)
    if optimiser_state is not None:
        optimiser.load_state_dict(optimiser_state)
    n_measured = int(torch.isfinite(batch.y).sum())
    bar = tqdm(range(start, iterations), desc=desc, unit="step", disable=not progress)
    for step in bar:
        optimiser.zero_grad()
        loss = -model.log_joint(eta, batch).sum() / n_measured
        loss.backward()
        optimiser.step()
        if (step + 1) % spread_every == 0 and step + 1 < iterations:
            cov = _laplace_covariance(model, eta.detach(), batch)
            noise_update(model, eta.detach(), cov, batch)
            with torch.no_grad():
                eta.copy_(model.update_spreads(eta.detach(), torch.linalg.diagonal(cov)))
        loss = float(loss.detach())
        bar.set_postfix(loss=f"{loss:.4f}")
        if on_step is not None:
            on_step(step + 1, loss, {"eta": eta.detach()}, optimiser)
    return eta.detach()


@torch.no_grad()
def orient_decoder(model: DiseaseCourse, batch: Batch) -> Tensor:
    """Point each biomarker's amplitude a_b the way it moves within patients over time; returns the signs.

    z always advances with time (the rate is positive), so a_b's sign says whether biomarker b
    rises or falls as the disease advances. Left to the optimiser from a_b = 1 for all, a
    cohort whose cross-section is strong (age tells stage) can settle with the course running
    backwards in time for some biomarkers: the pooled within-patient slope fixes that at the start.
    """
    t = batch.times[..., None].expand_as(batch.y)
    seen = torch.isfinite(batch.y) & torch.isfinite(t)
    n = seen.sum(1).clamp(min=1)
    t0 = torch.where(seen, t, torch.zeros_like(t))
    y0 = torch.where(seen, batch.y, torch.zeros_like(batch.y))
    tc = torch.where(seen, t0 - t0.sum(1, keepdim=True) / n[:, None], torch.zeros_like(t0))
    yc = torch.where(seen, y0 - y0.sum(1, keepdim=True) / n[:, None], torch.zeros_like(y0))
    slope = (tc * yc).sum((0, 1))  # pooled within-patient covariance of time and value, per biomarker
    sign = torch.where(slope < 0, -1.0, 1.0)
    model.a.copy_(sign * model.a.abs())
    return sign


def posterior(model: DiseaseCourse, batch: Batch, *, steps: int = 60,
              init: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Laplace posterior of each patient's effects: (MAP (S, P), covariance (S, P, P)).

    init (S, P): where L-BFGS starts (default 0, the prior mean); an amortised guess
    (`twin.amortise`) starts it near the mode, so it needs fewer steps.
    """
    shape = (len(batch), model.n_effects)
    if init is not None and tuple(init.shape) != shape:
        raise ValueError(f"posterior: init must be (S, P) = {shape}, got {tuple(init.shape)}")
    trainable = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        eta = (torch.zeros(shape) if init is None else init.detach().clone()).requires_grad_(True)
        optimiser = torch.optim.LBFGS([eta], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-7, tolerance_change=1e-10)

        def closure():
            optimiser.zero_grad()
            loss = -model.log_joint(eta, batch).sum()
            loss.backward()
            return loss

        optimiser.step(closure)
        eta = eta.detach()
        return eta, _laplace_covariance(model, eta, batch)
    finally:  # as they were: a caller training some parameters keeps its choice
        for p, flag in zip(model.parameters(), trainable):
            p.requires_grad_(flag)


def noise_update(model: DiseaseCourse, eta: Tensor, cov: Tensor, batch: Batch, floor: float = 1e-3) -> None:
    """The EM step for the measurement noise: sigma_b^2 <- mean over readings of E[(y - f(eta))^2].

    Under the Laplace posterior N(eta, cov) of each patient's effects, linearised,
    E[(y - f)^2] = (y - f(eta))^2 + J cov J^T with J = df/deta; the second term is the spread
    the effects' uncertainty adds, which the joint mode's residuals leave out. A reading
    censored at an instrument's end contributes s^2 (1 + alpha lambda(alpha)), the second moment
    of the Gaussian beyond the cut (alpha = (cut - f) / s, lambda the inverse Mills ratio).
    The step is sigma^2 <- the mean of E[(y - f)^2] over each biomarker's readings.
    """
    eta = eta.detach()
    f = lambda e: model.at_readings(e, batch)[1]  # noqa: E731
    with torch.no_grad():
        seen, mean = model.at_readings(eta, batch)
    columns = []
    for j in range(eta.shape[1]):
        direction = torch.zeros_like(eta)
        direction[:, j] = 1.0
        columns.append(torch.autograd.functional.jvp(f, eta, direction)[1].detach())
    J = torch.stack(columns, -1)  # (S, V, B, P)
    spread = torch.einsum("svbp,spq,svbq->svb", J, cov, J)
    with torch.no_grad():
        s = torch.exp(model.log_sigma)
        y = torch.where(seen, batch.y, mean)
        second = (y - mean).square()
        for cut, sign in ((model.upper_cut, 1.0), (model.lower_cut, -1.0)):
            alpha = sign * (torch.where(torch.isfinite(cut), cut, torch.zeros_like(cut)) - mean) / s
            mills = torch.exp(-0.5 * alpha.square() - 0.5 * math.log(2 * math.pi) - torch.special.log_ndtr(-alpha))
            second = torch.where(sign * (y - cut) > 0, s.square() * (1 + alpha * mills), second)
        second = torch.where(seen, second + spread, torch.zeros_like(second))
        n = seen.sum((0, 1))
        sigma = (second.sum((0, 1)) / n.clamp(min=1)).sqrt().clamp(min=floor)
        sigma = torch.where(n > 0, sigma, torch.exp(model.log_sigma))
        model.log_sigma.copy_(torch.log(sigma))


PRIOR = ("mu_tau", "beta_tau", "mu_xi", "beta_xi", "mu_zeta", "beta_zeta", "mu_alpha")
SPREADS = ("sd_xi", "sd_zeta", "sd_alpha", "omega")


def refine_prior(model: DiseaseCourse, batch: Batch, eta: Tensor, *, iterations: int, start: int = 0,
                 draws: int = 64, refresh: int = 25, lr: float = 0.03, seed: int = 0, state: dict | None = None,
                 optimiser_state: dict | None = None,
                 on_step: Callable[[int, float, dict[str, Tensor], torch.optim.Optimizer], None] | None = None,
                 progress: bool = True, desc: str = "fitting the prior") -> None:
    """Refit the prior of the personal effects by the marginal likelihood, steps `start` to `iterations`.

    After the joint fit (`fit_population`), the fixed effects (PRIOR) and spreads (SPREADS) of the
    patients' effects are moved to maximise log p(y | theta) = sum_i log E_q[p(y_i, eta) / q(eta)],
    estimated from `draws` draws per patient of the defensive mixture q around its Laplace
    posterior (`defensive`), redrawn every `refresh` steps; the weights are recomputed at every
    step, so the estimate follows theta between redraws. The decoder, noise and drugs stay as
    the joint fit left them.

    Why: the joint mode learns the prior only from the patients whose data pin their effects.
    A patient whose data only bound them (still at a score's ceiling: not yet declining) sits at
    the prior mean and pulls on nothing, so the prior is fitted to the stages seen declining
    within the follow-up: on the atrophy simulator, the disease's midpoint came out 2 years too
    soon with 0.7 of the true slope in age, and patients not yet declining were forecast to
    decline. Under the marginal likelihood such a patient says "past this bound", which counts.

    Between redraws the draws stay put on the whitened scale (the natural effects follow the
    prior as it moves), and the result is the average of the iterates over the second half of
    the steps (the estimate moves with each redraw). Held on the natural scale instead (only
    the prior's density moving), the fit went further towards the marginal optimum given the
    joint fit's decoder, and forecast worse on the atrophy benchmark (README).
    The spreads are optimised on the log scale (they are buffers of the model, set here).
    state, optimiser_state: what `on_step` received at the step resumed from ({"eta", "points",
    "log_q", "log_<spread>", "mean_<parameter>"}, and the optimiser's state_dict); on_step(step,
    loss, tensors, optimiser) is called after each step.
    """
    from tqdm.auto import tqdm

    fixed = {name: getattr(model, name) for name in PRIOR if getattr(model, name).numel()}
    others = [p for name, p in model.named_parameters() if name not in PRIOR]
    trainable = [p.requires_grad for p in others]
    for p in others:  # held as the joint fit left them: no gradients to compute
        p.requires_grad_(False)
    spreads = [name for name in SPREADS if getattr(model, name).numel()]
    state = state or {}
    log_sd = {name: state.get(f"log_{name}", torch.log(getattr(model, name))).detach().clone().requires_grad_(True)
              for name in spreads}
    optimiser = torch.optim.Adam([*fixed.values(), *log_sd.values()], lr=lr)
    tracked = {**fixed, **{f"log_{name}": v for name, v in log_sd.items()}}
    begin = iterations // 2  # the iterates from here on are averaged (Polyak-Ruppert)
    average = {key: state[f"mean_{key}"].clone() for key in tracked if f"mean_{key}" in state}
    if optimiser_state is not None:
        optimiser.load_state_dict(optimiser_state)
    n_measured = int(torch.isfinite(batch.y).sum())
    repeated = batch.repeat(draws)
    S, P = eta.shape
    points, log_q = state.get("points"), state.get("log_q")
    bar = tqdm(range(start, iterations), desc=desc, unit="step", disable=not progress)
    for step in bar:
        if step % refresh == 0 or points is None:
            _set_spreads(model, log_sd, grad=False)
            eta, cov = posterior(model, batch, init=eta)
            chol = torch.linalg.cholesky(cov + 1e-6 * torch.eye(P))
            # a generator per redraw, from the seed and the step: a resumed fit redraws the same
            points, log_q, _ = defensive(eta, chol, draws, torch.Generator().manual_seed(seed * 100_003 + step))
            points = points.reshape(draws * S, P)
        _set_spreads(model, log_sd, grad=True)
        optimiser.zero_grad()
        log_p = model.log_joint(points, repeated, copies=draws).reshape(draws, S)
        loss = -torch.logsumexp(log_p - log_q, 0).sum() / n_measured
        loss.backward()
        optimiser.step()
        _set_spreads(model, log_sd, grad=False)
        if step >= begin:
            for key, v in tracked.items():
                v = v.detach()
                average[key] = v.clone() if step == begin else average[key] + (v - average[key]) / (step + 1 - begin)
        loss = float(loss.detach())
        bar.set_postfix(loss=f"{loss:.4f}")
        if on_step is not None:
            tensors = {"eta": eta, "points": points, "log_q": log_q,
                       **{f"log_{name}": v.detach() for name, v in log_sd.items()},
                       **{f"mean_{key}": v for key, v in average.items()}}
            on_step(step + 1, loss, tensors, optimiser)
    with torch.no_grad():
        for key, v in tracked.items():
            if key in average:  # (none when resumed at the very end)
                v.copy_(average[key])
    _set_spreads(model, log_sd, grad=False)
    for p, flag in zip(others, trainable):
        p.requires_grad_(flag)


def _set_spreads(model: DiseaseCourse, log_sd: dict[str, Tensor], *, grad: bool) -> None:
    """The model's spread buffers from their logs: in the graph (grad) for a step, else plain values."""
    for name, v in log_sd.items():
        setattr(model, name, torch.exp(v) if grad else torch.exp(v).detach().clone())


def _laplace_covariance(model: DiseaseCourse, eta: Tensor, batch: Batch) -> Tensor:
    """H^-1 per patient (S, P, P), H the Hessian of -log p(y, eta) at eta."""
    hessian = _block_hessian(lambda e: -model.log_joint(e, batch).sum(), eta).detach()
    # H = I (the whitened prior) + the likelihood's curvature, which is positive semi-definite
    # at the mode (Gauss-Newton) but not away from it: floor the eigenvalues at the prior's 1,
    # so no effect is ever more uncertain than the prior says.
    hessian = 0.5 * (hessian + hessian.transpose(1, 2)).double()
    eigen, vectors = torch.linalg.eigh(hessian)
    cov = vectors @ torch.diag_embed(1.0 / eigen.clamp(min=1.0)) @ vectors.transpose(1, 2)
    return cov.to(eta.dtype)


def _block_hessian(f: Callable[[Tensor], Tensor], eta: Tensor) -> Tensor:
    """Per-patient Hessian blocks (S, P, P) of f = sum_i f_i(eta_i), by P Hessian-vector products."""
    eta = eta.detach().requires_grad_(True)
    grad = torch.autograd.grad(f(eta), eta, create_graph=True)[0]  # (S, P)
    S, P = eta.shape
    rows = []
    for j in range(P):
        v = torch.zeros(S, P)
        v[:, j] = 1.0  # e_j for every patient at once: blocks do not mix
        rows.append(torch.autograd.grad(grad, eta, grad_outputs=v, retain_graph=j < P - 1)[0])
    return torch.stack(rows, dim=1)  # (S, P, P): row j is d(grad)/d(eta_j)


@torch.no_grad()
def effect_draws(model: DiseaseCourse, history: Batch, eta: Tensor, cov: Tensor, n: int, generator: torch.Generator,
                 *, proposals: int = 1) -> Tensor:
    """n draws (n, S, P) of each patient's effects from its posterior N(eta, cov) given `history`.

    proposals > 1 corrects the Gaussian by sampling-importance-resampling: n * proposals
    candidates from the defensive mixture around N(eta, cov) (`defensive`), each weighted by
    p(history, effect) / q(effect), and n of them drawn by weight. The Laplace Gaussian is
    symmetric and sits at the mode; the posterior is not where a patient's decline may or may
    not have begun (the sigmoids saturate): for a patient still at a score's ceiling the mode
    lies at the edge of what the data allow (the latest stage without decline) and the mass
    stretches back from it, further than the curvature at the edge says. The mixture's wide
    half reaches that mass, and the weights put it where the data say.
    """
    S, P = eta.shape
    chol = torch.linalg.cholesky(cov + 1e-6 * torch.eye(P))
    if proposals <= 1:
        return eta + torch.einsum("spq,ksq->ksp", chol, torch.randn(n, S, P, generator=generator))
    candidates, log_w, log_laplace = [], [], []
    repeated = history.repeat(n)
    for _ in range(proposals):  # n candidates at a time: memory as for n plain draws
        draw, log_q, log_n = defensive(eta, chol, n, generator)
        log_p = model.log_joint(draw.reshape(n * S, P), repeated, copies=n).reshape(n, S)
        candidates.append(draw)
        log_w.append(log_p - log_q)
        log_laplace.append(log_n - log_q)
    # (n * proposals, S, ...)
    candidates, log_w, log_laplace = torch.cat(candidates), torch.cat(log_w), torch.cat(log_laplace)
    log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
    # no candidate scored: the Laplace Gaussian as it is (the candidates weighted towards it)
    log_w = torch.where(torch.isneginf(log_w).all(0), log_laplace, log_w)
    pick = torch.multinomial(torch.softmax(log_w, 0).T, n, replacement=True, generator=generator)  # (S, n)
    return candidates.permute(1, 0, 2)[torch.arange(S)[:, None], pick].permute(1, 0, 2)


def defensive(eta: Tensor, chol: Tensor, n: int, generator: torch.Generator,
              wide: float = 3.0) -> tuple[Tensor, Tensor, Tensor]:
    """n draws (n, S, P) from q = 1/2 N(eta, C) + 1/2 N(eta, wide^2 C), C = chol chol^T per patient,
    with log q and log N(draw; eta, C) (n, S), both up to the same constant per patient (what
    importance weights need).

    The first half of the draws comes from the Laplace Gaussian, the second from the same
    Gaussian `wide` times wider; weighting every draw by the mixture's density (not by the
    component it came from) keeps the weights bounded where either component covers the target.
    """
    S, P = eta.shape
    white = torch.randn(n, S, P, generator=generator, dtype=eta.dtype)
    white[n // 2:] *= wide
    r2 = white.square().sum(-1)
    log_q = torch.logaddexp(-0.5 * r2, -0.5 * r2 / wide**2 - P * math.log(wide))
    return eta + torch.einsum("spq,ksq->ksp", chol, white), log_q, -0.5 * r2


@torch.no_grad()
def sample(model: DiseaseCourse, batch: Batch, effects: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draws at batch.times from effect draws (K, S, P), standardised: (truth (K, S, T, B), observation (K, S, T, B))."""
    n, S, P = effects.shape
    big = batch.repeat(n)
    truth = model.predict(effects.reshape(n * S, P), big, copies=n).reshape(n, S, *batch.times.shape[1:], -1)
    noise = torch.randn(truth.shape, generator=generator) * torch.exp(model.log_sigma)
    return truth, model.observe(truth, noise)
