"""The conditional U-Net: shapes, the zero start, FiLM conditioning, batched against per-item, the sampler loop,
the change-from-reference helpers, and a tiny overfit that shows it learns a state-driven change."""

from __future__ import annotations

import pytest
import torch

from twin.denoiser import Condition, ConditionalUNet, change_from_reference, mask_outside, scan_from_change
from twin.diffusion import DDIMSampler, NoiseSchedule, sample, training_loss


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _condition(B, C, space, S, seed=0, dtype=torch.float32) -> Condition:
    g = _gen(seed)
    mask = torch.rand((B, *space), generator=g) > 0.3
    return Condition(torch.randn((B, C, *space), generator=g, dtype=dtype),
                     torch.rand(B, generator=g, dtype=dtype) * 3, torch.randn(B, S, generator=g, dtype=dtype), mask)


def _net(channels=1, dims=2, S=3, seed=0, live=True, **kw) -> ConditionalUNet:
    """A small net; live=True gives the zero-initialised last conv random weights, so the output is not 0."""
    net = ConditionalUNet(channels, dims, width=8, levels=3, state_dim=S, generator=_gen(seed), **kw)
    if live:
        with torch.no_grad():
            g = _gen(seed + 100)
            torch.nn.init.normal_(net.output[-1].weight, std=0.1, generator=g)
            torch.nn.init.normal_(net.output[-1].bias, std=0.1, generator=g)
    return net


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dims, space, C", [(2, (16, 16), 1), (2, (15, 13), 2), (3, (8, 8, 8), 1), (3, (7, 8, 9), 2)])
def test_output_shape_2d_3d_any_size(dims, space, C):
    net = _net(C, dims)
    cond = _condition(2, C, space, 3)
    x = torch.randn((2, C, *space), generator=_gen(1))
    y = net(x, torch.tensor([0, 999]), cond)
    assert y.shape == x.shape and bool(torch.isfinite(y).all())


@pytest.mark.parametrize("dims, space", [(2, (16, 16)), (3, (8, 8, 8))])
def test_initial_output_is_exactly_zero(dims, space):
    net = _net(1, dims, live=False)
    cond = _condition(3, 1, space, 3)
    y = net(torch.randn((3, 1, *space), generator=_gen(2)), torch.tensor([5, 500, 999]), cond)
    assert torch.equal(y, torch.zeros_like(y))
    # and the zero start still trains: the last conv gets a gradient
    (y - 1).pow(2).sum().backward()
    assert float(net.output[-1].weight.grad.abs().sum()) > 0


@torch.no_grad()
def test_film_conditions_on_state_gap_and_step():
    net = _net()
    cond = _condition(2, 1, (16, 16), 3)
    x = torch.randn((2, 1, 16, 16), generator=_gen(3))
    t = torch.tensor([100, 100])
    base = net(x, t, cond)
    state = cond.state.clone()
    state[:, 0] += 1.0
    gap = cond.gap + 0.5
    for other in (net(x, t, Condition(cond.reference, cond.gap, state, cond.mask)),
                  net(x, t, Condition(cond.reference, gap, cond.state, cond.mask)),
                  net(x, torch.tensor([600, 600]), cond),
                  net(x, t, Condition(cond.reference + 1, cond.gap, cond.state, cond.mask))):
        assert float((other - base).abs().max()) > 1e-4
    # the mask is the caller's, not an input: changing it leaves the output alone
    same = net(x, t, Condition(cond.reference, cond.gap, cond.state, ~cond.mask))
    assert torch.equal(same, base)


@pytest.mark.parametrize("dims, space", [(2, (16, 16)), (3, (8, 8, 8))])
def test_batched_equals_per_item(dims, space):
    net = _net(2, dims).double()
    B = 4
    cond = _condition(B, 2, space, 3, dtype=torch.float64)
    x = torch.randn((B, 2, *space), generator=_gen(4), dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    batched = net(x, t, cond)
    for i in range(B):
        one = net(x[i:i + 1], t[i:i + 1], cond.take(slice(i, i + 1)))
        torch.testing.assert_close(batched[i:i + 1], one, rtol=1e-10, atol=1e-12)


def test_deterministic_given_the_generator():
    a, b, c = _net(seed=7, live=False), _net(seed=7, live=False), _net(seed=8, live=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    cond = _condition(2, 1, (16, 16), 3)
    x = torch.randn((2, 1, 16, 16), generator=_gen(5))
    a, b = _net(seed=7), _net(seed=7)
    assert torch.equal(a(x, torch.tensor([3, 4]), cond), b(x, torch.tensor([3, 4]), cond))
    assert a.config == {"channels": 1, "dims": 2, "width": 8, "levels": 3, "state_dim": 3, "time_embedding": 64,
                        "reference_channels": 1}


@pytest.mark.parametrize("dims, space", [(2, (16, 16)), (3, (8, 8, 8))])
def test_plugs_into_the_ddim_sampler(dims, space):
    net = _net(1, dims)
    cond = _condition(3, 1, space, 3)
    change = sample(net, (3, 1, *space), cond, DDIMSampler(NoiseSchedule(), steps=4), _gen(6))
    assert change.shape == (3, 1, *space) and bool(torch.isfinite(change).all())
    again = sample(net, (3, 1, *space), cond, DDIMSampler(NoiseSchedule(), steps=4), _gen(6))
    assert torch.equal(change, again)
    scan = scan_from_change(change, cond)
    outside = ~cond.mask[:, None]
    assert torch.equal(scan[outside], cond.reference[outside])


def test_change_helpers_round_trip_and_zero_outside_the_mask():
    cond = _condition(2, 2, (6, 5), 1)
    scan = torch.randn((2, 2, 6, 5), generator=_gen(7))
    change = change_from_reference(scan, cond)
    inside = cond.mask[:, None].expand_as(scan)
    assert torch.equal(change[~inside], torch.zeros_like(change[~inside]))
    back = scan_from_change(change, cond)
    torch.testing.assert_close(back[inside], scan[inside])
    assert torch.equal(back[~inside], cond.reference[~inside])  # bit for bit
    nan = torch.full((2, 2, 6, 5), float("nan"))
    cleared = mask_outside(nan, cond.mask[:1])  # a batch-1 mask serves every item
    assert torch.equal(cleared[~cond.mask[:1, None].expand_as(nan)], torch.zeros(int((~cond.mask[:1]).sum()) * 4))
    assert bool(torch.isnan(cleared[cond.mask[:1, None].expand_as(nan)]).all())


def test_condition_repeat_and_take():
    cond = _condition(3, 1, (4, 4), 2)
    rep = cond.repeat(2)
    assert len(rep) == 6
    assert torch.equal(rep.take(slice(3, 6)).state, cond.state) and torch.equal(rep.mask[3:], cond.mask)
    shared = Condition(cond.reference, cond.gap, cond.state, cond.mask[:1])
    assert shared.repeat(4).mask.shape == (1, 4, 4) and shared.take(torch.tensor([2])).mask.shape == (1, 4, 4)


def test_errors_say_what_was_expected_and_what_came():
    cond = _condition(2, 1, (8, 8), 3)
    with pytest.raises(ValueError, match=r"Condition.gap must be a float tensor \(B,\) = \(2,\), "
                                         r"got torch.float32 of shape \(2, 1\)"):
        Condition(cond.reference, cond.gap[:, None], cond.state, cond.mask)
    with pytest.raises(ValueError, match=r"Condition.mask must be a bool tensor .* got torch.float32 of shape \(2, 8, 8\)$"):
        Condition(cond.reference, cond.gap, cond.state, cond.mask.float())
    net = _net(S=2)
    with pytest.raises(ValueError, match=r"condition.state must be \(B, 2\), got \(2, 3\)"):
        net(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), cond)
    net = _net(S=3)
    with pytest.raises(ValueError, match=r"x_t must be \(B, 1, y, x\), got shape \(2, 2, 8, 8\)"):
        net(torch.zeros(2, 2, 8, 8), torch.zeros(2, dtype=torch.long), cond)
    with pytest.raises(ValueError, match=r"ConditionalUNet.dims must be 2 or 3, got 4"):
        ConditionalUNet(1, dims=4)
    with pytest.raises(ValueError, match=r"time_embedding must be an even integer >= 2, got 7"):
        ConditionalUNet(1, time_embedding=7)


def test_learns_a_change_driven_by_the_state():
    """x0 = reference + a disk of radius state[:, 0]: the change (the disk) is learnable only from the state."""
    g = _gen(0)
    B, H = 16, 16
    yy, xx = torch.meshgrid(torch.arange(H) - 7.5, torch.arange(H) - 7.5, indexing="ij")
    r = torch.sqrt(yy**2 + xx**2)
    state = torch.stack([torch.linspace(2, 6, B), torch.zeros(B)], dim=1)
    reference = torch.randn(B, 1, H, H, generator=g)
    cond = Condition(reference, torch.ones(B), state, (r < 7.9)[None])
    x0 = change_from_reference(reference + (r[None] < state[:, :1, None]).float()[:, None], cond)
    schedule = NoiseSchedule()
    net = ConditionalUNet(1, 2, width=8, levels=3, state_dim=2, generator=g)

    def held_loss(c):  # the same 8 (t, eps) draws every time, so a difference is not luck of the draw
        with torch.no_grad():
            return sum(float(training_loss(net, x0, c, schedule, _gen(1000 + k))) for k in range(8)) / 8

    before = held_loss(cond)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    draws = _gen(1)
    for _ in range(150):
        opt.zero_grad()
        training_loss(net, x0, cond, schedule, draws).backward()
        opt.step()
    after = held_loss(cond)
    assert after < 0.6 * before, (before, after)
    # much of the drop needs no state (at low noise the disk shows in x_t); the state's share shows
    # when each image is handed another's radius: the loss is then several times higher
    wrong = held_loss(Condition(reference, cond.gap, state.flip(0), cond.mask))
    assert wrong > 2 * after, (after, wrong)
