"""Gaussian diffusion apart from any network: the noise schedule, the DDIM sampler, the loop.

The scan decoder is a denoiser `denoiser(x_t, t, condition) -> model_output`; everything here
takes it as a black box, as diffusers keeps schedulers apart from networks:

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,        eps ~ N(0, I)   (forward, `q_sample`)
    v_t = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0                         (Salimans & Ho 2022)

- `NoiseSchedule`: alpha_bar over the integer steps t = 0 .. T-1 (cosine by default, Nichol &
  Dhariwal 2021; or linear, Ho et al. 2020) and the algebra between x_0, eps, v and x_t.
  t = -1 stands for clean data (alpha_bar = 1), where every sampler ends.
- `DDIMSampler`: few-step sampling (Song et al. 2021), deterministic at eta = 0, with fresh
  noise from an explicit generator at eta > 0.
- `sample`: the denoising loop, written out; `training_loss`: the regression it is trained with.

Batches are (B, C, *space) with B = samples x times (x requests): the condition is handed to
the denoiser untouched, so the caller lays it out to match.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]  # (x_t (B, C, *space), t (B,) long, condition) -> (B, C, *space)
PREDICTIONS = ("eps", "v", "x0")  # what the denoiser outputs

__all__ = ["NoiseSchedule", "DDIMSampler", "sample", "training_loss", "Denoiser", "PREDICTIONS"]


@dataclass(frozen=True)
class NoiseSchedule:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s) for t = 0 .. T-1, and the equations built on it.

    cosine: alpha_bar_t = f(t + 1) / f(0), f(u) = cos((u / T + s) / (1 + s) * pi / 2)^2, each beta
    clipped at `max_beta` (Nichol & Dhariwal 2021); the clip keeps alpha_bar_{T-1} > 0 (about
    2e-9 at T = 1000: x_{T-1} is noise to nine decimals, as the sampler's start assumes).
    linear: beta from beta_start to beta_end, scaled by 1000 / T so that any T spans the noise
    levels of Ho et al.'s T = 1000.

    Every method takes t as an int, a float or a tensor (B,) (or any shape that broadcasts
    against x's leading dims): integers index the table exactly; non-integers interpolate
    log alpha_bar linearly between the neighbouring steps, so alpha_bar stays monotone.
    """

    kind: str = "cosine"
    T: int = 1000
    cosine_s: float = 0.008
    max_beta: float = 0.999
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        if self.kind not in ("cosine", "linear"):
            raise ValueError(f"NoiseSchedule.kind must be 'cosine' or 'linear', got {self.kind!r}")
        if not (isinstance(self.T, int) and self.T >= 2):
            raise ValueError(f"NoiseSchedule.T must be an integer >= 2, got {self.T!r}")
        if not 0 < self.max_beta < 1:
            raise ValueError(f"NoiseSchedule.max_beta must be in (0, 1), got {self.max_beta}")
        if self.kind == "linear" and not (0 < self.beta_start < self.beta_end and self.beta_end * 1000 / self.T < 1):
            raise ValueError("NoiseSchedule linear needs 0 < beta_start < beta_end and beta_end * 1000 / T < 1, "
                             f"got beta_start={self.beta_start}, beta_end={self.beta_end}, T={self.T}")

    @cached_property  # not a field: `dataclasses.asdict` gives the configuration alone
    def _log_alpha_bar(self) -> Tensor:
        """(T + 1,) float64: log alpha_bar at t = -1 .. T-1 (the leading 0 is clean data)."""
        u = torch.arange(self.T + 1, dtype=torch.float64)
        if self.kind == "cosine":
            f = torch.cos((u / self.T + self.cosine_s) / (1 + self.cosine_s) * math.pi / 2) ** 2
            beta = (1 - f[1:] / f[:-1]).clamp(max=self.max_beta)
        else:
            scale = 1000 / self.T
            beta = torch.linspace(self.beta_start * scale, self.beta_end * scale, self.T, dtype=torch.float64)
        return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.log1p(-beta), 0)])

    # -- the schedule ---------------------------------------------------------------------------

    def alpha_bar(self, t: int | float | Tensor) -> Tensor:
        """alpha_bar_t in (0, 1], float64, shape of t; t in [-1, T-1] (t = -1: clean data, 1)."""
        t = torch.as_tensor(t)
        if t.is_floating_point() and bool((t != t.floor()).any()):
            lo = t.floor()
            if bool((lo < -1).any() or (t > self.T - 1).any()):
                raise ValueError(f"diffusion time t must lie in [-1, {self.T - 1}], got values in "
                                 f"[{float(t.min())}, {float(t.max())}]")
            table = self._log_alpha_bar.to(t.device)
            i = (lo + 1).long()
            w = (t - lo).to(torch.float64)
            i_next = (i + 1).clamp(max=self.T)
            return torch.exp(table[i] * (1 - w) + table[i_next] * w)
        i = t.long()
        if bool((i < -1).any() or (i > self.T - 1).any()):
            raise ValueError(f"diffusion time t must lie in [-1, {self.T - 1}], got values in "
                             f"[{int(i.min())}, {int(i.max())}]")
        return torch.exp(self._log_alpha_bar.to(t.device)[i + 1])

    def snr(self, t: int | float | Tensor) -> Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), float64 (inf at t = -1)."""
        ab = self.alpha_bar(t)
        return ab / (1 - ab)

    def _coefficients(self, t, x: Tensor) -> tuple[Tensor, Tensor]:
        """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t): computed in float64, cast to x, shaped to broadcast."""
        ab = self.alpha_bar(t).to(x.device)
        shape = ab.shape + (1,) * (x.dim() - ab.dim())
        return ab.sqrt().reshape(shape).to(x.dtype), (1 - ab).sqrt().reshape(shape).to(x.dtype)

    # -- the equations (x_t, x_0, eps, v: (B, C, *space); t: (B,) or a scalar) -------------------

    def q_sample(self, x0: Tensor, t, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps: a draw from q(x_t | x_0)."""
        sqrt_ab, sqrt_1m_ab = self._coefficients(t, x0)
        return sqrt_ab * x0 + sqrt_1m_ab * noise

    def predict_x0_from_eps(self, x_t: Tensor, t, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        sqrt_ab, sqrt_1m_ab = self._coefficients(t, x_t)
        return (x_t - sqrt_1m_ab * eps) / sqrt_ab

    def predict_eps_from_x0(self, x_t: Tensor, t, x0: Tensor) -> Tensor:
        """eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t) (undefined at t = -1)."""
        sqrt_ab, sqrt_1m_ab = self._coefficients(t, x_t)
        return (x_t - sqrt_ab * x0) / sqrt_1m_ab

    def v_target(self, x0: Tensor, t, noise: Tensor) -> Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (argument order as `q_sample`)."""
        sqrt_ab, sqrt_1m_ab = self._coefficients(t, x0)
        return sqrt_ab * noise - sqrt_1m_ab * x0

    def predict_x0_from_v(self, x_t: Tensor, t, v: Tensor) -> Tensor:
        """x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v: no division, stable at every t."""
        sqrt_ab, sqrt_1m_ab = self._coefficients(t, x_t)
        return sqrt_ab * x_t - sqrt_1m_ab * v

    def predict_eps_from_v(self, x_t: Tensor, t, v: Tensor) -> Tensor:
        """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v."""
        sqrt_ab, sqrt_1m_ab = self._coefficients(t, x_t)
        return sqrt_1m_ab * x_t + sqrt_ab * v

    def x0_and_eps(self, model_output: Tensor, t, x_t: Tensor, prediction: str) -> tuple[Tensor, Tensor]:
        """(x_0, eps) implied by a denoiser's output of kind `prediction` ("eps" | "v" | "x0")."""
        if prediction == "eps":
            return self.predict_x0_from_eps(x_t, t, model_output), model_output
        if prediction == "v":
            return self.predict_x0_from_v(x_t, t, model_output), self.predict_eps_from_v(x_t, t, model_output)
        if prediction == "x0":
            return model_output, self.predict_eps_from_x0(x_t, t, model_output)
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


@dataclass(frozen=True)
class DDIMSampler:
    """DDIM (Song et al. 2021): `steps` denoising steps over the schedule's T.

    From x_t and the denoiser's x_0, eps, the step to t' < t is

        x_t' = sqrt(alpha_bar_t') x_0 + sqrt(1 - alpha_bar_t' - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - alpha_bar_t') / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_t'),

    eta = 0: deterministic (the probability-flow ODE, discretised); eta = 1: DDPM's ancestral step.
    """

    schedule: NoiseSchedule
    steps: int = 20
    eta: float = 0.0

    def __post_init__(self):
        if not (isinstance(self.steps, int) and 1 <= self.steps <= self.schedule.T):
            raise ValueError(f"DDIMSampler.steps must be an integer in [1, T={self.schedule.T}], got {self.steps!r}")
        if not self.eta >= 0:
            raise ValueError(f"DDIMSampler.eta must be >= 0, got {self.eta}")

    @property
    def timesteps(self) -> Tensor:
        """(steps,) long, descending, evenly spaced, starting at T-1: e.g. T=1000, 20 steps: 999, 949, ..., 49.

        "Trailing" spacing (diffusers' timestep_spacing="trailing"; Lin et al. 2024): the first step
        starts where x_T ~ N(0, I) is right. The "leading" spacing (980, 960, ..., 0) starts the
        sampler at a noise level where the data's mean still shows, biasing every sample.
        """
        T = self.schedule.T
        return (torch.arange(self.steps, 0, -1, dtype=torch.float64) * (T / self.steps)).round().long() - 1

    def step(self, model_output: Tensor, t: int, t_prev: int, x_t: Tensor, *, prediction: str = "v",
             generator: torch.Generator | None = None, clip: tuple[float, float] | None = None) -> Tensor:
        """x_t (B, C, *space) at step t -> x_{t_prev}, t_prev < t (t_prev = -1: clean data).

        clip: clamp the predicted x_0 to [lo, hi] (data known to lie there) and re-derive eps
        from it, so the step stays on the line through x_t and the clipped x_0.
        """
        if not -1 <= t_prev < t:
            raise ValueError(f"DDIMSampler.step goes down in time: need -1 <= t_prev < t, got t={t}, t_prev={t_prev}")
        if model_output.shape != x_t.shape:
            raise ValueError(f"model_output must have the shape of x_t {tuple(x_t.shape)}, got {tuple(model_output.shape)}")
        s = self.schedule
        x0, eps = s.x0_and_eps(model_output, t, x_t, prediction)
        if clip is not None:
            x0 = x0.clamp(*clip)
            eps = s.predict_eps_from_x0(x_t, t, x0)
        ab, ab_prev = s.alpha_bar(t), s.alpha_bar(t_prev)  # float64 scalars
        sigma = self.eta * torch.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        # sigma <= sqrt(1 - ab_prev) for eta <= 1; larger eta would ask for a negative variance
        direction = torch.sqrt((1 - ab_prev - sigma**2).clamp(min=0))
        x_prev = ab_prev.sqrt().to(x_t) * x0 + direction.to(x_t) * eps
        if self.eta > 0 and float(sigma) > 0:
            if generator is None:
                raise ValueError(f"DDIMSampler.eta={self.eta} > 0 draws noise: pass generator=torch.Generator(...)")
            z = torch.randn(x_t.shape, generator=generator, device=generator.device, dtype=x_t.dtype).to(x_t.device)
            x_prev = x_prev + sigma.to(x_t) * z
        return x_prev


@torch.no_grad()
def sample(denoiser: Denoiser, shape: tuple[int, ...], condition: Any, sampler: DDIMSampler,
           generator: torch.Generator, *, prediction: str = "v", clip: tuple[float, float] | None = None,
           x_T: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Draw x_0 of `shape` (B, C, *space) from the denoiser, given `condition`.

    B is every (sample, time) pair at once; `condition` goes to the denoiser untouched.
    x_T ~ N(0, I) is drawn from `generator` (on the generator's device) unless given: passing
    the same x_T to two conditions (two treatment scenarios, say) compares them on common
    random numbers. Runs without autograd.
    """
    if x_T is None:
        x_T = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    elif tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T must have shape {tuple(shape)}, got {tuple(x_T.shape)}")
    x = x_T
    timesteps = sampler.timesteps.tolist()
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):  # -1: the last step lands on clean data
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        model_output = denoiser(x, t_batch, condition)
        x = sampler.step(model_output, t, t_prev, x, prediction=prediction, generator=generator, clip=clip)
    return x


def training_loss(denoiser: Denoiser, x0: Tensor, condition: Any, schedule: NoiseSchedule,
                  generator: torch.Generator, *, prediction: str = "v") -> Tensor:
    """Mean squared error of the denoiser's `prediction` at a random step: a scalar to minimise.

    Per item of x0 (B, C, *space): t ~ Uniform{0 .. T-1}, eps ~ N(0, I) (both from `generator`),
    x_t = q_sample(x0, t, eps), target eps, v or x0. The three targets weigh the x_0 error
    differently: eps-MSE = SNR_t * x0-MSE (blows up near clean data), v-MSE = (1 + SNR_t) * x0-MSE
    (bounded below by the x0 error at high noise), which is why "v" is the default.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    t = torch.randint(0, schedule.T, (x0.shape[0],), generator=generator, device=generator.device).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
    x_t = schedule.q_sample(x0, t, noise)
    target = {"eps": noise, "v": schedule.v_target(x0, t, noise), "x0": x0}[prediction]
    return torch.mean((denoiser(x_t, t, condition) - target) ** 2)
