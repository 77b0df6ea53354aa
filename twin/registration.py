"""Registration: the change code that takes a reference scan to a target scan.

It makes the training targets of the scan decoder: for each pair of visits, the code whose
decoding (`twin.change_code.decode`) reproduces the later scan from the earlier one. The code
is fitted by Adam from zero (no change) on

    mean over the mask of (decode(G reference, code).scan - G target)^2
    + smoothness * S(velocity code) + residual_smoothness * S(residual code)
    + residual_l2 * mean(residual code^2)

with S the mean squared forward difference (`smoothness_penalty`) and G a Gaussian blur of
`presmooth` voxels. The L2 on the residual makes the fit explain by motion what motion can
explain, instead of painting it. G is there for noise: interpolating a noisy reference at a
fractional position averages its noise away, so without G any sub-voxel shift lowers the
error, and flat regions (where the anatomy does not pin the field) drift towards half-voxel
shifts. With noise sd 0.03 on unit-contrast images that bias moves identical anatomy by
0.26 voxels rms; a 0.7-voxel blur brings it to about 0.1 (benchmarked on 64 x 64 phantoms).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from twin.priors.deformation import smoothness_penalty

from .change_code import code_channels, code_grid, decode
from .errors import InputError


def register(reference: Tensor, target: Tensor, mask: Tensor, *, factor: int = 4, residual_bound: float,
             iterations: int = 200, smoothness: float = 1e-3, residual_smoothness: float = 1e-3,
             residual_l2: float = 1e-4, lr: float = 0.05, presmooth: float = 0.7, steps: int = 6,
             chunk: int = 64, progress: bool = False) -> Tensor:
    """Fit change codes (B, dims + C, *grid) taking reference to target, both (B, C, *space).

    mask (B or 1, *space), nonzero = inside; factor: image voxels per code voxel along each axis
    (grid = ceil(space / factor)); residual_bound: as in `decode`, in image units; presmooth:
    sigma in voxels of the blur of both scans (0: none); steps: as in `decode`, decode with the
    same. The weights suit intensities of order 1 (T1-like: white matter ~1, CSF ~0.3).
    The pairs are fitted `chunk` at a time; each pair's loss and gradient are its own (the
    batch loss is a sum over pairs), so the result does not depend on the chunking.
    Deterministic; float32 out, detached.
    """
    from tqdm.auto import tqdm

    for name, value in (("reference", reference), ("target", target), ("mask", mask)):
        if value.is_floating_point() and bool(torch.isnan(value).any()):
            raise InputError("contains NaN; registration needs finite scans and mask", field=name)
    if reference.shape != target.shape:
        raise ValueError(f"reference and target must have the same shape (B, C, *space), "
                         f"got {tuple(reference.shape)} and {tuple(target.shape)}")
    if reference.dim() not in (4, 5):
        raise ValueError(f"reference must be (B, C, y, x) or (B, C, z, y, x), got shape {tuple(reference.shape)}")
    if tuple(mask.shape[1:]) != tuple(reference.shape[2:]) or mask.shape[0] not in (1, reference.shape[0]):
        raise ValueError(f"mask must be (B, *space) with B={reference.shape[0]} (or 1) and space "
                         f"{tuple(reference.shape[2:])}, got shape {tuple(mask.shape)}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    if presmooth < 0:
        raise ValueError(f"presmooth must be >= 0 (a sigma in voxels), got {presmooth}")

    B, C, *space = reference.shape
    dims = len(space)
    shape = (code_channels(dims, C), *code_grid(tuple(space), factor))
    reference = _blur(reference.detach().float(), presmooth)
    target = _blur(target.detach().float(), presmooth)
    mask = mask.detach() != 0
    codes = []
    with torch.enable_grad():
        for start in tqdm(range(0, B, chunk), desc="registering", unit="chunk", disable=not progress):
            pairs = slice(start, start + chunk)
            m = mask if mask.shape[0] == 1 else mask[pairs]
            codes.append(_fit(reference[pairs], target[pairs], m, shape, residual_bound, iterations,
                              (smoothness, residual_smoothness, residual_l2), lr, steps))
    return torch.cat(codes)


def _fit(reference: Tensor, target: Tensor, mask: Tensor, shape: tuple[int, ...], residual_bound: float,
         iterations: int, weights: tuple[float, float, float], lr: float, steps: int) -> Tensor:
    """Adam on one chunk of n pairs; the loss is the sum of the pairs' own losses."""
    smoothness, residual_smoothness, residual_l2 = weights
    n, dims = reference.shape[0], reference.dim() - 2
    code = torch.zeros(n, *shape, device=reference.device, requires_grad=True)
    optimiser = torch.optim.Adam([code], lr=lr)
    inside = mask[:, None].to(reference.dtype)
    axes = tuple(range(1, reference.dim()))
    count = (inside.sum(dim=axes) * reference.shape[1]).clamp(min=1)  # (1 or n,) voxels x channels per pair
    for _ in range(iterations):
        optimiser.zero_grad()
        scan = decode(reference, code, mask, residual_bound=residual_bound, steps=steps).scan
        error = ((scan - target).square() * inside).sum(dim=axes) / count
        velocity, residual = code[:, :dims], code[:, dims:]
        # the penalties average over the chunk: times n makes them sums over pairs, like the error
        loss = error.sum() + n * (smoothness * smoothness_penalty(velocity)
                                  + residual_smoothness * _smoothness(residual, dims)
                                  + residual_l2 * residual.square().mean())
        loss.backward()
        optimiser.step()
    return code.detach()


def _smoothness(field: Tensor, dims: int) -> Tensor:
    """smoothness_penalty of a (B, K, *grid) field with any K (it wants K = dims): each channel as dims copies."""
    flat = field.reshape(-1, 1, *field.shape[2:])
    return smoothness_penalty(flat.expand(-1, dims, *field.shape[2:]))


def _blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, C, *space) along each spatial axis, edges replicated; sigma in voxels."""
    if sigma == 0:
        return image
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-x.square() / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    space = image.shape[2:]
    for axis in range(len(space)):
        # move the axis last, convolve every line along it as a 1D signal
        moved = image.movedim(2 + axis, -1)
        lines = moved.reshape(-1, 1, space[axis])
        lines = F.conv1d(F.pad(lines, (radius, radius), mode="replicate"), kernel.view(1, 1, -1))
        image = lines.reshape(moved.shape).movedim(-1, 2 + axis)
    return image


def remove_rigid(code: Tensor, mask: Tensor, factor: int) -> Tensor:
    """The code with the rigid part of its velocity removed: (B, dims + C, *grid) -> same.

    A rigid motion between two visits (the head lay differently in the scanner) is acquisition,
    not disease, and in a pair's code it can dwarf a year of atrophy. The stationary velocity of
    a rigid motion is exactly t + W (x - c) with W skew-symmetric (its exponential is the
    rotation), a linear space of 3 (2D) or 6 (3D) fields; each item's velocity loses its
    least-squares projection onto that space over the brain's code cells (mask (B or 1, *space)
    averaged to the grid, cells at least half inside). The residual channels are untouched.
    """
    dims = code.dim() - 2
    grid = tuple(code.shape[2:])
    inside = _grid_fraction(mask, factor, grid) >= 0.5  # (B or 1, *grid)
    inside = inside.expand(code.shape[0], *grid).reshape(code.shape[0], -1).to(code.dtype)
    axes = torch.meshgrid(*[(torch.arange(n, dtype=code.dtype) + 0.5) * factor - 0.5 for n in grid], indexing="ij")
    axes = [a - a.mean() for a in axes]
    fields = []  # each (dims, *grid): a generator of rigid motion
    for i in range(dims):
        f = torch.zeros((dims, *grid), dtype=code.dtype)
        f[i] = 1.0
        fields.append(f)
    for i in range(dims):
        for j in range(i + 1, dims):  # rotation in the plane of array axes i and j
            f = torch.zeros((dims, *grid), dtype=code.dtype)
            f[i], f[j] = -axes[j], axes[i]
            fields.append(f)
    G = torch.stack(fields).reshape(len(fields), -1)  # (R, dims * cells)
    v = code[:, :dims].reshape(code.shape[0], -1)  # (B, dims * cells)
    w = inside.repeat(1, dims)  # the same cells for every component
    # weighted least squares per item: (G W G^T) a = G W v
    A = torch.einsum("rn,bn,sn->brs", G, w, G) + 1e-6 * torch.eye(len(fields), dtype=code.dtype)
    b = torch.einsum("rn,bn->br", G, w * v)
    a = torch.linalg.solve(A, b)
    rigid = (a @ G).reshape(code.shape[0], dims, *grid)
    return torch.cat([code[:, :dims] - rigid, code[:, dims:]], dim=1)


def _grid_fraction(mask: Tensor, factor: int, grid: tuple[int, ...]) -> Tensor:
    """(B, *space) mask -> (B, *grid): the share of each code cell inside it."""
    m = mask.to(torch.float32)[:, None]
    pad = [p for n in reversed(m.shape[2:]) for p in (0, (-n) % factor)]
    pool = F.avg_pool2d if m.dim() == 4 else F.avg_pool3d
    out = pool(F.pad(m, pad), factor)[:, 0] if factor > 1 else m[:, 0]
    return out[(slice(None), *(slice(0, n) for n in grid))]
