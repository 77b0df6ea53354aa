"""Fitting the disease-course model to a cohort, and a patient's posterior given the population.

- `fit_population`: joint MAP of the population parameters and the training patients'
  whitened effects (Adam), with the spreads and the noise sigma updated from the effects'
  moments every few steps (`noise_update`). Full batch: cohorts of biomarker tables are small.
- `posterior`: a patient's effects given the population: MAP (L-BFGS on all patients at once;
  their objectives are independent, so the sum's optimum is each one's), then a Laplace
  approximation, N(MAP, H^-1), from the block-diagonal Hessian (P Hessian-vector products for
  the whole batch, P = effects per patient).
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
                   on_step: Callable[[int, float, Tensor, torch.optim.Optimizer], None] | None = None,
                   progress: bool = True) -> Tensor:
    """Train `model` on `batch` from step `start` to `iterations`; return the patients' effects eta (S, P).

    on_step(step, loss, eta, optimiser) is called after each step (checkpoints hook in there:
    the optimiser's state_dict is what `optimiser_state` takes back to resume exactly).
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
    bar = tqdm(range(start, iterations), desc="fitting the twin", unit="step", disable=not progress)
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
            on_step(step + 1, loss, eta.detach(), optimiser)
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
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


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
    candidates from N(eta, cov), each weighted by p(history, effect) / N(effect; eta, cov),
    and n of them drawn by weight. The Laplace Gaussian is symmetric, the posterior is not
    where a patient's decline may or may not have begun (the sigmoids saturate), and its
    tail of fast courses pulls forecasts; the weights put that mass back where the data say.
    """
    S, P = eta.shape
    chol = torch.linalg.cholesky(cov + 1e-6 * torch.eye(P))
    if proposals <= 1:
        return eta + torch.einsum("spq,ksq->ksp", chol, torch.randn(n, S, P, generator=generator))
    candidates, log_w = [], []
    repeated = history.repeat(n)
    for _ in range(proposals):  # n candidates at a time: memory as for n plain draws
        white = torch.randn(n, S, P, generator=generator)
        draw = eta + torch.einsum("spq,ksq->ksp", chol, white)
        log_p = model.log_joint(draw.reshape(n * S, P), repeated, copies=n).reshape(n, S)
        candidates.append(draw)
        log_w.append(log_p + 0.5 * white.square().sum(-1))  # - log q, up to a constant per patient
    candidates, log_w = torch.cat(candidates), torch.cat(log_w)  # (n * proposals, S, ...)
    log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
    log_w = torch.where(torch.isneginf(log_w).all(0), 0.0, log_w)  # no candidate scored: keep them all alike
    pick = torch.multinomial(torch.softmax(log_w, 0).T, n, replacement=True, generator=generator)  # (S, n)
    return candidates.permute(1, 0, 2)[torch.arange(S)[:, None], pick].permute(1, 0, 2)


@torch.no_grad()
def sample(model: DiseaseCourse, batch: Batch, effects: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draws at batch.times from effect draws (K, S, P), standardised: (truth (K, S, T, B), observation (K, S, T, B))."""
    n, S, P = effects.shape
    big = batch.repeat(n)
    truth = model.predict(effects.reshape(n * S, P), big, copies=n).reshape(n, S, *batch.times.shape[1:], -1)
    noise = torch.randn(truth.shape, generator=generator) * torch.exp(model.log_sigma)
    return truth, model.observe(truth, noise)
