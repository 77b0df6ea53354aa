"""A time-aware Mamba stack that reads a patient's visits and returns a posterior over the patient.

Each visit is a token x_t (scan embedding, biomarkers, treatment exposure, ...) taken g_t years
after the previous visit. In a standard Mamba block one step Δ_t, computed from the token, both
decays the state and scales the input, as if tokens were evenly spaced. Here a visit is an
event: the state decays over the real time since the last visit, then the visit writes into it.

    Δ_t  = softplus(W_Δ x_t + b_Δ)                       the token's step (how much it writes)
    Δ'_t = Δ_t + softplus(w_g) ⊙ g_t / τ                 the decay step, per channel
    h_t  = exp(Δ'_t A) h_{t-1} + Δ_t B(x_t) x_t,      y_t = (C(x_t) · h_t + D x_t) ⊙ silu(z_t)

So the state forgets more over a long gap than over a short one (A < 0), at a learned rate per
channel, and how strongly a visit writes does not depend on its gap. Feeding the gap into the
single step of standard Mamba instead (Δ = softplus(...) + rate g) would make a visit after a
long gap write more than one after a short gap, and Δ = softplus(...) g would erase the first
visit (g_0 = 0). The state starts at 0, so g_0 has no effect. `selective_scan` takes one step,
so it gets Δ' and the input x Δ / Δ'; D and the gate z are applied outside the scan for that
reason.

Padding sits at the end of each row (mask False). Padded steps get Δ' = 0 and input 0, so the
state passes through them unchanged, and every operation is per token or causal, so the outputs
at real visits do not depend on the padding at all.

Why no causal conv1d (standard Mamba puts a width-4 depthwise conv before the scan): a conv over
token positions mixes visit t with visit t-1 with the same weights whether they are a month or
five years apart, which is exactly the even-spacing assumption this block removes; histories
are tens of visits long, so the scan alone carries the temporal mixing. It also keeps the CUDA
path free of the causal-conv1d package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .selective_scan import selective_scan

LOG_STD_MIN, LOG_STD_MAX = -7.0, 2.0  # keeps the posterior's std in [1e-3, 7.4]


@dataclass(frozen=True, eq=False)  # eq on tensors would be ambiguous
class Posterior:
    """Diagonal Gaussian q(s | history) over a patient's initial state and personal parameters.

    mean, log_std: (B, D). Which of the D coordinates are d(t0), the anatomy code a or the
    parameters theta is the caller's layout.
    """

    mean: Tensor
    log_std: Tensor

    @property
    def std(self) -> Tensor:
        return self.log_std.exp()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n reparameterised draws (n, B, D): mean + std * eps, so gradients reach mean and std.

        eps is drawn on the generator's device and moved: a seeded CPU generator gives the same
        draws to a posterior on the GPU as on the CPU.
        """
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn((n, *self.mean.shape), generator=generator, dtype=self.mean.dtype, device=device)
        eps = eps.to(self.mean.device)
        return self.mean + self.std * eps

    def log_prob(self, s: Tensor) -> Tensor:
        """log q(s) summed over D: s (..., B, D) -> (..., B)."""
        return self.normal.log_prob(s).sum(-1)

    @property
    def normal(self) -> torch.distributions.Normal:
        """The same distribution as torch's Normal (for kl_divergence against a prior)."""
        return torch.distributions.Normal(self.mean, self.std)


class TimeAwareMambaBlock(nn.Module):
    """Mamba mixer over visit tokens whose discretisation step sees the time gaps.

    (B, L, d_model) -> (B, L, d_model). d_inner = expand * d_model channels, each with d_state
    states. time_scale (years) is τ in the decay step Δ' = softplus(W_Δ x + b_Δ) + softplus(w_g) g / τ.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: int = 2,
        *,
        time_scale: float = 1.0,
        dt_min: float = 1e-2,
        dt_max: float = 0.5,
        rate_min: float = 0.05,
        rate_max: float = 0.5,
        backend: str = "auto",
    ):
        super().__init__()
        d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.d_state = d_state
        self.time_scale = time_scale
        self.backend = backend
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)  # -> (x, z)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)  # -> (Δ low-rank, B, C)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        # As mamba-ssm, the token step softplus(b_Δ) starts log-uniform in [dt_min, dt_max], but
        # larger (mamba: 1e-3 to 0.1): a history has tens of visits, not thousands of tokens, and
        # with steps that small the first visits barely write into the state. A = -exp(A_log)
        # = -(1, ..., N) gives each channel a ladder of decay rates.
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(_inverse_softplus(dt))
        rate = torch.exp(torch.rand(d_inner) * (math.log(rate_max) - math.log(rate_min)) + math.log(rate_min))
        # softplus(w_g) per year of gap: with |A| in 1..N the channels' memories span weeks to decades.
        self.w_gap = nn.Parameter(_inverse_softplus(rate))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))

    def forward(self, x: Tensor, gap: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, L, d_model), gap (B, L) years >= 0, mask (B, L) bool (False = end padding) -> (B, L, d_model).

        Outputs at padded positions are 0; NaN in padded x or gap is ignored.
        """
        mask = _check_history(x, gap, mask, "TimeAwareMambaBlock")
        return self._mix(x.masked_fill(~mask[..., None], 0.0), gap.masked_fill(~mask, 0.0), mask)

    def _mix(self, x: Tensor, gap: Tensor, mask: Tensor) -> Tensor:
        """forward without the checks, for clean inputs (padding already zero)."""
        keep = mask[..., None].to(x.dtype)
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, d_inner) each
        u = F.silu(u) * keep
        dt_low, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        write = F.softplus(self.dt_proj(dt_low))  # Δ (B, L, d_inner)
        decay = (write + F.softplus(self.w_gap) * (gap[..., None] / self.time_scale)) * keep  # Δ'
        # Δ' = 0 at padding: exp(0 A) = 1 and no input, the state passes unchanged. Δ' >= Δ, and
        # the clamp only guards 0/0 where softplus underflows.
        u_scan = u * write / decay.clamp_min(torch.finfo(decay.dtype).tiny)
        y = selective_scan(
            u_scan.transpose(1, 2),
            decay.transpose(1, 2),
            -torch.exp(self.A_log),
            B.transpose(1, 2),
            C.transpose(1, 2),
            backend=self.backend,
        ).transpose(1, 2)
        y = (y + self.D * u) * F.silu(z)
        return self.out_proj(y) * keep


class HistoryEncoder(nn.Module):
    """Visit tokens -> Gaussian posterior over the patient's initial state and parameters.

    (B, L, d_token), gaps (B, L), mask (B, L) -> Posterior with mean, log_std (B, d_out).
    An input projection, n_layers pre-norm residual TimeAwareMambaBlocks, a final norm, and a
    linear head read at each row's last real visit.
    """

    def __init__(
        self,
        d_token: int,
        d_out: int,
        d_model: int = 64,
        n_layers: int = 2,
        d_state: int = 16,
        *,
        expand: int = 2,
        time_scale: float = 1.0,
        backend: str = "auto",
    ):
        super().__init__()
        self.embed = nn.Linear(d_token, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.blocks = nn.ModuleList(
            TimeAwareMambaBlock(d_model, d_state, expand, time_scale=time_scale, backend=backend) for _ in range(n_layers)
        )
        self.norm_out = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 2 * d_out)

    def posterior(self, tokens: Tensor, gap: Tensor, mask: Tensor | None = None) -> Posterior:
        """tokens (B, L, d_token), gap (B, L) years since the previous visit (>= 0), mask (B, L) bool.

        Padding must sit at the end of each row, and each row needs at least one real visit.
        NaN in padded tokens or gaps is ignored.
        """
        mask = _check_history(tokens, gap, mask, "HistoryEncoder")
        gap = gap.masked_fill(~mask, 0.0)
        h = self.embed(tokens.masked_fill(~mask[..., None], 0.0))
        for norm, block in zip(self.norms, self.blocks):
            h = h + block._mix(norm(h), gap, mask)
        last = mask.sum(1) - 1  # index of each row's last real visit
        h = self.norm_out(h[torch.arange(h.shape[0], device=h.device), last])
        mean, log_std = self.head(h).chunk(2, dim=-1)
        return Posterior(mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX))

    def forward(self, tokens: Tensor, gap: Tensor, mask: Tensor | None = None) -> Posterior:
        """Calling the module is `posterior`."""
        return self.posterior(tokens, gap, mask)


def _check_history(x: Tensor, gap: Tensor, mask: Tensor | None, who: str) -> Tensor:
    """The mask (B, L) bool after checking shapes, end padding and gaps at real visits."""
    if x.dim() != 3 or x.shape[1] == 0:
        raise ValueError(f"{who}: tokens must be (B, L, features) with L >= 1, got shape {tuple(x.shape)}")
    if gap.shape != x.shape[:2]:
        raise ValueError(f"{who}: gap must be (B, L) = {tuple(x.shape[:2])}, got {tuple(gap.shape)}")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask.shape != x.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"{who}: mask must be bool (B, L) = {tuple(x.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
    if not mask[:, 0].all() or (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError(f"{who}: mask must mark each row's visits first and padding after (True...True False...False), with >= 1 visit per row")
    real_gap = gap[mask]
    if not torch.isfinite(real_gap).all() or (real_gap < 0).any():
        raise ValueError(f"{who}: gap must be finite and >= 0 (years) at every real visit, got min {real_gap.min().item()}")
    return mask


def _inverse_softplus(y: Tensor) -> Tensor:
    return y + torch.log(-torch.expm1(-y))
