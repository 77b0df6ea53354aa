"""The scan decoder's network: a small conditional U-Net, the `denoiser` twin.diffusion samples with.

It denoises the scan at time t given the nearest observed scan (the reference), the gap in
years from it, and the patient state at t from the dynamics:

    denoiser(x_t, t, condition) -> model_output          x_t, model_output (B, C, *space)

The reference enters as extra input channels, concat(x_t, reference), because it is an image
aligned voxel by voxel with the output; the diffusion step t, the gap and the state are vectors
and enter every residual block by FiLM, h <- GroupNorm(h) (1 + scale) + shift (Perez et al.
2018; the "scale-shift norm" of Dhariwal & Nichol 2021).

The structural prior: the diffusion runs on the CHANGE from the reference scan, not on the scan,

    x_0 = mask_outside(scan - reference, mask)            (`change_from_reference`)
    scan = reference + mask_outside(x_0, mask)            (`scan_from_change`)

so "copy the reference" is the zero change, and outside the brain mask the caller zeroes the
change (nothing changes there, bit for bit). The last convolution starts at zero, so an
untrained network outputs exactly 0: with x0-prediction that is "no change"; with v- or
eps-prediction it is the neutral start training moves away from. Either way training begins
from a network that adds nothing to the reference rather than from random structure.

Pure torch, no I/O. Shapes: space = (y, x) with dims=2 or (z, y, x) with dims=3. Any spatial
size works: the input is zero-padded at the far end of each axis to a multiple of
2^(levels - 1) and the output cropped back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Condition", "ConditionalUNet", "mask_outside", "change_from_reference", "scan_from_change"]


@dataclass(frozen=True)
class Condition:
    """What the scan at time t is generated from; B items, each its own (sample, time, request).

    reference (B, C, *space): the nearest observed scan; gap (B,): years from the reference's
    visit to t (negative when the reference comes after t, as when filling a missed visit);
    state (B, S): the patient state at t; mask (B, *space) bool, or (1, *space) for all items:
    True inside the brain (body) mask, where change may happen.
    """

    reference: Tensor
    gap: Tensor
    state: Tensor
    mask: Tensor

    def __post_init__(self):
        ref = self.reference
        if not (isinstance(ref, Tensor) and ref.dim() in (4, 5) and ref.is_floating_point()):
            raise ValueError(f"Condition.reference must be a float tensor (B, C, y, x) or (B, C, z, y, x), "
                             f"got {_describe(ref)}")
        B, space = ref.shape[0], tuple(ref.shape[2:])
        if not (isinstance(self.gap, Tensor) and tuple(self.gap.shape) == (B,) and self.gap.is_floating_point()):
            raise ValueError(f"Condition.gap must be a float tensor (B,) = ({B},), got {_describe(self.gap)}")
        if not (isinstance(self.state, Tensor) and self.state.dim() == 2 and self.state.shape[0] == B
                and self.state.is_floating_point()):
            raise ValueError(f"Condition.state must be a float tensor (B, S) with B={B}, got {_describe(self.state)}")
        m = self.mask
        if not (isinstance(m, Tensor) and m.dtype == torch.bool and tuple(m.shape[1:]) == space
                and m.dim() == 1 + len(space) and m.shape[0] in (1, B)):
            raise ValueError(f"Condition.mask must be a bool tensor (B, *space) with B={B} (or 1) and space {space}, "
                             f"got {_describe(m)}")

    def __len__(self) -> int:
        return self.reference.shape[0]

    def take(self, index: Tensor | slice) -> Condition:
        """The items `index` selects (a mask of batch 1 is kept for all)."""
        mask = self.mask if self.mask.shape[0] == 1 else self.mask[index]
        return Condition(self.reference[index], self.gap[index], self.state[index], mask)

    def repeat(self, n: int) -> Condition:
        """n copies stacked along the batch, item i of copy k at k * B + i: K samples of every request."""
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"Condition.repeat needs an integer n >= 1, got {n!r}")

        def tile(a: Tensor) -> Tensor:
            return a.repeat(n, *([1] * (a.dim() - 1)))

        mask = self.mask if self.mask.shape[0] == 1 else tile(self.mask)
        return Condition(tile(self.reference), tile(self.gap), tile(self.state), mask)


def mask_outside(x: Tensor, mask: Tensor) -> Tensor:
    """x (B, C, *space) with exact zeros where mask (B or 1, *space, bool) is False (NaN there too)."""
    space = tuple(x.shape[2:])
    if not (mask.dtype == torch.bool and mask.dim() == x.dim() - 1 and tuple(mask.shape[1:]) == space
            and mask.shape[0] in (1, x.shape[0])):
        raise ValueError(f"mask must be a bool tensor (B, *space) with B={x.shape[0]} (or 1) and space {space}, "
                         f"got {_describe(mask)}")
    return torch.where(mask[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def change_from_reference(scan: Tensor, condition: Condition) -> Tensor:
    """The diffusion's x_0: (scan - reference) inside the mask, 0 outside; scan (B, C, *space)."""
    if scan.shape != condition.reference.shape:
        raise ValueError(f"scan must be shaped like the reference {tuple(condition.reference.shape)}, "
                         f"got {tuple(scan.shape)}")
    return mask_outside(scan - condition.reference, condition.mask)


def scan_from_change(change: Tensor, condition: Condition) -> Tensor:
    """reference + change inside the mask; outside it the reference, bit for bit; change (B, C, *space)."""
    ref = condition.reference
    if change.shape != ref.shape:
        raise ValueError(f"change must be shaped like the reference {tuple(ref.shape)}, got {tuple(change.shape)}")
    mask_outside(change, condition.mask)  # checks the mask against change
    return torch.where(condition.mask[:, None], ref + change, ref)


class ConditionalUNet(nn.Module):
    """(x_t (B, C, *space), t (B,), Condition) -> (B, C, *space): the v/eps/x0 prediction of the change.

    A U-Net with `levels` resolutions of widths width * 2^i, one FiLM residual block per level
    on the way down and up (GroupNorm, SiLU, 3x3[x3] convolutions), a middle block, stride-2
    convolutions down and nearest-neighbour upsampling plus a convolution up, skips by
    concatenation. Input channels: C + C_ref (x_t and the reference; C_ref = `reference_channels`,
    C by default, more when the reference carries extra aligned maps). The embedding that drives FiLM is
    e = MLP(sinusoid(t)) + MLP([gap, state]), both of size `time_embedding`.

    generator: initialises the weights (torch's default schemes) from an explicit generator;
    None draws from torch's global RNG, as nn modules do. The last convolution is zero either way.
    """

    def __init__(self, channels: int, dims: int = 2, width: int = 16, levels: int = 3, state_dim: int = 0,
                 time_embedding: int = 64, *, reference_channels: int | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        reference_channels = channels if reference_channels is None else reference_channels
        for name, value, low in (("channels", channels, 1), ("width", width, 1), ("levels", levels, 1),
                                 ("state_dim", state_dim, 0), ("reference_channels", reference_channels, 1)):
            if not (isinstance(value, int) and value >= low):
                raise ValueError(f"ConditionalUNet.{name} must be an integer >= {low}, got {value!r}")
        if dims not in (2, 3):
            raise ValueError(f"ConditionalUNet.dims must be 2 or 3, got {dims!r}")
        if not (isinstance(time_embedding, int) and time_embedding >= 2 and time_embedding % 2 == 0):
            raise ValueError(f"ConditionalUNet.time_embedding must be an even integer >= 2, got {time_embedding!r}")
        self.channels, self.dims, self.width, self.levels = channels, dims, width, levels
        self.state_dim, self.time_embedding = state_dim, time_embedding
        self.reference_channels = reference_channels
        E = time_embedding
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        widths = [width * 2**i for i in range(levels)]

        self.t_mlp = nn.Sequential(nn.Linear(E, E), nn.SiLU(), nn.Linear(E, E))
        self.c_mlp = nn.Sequential(nn.Linear(1 + state_dim, E), nn.SiLU(), nn.Linear(E, E))
        self.input = conv(channels + reference_channels, width, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        previous = width
        for i, w in enumerate(widths):
            self.down.append(_ResBlock(conv, previous, w, E))
            if i < levels - 1:
                self.downsample.append(conv(w, w, 3, stride=2, padding=1))
            previous = w
        self.middle = _ResBlock(conv, widths[-1], widths[-1], E)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, w in enumerate(widths):
            below = widths[i + 1] if i < levels - 1 else widths[-1]  # what arrives from the coarser level
            self.up.append(_ResBlock(conv, below + w, w, E))
            if i > 0:
                self.upsample.append(conv(w, w, 3, padding=1))
        self.output = nn.Sequential(nn.GroupNorm(_groups(width), width), nn.SiLU(), conv(width, channels, 3, padding=1))

        if generator is not None:
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
                    _default_init(module, generator)
        # training starts from "no change": the network's output is exactly 0 until it learns
        nn.init.zeros_(self.output[-1].weight)
        nn.init.zeros_(self.output[-1].bias)

    @property
    def config(self) -> dict:
        """The constructor's arguments, JSON-able (for a checkpoint's config)."""
        return {"channels": self.channels, "dims": self.dims, "width": self.width, "levels": self.levels,
                "state_dim": self.state_dim, "time_embedding": self.time_embedding,
                "reference_channels": self.reference_channels}

    def forward(self, x_t: Tensor, t: Tensor, condition: Condition) -> Tensor:
        """x_t (B, C, *space), t (B,) diffusion steps (long or float), condition for the same B -> (B, C, *space)."""
        self._check(x_t, t, condition)
        space = tuple(x_t.shape[2:])
        e = self.t_mlp(_sinusoid(t.to(x_t.dtype), self.time_embedding))
        e = e + self.c_mlp(torch.cat([condition.gap[:, None], condition.state], dim=1).to(x_t.dtype))

        h = torch.cat([x_t, condition.reference.to(x_t.dtype)], dim=1)
        multiple = 2 ** (self.levels - 1)
        pad = [(-n) % multiple for n in space]
        if any(pad):  # F.pad lists (before, after) pairs from the last axis backwards
            h = F.pad(h, [p for n in reversed(pad) for p in (0, n)])
        h = self.input(h)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, e)
            skips.append(h)
            if i < self.levels - 1:
                h = self.downsample[i](h)
        h = self.middle(h, e)
        for i in reversed(range(self.levels)):
            h = self.up[i](torch.cat([h, skips.pop()], dim=1), e)
            if i > 0:
                h = self.upsample[i - 1](F.interpolate(h, scale_factor=2, mode="nearest"))
        out = self.output(h)
        return out[(slice(None), slice(None), *(slice(0, n) for n in space))]

    def _check(self, x_t: Tensor, t: Tensor, condition: Condition) -> None:
        if not isinstance(condition, Condition):
            raise ValueError(f"condition must be a twin.denoiser.Condition, got {type(condition).__name__}")
        if x_t.dim() != 2 + self.dims or x_t.shape[1] != self.channels:
            axes = "y, x" if self.dims == 2 else "z, y, x"
            raise ValueError(f"x_t must be (B, {self.channels}, {axes}), got shape {tuple(x_t.shape)}")
        want = (x_t.shape[0], self.reference_channels, *x_t.shape[2:])
        if tuple(condition.reference.shape) != want:
            raise ValueError(f"condition.reference must be {want} (x_t's batch and space), "
                             f"got {tuple(condition.reference.shape)}")
        if tuple(t.shape) != (x_t.shape[0],):
            raise ValueError(f"t must be (B,) = ({x_t.shape[0]},), got shape {tuple(t.shape)}")
        if condition.state.shape[1] != self.state_dim:
            raise ValueError(f"condition.state must be (B, {self.state_dim}), got {tuple(condition.state.shape)}")


class _ResBlock(nn.Module):
    """h -> conv(SiLU(FiLM_e(GroupNorm(conv(SiLU(GroupNorm(h))))))) + skip(h); FiLM from the embedding e (B, E)."""

    def __init__(self, conv, cin: int, cout: int, embedding: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = conv(cin, cout, 3, padding=1)
        self.film = nn.Linear(embedding, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = conv(cout, cout, 3, padding=1)
        self.skip = conv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(e)).chunk(2, dim=1)
        view = (*scale.shape, *[1] * (h.dim() - 2))
        # 1 + scale: a zero FiLM output leaves the normalised features as they are
        h = self.norm2(h) * (1 + scale.view(view)) + shift.view(view)
        return self.conv2(F.silu(h)) + self.skip(x)


def _sinusoid(t: Tensor, size: int, max_period: float = 10_000.0) -> Tensor:
    """t (B,) -> (B, size): [cos(t w_k), sin(t w_k)], w_k = max_period^(-k / (size/2)) (Vaswani et al. 2017)."""
    half = size // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    angle = t[:, None] * w[None]
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)


def _groups(channels: int, most: int = 8) -> int:
    """The largest group count <= `most` that divides `channels` (GroupNorm needs a divisor)."""
    return max(g for g in range(1, min(most, channels) + 1) if channels % g == 0)


def _default_init(module: nn.Module, generator: torch.Generator) -> None:
    """torch's own init for Linear and ConvNd (kaiming_uniform_ with a = sqrt(5), uniform bias), from `generator`."""
    nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
    if module.bias is not None:
        fan_in = module.weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(module.bias, -bound, bound, generator=generator)


def _describe(a) -> str:
    return f"{a.dtype} of shape {tuple(a.shape)}" if isinstance(a, Tensor) else type(a).__name__
