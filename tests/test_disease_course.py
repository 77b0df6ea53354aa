"""The biomarker twin's model and inference on cohorts drawn from the model itself (known truth)."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from twin.inference import (defensive, effect_draws, fit_population, noise_update, orient_decoder, posterior,
                            refine_prior, sample)
from twin.model import Batch, DiseaseCourse

NAN = float("nan")


def truth_model() -> DiseaseCourse:
    torch.manual_seed(0)
    m = DiseaseCourse(n_biomarkers=3, n_covariates=1, n_drugs=1, hidden=0, dose_scale=(10.0,))
    with torch.no_grad():
        m.a.copy_(torch.tensor([1.5, -1.2, -2.0]))
        m.log_v.copy_(torch.log(torch.tensor([1.5, 1.0, 2.0])))
        m.g.copy_(torch.tensor([0.0, 0.5, 1.0]))
        m.log_sigma.fill_(np.log(0.1))
        m.beta_tau.fill_(0.8)  # older patients are further along
        m.mu_xi.fill_(np.log(0.6))
        m.mu_zeta.fill_(1.0)
        m.sd_xi.fill_(0.3)
        m.omega.fill_(0.4)
    return m


def cohort(model: DiseaseCourse, n: int, seed: int) -> tuple[Batch, Batch, torch.Tensor]:
    """(measured batch, the same patients' noise-free values at the same times, true effects)."""
    g = torch.Generator().manual_seed(seed)
    times = torch.cumsum(torch.rand(n, 6, generator=g) * 0.8 + 0.2, dim=1)
    times = torch.cat([torch.zeros(n, 1), times[:, :-1]], dim=1)
    times[: n // 4, 4:] = NAN  # ragged histories
    treated = torch.arange(n) % 2 == 0
    dose_time = torch.where(treated[:, None], 0.5 + torch.arange(20) / 12.0, torch.full((n, 20), NAN))
    dose = torch.where(torch.isfinite(dose_time), torch.full_like(dose_time, 10.0), dose_time)
    x = torch.randn(n, 1, generator=g)
    eta = torch.randn(n, model.n_effects, generator=g)
    clean = Batch(times, torch.full((n, 6, 3), NAN), x, ((dose_time, dose),))
    with torch.no_grad():
        mean = model.predict(eta, clean)
    y = mean + 0.1 * torch.randn(mean.shape, generator=g)
    return Batch(times, y, x, ((dose_time, dose),)), Batch(times, mean, x, ((dose_time, dose),)), eta


def test_log_joint_gradient_is_finite_with_padding():
    model = truth_model()
    batch, _, _ = cohort(model, 12, 1)
    eta = torch.zeros(12, model.n_effects, requires_grad=True)
    model.log_joint(eta, batch).sum().backward()
    assert torch.isfinite(eta.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_posterior_recovers_the_true_effects_with_honest_spread():
    model = truth_model()
    batch, _, eta_true = cohort(model, 60, 2)
    eta, cov = posterior(model, batch)
    sd = torch.linalg.diagonal(cov).sqrt()
    # well-measured effects (tau, the offsets) are recovered; the rest are at least not contradicted
    for j in (0, 3, 4, 5):
        assert np.corrcoef(eta[:, j], eta_true[:, j])[0, 1] > 0.8
    z = (eta_true - eta) / sd
    assert (z.abs() < 2.5).float().mean() > 0.9
    assert (sd <= 1.0 + 1e-5).all()  # never less certain than the prior


def test_noise_step_is_the_expected_squared_residual():
    from scipy.stats import truncnorm

    model = truth_model()
    batch, _, eta = cohort(model, 20, 5)
    seen = torch.isfinite(batch.y)
    ask = Batch(torch.where(torch.isfinite(batch.times), batch.times, 0.0), batch.y, batch.x, batch.doses)
    with torch.no_grad():
        f = model.predict(eta, ask)
    rms = torch.stack([(batch.y - f)[..., b][seen[..., b]].square().mean().sqrt() for b in range(3)])
    noise_update(model, eta, torch.zeros(20, model.n_effects, model.n_effects), batch)
    torch.testing.assert_close(torch.exp(model.log_sigma), rms, rtol=1e-5, atol=1e-6)
    # the effects' uncertainty adds J cov J^T, J by central differences
    cov = 0.05 * torch.eye(model.n_effects).expand(20, -1, -1)
    J = []
    for j in range(model.n_effects):
        step = torch.zeros_like(eta)
        step[:, j] = 1e-2
        with torch.no_grad():
            J.append((model.predict(eta + step, ask) - model.predict(eta - step, ask)) / 2e-2)
    spread = 0.05 * torch.stack(J, -1).square().sum(-1)
    want = torch.stack([((batch.y - f).square() + spread)[..., b][seen[..., b]].mean().sqrt() for b in range(3)])
    noise_update(model, eta, cov, batch)
    torch.testing.assert_close(torch.exp(model.log_sigma), want, rtol=1e-3, atol=1e-5)
    # a reading past an instrument's cut counts the Gaussian's second moment beyond the cut
    model.log_sigma.data.fill_(math.log(0.1))
    cut = float(f[..., 1][seen[..., 1]].quantile(0.7))
    model.upper_cut[1], model.upper_end[1] = cut, cut + 0.05
    noise_update(model, eta, torch.zeros(20, model.n_effects, model.n_effects), batch)
    mu, y = f[..., 1][seen[..., 1]].double().numpy(), batch.y[..., 1][seen[..., 1]].double().numpy()
    beyond = truncnorm.moment(2, (cut - mu) / 0.1, np.inf) * 0.01  # E[(y* - mu)^2 | y* > cut]
    second = np.where(y > cut, beyond, (y - mu) ** 2)
    assert (y > cut).sum() >= 5
    assert abs(float(torch.exp(model.log_sigma[1].detach())) - np.sqrt(second.mean())) < 1e-4


def test_orient_decoder_finds_each_biomarkers_direction():
    model = truth_model()
    batch, _, _ = cohort(model, 40, 3)
    fresh = DiseaseCourse(3, 1, 1, hidden=0, dose_scale=(10.0,))
    assert orient_decoder(fresh, batch).tolist() == [1.0, -1.0, -1.0]
    assert torch.equal(torch.sign(fresh.a.data), torch.tensor([1.0, -1.0, -1.0]))


def test_fitted_model_forecasts_held_out_visits_better_than_copying_the_last():
    truth = truth_model()
    batch, clean, _ = cohort(truth, 80, 4)
    torch.manual_seed(0)
    model = DiseaseCourse(3, 1, 1, hidden=0, dose_scale=(10.0,))
    orient_decoder(model, batch)
    losses = []
    fit_population(model, batch, iterations=200, lr=0.05, progress=False, on_step=lambda s, l, e, o: losses.append(l))
    assert losses[-1] < losses[0] - 0.5
    # the noise's EM step: the joint mode's residuals alone put sigma 12-25% below the truth's 0.1
    assert (torch.exp(model.log_sigma) / 0.1 - 1).abs().max() < 0.08
    # condition on the first three visits, forecast the rest
    history = Batch(torch.where(torch.arange(6) < 3, batch.times, NAN), batch.y, batch.x, batch.doses)
    eta, cov = posterior(model, history)
    later = torch.where(torch.arange(6) >= 3, batch.times, NAN)
    ask = Batch(torch.where(torch.isfinite(later), later, 0.0), batch.y, batch.x, batch.doses)
    g = torch.Generator().manual_seed(0)
    draws, _ = sample(model, ask, effect_draws(model, history, eta, cov, 100, g, proposals=4), g)
    forecast = draws.median(0).values
    target = torch.isfinite(later)[..., None].expand_as(forecast)
    twin_error = (forecast - clean.y).abs()[target].mean()
    copy_error = (batch.y[:, 2:3] - clean.y).abs()[target].mean()
    assert twin_error < 0.7 * copy_error


def test_samples_are_seeded_and_observations_are_noisier_than_the_course():
    model = truth_model()
    batch, _, _ = cohort(model, 10, 5)
    eta, cov = posterior(model, batch)
    ask = Batch(torch.where(torch.isfinite(batch.times), batch.times, 0.0), batch.y, batch.x, batch.doses)
    a_truth, a_obs = sample(model, ask, effect_draws(model, batch, eta, cov, 50, torch.Generator().manual_seed(7),
                                                     proposals=3), torch.Generator().manual_seed(8))
    b_truth, b_obs = sample(model, ask, effect_draws(model, batch, eta, cov, 50, torch.Generator().manual_seed(7),
                                                     proposals=3), torch.Generator().manual_seed(8))
    assert torch.equal(a_truth, b_truth) and torch.equal(a_obs, b_obs)
    assert a_truth.shape == (50, 10, 6, 3)
    assert (a_obs.std(0).mean() > a_truth.std(0).mean())


def test_importance_resampling_recovers_the_posterior_from_a_wrong_gaussian():
    # nothing measured: the exact posterior of the whitened effects is the prior N(0, I)
    model = truth_model()
    batch, _, _ = cohort(model, 3, 4)
    empty = Batch(batch.times, torch.full_like(batch.y, float("nan")), batch.x, batch.doses)
    P = model.n_effects
    eta, cov = torch.full((3, P), 0.5), 2.0 * torch.eye(P).expand(3, P, P)
    plain = effect_draws(model, empty, eta, cov, 4000, torch.Generator().manual_seed(0))
    fixed = effect_draws(model, empty, eta, cov, 4000, torch.Generator().manual_seed(0), proposals=30)
    assert abs(plain.mean() - 0.5) < 0.05 and abs(plain.var() - 2.0) < 0.1
    assert abs(fixed.mean()) < 0.05 and abs(fixed.var() - 1.0) < 0.1


def test_importance_resampling_keeps_the_candidates_when_none_can_be_scored(monkeypatch):
    model = truth_model()
    batch, _, _ = cohort(model, 2, 4)
    P = model.n_effects
    monkeypatch.setattr(model, "log_joint", lambda eta, b, copies=1: torch.full((eta.shape[0],), float("nan")))
    draws = effect_draws(model, batch, torch.zeros(2, P), torch.eye(P).expand(2, P, P), 500,
                         torch.Generator().manual_seed(1), proposals=4)
    assert torch.isfinite(draws).all() and abs(draws.mean()) < 0.1 and abs(draws.var() - 1) < 0.1


def test_defensive_draws_carry_the_mixtures_density():
    from scipy.stats import multivariate_normal

    g = torch.Generator().manual_seed(0)
    eta = torch.randn(2, 3, generator=g, dtype=torch.float64)
    A = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    C = A @ A.transpose(1, 2) + 0.5 * torch.eye(3, dtype=torch.float64)
    x, log_q, log_laplace = defensive(eta, torch.linalg.cholesky(C), 8, g, wide=3.0)
    for s in range(2):
        narrow = multivariate_normal(eta[s].numpy(), C[s].numpy()).logpdf(x[:, s].numpy())
        wide = multivariate_normal(eta[s].numpy(), 9 * C[s].numpy()).logpdf(x[:, s].numpy())
        q = np.logaddexp(narrow, wide) + np.log(0.5)
        # each up to one constant per patient, the same for both
        offset = q - log_q[:, s].numpy()
        assert np.ptp(offset) < 1e-9 and np.allclose(narrow - log_laplace[:, s].numpy(), offset - np.log(0.5))
    # half the draws come from the Laplace Gaussian, half from one 3 times as wide
    white = torch.linalg.solve_triangular(torch.linalg.cholesky(C), (x - eta)[..., None], upper=False)[..., 0]
    radius = white.norm(dim=-1)  # (n, S)
    assert radius[4:].mean() > 2 * radius[:4].mean()


def marginal_loglik(model: DiseaseCourse, batch: Batch, draws: int = 2048, seed: int = 1) -> float:
    """log p(y | population), up to a constant, by importance sampling around each patient's Laplace posterior."""
    eta, cov = posterior(model, batch)
    S, P = eta.shape
    chol = torch.linalg.cholesky(cov + 1e-6 * torch.eye(P))
    x, log_q, _ = defensive(eta, chol, draws, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        log_p = model.log_joint(x.reshape(draws * S, P), batch.repeat(draws), copies=draws).reshape(draws, S)
    log_det = torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(-1)  # q's normaliser, which differs per fit
    return float((torch.logsumexp(log_p - log_q, 0) + log_det).sum())


def test_the_prior_refit_by_the_marginal_likelihood_undoes_the_joint_modes_compression():
    """At the joint mode a patient whose data only bound its stage (not yet declining, or past
    the whole course) sits at the prior mean and pulls on nothing: the prior is fitted to the
    stages seen moving, and the covariate's effect on tau (1.5 in truth) comes out about 3/4 of it.
    The marginal fit counts those patients: it raises log p(y | population) and moves the effect back."""
    truth = truth_model()
    with torch.no_grad():
        truth.beta_tau.fill_(1.5)
    batch, _, _ = cohort(truth, 100, 6)
    model = copy.deepcopy(truth)
    eta = fit_population(model, batch, iterations=150, lr=0.05, progress=False)
    joint_beta, joint_fit = float(model.beta_tau.detach()), marginal_loglik(model, batch)
    assert joint_beta < 1.3  # compressed
    decoder = [p.detach().clone() for p in (model.a, model.g, model.log_v, model.log_sigma)]
    refine_prior(model, batch, eta, iterations=100, draws=32, progress=False)
    assert marginal_loglik(model, batch) > joint_fit + 1.5  # the estimate's own spread is ~0.6 here
    assert float(model.beta_tau.detach()) > joint_beta + 0.04
    assert all(torch.equal(p, q) for p, q in zip((model.a, model.g, model.log_v, model.log_sigma), decoder))


def test_draws_share_their_patient_exposure_exactly():
    # copies: the drug integrals of n stacked copies of a batch are computed once, not n times
    model = truth_model()
    batch, _, _ = cohort(model, 6, 9)
    ask = Batch(torch.where(torch.isfinite(batch.times), batch.times, 0.0), batch.y, batch.x, batch.doses)
    eta = torch.randn(5 * 6, model.n_effects, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        shared = model.predict(eta, ask.repeat(5), copies=5)
        alone = model.predict(eta, ask.repeat(5))
        torch.testing.assert_close(shared, alone, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.log_joint(eta, batch.repeat(5), copies=5), model.log_joint(eta, batch.repeat(5)))
    assert not torch.equal(shared[:6], shared[6:12])  # the draws differ; only the exposure is shared


def test_spread_update_keeps_the_natural_effects():
    model = truth_model()
    eta = torch.randn(30, model.n_effects)
    before = model.personal(eta, torch.zeros(30, 1))
    after_eta = model.update_spreads(eta, torch.full_like(eta, 0.2))
    after = model.personal(after_eta, torch.zeros(30, 1))
    for key in ("zeta", "offset"):
        torch.testing.assert_close(before[key], after[key], rtol=1e-5, atol=1e-6)
    # xi's spread is as it was; its mean moved with z's unit (`rescale_state`)
    torch.testing.assert_close(before["xi"] - before["xi"].mean(), after["xi"] - after["xi"].mean(), rtol=1e-5, atol=1e-5)
    # the new spreads are the effects' root mean square, the posterior variance included
    torch.testing.assert_close(model.omega, (before["offset"].square().mean(0) + 0.2 * 0.4**2).sqrt(), rtol=1e-5, atol=1e-6)


def test_rescaling_the_state_leaves_every_forecast_as_it_was():
    # a tumour course with all that reads z: a learned bend, a drug, radiotherapy, second sigmoids
    torch.manual_seed(3)
    model = DiseaseCourse(n_biomarkers=2, n_covariates=1, n_drugs=1, hidden=8, dose_scale=(10.0,),
                          family="growth", radiotherapy=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    n = 6
    times = torch.linspace(0.0, 2.0, 5).expand(n, 5)
    dose_time = (0.2 + torch.arange(6) / 12.0).expand(n, 6)
    fraction_time = (0.1 + torch.arange(10) / 365.25).expand(n, 10)
    batch = Batch(times, torch.full((n, 5, 2), NAN), torch.randn(n, 1), ((dose_time, torch.full((n, 6), 10.0)),),
                  (fraction_time, torch.full((n, 10), 2.0)))
    eta = torch.randn(n, model.n_effects)
    with torch.no_grad():
        before = model.predict(eta, batch)
        model.rescale_state(1.7)
        eta[:, 0] /= 1.7
        # within the ODE solver's tolerances (rtol 1e-4, atol 1e-5): its steps differ on another scale
        torch.testing.assert_close(model.predict(eta, batch), before, rtol=1e-4, atol=1e-4)
        # the spread step rescales by tau's root mean square, the posterior variance included
        tau = model.personal(eta, batch.x)["tau"]
        s = float((eta[:, 0].square() + 0.2).mean().sqrt())
        eta = model.update_spreads(eta, torch.full_like(eta, 0.2))
        torch.testing.assert_close(model.predict(eta, batch), before, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.personal(eta, batch.x)["tau"], tau / s)


def ceiling_cohort(model: DiseaseCourse, n: int, seed: int) -> tuple[Batch, Batch]:
    """The cohort of `cohort` with biomarker 1 read on an instrument that tops out: readings are
    rounded to 0.25 and recorded at most at the ceiling, 0.25 below the top of the course."""
    batch, clean, _ = cohort(model, n, seed)
    top = model.c[1].item() - 0.25  # a falling biomarker: its course starts near c
    y = batch.y.clone()
    y[..., 1] = torch.clamp(torch.round(y[..., 1] * 4) / 4, max=top)
    return Batch(batch.times, y, batch.x, batch.doses), clean


def test_set_ranges_finds_a_ceiling_where_readings_pile_up_and_only_on_instruments():
    model = truth_model()
    batch, _ = ceiling_cohort(model, 60, 5)
    model.set_ranges(batch.y, torch.tensor([True, True, False]))
    top = model.c[1].item() - 0.25
    seen = batch.y[..., 1][torch.isfinite(batch.y[..., 1])]
    assert (seen == top).float().mean() > 0.05  # the pile-up the cohort was made with
    assert abs(float(model.upper_end[1]) - top) < 1e-6
    assert abs(float(model.upper_cut[1]) - (top - 0.125)) < 1e-6  # half-way to the next reading, 0.25 below
    assert torch.isinf(model.lower_cut[1]) and torch.isinf(model.lower_end[1])  # no floor where none piles up
    assert torch.isinf(model.upper_cut[0]) and torch.isinf(model.lower_cut[0])  # continuous readings: no range
    assert torch.isinf(model.upper_cut[2]) and torch.isinf(model.lower_cut[2])  # not an instrument (a volume)


def test_a_reading_past_the_cut_is_censored_in_the_likelihood():
    from scipy.stats import norm

    model = truth_model()
    with torch.no_grad():
        model.upper_cut[1], model.upper_end[1] = 0.5, 0.6
    times = torch.tensor([[0.0, 1.0]])
    none = (torch.full((1, 1), NAN), torch.full((1, 1), NAN))
    eta = torch.zeros(1, model.n_effects)
    with torch.no_grad():
        mean = model.predict(eta, Batch(times, torch.full((1, 2, 3), NAN), torch.zeros(1, 1), (none,)))[0, :, 1]
    sigma = float(np.exp(model.log_sigma[1].item()))

    def log_lik(reading: float) -> float:
        y = torch.full((1, 2, 3), NAN)
        y[0, :, 1] = reading
        with torch.no_grad():
            return float(model.log_joint(eta, Batch(times, y, torch.zeros(1, 1), (none,)))[0])

    censored = sum(norm.logcdf((float(m) - 0.5) / sigma) for m in mean)
    assert abs(log_lik(0.6) - censored) < 1e-3  # at the end: only "past the cut"
    exact = sum(norm.logpdf((0.45 - float(m)) / sigma) - np.log(sigma) + 0.5 * np.log(2 * np.pi) for m in mean)
    assert abs(log_lik(0.45) - exact) < 1e-3  # inside the range: the Gaussian as before


def test_drawn_readings_stay_in_the_instruments_range():
    model = truth_model()
    with torch.no_grad():
        model.upper_cut[1], model.upper_end[1] = 0.2, 0.3
    truth = torch.full((1000, 3), 0.25)
    noise = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0))
    y = model.observe(truth, noise)
    assert torch.equal(y[:, [0, 2]], (truth + noise)[:, [0, 2]])  # no range, as drawn
    past = (truth + noise)[:, 1] > 0.2
    assert past.any() and (~past).any()
    assert torch.equal(y[past, 1], torch.full((int(past.sum()),), 0.3))  # recorded at the end
    assert torch.equal(y[~past, 1], (truth + noise)[~past, 1])
    assert float(y[:, 1].max()) <= 0.3 + 1e-6


def test_censoring_keeps_patients_at_the_ceiling_from_reading_as_declined():
    """Stable patients at a ceiling, 8 readings each: the top reading hides values above it. Read as
    exact, their levels sink below the course (by about sigma phi(0) / 2 on average); censored,
    the bias is gone and no patient's level is worse on average."""
    model = truth_model()
    with torch.no_grad():
        model.omega.fill_(1.0)
    n = 200
    times = torch.linspace(0.0, 1.0, 8).repeat(n, 1)
    none = (torch.full((n, 1), NAN), torch.full((n, 1), NAN))
    x = torch.full((n, 1), -3.0)  # young: far from decline, so biomarker 1 sits on its top c
    clean = Batch(times, torch.full((n, 8, 3), NAN), x, (none,))
    eta = torch.zeros(n, model.n_effects)
    with torch.no_grad():
        course = model.predict(eta, clean)[..., 1]
    top = course[0, 0].item()
    y = torch.full((n, 8, 3), NAN)
    y[..., 1] = torch.clamp(course + 0.1 * torch.randn(n, 8, generator=torch.Generator().manual_seed(3)), max=top)
    batch = Batch(times, y, x, (none,))

    def level_error() -> torch.Tensor:  # (n, 8): each patient's fitted course minus the true one
        eta_map, _ = posterior(model, batch)
        with torch.no_grad():
            return model.predict(eta_map, clean)[..., 1] - course

    plain = level_error()
    with torch.no_grad():
        model.upper_cut[1], model.upper_end[1] = top - 1e-4, top
    censored = level_error()
    assert plain.mean() < -0.02
    assert censored.mean().abs() < 0.25 * plain.mean().abs()
    assert censored.abs().mean() <= plain.abs().mean()
