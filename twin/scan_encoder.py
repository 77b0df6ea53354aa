"""Scan encoder: one observed scan, with its channels, into the patient state s = (a, d).

The dynamics keep a static anatomy/identity code a and a low-dimensional dynamic disease state
d(t) (DESIGN.md, "State"). This module reads one scan (B, C, *space), 2D (y, x) or 3D (z, y, x),
into both: `ScanCode(anatomy (B, anatomy_dim), state (B, state_dim))`. `tokens` lays a cohort's
visits (B, L, C, *space) out as visit tokens (B, L, anatomy_dim + state_dim) for
`twin.dynamics.HistoryEncoder`, encoding only the observed visits.

Nothing here separates a from d by construction: both heads read the same pooled features, and
it is the training objective (a shared across a patient's visits, d following the ODE) that
makes one static and the other dynamic.

Pipeline, per scan:

1. Robust scaling inside the brain mask M, per channel c:
       x'_c = (x_c - median_M(x_c)) / IQR_M(x_c)                         inside M,   0 outside
   so scanner gain and bias-field level (x -> alpha x + beta, alpha > 0) leave x' unchanged.
   Where the IQR is 0 (more than half the voxels share one value, e.g. a binary lesion channel)
   the range max_M - min_M stands in, and 1 where the channel is constant (x' = 0 then).
2. Convolutions on (x', M): M enters as an extra channel, because after step 1 "0" means "the
   median tissue" inside and "nothing" outside; the network must tell them apart. A stem conv,
   then `depth` levels of (stride-2 conv, conv), each conv -> GroupNorm -> SiLU, channels
   doubling from 2 * width up to 8 * width. GroupNorm, not BatchNorm: a scan's code must not
   depend on the other scans in its batch.
3. Masked global average pooling: the last feature map averaged with weights = the fraction
   of each cell covered by M, so cells wholly outside the brain do not count.
4. Two linear heads: anatomy and state.

Voxels outside M never reach the network (step 1 replaces them, NaN included, with 0 before
any arithmetic), so the code is exactly the same whatever lies outside the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ScanCode", "ScanEncoder", "robust_scale"]

_MAX_MULT = 8  # channel cap, in units of `width`


@dataclass(frozen=True, eq=False)  # eq on tensors would be ambiguous
class ScanCode:
    """anatomy (B, anatomy_dim): the static identity code a; state (B, state_dim): the disease state d."""

    anatomy: Tensor
    state: Tensor

    @property
    def token(self) -> Tensor:
        """(B, anatomy_dim + state_dim): anatomy then state, the layout of a visit token."""
        return torch.cat([self.anatomy, self.state], dim=-1)


def robust_scale(x: Tensor, mask: Tensor) -> Tensor:
    """(x - median) / IQR per scan and channel over the mask, 0 outside: x (B, C, *space), mask (B, *space) bool.

    Falls back to the range where the IQR is 0, and to 1 where the channel is constant over the
    mask. Values outside the mask (NaN included) are never read. Every scan needs >= 1 voxel in
    its mask.
    """
    inside = mask[:, None].expand_as(x)
    low, q25, median, q75, high = _masked_quantiles(x, inside, (0.0, 0.25, 0.5, 0.75, 1.0))
    iqr, span = q75 - q25, high - low
    scale = torch.where(iqr > 0, iqr, torch.where(span > 0, span, torch.ones_like(span)))
    shape = (*x.shape[:2], *([1] * (x.dim() - 2)))
    median, scale = median.reshape(shape), scale.reshape(shape)
    # the inner where keeps what lies outside the mask (NaN too) out of the arithmetic, where
    # even a masked NaN would make the gradient NaN
    scaled = (torch.where(inside, x, median) - median) / scale
    return torch.where(inside, scaled, torch.zeros_like(scaled))


class ScanEncoder(nn.Module):
    """Scans (B, C, *space) and brain masks (B, *space) -> ScanCode(anatomy (B, anatomy_dim), state (B, state_dim)).

    dims: 2 for (B, C, H, W), 3 for (B, C, D, H, W). The last feature map is space / 2**depth
    (rounded up), so 64^3 with depth 4 pools over 4^3 cells.
    """

    def __init__(self, in_channels: int, dims: int = 2, width: int = 16, depth: int = 4, anatomy_dim: int = 16,
                 state_dim: int = 4):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"ScanEncoder: dims must be 2 or 3, got {dims!r}")
        for name, value, least in (("in_channels", in_channels, 1), ("width", width, 1), ("depth", depth, 1),
                                   ("anatomy_dim", anatomy_dim, 0), ("state_dim", state_dim, 0)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"ScanEncoder: {name} must be an integer >= {least}, got {value!r}")
        self.in_channels, self.dims = in_channels, dims
        self.anatomy_dim, self.state_dim = anatomy_dim, state_dim
        Conv = nn.Conv2d if dims == 2 else nn.Conv3d

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(Conv(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(_groups(c_out), c_out),
                                 nn.SiLU())

        layers = [block(in_channels + 1, width, 1)]  # + 1: the mask channel
        c = width
        for level in range(depth):
            c_next = width * min(2 ** (level + 1), _MAX_MULT)
            layers += [block(c, c_next, 2), block(c_next, c_next, 1)]
            c = c_next
        self.features = nn.Sequential(*layers)
        self.anatomy_head = nn.Linear(c, anatomy_dim)
        self.state_head = nn.Linear(c, state_dim)

    @property
    def token_dim(self) -> int:
        """Width of a visit token: anatomy_dim + state_dim (the history encoder's d_token)."""
        return self.anatomy_dim + self.state_dim

    def forward(self, x: Tensor, mask: Tensor | None = None) -> ScanCode:
        """x (B, C, *space) finite inside the mask; mask (B, *space) bool, None = everywhere -> ScanCode."""
        mask = self._check(x, mask)
        h = self.features(torch.cat([robust_scale(x, mask), mask[:, None].to(x.dtype)], dim=1))
        # weight of each last-level cell = the fraction of its footprint inside the mask
        pool = F.adaptive_avg_pool2d if self.dims == 2 else F.adaptive_avg_pool3d
        w = pool(mask[:, None].to(h.dtype), h.shape[2:])
        pooled = (h * w).flatten(2).sum(-1) / w.flatten(2).sum(-1)  # (B, c)
        return ScanCode(self.anatomy_head(pooled), self.state_head(pooled))

    def tokens(self, x: Tensor, observed: Tensor, mask: Tensor | None = None) -> Tensor:
        """Visit tokens (B, L, token_dim) from scans x (B, L, C, *space), observed (B, L) bool, mask (B, L, *space) bool.

        Only observed visits are encoded (their scans are gathered into one batch); a missing
        visit's token is 0 and its scan, NaN or not, is never read.
        """
        lead = 2 + 1 + self.dims
        if x.dim() != lead or observed.shape != x.shape[:2] or observed.dtype != torch.bool:
            raise ValueError(f"ScanEncoder.tokens: x must be (B, L, C, *space) with {self.dims} spatial dims and observed "
                             f"bool (B, L), got x {tuple(x.shape)} and observed {observed.dtype} {tuple(observed.shape)}")
        if mask is not None and (mask.shape != x.shape[:2] + x.shape[3:] or mask.dtype != torch.bool):
            raise ValueError(f"ScanEncoder.tokens: mask must be bool (B, L, *space) = {tuple(x.shape[:2] + x.shape[3:])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        out = x.new_zeros((*x.shape[:2], self.token_dim))
        if observed.any():  # an empty batch must not reach the convs
            out = out.index_put((observed,), self(x[observed], None if mask is None else mask[observed]).token)
        return out

    def _check(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """The mask (B, *space) bool after checking shapes, a non-empty mask per scan and finite values inside it."""
        if x.dim() != 2 + self.dims or x.shape[1] != self.in_channels:
            want = "(B, C, H, W)" if self.dims == 2 else "(B, C, D, H, W)"
            raise ValueError(f"ScanEncoder: x must be {want} with C = {self.in_channels}, got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("ScanEncoder: x holds no scans (B = 0)")
        if mask is None:
            mask = torch.ones((x.shape[0], *x.shape[2:]), dtype=torch.bool, device=x.device)
        if mask.shape != (x.shape[0], *x.shape[2:]) or mask.dtype != torch.bool:
            raise ValueError(f"ScanEncoder: mask must be bool (B, *space) = {(x.shape[0], *x.shape[2:])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        empty = ~mask.flatten(1).any(1)
        if empty.any():
            raise ValueError("ScanEncoder: every scan needs >= 1 voxel in its mask; "
                             f"scans {empty.nonzero().flatten().tolist()} have none")
        bad = (~torch.isfinite(x) & mask[:, None]).flatten(1).any(1)
        if bad.any():
            raise ValueError("ScanEncoder: scans must be finite inside the mask; "
                             f"scans {bad.nonzero().flatten().tolist()} are not")
        return mask


def _masked_quantiles(x: Tensor, inside: Tensor, qs: tuple[float, ...]) -> list[Tensor]:
    """Quantiles (B, C) of x (B, C, *space) over the voxels where `inside`, interpolated linearly (numpy's default).

    A sort rather than torch.nanquantile, which refuses rows over 2^24 voxels (256^3).
    """
    n = inside.flatten(2).sum(-1, keepdim=True)  # (B, C, 1), >= 1
    ordered = torch.where(inside, x, torch.inf).flatten(2).sort(-1).values  # outside sorts last
    out = []
    for q in qs:
        pos = q * (n - 1).to(x.dtype)
        lo = pos.floor().long()
        hi = torch.minimum(lo + 1, n - 1)
        a, b = ordered.gather(-1, lo), ordered.gather(-1, hi)
        out.append((a + (pos - lo.to(x.dtype)) * (b - a)).squeeze(-1))
    return out


def _groups(channels: int) -> int:
    """GroupNorm groups of >= 4 channels where possible: at a 1-voxel map a group of 1 would normalise to 0."""
    return next(g for g in range(min(8, channels // 4), 0, -1) if channels % g == 0) if channels >= 4 else 1
