"""The change code and its registration: decoding a zero code is the identity, the outside of the
mask never changes, shapes in 2D and 3D, and registration recovers a known change on a phantom,
gives no change for identical scans, and does not depend on how the batch is chunked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from twin.change_code import Decoded, code_channels, code_grid, decode, upsample, zero_code
from twin.registration import register

BOUND = 0.2


def phantom(n=48, batch=1, seed=0):
    """T1-like slices (batch, 1, n, n): grey matter 0.6, white matter 1.0, two ventricles 0.3 with soft
    (about 1-voxel) edges, a little jitter per item; and the head mask (batch, n, n)."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
    images, masks = [], []
    for _ in range(batch):
        cy, cx = (n / 2 + torch.randn(2, generator=g)).tolist()
        r = torch.sqrt(((y - cy) / (0.40 * n)) ** 2 + ((x - cx) / (0.36 * n)) ** 2)
        image = 0.6 * soft_inside(r, 1.0, n) + 0.4 * soft_inside(r, 0.8, n)
        for side in (-1, 1):
            rv = torch.sqrt(((y - cy) / (0.14 * n)) ** 2 + ((x - cx - side * 0.08 * n) / (0.05 * n)) ** 2)
            image = image - 0.7 * soft_inside(rv, 1.0, n)
        images.append(image)
        masks.append(r < 1.1)
    return torch.stack(images)[:, None], torch.stack(masks)


def soft_inside(distance, radius, n):
    """1 inside `radius` (of a normalised distance, about 0.4 n voxels per unit), 0 outside, ~1-voxel edge."""
    return torch.sigmoid((radius - distance) * 0.4 * n)


def smooth_code(batch, grid, amplitude, seed, residual=0.3, channels=1):
    """A smooth random code: 3^d noise upsampled, velocity scaled to max |v| = amplitude voxels."""
    g = torch.Generator().manual_seed(seed)
    dims = len(grid)
    coarse = torch.randn(batch, dims + channels, *[3] * dims, generator=g)
    code = F.interpolate(coarse, size=grid, mode="bilinear" if dims == 2 else "trilinear", align_corners=True)
    v = code[:, :dims] / code[:, :dims].abs().amax() * amplitude
    return torch.cat([v, code[:, dims:] / code[:, dims:].abs().amax() * residual], 1)


def masked_rmse(a, b, mask):
    return float((a - b)[mask[:, None].expand_as(a)].square().mean().sqrt())


def masked_correlation(a, b, mask):
    m = mask[:, None].expand_as(a)
    a, b = a[m] - a[m].mean(), b[m] - b[m].mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_channels_grid_and_upsample():
    assert code_channels(2, 1) == 3 and code_channels(3, 2) == 5
    assert code_grid((64, 64), 4) == (16, 16)
    assert code_grid((65, 63, 16), 4) == (17, 16, 4)
    with pytest.raises(ValueError, match="factor"):
        code_grid((64, 64), 0)
    # velocities are in full-resolution voxels already: a constant field stays the same constant
    field = torch.full((2, 3, 4, 5, 6), 1.5)
    up = upsample(field, (16, 20, 24))
    assert up.shape == (2, 3, 16, 20, 24) and torch.allclose(up, torch.full_like(up, 1.5))
    assert zero_code(2, 3, 1, (4, 4, 4)).shape == (2, 4, 4, 4, 4)


@pytest.mark.parametrize("space", [(48, 48), (16, 16, 16)])
def test_zero_code_is_the_identity(space):
    dims = len(space)
    reference = torch.rand(2, 2, *space, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, *space, dtype=torch.bool)
    mask[(0, *[slice(3, n - 3) for n in space])] = True
    code = zero_code(2, dims, 2, code_grid(space, 4))
    exact = decode(reference, code, mask, residual_bound=BOUND, method="reference")
    assert torch.equal(exact.scan, reference)
    fast = decode(reference, code, mask, residual_bound=BOUND)
    # grid_sample goes through normalised coordinates, so inside the mask it is the identity to rounding
    assert torch.equal(fast.scan[:, :, ~mask[0]], reference[:, :, ~mask[0]])
    assert torch.allclose(fast.scan, reference, rtol=0, atol=1e-5)
    assert torch.equal(fast.displacement, torch.zeros_like(fast.displacement))
    assert torch.equal(fast.jacobian, torch.ones_like(fast.jacobian))


@pytest.mark.parametrize("space", [(32, 32), (16, 16, 16)])
def test_outside_the_mask_nothing_changes_bit_for_bit(space):
    dims = len(space)
    g = torch.Generator().manual_seed(2)
    reference = torch.rand(3, 1, *space, generator=g)
    mask = torch.rand(3, *space, generator=g) > 0.4
    code = 2.0 * torch.randn(3, dims + 1, *code_grid(space, 4), generator=g)
    out = decode(reference, code, mask, residual_bound=BOUND)
    outside = ~mask[:, None]
    assert torch.equal(out.scan[outside], reference[outside])
    assert torch.equal(out.displacement[~mask[:, None].expand_as(out.displacement)],
                       torch.zeros_like(out.displacement)[~mask[:, None].expand_as(out.displacement)])
    assert (out.scan - reference)[~outside].abs().max() > 0.05  # inside, the code did change the scan


@pytest.mark.parametrize("space, factor", [((48, 40), 4), ((16, 16, 16), 4)])
def test_decode_shapes(space, factor):
    dims = len(space)
    grid = code_grid(space, factor)
    reference = torch.rand(1, 2, *space, generator=torch.Generator().manual_seed(3))  # one reference for all
    mask = torch.ones(1, *space, dtype=torch.bool)
    code = smooth_code(3, grid, 1.0, seed=4, channels=2)
    out = decode(reference, code, mask, residual_bound=BOUND)
    assert isinstance(out, Decoded)
    assert out.scan.shape == (3, 2, *space)
    assert out.displacement.shape == (3, dims, *space)
    assert out.jacobian.shape == (3, *space)
    assert out.jacobian.min() > 0  # a smooth velocity integrates to a map that does not fold
    one = slice(0, 1)  # the gather path is slow in 3D: one item is enough
    reference_path = decode(reference, code[one], mask, residual_bound=BOUND, method="reference")
    assert torch.allclose(out.scan[one], reference_path.scan, atol=1e-4)


def test_decode_rejects_bad_shapes():
    reference = torch.rand(2, 1, 16, 16)
    mask = torch.ones(2, 16, 16, dtype=torch.bool)
    good = zero_code(2, 2, 1, (4, 4))
    with pytest.raises(ValueError, match="code must be"):
        decode(reference, torch.zeros(2, 2, 4, 4), mask, residual_bound=BOUND)
    with pytest.raises(ValueError, match="mask must be"):
        decode(reference, good, torch.ones(2, 16, 15, dtype=torch.bool), residual_bound=BOUND)
    with pytest.raises(ValueError, match="reference batch"):
        decode(torch.rand(3, 1, 16, 16), good, mask, residual_bound=BOUND)
    with pytest.raises(ValueError, match="dtype"):
        decode(reference.double(), good, mask, residual_bound=BOUND)


def test_register_recovers_a_known_change():
    reference, mask = phantom(48, batch=1, seed=5)
    truth = smooth_code(1, code_grid((48, 48), 4), 1.5, seed=6)
    true = decode(reference, truth, mask, residual_bound=BOUND)
    assert 1.0 < float(true.displacement.abs().max()) < 2.0
    code = register(reference, true.scan, mask, residual_bound=BOUND)
    assert code.shape == truth.shape and code.dtype == torch.float32 and not code.requires_grad
    fit = decode(reference, code, mask, residual_bound=BOUND)
    copy_last = masked_rmse(reference, true.scan, mask)
    assert masked_rmse(fit.scan, true.scan, mask) < 0.2 * copy_last
    # motion along a straight or circular edge leaves no trace in the scans (the aperture problem),
    # so the field is recovered less well than the scan
    assert masked_correlation(fit.displacement, true.displacement, mask) > 0.8
    assert fit.jacobian[mask].min() > 0


def test_identical_scans_give_a_near_zero_code():
    reference, mask = phantom(48, batch=1, seed=7)
    code = register(reference, reference, mask, residual_bound=BOUND, iterations=100)
    assert code.abs().max() < 0.01
    fit = decode(reference, code, mask, residual_bound=BOUND)
    assert fit.displacement.abs().max() < 0.01


def test_chunking_does_not_change_the_result_and_no_grad_is_fine():
    reference, mask = phantom(32, batch=3, seed=8)
    target = decode(reference, smooth_code(3, code_grid((32, 32), 4), 1.0, seed=9), mask, residual_bound=BOUND).scan
    with torch.no_grad():  # register turns gradients on for itself
        together = register(reference, target, mask, residual_bound=BOUND, iterations=40, chunk=2)
    alone = torch.cat([register(reference[i:i + 1], target[i:i + 1], mask[i:i + 1], residual_bound=BOUND,
                                iterations=40) for i in range(3)])
    assert together.abs().max() > 0.1
    assert torch.allclose(together, alone, rtol=0, atol=1e-4)


def test_register_in_3d_shapes():
    reference = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(10))
    mask = torch.ones(1, 16, 16, 16, dtype=torch.bool)
    code = register(reference, reference.flip(-1), mask, residual_bound=BOUND, iterations=3)
    assert code.shape == (2, 4, 4, 4, 4) and torch.isfinite(code).all()


@pytest.mark.parametrize("name", ["reference", "target"])
def test_nan_input_is_named(name):
    reference, mask = phantom(16, batch=1)
    scans = {"reference": reference.clone(), "target": reference.clone()}
    scans[name][0, 0, 8, 8] = float("nan")
    with pytest.raises(ValueError, match=name):
        register(scans["reference"], scans["target"], mask, residual_bound=BOUND, iterations=1)


def test_remove_rigid_drops_exactly_rigid_motion():
    from twin.registration import remove_rigid

    grid, factor = 12, 4
    axes = torch.meshgrid(*[(torch.arange(grid, dtype=torch.float32) + 0.5) * factor - 0.5] * 2, indexing="ij")
    y, x = (a - a.mean() for a in axes)
    rigid = torch.zeros(1, 3, grid, grid)
    rigid[0, 0], rigid[0, 1] = 0.8 - 0.02 * x, -0.4 + 0.02 * y  # a shift and a small rotation
    mask = torch.ones(1, grid * factor, grid * factor, dtype=torch.bool)
    assert remove_rigid(rigid, mask, factor)[:, :2].abs().max() < 1e-4
    other = torch.zeros(1, 3, grid, grid)
    other[0, 0] = torch.exp(-(x ** 2 + y ** 2) / 200)  # a local push: not rigid
    other[0, 2] = 1.0
    cleaned = remove_rigid(rigid + other, mask, factor)
    kept = cleaned[0, 0] - other[0, 0]
    assert kept.abs().max() < 0.5 * other[0, 0].abs().max()  # most of the local push survives
    assert torch.equal(cleaned[:, 2], (rigid + other)[:, 2])  # residual channels untouched
