"""The diffusion machinery against exact answers: the schedule's algebra, DDIM with oracle denoisers.

For data with a known distribution the best denoiser is closed form, so the sampler can be
checked without any network: a point mass must come back exactly, and for Gaussian data the
DDIM update is affine in x_t, so its output mean and variance follow a scalar recursion.
"""

from __future__ import annotations

import math

import pytest
import torch

from twin.diffusion import PREDICTIONS, DDIMSampler, NoiseSchedule, sample, training_loss

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _as_prediction(schedule, x0_hat, x_t, t, prediction):
    """The output a denoiser of kind `prediction` gives when its x_0 estimate is x0_hat."""
    eps = schedule.predict_eps_from_x0(x_t, t, x0_hat)
    return {"eps": eps, "v": schedule.v_target(x0_hat, t, eps), "x0": x0_hat}[prediction]


# -- the schedule -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_alpha_bar_is_monotone_decreasing_in_0_1(kind):
    s = NoiseSchedule(kind)
    ab = s.alpha_bar(torch.arange(-1, s.T))
    assert ab.dtype == F64 and ab[0] == 1.0  # t = -1 is clean data
    assert bool((ab[1:] > 0).all()) and bool((ab[1:] < 1).all())
    assert bool((ab[1:] < ab[:-1]).all())
    snr = s.snr(torch.arange(0, s.T))
    assert bool((snr[1:] < snr[:-1]).all()) and math.isinf(float(s.snr(-1)))


def test_cosine_alpha_bar_matches_its_closed_form():
    s = NoiseSchedule("cosine", T=1000)

    def f(u):
        return math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    t = torch.tensor([0, 1, 10, 500, 900, 998])
    expected = torch.tensor([f(int(i) + 1) / f(0) for i in t], dtype=F64)
    torch.testing.assert_close(s.alpha_bar(t), expected, rtol=1e-10, atol=0)
    # the last beta is clipped at 0.999 instead of 1, which keeps alpha_bar_{T-1} > 0
    torch.testing.assert_close(s.alpha_bar(999), s.alpha_bar(998) * 0.001, rtol=1e-10, atol=0)


def test_continuous_t_interpolates_between_the_integer_steps():
    s = NoiseSchedule()
    lo, hi, mid = s.alpha_bar(40), s.alpha_bar(41), s.alpha_bar(40.5)
    torch.testing.assert_close(mid, torch.sqrt(lo * hi), rtol=1e-12, atol=0)  # linear in log alpha_bar
    torch.testing.assert_close(s.alpha_bar(torch.tensor([40.0, 41.0], dtype=F64)), torch.stack([lo, hi]))
    assert float(s.alpha_bar(-0.5)) > float(s.alpha_bar(0))


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_q_sample_then_predictions_recover_x0_and_noise(kind):
    s = NoiseSchedule(kind)
    g = _gen(0)
    x0 = torch.randn(6, 2, 4, 3, generator=g, dtype=F64)
    noise = torch.randn(6, 2, 4, 3, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    x_t = s.q_sample(x0, t, noise)
    torch.testing.assert_close(s.predict_x0_from_eps(x_t, t, noise), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(s.predict_eps_from_x0(x_t, t, x0), noise, rtol=0, atol=1e-12)
    v = s.v_target(x0, t, noise)
    torch.testing.assert_close(s.predict_x0_from_v(x_t, t, v), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(s.predict_eps_from_v(x_t, t, v), noise, rtol=0, atol=1e-12)
    # at t = 0 the data is barely noised; at T-1 it is noise
    torch.testing.assert_close(x_t[0], x0[0], rtol=0, atol=0.05)
    torch.testing.assert_close(x_t[-1], noise[-1], rtol=0, atol=0.03)  # linear: alpha_bar_{T-1} = 4e-5


def test_scalar_t_broadcasts_like_a_batch_of_equal_t():
    s = NoiseSchedule()
    g = _gen(1)
    x0, noise = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    torch.testing.assert_close(s.q_sample(x0, 300, noise), s.q_sample(x0, torch.full((3,), 300), noise))
    assert s.q_sample(x0, 300, noise).dtype == torch.float32


def test_bad_configuration_and_times_raise_with_what_came():
    with pytest.raises(ValueError, match="kind must be 'cosine' or 'linear', got 'sigmoid'"):
        NoiseSchedule("sigmoid")
    with pytest.raises(ValueError, match=r"linear needs .* beta_end=0.5, T=1000"):
        NoiseSchedule("linear", beta_start=0.6, beta_end=0.5)
    with pytest.raises(ValueError, match=r"t must lie in \[-1, 999\], got values in \[0, 1000\]"):
        NoiseSchedule().alpha_bar(torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, T=10\], got 11"):
        DDIMSampler(NoiseSchedule(T=10), steps=11)
    with pytest.raises(ValueError, match="prediction must be one of .* got 'score'"):
        NoiseSchedule().x0_and_eps(torch.zeros(2, 1), 5, torch.zeros(2, 1), "score")


# -- the DDIM sampler -------------------------------------------------------------------------

def test_timesteps_descend_evenly_from_T_minus_1():
    s = NoiseSchedule(T=1000)
    ts = DDIMSampler(s, steps=20).timesteps
    assert ts.dtype == torch.long and ts[0] == 999 and ts[-1] == 49
    assert bool((ts[:-1] - ts[1:] == 50).all())
    assert torch.equal(DDIMSampler(s, steps=1000).timesteps, torch.arange(999, -1, -1))
    gaps = -torch.diff(DDIMSampler(s, steps=7).timesteps)
    assert set(gaps.tolist()) <= {142, 143}


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_returns_a_point_mass_exactly(prediction, eta):
    """Data = x* only: the optimal x_0 estimate is x* from any x_t, so every step lands on its line."""
    s = NoiseSchedule()
    x_star = torch.tensor([[0.3, -1.2, 2.0]], dtype=F64).expand(5, 3)

    def oracle(x, t, condition):
        assert condition is x_star  # handed through untouched
        return _as_prediction(s, x_star, x, t, prediction)

    x = sample(oracle, (5, 3), x_star, DDIMSampler(s, steps=10, eta=eta), _gen(2), prediction=prediction, dtype=F64)
    torch.testing.assert_close(x, x_star, rtol=0, atol=1e-8)


def _gaussian_oracle(s, mu, sd, prediction):
    """E[x_0 | x_t] for x_0 ~ N(mu, sd^2 I): mu + sd^2 sqrt(ab) (x_t - sqrt(ab) mu) / (ab sd^2 + 1 - ab)."""
    def oracle(x, t, condition):
        ab = s.alpha_bar(t).to(x).reshape(-1, *[1] * (x.dim() - 1))
        x0_hat = mu + sd**2 * ab.sqrt() * (x - ab.sqrt() * mu) / (ab * sd**2 + 1 - ab)
        return _as_prediction(s, x0_hat, x, t, prediction)
    return oracle


def _gaussian_ddim_moments(s, sampler, mu, sd):
    """Mean and sd of DDIM's output for N(mu, sd^2) data and the exact oracle, x_T ~ N(0, 1).

    With y = x_t - sqrt(ab) mu the step is affine: y' = r y + sigma z,
    r = (sqrt(ab ab') sd^2 + c sqrt(1 - ab)) / (ab sd^2 + 1 - ab), c = sqrt(1 - ab' - sigma^2).
    """
    ts = sampler.timesteps.tolist()
    ab_T = float(s.alpha_bar(ts[0]))
    mean_y, var_y = -math.sqrt(ab_T) * mu, 1.0
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        ab, ab_p = float(s.alpha_bar(t)), float(s.alpha_bar(t_prev))
        sigma2 = sampler.eta**2 * (1 - ab_p) / (1 - ab) * (1 - ab / ab_p)
        c = math.sqrt(max(1 - ab_p - sigma2, 0.0))
        r = (math.sqrt(ab * ab_p) * sd**2 + c * math.sqrt(1 - ab)) / (ab * sd**2 + 1 - ab)
        mean_y, var_y = r * mean_y, r**2 * var_y + sigma2
    return mu + mean_y, math.sqrt(var_y)


def test_ddim_eta0_is_the_affine_map_of_the_gaussian_flow():
    """Deterministic DDIM on Gaussian data maps each x_T to mu + k (x_T - sqrt(ab_T) mu), k closed form."""
    s, mu, sd = NoiseSchedule(), 1.5, 0.5
    sampler = DDIMSampler(s, steps=20)
    x_T = torch.randn(64, 1, generator=_gen(3), dtype=F64)
    x = sample(_gaussian_oracle(s, mu, sd, "eps"), (64, 1), None, sampler, _gen(99), prediction="eps", x_T=x_T)
    ab_T = float(s.alpha_bar(999))
    _, k = _gaussian_ddim_moments(s, sampler, 0.0, sd)
    torch.testing.assert_close(x, mu + k * (x_T - math.sqrt(ab_T) * mu), rtol=0, atol=1e-10)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_samples_a_gaussian_with_the_right_moments(eta, prediction):
    s, mu, sd, n = NoiseSchedule(), 1.5, 0.5, 4000
    sampler = DDIMSampler(s, steps=20, eta=eta)
    x = sample(_gaussian_oracle(s, mu, sd, prediction), (n, 1), None, sampler, _gen(4),
               prediction=prediction, dtype=F64)
    mean, spread = _gaussian_ddim_moments(s, sampler, mu, sd)
    assert abs(float(x.mean()) - mean) < 4 * spread / math.sqrt(n)
    assert abs(float(x.std()) - spread) < 4 * spread / math.sqrt(2 * n)
    # mean ~ mu; a first-order sampler with the posterior-mean denoiser narrows the spread:
    # at 20 steps on the cosine schedule by ~7% (eta = 0) and ~14% (eta = 1), shrinking as 1/steps
    assert abs(mean - mu) < 1e-3
    assert 0.8 * sd < spread < sd


def test_ddim_spread_converges_to_the_data_spread_at_first_order():
    s, sd = NoiseSchedule(), 0.5
    gaps = [sd - _gaussian_ddim_moments(s, DDIMSampler(s, steps=n), 0.0, sd)[1] for n in (10, 20, 40, 80)]
    ratios = [a / b for a, b in zip(gaps, gaps[1:])]
    assert all(1.8 < r < 2.2 for r in ratios), ratios  # halving the step halves the error


def test_same_seed_same_samples_and_batched_equals_per_item():
    s = NoiseSchedule()
    g = _gen(5)
    w1, w2 = torch.randn(2 + 1 + 2, 16, generator=g, dtype=F64), torch.randn(16, 2, generator=g, dtype=F64)

    def net(x, t, condition):  # a fixed random network: per item, conditioned
        h = torch.cat([x, (t.to(x) / s.T)[:, None], condition], dim=1)
        return torch.tanh(h @ w1) @ w2

    condition = torch.randn(6, 2, generator=g, dtype=F64)
    stochastic = DDIMSampler(s, steps=8, eta=1.0)
    a = sample(net, (6, 2), condition, stochastic, _gen(7), dtype=F64)
    b = sample(net, (6, 2), condition, stochastic, _gen(7), dtype=F64)
    c = sample(net, (6, 2), condition, stochastic, _gen(8), dtype=F64)
    assert torch.equal(a, b) and not torch.allclose(a, c)

    x_T = torch.randn(6, 2, generator=g, dtype=F64)
    deterministic = DDIMSampler(s, steps=8)
    batched = sample(net, (6, 2), condition, deterministic, _gen(0), x_T=x_T)
    single = torch.cat([sample(net, (1, 2), condition[i:i + 1], deterministic, _gen(0), x_T=x_T[i:i + 1])
                        for i in range(6)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-12)


def test_sampler_errors_say_what_was_expected():
    s = NoiseSchedule()
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"eta=0.5 > 0 draws noise: pass generator="):
        DDIMSampler(s, steps=5, eta=0.5).step(x, 999, 799, x)
    with pytest.raises(ValueError, match=r"need -1 <= t_prev < t, got t=10, t_prev=20"):
        DDIMSampler(s).step(x, 10, 20, x)
    with pytest.raises(ValueError, match=r"x_T must have shape \(2, 3\), got \(2, 4\)"):
        sample(lambda x, t, c: x, (2, 3), None, DDIMSampler(s), _gen(0), x_T=torch.zeros(2, 4))


def test_clip_keeps_the_x0_estimate_in_range():
    s = NoiseSchedule()
    x = sample(lambda x, t, c: torch.full_like(x, 5.0), (4, 2), None, DDIMSampler(s, steps=5), _gen(0),
               prediction="x0", clip=(-1.0, 1.0), dtype=F64)
    torch.testing.assert_close(x, torch.ones(4, 2, dtype=F64))


# -- training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_training_loss_is_zero_for_the_oracle_and_the_target_variance_for_zero(prediction):
    s = NoiseSchedule()
    x_star = torch.tensor([[0.7, -0.4]], dtype=F64).expand(2048, 2)
    oracle = lambda x, t, c: _as_prediction(s, x_star, x, t, prediction)  # noqa: E731
    assert float(training_loss(oracle, x_star, None, s, _gen(0), prediction=prediction)) < 1e-12
    zero = training_loss(lambda x, t, c: torch.zeros_like(x), x_star, None, s, _gen(0), prediction=prediction)
    if prediction == "eps":
        assert abs(float(zero) - 1.0) < 0.05  # E[eps^2]
    if prediction == "x0":
        torch.testing.assert_close(zero, (x_star**2).mean())


def test_training_loss_goes_down_for_a_tiny_mlp():
    torch.manual_seed(0)  # the MLP's initial weights
    s = NoiseSchedule()
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 32), torch.nn.SiLU(),
                              torch.nn.Linear(32, 2))

    def denoiser(x, t, condition):
        return mlp(torch.cat([x, (t.to(x) / s.T)[:, None]], dim=1))

    data = torch.tensor([1.0, -1.0]) + torch.tensor([0.3, 0.8]) * torch.randn(4096, 2, generator=_gen(1))

    def held_out():  # the same t and noise every time
        with torch.no_grad():
            return float(training_loss(denoiser, data, None, s, _gen(2)))

    before = held_out()
    opt = torch.optim.Adam(mlp.parameters(), lr=3e-3)
    g = _gen(3)
    for _ in range(200):
        batch = data[torch.randint(0, len(data), (128,), generator=g)]
        loss = training_loss(denoiser, batch, None, s, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out() < 0.7 * before
