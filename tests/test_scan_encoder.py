"""The scan encoder: shapes, masked pooling, robust scaling, visit tokens, batching, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twin.dynamics.mamba import HistoryEncoder
from twin.scan_encoder import ScanCode, ScanEncoder, robust_scale

SIZE = {2: (32, 32), 3: (16, 16, 16)}


pytestmark = pytest.mark.usefixtures("one_thread")


def _encoder(dims=2, channels=2, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    kw = dict(width=8, depth=3, anatomy_dim=5, state_dim=3) | kw
    return ScanEncoder(channels, dims=dims, **kw).to(dtype)


def _scans(n, dims=2, channels=2, dtype=torch.float64, seed=0):
    """Scans (n, C, *space) with brain-like ball masks (n, *space) of differing radii and centres."""
    g = torch.Generator().manual_seed(seed)
    space = SIZE[dims]
    x = 100 + 20 * torch.randn(n, channels, *space, generator=g, dtype=dtype)
    grid = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=dtype) for s in space), indexing="ij"))  # (dims, *space)
    centre = (torch.tensor(space, dtype=dtype) - 1) / 2 + torch.rand(n, dims, generator=g, dtype=dtype) * 4 - 2
    radius = space[0] * (0.3 + 0.1 * torch.rand(n, generator=g, dtype=dtype))
    d2 = ((grid[None] - centre.reshape(n, dims, *[1] * dims)) ** 2).sum(1)
    return x, d2 <= radius.reshape(n, *[1] * dims) ** 2


@pytest.mark.parametrize("dims", [2, 3])
def test_shapes(dims):
    x, mask = _scans(3, dims, dtype=torch.float32)
    enc = _encoder(dims, dtype=torch.float32)
    code = enc(x, mask)
    assert isinstance(code, ScanCode)
    assert code.anatomy.shape == (3, 5) and code.state.shape == (3, 3) and code.anatomy.dtype == torch.float32
    assert code.token.shape == (3, enc.token_dim) == (3, 8)
    torch.testing.assert_close(code.token, torch.cat([code.anatomy, code.state], -1))
    assert enc(x).state.shape == (3, 3)  # no mask: the whole field of view


@pytest.mark.parametrize("dims", [2, 3])
def test_code_ignores_everything_outside_the_mask(dims):
    x, mask = _scans(2, dims)
    enc = _encoder(dims)
    other = x.clone()
    outside = ~mask[:, None].expand_as(x)
    g = torch.Generator().manual_seed(5)
    other[outside] = 1e4 * torch.randn(int(outside.sum()), generator=g, dtype=x.dtype)
    other[:, 0][~mask] = torch.nan  # not even NaN may leak in
    a, b = enc(x, mask), enc(other, mask)
    assert torch.equal(a.anatomy, b.anatomy) and torch.equal(a.state, b.state)
    assert not torch.equal(enc(x).state, enc(other.nan_to_num()).state)  # without the mask it would matter


@pytest.mark.parametrize("dims", [2, 3])
def test_code_is_invariant_to_gain_and_offset_per_scan_and_channel(dims):
    x, mask = _scans(3, dims)
    enc = _encoder(dims)
    g = torch.Generator().manual_seed(1)
    gain = torch.exp(torch.randn(3, 2, generator=g, dtype=x.dtype))
    offset = 500 * torch.randn(3, 2, generator=g, dtype=x.dtype)
    shape = (3, 2, *[1] * dims)
    a, b = enc(x, mask), enc(gain.reshape(shape) * x + offset.reshape(shape), mask)
    torch.testing.assert_close(b.token, a.token, rtol=1e-9, atol=1e-9)
    assert (a.token - enc(x + 0.1 * x.square() / 100, mask).token).abs().max() > 1e-4  # a non-affine change is seen


def test_robust_scale_is_median_and_iqr_inside_the_mask():
    x, mask = _scans(2, 2, channels=1)
    x[:, 0][~mask] = torch.nan  # never read
    got = robust_scale(x, mask)
    for i in range(2):
        v = x[i, 0][mask[i]].numpy()
        q25, med, q75 = np.quantile(v, [0.25, 0.5, 0.75])
        np.testing.assert_allclose(got[i, 0][mask[i]].numpy(), (v - med) / (q75 - q25), rtol=1e-12, atol=1e-12)
        assert (got[i, 0][~mask[i]] == 0).all()


def test_robust_scale_falls_back_to_the_range_then_to_one():
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    binary = torch.zeros(4, 4, dtype=torch.float64)
    binary[0, :3] = 2.0  # 3 of 16 voxels: IQR = 0, range = 2
    x = torch.stack([binary, torch.full((4, 4), 7.0, dtype=torch.float64)])[:, None]
    got = robust_scale(x, mask)
    torch.testing.assert_close(got[0, 0], binary / 2.0)  # median 0, divided by the range
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # a constant channel is 0, not NaN


def test_tokens_encode_observed_visits_and_zero_the_missing():
    B, L = 2, 4
    x, mask = _scans(B * L, 2)
    x, mask = x.reshape(B, L, *x.shape[1:]), mask.reshape(B, L, *mask.shape[1:])
    observed = torch.tensor([[True, False, True, True], [True, True, False, False]])
    x[~observed] = torch.nan  # a missing visit's scan is never read
    enc = _encoder(2)
    tokens = enc.tokens(x, observed, mask)
    assert tokens.shape == (B, L, enc.token_dim)
    for b in range(B):
        for t in range(L):
            if observed[b, t]:
                alone = enc(x[b, t][None], mask[b, t][None]).token[0]
                torch.testing.assert_close(tokens[b, t], alone, rtol=1e-10, atol=1e-10)
            else:
                assert torch.equal(tokens[b, t], torch.zeros(enc.token_dim, dtype=x.dtype))
    assert torch.equal(enc.tokens(x, torch.zeros(B, L, dtype=torch.bool)), torch.zeros(B, L, enc.token_dim, dtype=x.dtype))


def test_tokens_feed_the_history_encoder_and_gradients_reach_the_convs():
    x, mask = _scans(6, 3, dtype=torch.float32)
    x, mask = x.reshape(2, 3, *x.shape[1:]), mask.reshape(2, 3, *mask.shape[1:])
    observed = torch.tensor([[True, True, True], [True, True, False]])  # end padding, as the history encoder wants
    enc = _encoder(3, dtype=torch.float32)
    torch.manual_seed(0)
    history = HistoryEncoder(enc.token_dim, 4, d_model=8, n_layers=1, d_state=4, backend="reference")
    gap = torch.tensor([[0.0, 0.5, 1.0], [0.0, 2.0, 0.0]])
    q = history(enc.tokens(x, observed, mask), gap, observed)
    q.mean.sum().backward()
    grad = enc.features[0][0].weight.grad
    assert q.mean.shape == (2, 4) and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("dims", [2, 3])
def test_batched_equals_per_item(dims):
    x, mask = _scans(4, dims)
    enc = _encoder(dims)
    batch = enc(x, mask)
    for i in range(4):
        alone = enc(x[i : i + 1], mask[i : i + 1])
        torch.testing.assert_close(batch.anatomy[i], alone.anatomy[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(batch.state[i], alone.state[0], rtol=1e-10, atol=1e-10)


def test_gradients_are_finite_and_zero_outside_the_mask():
    x, mask = _scans(2, 2)
    x[:, 1][~mask] = torch.nan
    x.requires_grad_(True)
    enc = _encoder(2)
    code = enc(x, mask)
    (code.anatomy.square().sum() + code.state.sum()).backward()
    grads = [p.grad for p in enc.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert any(gr.abs().sum() > 0 for gr in grads)
    assert torch.isfinite(x.grad).all() and (x.grad[~mask[:, None].expand_as(x)] == 0).all()
    assert x.grad[mask[:, None].expand_as(x)].abs().sum() > 0


def test_same_seed_same_weights_and_codes():
    a, b, c = _encoder(3, seed=3), _encoder(3, seed=3), _encoder(3, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    x, mask = _scans(2, 3)
    assert torch.equal(a(x, mask).token, b(x, mask).token)


def test_bad_input_says_what_was_expected():
    enc = _encoder(2)
    x, mask = _scans(2, 2)
    with pytest.raises(ValueError, match=r"x must be \(B, C, H, W\) with C = 2, got \(2, 1, 32, 32\)"):
        enc(x[:, :1], mask)
    with pytest.raises(ValueError, match=r"mask must be bool \(B, \*space\)"):
        enc(x, mask.double())
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"needs >= 1 voxel in its mask; scans \[1\] have none"):
        enc(x, empty)
    x[0, 1][mask[0]] = torch.nan
    with pytest.raises(ValueError, match=r"finite inside the mask; scans \[0\] are not"):
        enc(x, mask)
    with pytest.raises(ValueError, match="dims must be 2 or 3, got 4"):
        ScanEncoder(1, dims=4)
    with pytest.raises(ValueError, match=r"observed bool \(B, L\)"):
        enc.tokens(x[:, None], torch.ones(2, 2, dtype=torch.bool))


def _disks(n, g, size=32):
    """Tissue (0.3) in a brain disc of radius 14, one bright disk (1.0) of radius r in [3, 9], noise; target (r - 6) / 2."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    c = (size - 1) / 2
    brain = (yy - c) ** 2 + (xx - c) ** 2 <= 14**2
    r = 3 + 6 * torch.rand(n, generator=g)
    cy, cx = c + 3 * (2 * torch.rand(2, n, generator=g) - 1)
    disk = (yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2 <= r[:, None, None] ** 2
    x = 0.3 + 0.7 * disk.float() + 0.05 * torch.randn(n, size, size, generator=g)
    return x[:, None], brain.expand(n, size, size), (r - 6) / 2


def test_learns_a_disk_radius_into_the_state():
    g = torch.Generator().manual_seed(0)
    enc = _encoder(2, channels=1, dtype=torch.float32, anatomy_dim=4, state_dim=2)
    x, mask, y = _disks(32, g)
    x_new, mask_new, y_new = _disks(32, g)

    def loss(x, mask, y):
        return (enc(x, mask).state[:, 0] - y).square().mean()

    with torch.no_grad():
        before, before_new = loss(x, mask, y).item(), loss(x_new, mask_new, y_new).item()
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    for _ in range(100):
        opt.zero_grad()
        loss(x, mask, y).backward()
        opt.step()
    with torch.no_grad():
        after, after_new = loss(x, mask, y).item(), loss(x_new, mask_new, y_new).item()
    assert after < 0.5 * before
    assert after_new < 0.5 * before_new  # and it reads the radius of disks it has not seen
