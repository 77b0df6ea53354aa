"""Diffeomorphic deformation of the reference scan: warping against exact answers (shifts, linear
images, the reference gather path), scaling and squaring against a closed-form flow and its
inverse, Jacobians against affine maps, volumes, masking and the plausibility penalties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from twin.priors.deformation import (
    METHODS,
    compose,
    folding_fraction,
    integrate_velocity,
    jacobian_determinant,
    jacobian_penalty,
    log_volume_change,
    masked_change,
    smoothness_penalty,
    volume_ratio,
    warp,
)

F64 = torch.float64
SHAPES = {2: (16, 16), 3: (12, 12, 12)}


def indices(space):
    """(1, ndim, *space) voxel indices in array order."""
    return torch.stack(torch.meshgrid(*[torch.arange(n, dtype=F64) for n in space], indexing="ij"))[None]


def smooth_field(ndim, amplitude, seed, batch=1):
    """A smooth random (B, ndim, *space) field: coarse noise upsampled, scaled to max |v| = amplitude."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, ndim, *[4] * ndim, dtype=F64, generator=g)
    field = F.interpolate(coarse, size=SHAPES[ndim], mode="bilinear" if ndim == 2 else "trilinear", align_corners=True)
    return field / field.abs().amax() * amplitude


def tapered_field(ndim, amplitude, seed):
    """smooth_field brought to rest at the grid's faces (times prod sin(pi i / (n - 1))), max |v| = amplitude."""
    field = smooth_field(ndim, 1.0, seed)
    for axis, n in enumerate(SHAPES[ndim]):
        field = field * torch.sin(math.pi * torch.arange(n, dtype=F64) / (n - 1)).view(n, *[1] * (ndim - 1 - axis))
    return field / field.abs().amax() * amplitude


def linear_image(space):
    """(1, 1, *space) image 1 z + 10 y + 100 x (last ndim weights): linear interpolation reproduces it."""
    ndim = len(space)
    weights = torch.tensor((1.0, 10.0, 100.0)[:ndim], dtype=F64).view(1, ndim, *[1] * ndim)
    return (indices(space) * weights).sum(1, keepdim=True)


def disc(space, radius):
    """(1, *space) bool ball around the centre."""
    centre = torch.tensor([(n - 1) / 2 for n in space], dtype=F64).view(1, -1, *[1] * len(space))
    return ((indices(space) - centre).square().sum(1) <= radius**2)


# --- warp -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ndim", [2, 3])
def test_zero_displacement_is_the_identity(ndim):
    image = torch.randn(2, 3, *SHAPES[ndim], dtype=F64, generator=torch.Generator().manual_seed(0))
    zero = torch.zeros(2, ndim, *SHAPES[ndim], dtype=F64)
    assert torch.equal(warp(image, zero, method="reference"), image)
    # grid_sample goes through normalised coordinates and back: the identity holds to rounding only
    torch.testing.assert_close(warp(image, zero), image, rtol=0, atol=1e-14)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_integer_shift_is_a_roll_inside(ndim, method):
    space = SHAPES[ndim]
    image = torch.randn(1, 2, *space, dtype=F64, generator=torch.Generator().manual_seed(1))
    shift = (2, -1, 3)[-ndim:]  # voxels along the array axes ((z,) y, x)
    displacement = torch.tensor(shift, dtype=F64).view(1, ndim, *[1] * ndim).expand(1, ndim, *space)
    out = warp(image, displacement, method=method)
    rolled = torch.roll(image, shifts=tuple(-s for s in shift), dims=tuple(range(2, 2 + ndim)))
    inside = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, space))
    if method == "reference":
        assert torch.equal(out[(..., *inside)], rolled[(..., *inside)])
    else:
        torch.testing.assert_close(out[(..., *inside)], rolled[(..., *inside)], rtol=0, atol=1e-13)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_linear_image_is_sampled_exactly_along_each_axis(ndim, method):
    """(Bi/tri)linear interpolation reproduces a linear image: catches any swap of the axis order."""
    space = SHAPES[ndim]
    weights = torch.tensor((1.0, 10.0, 100.0)[:ndim], dtype=F64).view(1, ndim, *[1] * ndim)
    image = linear_image(space)
    u = smooth_field(ndim, 1.5, seed=2)
    # keep the sampling points inside the grid, where there is no padding to change the answer
    position = (indices(space) + u).clamp(min=0)
    position = torch.minimum(position, torch.tensor(space, dtype=F64).view(1, ndim, *[1] * ndim) - 1)
    out = warp(image, position - indices(space), method=method)
    torch.testing.assert_close(out, (position * weights).sum(1, keepdim=True), rtol=0, atol=1e-10)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_grid_sample_matches_the_reference_gather(ndim, padding):
    image = torch.randn(3, 2, *SHAPES[ndim], dtype=F64, generator=torch.Generator().manual_seed(3))
    u = smooth_field(ndim, 4.0, seed=4, batch=3).requires_grad_()  # large enough to leave the grid
    fast = warp(image, u, padding=padding)
    ref = warp(image, u, padding=padding, method="reference")
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    g_fast, = torch.autograd.grad(fast.square().sum(), u)
    g_ref, = torch.autograd.grad(ref.square().sum(), u)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-9)


def test_batched_warp_equals_per_item_and_broadcasts_one_reference():
    image = torch.randn(1, 2, *SHAPES[2], dtype=F64, generator=torch.Generator().manual_seed(5))
    u = smooth_field(2, 2.0, seed=6, batch=4)
    batched = warp(image, u)
    assert batched.shape == (4, 2, *SHAPES[2])
    for b in range(4):
        assert torch.equal(batched[b:b + 1], warp(image, u[b:b + 1]))


def test_warp_rejects_mismatched_shapes():
    image = torch.zeros(1, 1, 16, 16, dtype=F64)
    expected = r"displacement must be \(B, 2, y, x\) or \(B, 3, z, y, x\), got shape \(1, 3, 16, 16\)"
    with pytest.raises(ValueError, match=expected):
        warp(image, torch.zeros(1, 3, 16, 16, dtype=F64))
    with pytest.raises(ValueError, match=r"space \(8, 8\) of the displacement"):
        warp(image, torch.zeros(1, 2, 8, 8, dtype=F64))
    with pytest.raises(ValueError, match="batch sizes must match"):
        warp(torch.zeros(2, 1, 16, 16, dtype=F64), torch.zeros(3, 2, 16, 16, dtype=F64))
    with pytest.raises(ValueError, match="share a dtype"):
        warp(image.float(), torch.zeros(1, 2, 16, 16, dtype=F64))
    with pytest.raises(ValueError, match="method must be one of"):
        warp(image, torch.zeros(1, 2, 16, 16, dtype=F64), method="cuda")


# --- compose and scaling and squaring -----------------------------------------------------------------

@pytest.mark.parametrize("ndim", [2, 3])
def test_compose_applies_v_first_and_matches_warping_twice(ndim):
    space = SHAPES[ndim]
    dims = list(range(2, 2 + ndim))
    u = smooth_field(ndim, 1.0, seed=7)
    shift = torch.ones(1, ndim, *space, dtype=F64)  # v: one voxel along every axis
    # x -> x + 1 first, then u there: the composed displacement is 1 + u(x + 1)
    inner = (..., *[slice(0, n - 1) for n in space])
    expected = 1 + torch.roll(u, [-1] * ndim, dims)
    torch.testing.assert_close(compose(u, shift)[inner], expected[inner], rtol=0, atol=1e-12)
    # pull-back: warping by u, then by v, is warping once by compose(u, v); a linear image makes it exact
    u, v = tapered_field(ndim, 1.0, seed=7), tapered_field(ndim, 0.8, seed=8)
    for field in (u, v, compose(u, v)):  # premise: every sampling point lies in the grid, no padding involved
        position = indices(space) + field
        assert position.min() >= 0 and (position <= torch.tensor(space).view(1, ndim, *[1] * ndim) - 1).all()
    image = linear_image(space)
    torch.testing.assert_close(warp(warp(image, u), v), warp(image, compose(u, v)), rtol=0, atol=1e-10)


@pytest.mark.parametrize("ndim", [2, 3])
def test_constant_velocity_integrates_to_that_translation(ndim):
    velocity = torch.tensor((0.75, -1.5, 2.25)[:ndim], dtype=F64).view(1, ndim, *[1] * ndim)
    velocity = velocity.expand(2, ndim, *SHAPES[ndim])
    for steps in (0, 3, 7):
        torch.testing.assert_close(integrate_velocity(velocity, steps), velocity, rtol=0, atol=1e-13)


def sine_flow(n, amplitude, steps):
    """dx/dt = a sin(k x) along x (k = 2 pi / n): its time-1 flow and the exact one,
    tan(k x(1) / 2) = tan(k x0 / 2) exp(a k); points flow to the stable x = n/2 and stay in the grid."""
    k = 2 * math.pi / n
    x = torch.arange(n, dtype=F64)
    velocity = torch.zeros(1, 2, 3, n, dtype=F64)
    velocity[:, 1] = amplitude * torch.sin(k * x)
    exact = torch.remainder(2 / k * torch.atan(torch.tan(k * x / 2) * math.exp(amplitude * k)), n)
    exact[0] = 0.0  # the unstable rest point (atan puts it at n)
    return velocity, integrate_velocity(velocity, steps), exact


def test_scaling_and_squaring_converges_to_the_closed_form_flow():
    errors = []
    for steps in (1, 3, 5, 7):
        velocity, u, exact = sine_flow(16, 4.0, steps)
        x = torch.arange(16, dtype=F64)
        errors.append((x + u[0, 1, 1] - exact).abs().max().item())
        assert torch.equal(u[:, 0], torch.zeros_like(u[:, 0]))  # no motion along y
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # refining the grid (same flow, twice the voxels) shrinks the error relative to the domain
    _, u32, exact32 = sine_flow(32, 8.0, 7)
    error32 = (torch.arange(32, dtype=F64) + u32[0, 1, 1] - exact32).abs().max().item() / 32
    assert error32 < 0.6 * errors[-1] / 16
    # the exact Jacobian at the stable point is exp(-a k); the discrete one approaches it
    det = jacobian_determinant(u)
    assert det.min().item() == pytest.approx(math.exp(-4.0 * 2 * math.pi / 16), rel=0.05)


@pytest.mark.parametrize("ndim", [2, 3])
def test_exp_of_minus_v_inverts_exp_of_v(ndim):
    # tapered to rest at the faces: a flow that carries points off the grid has no inverse on it
    velocity = tapered_field(ndim, 1.2, seed=9)
    errors = [compose(integrate_velocity(velocity, s), integrate_velocity(-velocity, s)).abs().max().item()
              for s in range(8)]
    assert all(a >= b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.35 * errors[0]
    assert errors[-1] < 0.2  # voxels, for |v| up to 1.2: what is left is interpolation on a 12- or 16-voxel grid


def test_exp_stays_unfolded_where_the_naive_displacement_folds():
    """A Gaussian swirl v = w(r) (-y, x), w = a exp(-r^2 / 2 s^2): det(I + grad v) = 1 + w^2 (1 - r^2 / s^2),
    negative in a ring for a = 3; its flow only turns points around the centre, a diffeomorphism."""
    space = (24, 24)
    centre = torch.tensor([11.5, 11.5], dtype=F64).view(1, 2, 1, 1)
    rel = indices(space) - centre
    r2 = rel.square().sum(1, keepdim=True)
    w = 3.0 * torch.exp(-r2 / (2 * 4.0**2))
    velocity = w * torch.cat([rel[:, 1:], -rel[:, :1]], dim=1)  # (dy, dx) = w (x, -y): a rotation field
    naive = jacobian_determinant(velocity)
    assert naive.min() <= 0
    assert folding_fraction(velocity) > 0
    phi = integrate_velocity(velocity, 7)
    assert jacobian_determinant(phi).min() > 0
    assert folding_fraction(phi).item() == 0
    assert phi.abs().max() > 3  # not a small deformation


def test_masked_velocity_leaves_the_outside_exactly_still():
    space = SHAPES[3]
    mask = disc(space, 4.5)
    velocity = smooth_field(3, 2.0, seed=10, batch=2)
    u = integrate_velocity(velocity, 7, mask=mask)
    outside = ~mask[:, None].expand_as(u)
    assert torch.equal(u[outside], torch.zeros_like(u[outside]))
    assert u.abs().max() > 0.5
    assert jacobian_determinant(u)[:, mask[0]].min() > 0


# --- Jacobians and volumes ----------------------------------------------------------------------------

@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_of_an_affine_map_is_det_of_i_plus_a(ndim):
    g = torch.Generator().manual_seed(11)
    A = 0.3 * torch.randn(2, ndim, ndim, dtype=F64, generator=g)
    u = torch.einsum("bij,zj...->bi...", A, indices(SHAPES[ndim]))
    det = jacobian_determinant(u)
    expected = torch.linalg.det(torch.eye(ndim, dtype=F64) + A).view(2, *[1] * ndim).expand_as(det)
    torch.testing.assert_close(det, expected, rtol=0, atol=1e-12)  # everywhere: one-sided edges are exact too


def test_jacobian_determinant_gradient_is_right():
    u = smooth_field(2, 1.0, seed=12)[..., :5, :6].contiguous().requires_grad_()
    assert torch.autograd.gradcheck(jacobian_determinant, (u,))


@pytest.mark.parametrize("ndim", [2, 3])
def test_uniform_scaling_changes_volume_by_s_to_the_ndim(ndim):
    space = SHAPES[ndim]
    centre = torch.tensor([(n - 1) / 2 for n in space], dtype=F64).view(1, ndim, *[1] * ndim)
    s = 1.1
    u = (s - 1) * (indices(space) - centre)
    mask = disc(space, 4.0)
    regions = torch.stack([mask, ~mask], dim=1)  # (1, R=2, *space)
    torch.testing.assert_close(volume_ratio(u, mask), torch.tensor([s**ndim], dtype=F64))
    torch.testing.assert_close(volume_ratio(u, regions), torch.full((1, 2), s**ndim, dtype=F64))
    torch.testing.assert_close(log_volume_change(u, mask), torch.tensor([ndim * math.log(s)], dtype=F64))
    torch.testing.assert_close(volume_ratio(u), torch.tensor([s**ndim], dtype=F64))


def test_volume_ratio_of_the_forward_map_is_the_warped_masks_volume_change():
    """Warp by u = exp(v) (pull-back) moves the anatomy by exp(-v): the warped mask's volume over the
    reference mask's is volume_ratio(exp(-v), reference mask) = 1 / volume_ratio(exp(v), warped mask)."""
    space = (32, 32)
    centre = torch.tensor([15.5, 15.5], dtype=F64).view(1, 2, 1, 1)
    rel = indices(space) - centre
    velocity = -0.15 * rel * torch.exp(-rel.square().sum(1, keepdim=True) / (2 * 8.0**2))  # pulls inward: anatomy grows
    reference = disc(space, 6.0).to(F64)
    warped = warp(reference[:, None], integrate_velocity(velocity))[:, 0]
    measured = warped.sum() / reference.sum()
    assert measured > 1.2
    assert volume_ratio(integrate_velocity(-velocity), reference).item() == pytest.approx(measured.item(), rel=0.03)
    assert 1 / volume_ratio(integrate_velocity(velocity), warped).item() == pytest.approx(measured.item(), rel=0.03)


def test_log_volume_change_is_nan_where_the_region_folds():
    space = SHAPES[2]
    u = torch.zeros(2, 2, *space, dtype=F64)
    u[1, 1] = -1.5 * indices(space)[0, 1]  # x -> -0.5 x: det = -0.5 everywhere in patient 1
    out = log_volume_change(u, disc(space, 5.0))
    assert out[0] == 0 and torch.isnan(out[1])
    torch.testing.assert_close(folding_fraction(u, disc(space, 5.0)), torch.tensor([0.0, 1.0], dtype=F64))


def test_volume_checks_reject_a_wrong_mask():
    u = torch.zeros(1, 2, 16, 16, dtype=F64)
    expected = r"mask must be \(B, \*space\) or \(B, R, \*space\) with space \(16, 16\), got shape \(16, 16\)"
    with pytest.raises(ValueError, match=expected):
        volume_ratio(u, torch.ones(16, 16))


# --- the decoder's structural form ---------------------------------------------------------------------

@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_masked_change_leaves_the_outside_bit_identical(ndim, method):
    space = SHAPES[ndim]
    g = torch.Generator().manual_seed(13)
    reference = torch.rand(1, 2, *space, generator=g)  # float32, as scans are
    mask = disc(space, 4.5)
    velocity = smooth_field(ndim, 2.5, seed=14, batch=3).float()
    u = integrate_velocity(velocity, 7)  # deliberately NOT masked: masked_change must still hold the outside
    residual = 3 * torch.randn(3, 2, *space, generator=g)
    bound = torch.tensor([0.0, 0.1, 0.2])
    out = masked_change(reference, u, residual, mask, bound, method=method)
    outside = ~mask[:, None].expand_as(out)
    assert torch.equal(out[outside], reference.expand_as(out)[outside])
    inside = ~outside
    moved = warp(reference, torch.where(mask[:, None], u, torch.zeros_like(u)), method=method)
    assert torch.equal(out[0][inside[0]], moved[0][inside[0]])  # bound 0: pure deformation
    excess = torch.where(inside, out - moved, torch.zeros_like(out)).abs().amax(dim=tuple(range(1, out.dim())))
    assert torch.all(excess <= bound + 1e-6) and excess[2] > 0.15
    assert (out - reference).abs()[inside].max() > 0.1  # the inside does change


def test_masked_change_is_differentiable_in_displacement_and_residual():
    space = SHAPES[2]
    reference = torch.rand(2, 1, *space, dtype=F64, generator=torch.Generator().manual_seed(15))
    velocity = smooth_field(2, 1.0, seed=16, batch=2).requires_grad_()
    residual = torch.zeros(2, 1, *space, dtype=F64, requires_grad=True)
    mask = disc(space, 5.0).expand(2, *space)
    out = masked_change(reference, integrate_velocity(velocity, mask=mask), residual, mask, 0.1)
    out.square().sum().backward()
    assert torch.isfinite(velocity.grad).all() and velocity.grad.abs().max() > 0
    assert torch.equal(residual.grad[~mask[:, None]], torch.zeros_like(residual.grad[~mask[:, None]]))
    assert residual.grad[mask[:, None]].abs().max() > 0


# --- penalties -------------------------------------------------------------------------------------------

def test_smoothness_penalty_is_zero_for_constants_and_catches_checkerboards():
    constant = torch.full((1, 2, *SHAPES[2]), 0.7, dtype=F64)
    assert smoothness_penalty(constant).item() == 0
    board = (indices(SHAPES[2]).sum(1, keepdim=True) % 2).expand(1, 2, *SHAPES[2]).clone().requires_grad_()
    penalty = smoothness_penalty(board)
    assert penalty.item() == pytest.approx(2.0)  # each of 2 components jumps by 1 along each of 2 axes
    assert smoothness_penalty(smooth_field(2, 1.0, seed=17)) < 0.05 * penalty
    penalty.backward()
    assert torch.isfinite(board.grad).all() and board.grad.abs().max() > 0


def test_jacobian_penalty_is_zero_when_compliant_and_finite_and_pushing_when_folded():
    space = SHAPES[3]
    centre = torch.tensor([5.5] * 3, dtype=F64).view(1, 3, 1, 1, 1)
    mild = (0.95 - 1) * (indices(space) - centre)  # det 0.86: compliant
    assert jacobian_penalty(mild).item() == 0
    folded = torch.zeros(1, 3, *space, dtype=F64)
    folded[:, 2] = -1.5 * indices(space)[0, 2]  # det -0.5: folded everywhere
    for u in (folded, (0.7 - 1) * (indices(space) - centre)):  # folded; det 0.34 below the floor
        u = u.clone().requires_grad_()
        penalty = jacobian_penalty(u)
        assert penalty.item() > 0 and math.isfinite(penalty.item())
        penalty.backward()
        assert torch.isfinite(u.grad).all() and u.grad.abs().max() > 0
    # a step along the gradient lowers it (the barrier pushes det up)
    u = folded.clone().requires_grad_()
    jacobian_penalty(u).backward()
    assert jacobian_penalty(folded - 1e-4 * u.grad) < jacobian_penalty(folded)
    mask = disc(space, 3.0)
    assert jacobian_penalty(folded, mask) == pytest.approx(jacobian_penalty(folded).item())
    with pytest.raises(ValueError, match="need 0 < eps < floor"):
        jacobian_penalty(folded, floor=0.01)
