"""The change code: what the scan decoder generates, and how it becomes a scan.

The change from a reference scan to the scan at time t is held as a low-resolution code on a
coarse grid (e.g. 16 x 16 for a 64 x 64 image): `dims` channels of a stationary velocity field,
then one intensity-residual channel per image channel. Decoding upsamples both to the image,
integrates the velocity into a diffeomorphic displacement (scaling and squaring) and applies
`twin.priors.deformation.masked_change`: the reference warped, plus a bounded residual, and
nothing changed outside the body mask. A coarse code is cheap to generate and can only express
smooth change, which is what anatomy does between visits.

    code       (B, dims + C, *grid)    velocity components first (voxels of the full image,
                                       component i along array axis i), then the residual (logits
                                       of residual_bound * tanh)
    reference  (B or 1, C, *space)     mask (B or 1, *space), nonzero = inside
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from twin.priors.deformation import integrate_velocity, jacobian_determinant, masked_change


def code_channels(dims: int, channels: int) -> int:
    """Channels of a change code: dims velocity components, then one residual per image channel."""
    if dims not in (2, 3) or channels < 1:
        raise ValueError(f"need dims 2 or 3 and channels >= 1, got dims={dims} and channels={channels}")
    return dims + channels


def code_grid(space: tuple[int, ...], factor: int) -> tuple[int, ...]:
    """The code's grid for an image of shape `space`: ceil(n / factor) along each axis."""
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
    return tuple(math.ceil(n / factor) for n in space)


def upsample(field: Tensor, space: tuple[int, ...]) -> Tensor:
    """(B, K, *grid) -> (B, K, *space) by (bi/tri)linear interpolation, align_corners=False.

    Velocity components are stored in full-resolution voxels already, so they are not rescaled.
    """
    if field.dim() - 2 != len(space) or len(space) not in (2, 3):
        raise ValueError(f"field must be (B, K, *grid) with {len(space)} spatial axes for space {tuple(space)}, "
                         f"got shape {tuple(field.shape)}")
    mode = "bilinear" if len(space) == 2 else "trilinear"
    return F.interpolate(field, size=tuple(space), mode=mode, align_corners=False)


@dataclass(frozen=True)
class Decoded:
    """A decoded change code.

    scan          (B, C, *space)       the reference moved and changed; the reference outside the mask
    displacement  (B, ndim, *space)    the warp's u in voxels: scan(x) shows the reference at x + u(x)
    jacobian      (B, *space)          det J of x -> x + u(x) (reference volume per output voxel)
    """

    scan: Tensor
    displacement: Tensor
    jacobian: Tensor


def decode(reference: Tensor, code: Tensor, mask: Tensor, *, residual_bound: float, steps: int = 6,
           method: str = "grid_sample") -> Decoded:
    """The scan a change code (B, dims + C, *grid) makes of the reference (B or 1, C, *space).

    mask (B or 1, *space); residual_bound bounds |scan - warped reference| in image units;
    steps: squarings of the scaling and squaring. method: the warp's, as in
    `twin.priors.deformation.warp`: "grid_sample" (fast) reproduces the reference under a zero
    code only to rounding (~1e-6 relative) inside the mask, "reference" exactly. Outside the
    mask the scan is the reference bit for bit with either.
    """
    _check(reference, code, mask)
    dims = reference.dim() - 2
    space = tuple(reference.shape[2:])
    velocity = upsample(code[:, :dims], space)
    displacement = integrate_velocity(velocity, steps, mask, method=method)
    residual = upsample(code[:, dims:], space)
    scan = masked_change(reference, displacement, residual, mask, residual_bound, method=method)
    return Decoded(scan=scan, displacement=displacement, jacobian=jacobian_determinant(displacement))


def zero_code(batch: int, dims: int, channels: int, grid: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """The code of no change: (batch, dims + channels, *grid) zeros."""
    if len(grid) != dims:
        raise ValueError(f"grid must have {dims} axes, got {tuple(grid)}")
    return torch.zeros(batch, code_channels(dims, channels), *grid, dtype=dtype)


def _check(reference: Tensor, code: Tensor, mask: Tensor) -> None:
    dims = reference.dim() - 2
    if dims not in (2, 3):
        raise ValueError(f"reference must be (B, C, y, x) or (B, C, z, y, x), got shape {tuple(reference.shape)}")
    B, C, space = code.shape[0], reference.shape[1], tuple(reference.shape[2:])
    if code.dim() != reference.dim() or code.shape[1] != code_channels(dims, C):
        raise ValueError(f"code must be (B, {dims} + {C}, *grid) for a reference of shape {tuple(reference.shape)}, "
                         f"got shape {tuple(code.shape)}")
    if reference.shape[0] not in (1, B):
        raise ValueError(f"reference batch must be {B} (the code's) or 1, got shape {tuple(reference.shape)}")
    if mask.dim() != 1 + dims or tuple(mask.shape[1:]) != space or mask.shape[0] not in (1, B):
        raise ValueError(f"mask must be (B, *space) with B={B} (or 1) and space {space}, got shape {tuple(mask.shape)}")
    if code.dtype != reference.dtype:
        raise ValueError(f"code and reference must share a dtype, got {code.dtype} and {reference.dtype}")
