"""The scan decoder: a conditional diffusion model over change codes, around a mean change that the state sets.

A scan at time t is generated from the nearest observed scan (the reference, at t_ref) as a
change code c (`twin.change_code`: a low-resolution velocity field, integrated into a
diffeomorphism, plus a bounded intensity residual; nothing changes outside the brain mask):

    c = mu + sigma * e,      mu = sum_k (y_k(t) - y_k(t_ref)) B_k(ref, y(t_ref))
    e ~ p(e | ref, mu, y(t_ref), y(t) - y(t_ref), t - t_ref)              (the diffusion model)

- mu is the change the dynamics explain: y is the patient state in standardised biomarker units
  (the biomarker twin's noise-free draws), and the change fields B_k (one per state dimension)
  are read off the reference scan and the stage there by a small convolutional network
  (`ChangeBasis`). Linear in the state change by construction: no progression, no change, and a
  twice larger progression is a twice larger velocity. (A drift per year beside them was tried
  and dropped: on atrophy it learned registration artefacts, on glioma it added nothing.) Fitted by least squares on the codes of
  observed visit pairs (`twin.registration`), so the noise of single registrations averages out
  over the cohort instead of being learned.
- e is what the state does not explain (registration and acquisition variability, the shape of
  a lesion's growth): a conditional diffusion model (`ConditionalUNet` on the code grid, v-
  prediction, cosine schedule) learns its distribution, conditioned on the reference (pooled to
  the code grid), mu, the state and the gap; `DPMSolverSampler` draws it in `sampler_steps`
  steps (20 by default). sigma (per code channel) whitens the residual codes for the diffusion.

Pure torch; training takes tensors (the scan twin assembles them from a cohort).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twin.errors import InputError
from twin.settings import known_settings

from .change_code import code_channels, decode
from .denoiser import Condition, ConditionalUNet
from .diffusion import DPMSolverSampler, NoiseSchedule, sample, training_loss


@dataclass(frozen=True)
class DecoderConfig:
    """The scan decoder's shape and training.

    factor: image voxels per code cell along each axis; residual_bound: largest intensity change
    the residual may paint (the scans' units); basis_width / basis_iterations: the mean-change
    network and its Adam steps; width / levels / iterations: the diffusion's U-Net and its
    steps; batch, lr: both trainings; timesteps, sampler_steps: the diffusion schedule and the
    number of DPM-Solver++ steps at sampling; seed: initialisation and training draws.
    """

    factor: int = 4
    residual_bound: float = 1.0
    basis_width: int = 16
    basis_iterations: int = 1000
    width: int = 16
    levels: int = 2
    iterations: int = 1500
    batch: int = 32
    lr: float = 2e-3
    timesteps: int = 1000
    sampler_steps: int = 20
    seed: int = 0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            low = 0 if f.name == "seed" else 1
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise InputError(f"expected an integer >= {low}, got {value!r}", source="DecoderConfig", field=f.name)
            if f.type == "float" and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InputError(f"expected a finite number > 0, got {value!r}", source="DecoderConfig", field=f.name)
        if self.sampler_steps > self.timesteps:
            raise InputError(f"expected at most timesteps={self.timesteps} steps, got {self.sampler_steps}",
                             source="DecoderConfig", field="sampler_steps")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping, *, source: str = "DecoderConfig") -> DecoderConfig:
        """From a mapping (JSON); unknown keys raise, missing ones take their defaults."""
        return cls(**known_settings(cls, d, source=source))


@dataclass(frozen=True)
class Pairs:
    """Training pairs (N of them): a reference scan, the state at both visits, and the fitted code.

    reference (N, C, *space); mask (N, *space) bool; gap (N,) years t - t_ref; state_ref,
    state_change (N, B) standardised biomarker state at t_ref and its change to t;
    code (N, dims + C, *grid) from registering the reference to the scan at t.
    """

    reference: Tensor
    mask: Tensor
    gap: Tensor
    state_ref: Tensor
    state_change: Tensor
    code: Tensor


class ChangeBasis(nn.Module):
    """Reference scan (B, C, *space), mask and state at the reference (B, K) -> change fields
    (B, K, code channels, *grid).

    The scan enters on the code grid, as each cell's mean, its variance (edges: where the
    tissue boundaries that move lie) and its brain fraction, with the state; dilated 3x3 convolutions then
    widen the view to the whole brain slice (ventricles push tissue centimetres away). Working
    on the coarse grid keeps training cheap on a CPU. The last layer starts at zero: an
    untrained basis predicts no change.
    """

    def __init__(self, channels: int, dims: int, state_dim: int, factor: int, width: int = 32):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.dims, self.channels, self.state_dim, self.factor = dims, channels, state_dim, factor
        self.out_channels = code_channels(dims, channels)
        layers: list[nn.Module] = [conv(2 * channels + 1 + state_dim, width, 3, padding=1), nn.SiLU()]
        for dilation in (1, 2, 4, 1):
            layers += [conv(width, width, 3, padding=dilation, dilation=dilation), nn.SiLU()]
        layers.append(conv(width, state_dim * self.out_channels, 1))
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, reference: Tensor, mask: Tensor, state_ref: Tensor) -> Tensor:
        mean = pool_to_grid(reference, self.factor)
        variance = (pool_to_grid(reference * reference, self.factor) - mean * mean).clamp(min=0)
        inside = pool_to_grid(mask[:, None].to(reference.dtype), self.factor)
        # the stage at the reference, as constant maps: how far a tumour spreads per unit of growth
        # depends on how large it already is
        stage = state_ref.to(mean.dtype).reshape(*state_ref.shape, *[1] * self.dims).expand(-1, -1, *mean.shape[2:])
        h = self.net(torch.cat([mean, variance, inside, stage], dim=1))
        return h.reshape(h.shape[0], self.state_dim, self.out_channels, *h.shape[2:])

    @staticmethod
    def mean(basis: Tensor, state_change: Tensor) -> Tensor:
        """mu (B, code channels, *grid) = sum_k dy_k B_k, for basis (B, K, ...) and dy (B, K)."""
        return torch.einsum("bk,bk...->b...", state_change.to(basis.dtype), basis)


def pool_to_grid(x: Tensor, factor: int) -> Tensor:
    """(B, K, *space) averaged over each code cell -> (B, K, *grid); a ragged edge pads with zeros."""
    if factor == 1:
        return x
    pad = [p for n in reversed(x.shape[2:]) for p in (0, (-n) % factor)]
    pool = F.avg_pool2d if x.dim() == 4 else F.avg_pool3d
    return pool(F.pad(x, pad), factor)


class ScanDecoder(nn.Module):
    """The mean-change basis, the residual diffusion and their scales; see the module notes."""

    def __init__(self, channels: int, dims: int, state_dim: int, config: DecoderConfig = DecoderConfig()):
        super().__init__()
        self.channels, self.dims, self.state_dim, self.config = channels, dims, state_dim, config
        k = code_channels(dims, channels)
        generator = torch.Generator().manual_seed(config.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.basis = ChangeBasis(channels, dims, state_dim, config.factor, config.basis_width)
        self.denoiser = ConditionalUNet(k, dims, config.width, config.levels, state_dim=2 * state_dim,
                                        reference_channels=channels + 1 + k, generator=generator)
        self.register_buffer("sigma", torch.ones(k))  # per code channel scale of the residual codes
        self.schedule = NoiseSchedule(T=config.timesteps)

    @property
    def code_channels(self) -> int:
        return code_channels(self.dims, self.channels)

    # ---- the parts of one draw ----------------------------------------------------------------

    def _grid_reference(self, reference: Tensor, mask: Tensor) -> Tensor:
        """The reference and mask averaged over each code cell: (B, C + 1, *grid)."""
        return pool_to_grid(torch.cat([reference, mask[:, None].to(reference.dtype)], dim=1), self.config.factor)

    def _condition(self, reference, mask, mu, state_ref, state_change, gap) -> Condition:
        grid_ref = torch.cat([self._grid_reference(reference, mask), mu / self.sigma.view(1, -1, *[1] * self.dims)], 1)
        state = torch.cat([state_ref, state_change], dim=1)
        grid_mask = torch.ones((1, *grid_ref.shape[2:]), dtype=torch.bool)
        return Condition(grid_ref, gap.to(grid_ref.dtype), state.to(grid_ref.dtype), grid_mask)

    def mean_code(self, reference: Tensor, mask: Tensor, state_ref: Tensor, state_change: Tensor) -> Tensor:
        """mu (B, code channels, *grid): the change the state explains (see the module notes)."""
        return self.basis.mean(self.basis(reference, mask, state_ref), state_change)

    @torch.no_grad()
    def sample_codes(self, reference: Tensor, mask: Tensor, state_ref: Tensor, state_change: Tensor, gap: Tensor,
                     generator: torch.Generator, *, x_T: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One draw per item: (code, mu), each (B, code channels, *grid); code = mu + a diffusion draw
        of the residual, mu the mean change the state explains."""
        mu = self.mean_code(reference, mask, state_ref, state_change)
        condition = self._condition(reference, mask, mu, state_ref, state_change, gap)
        sampler = DPMSolverSampler(self.schedule, self.config.sampler_steps)
        e = sample(self.denoiser, tuple(mu.shape), condition, sampler, generator, x_T=x_T)
        return mu + self.sigma.view(1, -1, *[1] * self.dims) * e, mu

    def decode(self, reference: Tensor, code: Tensor, mask: Tensor):
        """The scan a code makes of the reference (`twin.change_code.decode`)."""
        return decode(reference, code, mask, residual_bound=self.config.residual_bound)

    # ---- training -----------------------------------------------------------------------------

    def fit(self, pairs: Pairs, *, progress: bool = True, on_step=None) -> dict:
        """Fit the basis (least squares on the codes), the residual scale, then the diffusion.

        Returns the training record: final losses and the share of the codes' variance the
        mean change explains. Draws (batches, diffusion steps, noise) come from `config.seed`.
        """
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        n = pairs.code.shape[0]
        if n < 2:
            raise InputError(f"need at least 2 pairs of observed scans to train the decoder, got {n}",
                             source="cohort", field="image")
        shape = [1, -1, *[1] * self.dims]
        raw_scale = pairs.code.transpose(0, 1).reshape(self.code_channels, -1).std(dim=1).clamp(min=1e-6)
        weight = 1.0 / raw_scale.view(shape) ** 2

        def mean_change_loss(idx):  # least squares on the codes, each channel in units of its spread
            mu = self.mean_code(pairs.reference[idx], pairs.mask[idx], pairs.state_ref[idx], pairs.state_change[idx])
            return (weight * (mu - pairs.code[idx]) ** 2).mean()

        basis_loss = _train(self.basis, mean_change_loss, cfg.basis_iterations, n, cfg, generator,
                            "decoder: mean change", progress)

        with torch.no_grad():
            mu_all = torch.cat([self.mean_code(pairs.reference[i:i + 256], pairs.mask[i:i + 256], pairs.state_ref[i:i + 256],
                                               pairs.state_change[i:i + 256])
                                for i in range(0, n, 256)])
            residual = pairs.code - mu_all
            self.sigma.copy_(residual.transpose(0, 1).reshape(self.code_channels, -1).std(dim=1).clamp(min=1e-6))
            explained = 1 - float((residual ** 2).sum() / ((pairs.code - pairs.code.mean(0)) ** 2).sum())
            e = residual / self.sigma.view(shape)

        def denoising_loss(idx):
            condition = self._condition(pairs.reference[idx], pairs.mask[idx], mu_all[idx], pairs.state_ref[idx],
                                        pairs.state_change[idx], pairs.gap[idx])
            return training_loss(self.denoiser, e[idx], condition, self.schedule, generator)

        diffusion_loss = _train(self.denoiser, denoising_loss, cfg.iterations, n, cfg, generator,
                                "decoder: diffusion", progress, cosine=True, on_step=on_step)
        return {"basis_loss": basis_loss, "diffusion_loss": diffusion_loss, "explained_variance": explained,
                "pairs": n}


def _train(module: nn.Module, loss_of, iterations: int, n: int, cfg: DecoderConfig, generator: torch.Generator,
           desc: str, progress: bool, *, cosine: bool = False, on_step=None) -> float:
    """Adam on `loss_of(batch indices)` over random batches of the n pairs; the module is frozen after.
    Returns the last loss."""
    from tqdm.auto import tqdm

    optimiser = torch.optim.Adam(module.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, iterations) if cosine else None
    bar = tqdm(range(iterations), desc=desc, disable=not progress, leave=False)
    last = float("nan")
    for step in bar:
        loss = loss_of(torch.randint(0, n, (min(cfg.batch, n),), generator=generator))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if schedule is not None:
            schedule.step()
        last = loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{last:.4f}")
        if on_step is not None:
            on_step(step, last)
    for p in module.parameters():
        p.requires_grad_(False)
    return last
