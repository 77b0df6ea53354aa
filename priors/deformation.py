"""Anatomy as structure: change is a diffeomorphic deformation of the reference scan plus a bounded residual.

The decoder does not paint a new scan; it moves the reference one. A stationary velocity field v
is integrated by scaling and squaring into phi = exp(v), whose displacement u (phi(x) = x + u(x))
warps the reference; a bounded intensity residual adds what no motion explains (a new lesion);
outside the body mask nothing changes. The same fields give the plausibility checks: det J <= 0
is folding (topology broken), det J far from 1 is a volume change no physiology produces.

Conventions (2D and 3D, batched, differentiable, pure torch):
    image          (B, C, *space)      space = (y, x) or (z, y, x), the cohort's array order
    displacement   (B, ndim, *space)   in VOXELS; component i moves along array axis i, so in
                                       3D the components are (dz, dy, dx), in 2D (dy, dx)
    mask           (B, *space)         nonzero = inside (weights for the volume sums); B may be 1;
                   (B, R, *space)      R regions at once, reductions then give (B, R)

    warp(image, u)(x) = image(x + u(x))    pull-back: the output at x shows the reference at phi(x)

Voxel units make det J independent of the voxel size: with spacing S, J_mm = S J S^-1.

Which way volumes go. For the map phi(x) = x + u(x), |phi(M)| = sum over M of det J. For the
warp's displacement u that reads as "reference volume per output voxel": the output region M
shows the reference region phi(M), so volume_ratio(u, M) = old / new (det J > 1 where the anatomy
shrinks). The anatomy's own motion is the inverse map, exp(-v) for u = exp(v): volume_ratio of
that displacement with the reference mask is new / old. The functions below are neutral and
say "of the map x -> x + u(x)"; the caller picks which map it hands in.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._batch import per_patient

METHODS = ("grid_sample", "reference")


def warp(image: Tensor, displacement: Tensor, mode: str = "bilinear", padding: str = "border",
         method: str = "grid_sample") -> Tensor:
    """image (B, C, *space) sampled at x + displacement(x) (B, ndim, *space, voxels) -> (B, C, *space).

    B may be 1 on either side. method "grid_sample" is torch's fused kernel (any mode/padding it
    takes); "reference" is the same (bi/tri)linear interpolation written out with gathers
    (mode "bilinear", padding "border" or "zeros"), slower but exact where grid_sample is only
    exact to rounding: grid_sample maps voxel positions through normalised [-1, 1] coordinates
    and back, so a zero displacement reproduces the image only to about one ulp.
    """
    space = _check_field(displacement, "displacement")
    if image.dim() != displacement.dim() or tuple(image.shape[2:]) != space:
        raise ValueError(f"image must be (B, C, *space) with space {space} of the displacement, "
                         f"got image {tuple(image.shape)} and displacement {tuple(displacement.shape)}")
    if image.dtype != displacement.dtype:
        raise ValueError(f"image and displacement must share a dtype, got {image.dtype} and {displacement.dtype}")
    B = _batch(image, displacement)
    image, displacement = image.expand(B, *image.shape[1:]), displacement.expand(B, *displacement.shape[1:])
    if method == "grid_sample":
        return _warp_grid_sample(image, displacement, mode, padding)
    if method == "reference":
        return _warp_reference(image, displacement, mode, padding)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def compose(u: Tensor, v: Tensor, method: str = "grid_sample") -> Tensor:
    """Displacement of phi_u o phi_v: x -> x + v(x) + u(x + v(x)), (B, ndim, *space).

    v moves the point first, then u. With the pull-back warp this is warping by u, then by v:
    warp(warp(image, u), v) = warp(image, compose(u, v)) (up to interpolation).
    """
    return v + warp(u, v, method=method)


def integrate_velocity(velocity: Tensor, steps: int = 7, mask: Tensor | None = None,
                       method: str = "grid_sample") -> Tensor:
    """phi = exp(v) by scaling and squaring: velocity (B, ndim, *space) -> displacement (B, ndim, *space).

    d = v / 2^steps is a small step of the flow; composing it with itself `steps` times gives
    the time-1 flow. A smooth velocity gives a map with det J > 0 even where x + v(x) itself would
    fold, and exp(-v) is its inverse. With `mask` (B, *space) the velocity is zeroed outside
    before integrating (the flow then cannot carry points across the outside voxels, where it is
    at rest) and the result is zeroed outside after, so that the map is exactly the identity
    there and not merely up to interpolation rounding.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    _check_field(velocity, "velocity")
    inside = None if mask is None else _inside(mask, velocity)
    if inside is not None:
        velocity = torch.where(inside, velocity, torch.zeros_like(velocity))
    d = velocity / 2**steps
    for _ in range(steps):
        d = compose(d, d, method=method)
    if inside is not None:
        d = torch.where(inside, d, torch.zeros_like(d))
    return d


def jacobian_determinant(displacement: Tensor) -> Tensor:
    """det(I + grad u) of x -> x + u(x): (B, ndim, *space) -> (B, *space).

    Central differences inside, one-sided at the edges (torch.gradient): exact for affine u.
    """
    space = _check_field(displacement, "displacement")
    ndim = len(space)
    grads = torch.gradient(displacement, dim=tuple(range(2, 2 + ndim)))  # grads[j][:, i] = du_i / dx_j
    J = [[grads[j][:, i] + (1.0 if i == j else 0.0) for j in range(ndim)] for i in range(ndim)]
    if ndim == 2:
        return J[0][0] * J[1][1] - J[0][1] * J[1][0]
    return (J[0][0] * (J[1][1] * J[2][2] - J[1][2] * J[2][1])
            - J[0][1] * (J[1][0] * J[2][2] - J[1][2] * J[2][0])
            + J[0][2] * (J[1][0] * J[2][1] - J[1][1] * J[2][0]))


def volume_ratio(displacement: Tensor, mask: Tensor | None = None) -> Tensor:
    """|phi(M)| / |M| for phi(x) = x + u(x): sum over M of det J / sum over M of 1 -> (B,) or (B, R).

    A soft mask weights the sums. For the warp's displacement with the mask on the output grid
    this is old / new volume; for the anatomy's forward map (exp(-v)) with the reference mask it
    is new / old (see the module notes). An empty region gives NaN.
    """
    return _region_mean(jacobian_determinant(displacement), mask, displacement)


def log_volume_change(displacement: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of log det J of x -> x + u(x) over each region -> (B,) or (B, R).

    NaN if any voxel of the region folds (det J <= 0): a folded map has no log volume change,
    and NaN is what the plausibility checks flag. Multiply by the region's voxel count for the sum.
    """
    det = jacobian_determinant(displacement)
    positive = det > 0
    log_det = torch.where(positive, torch.log(torch.where(positive, det, torch.ones_like(det))),
                          torch.full_like(det, float("nan")))
    return _region_mean(log_det, mask, displacement)


def folding_fraction(displacement: Tensor, mask: Tensor | None = None) -> Tensor:
    """Share of the region's voxels where det J <= 0 (the map folds) -> (B,) or (B, R), in [0, 1]."""
    folded = (jacobian_determinant(displacement) <= 0).to(displacement.dtype)
    return _region_mean(folded, None if mask is None else mask != 0, displacement)


def smoothness_penalty(velocity: Tensor) -> Tensor:
    """Mean squared forward difference of each velocity component along each axis -> scalar >= 0.

    Forward, not central, differences: a voxel-wise checkerboard has zero central difference
    and would slip through. 0 exactly for a constant field.
    """
    space = _check_field(velocity, "velocity")
    total = velocity.new_zeros(())
    for axis in range(2, 2 + len(space)):
        total = total + torch.diff(velocity, dim=axis).square().mean()
    return total


def jacobian_penalty(displacement: Tensor, mask: Tensor | None = None, floor: float = 0.5, eps: float = 1e-2) -> Tensor:
    """Mean over the mask of relu(log floor - log det J)^2 -> scalar >= 0; 0 where every det J >= floor.

    log det is continued linearly below `eps` (value and slope of log at eps), so the penalty is
    finite and keeps pushing where det J <= 0 rather than stopping at a clamp. floor 0.5 (half
    or less of a voxel's volume per step) is far beyond any physiological change between visits.
    """
    if not 0 < eps < floor:
        raise ValueError(f"need 0 < eps < floor, got eps={eps} and floor={floor}")
    det = jacobian_determinant(displacement)
    # clamp inside the log as well as where(): the unused branch's gradient must not be inf or NaN
    log_det = torch.where(det >= eps, torch.log(torch.clamp(det, min=eps)), math.log(eps) + (det - eps) / eps)
    violation = torch.relu(math.log(floor) - log_det).square()
    if mask is None:
        weight = torch.ones_like(det)
    else:
        weight = _inside(mask, displacement, channel=False).to(det.dtype).expand_as(det)
    return (violation * weight).sum() / weight.sum().clamp(min=1)


def masked_change(reference: Tensor, displacement: Tensor, residual: Tensor, mask: Tensor,
                  residual_bound: float | Tensor, method: str = "grid_sample") -> Tensor:
    """The decoder's structural form: warp(reference, u) + residual_bound * tanh(residual) inside the mask.

    reference, residual (B, C, *space); displacement (B, ndim, *space) in voxels; mask (B, *space);
    residual_bound a number, (B,) or broadcastable to (B, C, *space). Outside the mask the result
    is the reference, bit for bit: the displacement and residual are zeroed there, and the output
    is selected there too, because grid_sample's identity is exact only to rounding.
    """
    if residual.shape[1:] != reference.shape[1:]:
        raise ValueError(f"residual must be shaped like the reference (B, C, *space), "
                         f"got {tuple(residual.shape)} and {tuple(reference.shape)}")
    if not isinstance(residual_bound, Tensor) and residual_bound < 0:
        raise ValueError(f"residual_bound must be >= 0, got {residual_bound}")
    inside_u = _inside(mask, displacement)
    displacement = torch.where(inside_u, displacement, torch.zeros_like(displacement))
    moved = warp(reference, displacement, method=method)
    inside = _inside(mask, moved)
    residual = torch.where(inside, residual, torch.zeros_like(residual))
    changed = moved + per_patient(residual_bound, moved) * torch.tanh(residual)
    return torch.where(inside, changed, reference.expand_as(changed))


def _check_field(field: Tensor, name: str) -> tuple[int, ...]:
    """Spatial shape of a (B, ndim, *space) field, checked."""
    ndim = field.dim() - 2
    if ndim not in (2, 3) or field.shape[1] != ndim:
        raise ValueError(f"{name} must be (B, 2, y, x) or (B, 3, z, y, x), got shape {tuple(field.shape)}")
    if min(field.shape[2:]) < 2:
        raise ValueError(f"{name} needs at least 2 voxels along each spatial axis, got shape {tuple(field.shape)}")
    if not field.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {field.dtype}")
    return tuple(field.shape[2:])


def _batch(a: Tensor, b: Tensor) -> int:
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(f"batch sizes must match (or one be 1), got {a.shape[0]} and {b.shape[0]}")
    return max(a.shape[0], b.shape[0])


def _identity(space: tuple[int, ...], like: Tensor) -> Tensor:
    """(1, ndim, *space): each voxel's own index, in array order."""
    axes = [torch.arange(n, dtype=like.dtype, device=like.device) for n in space]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def _warp_grid_sample(image: Tensor, displacement: Tensor, mode: str, padding: str) -> Tensor:
    space = displacement.shape[2:]
    ndim = len(space)
    # align_corners=True: -1 and +1 are the centres of the first and last voxel
    scale = torch.tensor([2.0 / (n - 1) for n in space], dtype=displacement.dtype, device=displacement.device)
    grid = (_identity(space, displacement) + displacement) * scale.view(1, ndim, *[1] * ndim) - 1
    grid = grid.movedim(1, -1).flip(-1)  # grid_sample wants the last axis as (x, y[, z])
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=True)


def _warp_reference(image: Tensor, displacement: Tensor, mode: str, padding: str) -> Tensor:
    if mode != "bilinear" or padding not in ("border", "zeros"):
        raise ValueError(f"the reference warp does mode 'bilinear' with padding 'border' or 'zeros', "
                         f"got mode {mode!r} and padding {padding!r}")
    B, C, *space = image.shape
    ndim = len(space)
    size = torch.tensor(space, device=image.device).view(1, ndim, *[1] * ndim)
    position = _identity(tuple(space), displacement) + displacement
    if padding == "border":  # as grid_sample: clip the sampling point into the grid
        position = torch.minimum(position.clamp(min=0), (size - 1).to(position.dtype))
    low = position.floor()
    frac = position - low
    low = low.long()
    strides = [math.prod(space[a + 1:]) for a in range(ndim)]
    flat = image.reshape(B, C, -1)
    out = torch.zeros_like(image)
    for corner in itertools.product((0, 1), repeat=ndim):
        index = low + torch.tensor(corner, device=image.device).view(1, ndim, *[1] * ndim)
        weight = torch.ones_like(frac[:, 0])
        for a, c in enumerate(corner):
            weight = weight * (frac[:, a] if c else 1 - frac[:, a])
        valid = ((index >= 0) & (index < size)).all(dim=1)
        index = torch.minimum(index.clamp(min=0), size - 1)
        linear = sum(index[:, a] * strides[a] for a in range(ndim)).reshape(B, 1, -1).expand(B, C, -1)
        values = flat.gather(2, linear).reshape(image.shape)
        out = out + torch.where(valid, weight, torch.zeros_like(weight))[:, None] * values
    return out


def _inside(mask: Tensor, like: Tensor, channel: bool = True) -> Tensor:
    """mask (B, *space) as bool (B, 1, *space) for a (B, C, *space) tensor, or (B, *space) with channel=False."""
    space = tuple(like.shape[2:])
    if mask.dim() != 1 + len(space) or tuple(mask.shape[1:]) != space or mask.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"mask must be (B, *space) with B={like.shape[0]} (or 1) and space {space}, "
                         f"got shape {tuple(mask.shape)}")
    inside = mask != 0
    return inside[:, None] if channel else inside


def _region_mean(values: Tensor, mask: Tensor | None, displacement: Tensor) -> Tensor:
    """Weighted mean of values (B, *space) over mask (B, *space) -> (B,) or (B, R, *space) -> (B, R)."""
    space = tuple(displacement.shape[2:])
    dims = tuple(range(-len(space), 0))
    if mask is None:
        return values.mean(dim=dims)
    if mask.dim() == 1 + len(space):
        regions = False
        mask = mask[:, None]
    elif mask.dim() == 2 + len(space):
        regions = True
    else:
        raise ValueError(f"mask must be (B, *space) or (B, R, *space) with space {space}, "
                         f"got shape {tuple(mask.shape)}")
    if tuple(mask.shape[2:]) != space or mask.shape[0] not in (1, values.shape[0]):
        raise ValueError(f"mask must be (B, *space) or (B, R, *space) with B={values.shape[0]} (or 1) and "
                         f"space {space}, got shape {tuple(mask.shape)}")
    weight = mask.to(values.dtype)
    # where, not weight * values: a NaN outside the region must not leak in (NaN * 0 is NaN)
    picked = torch.where(weight != 0, weight * values[:, None], torch.zeros_like(weight * values[:, None]))
    mean = picked.sum(dim=dims) / weight.sum(dim=dims)
    return mean if regions else mean[:, 0]
