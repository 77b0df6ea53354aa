"""The time-aware Mamba block and history encoder: padding, batching, time gaps, determinism."""

from __future__ import annotations

import pytest
import torch

from twin.dynamics.mamba import LOG_STD_MAX, LOG_STD_MIN, HistoryEncoder, Posterior, TimeAwareMambaBlock

D_TOKEN, D_OUT = 5, 3


def _history(lengths, *, L=None, d=D_TOKEN, dtype=torch.float64, seed=0, fill=float("nan")):
    """Tokens (B, L, d), gaps (B, L) in years with gap_0 = 0, end-padding mask; padding holds `fill`."""
    g = torch.Generator().manual_seed(seed)
    L = L or max(lengths)
    tokens = torch.randn(len(lengths), L, d, generator=g, dtype=dtype)
    gap = torch.rand(len(lengths), L, generator=g, dtype=dtype) * 2
    gap[:, 0] = 0.0
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    tokens[~mask] = fill
    gap[~mask] = fill
    return tokens, gap, mask


def _encoder(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return HistoryEncoder(D_TOKEN, D_OUT, d_model=16, n_layers=2, d_state=4, **kw).to(dtype)


def test_shapes_and_log_std_range():
    tokens, gap, mask = _history([4, 2, 1], dtype=torch.float32)
    q = _encoder(torch.float32).posterior(tokens, gap, mask)
    assert isinstance(q, Posterior) and q.mean.shape == q.log_std.shape == (3, D_OUT)
    assert q.mean.dtype == torch.float32
    assert ((q.log_std >= LOG_STD_MIN) & (q.log_std <= LOG_STD_MAX)).all()
    assert q.sample(7).shape == (7, 3, D_OUT) and q.log_prob(q.sample(2)).shape == (2, 3)
    torch.manual_seed(1)
    block = TimeAwareMambaBlock(8, d_state=4)
    assert block(torch.randn(2, 6, 8), torch.rand(2, 6)).shape == (2, 6, 8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_padded_batch_equals_each_history_alone(dtype):
    lengths = [5, 2, 1, 3]
    tokens, gap, mask = _history(lengths, L=7, dtype=dtype)  # NaN padding must not leak
    enc = _encoder(dtype)
    batch = enc.posterior(tokens, gap, mask)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for i, n in enumerate(lengths):
        alone = enc.posterior(tokens[i : i + 1, :n], gap[i : i + 1, :n])
        torch.testing.assert_close(batch.mean[i], alone.mean[0], **tol)
        torch.testing.assert_close(batch.log_std[i], alone.log_std[0], **tol)


def test_block_outputs_at_visits_ignore_padding_and_are_zero_on_it():
    tokens, gap, mask = _history([4, 2], L=6)
    torch.manual_seed(0)
    block = TimeAwareMambaBlock(D_TOKEN, d_state=4).double()
    out = block(tokens, gap, mask)
    assert (out[~mask] == 0).all()
    for i, n in enumerate([4, 2]):
        torch.testing.assert_close(out[i, :n], block(tokens[i : i + 1, :n], gap[i : i + 1, :n])[0], rtol=1e-12, atol=1e-12)


def _influence_of_first_visit(block, tokens, gap, at):
    """|| d out_at / d token_0 ||: how much of the first visit is still in the state at visit `at`."""
    tokens = tokens.clone().requires_grad_(True)
    out = block(tokens, gap)[0, at]
    jac = torch.stack([torch.autograd.grad(out[k], tokens, retain_graph=True)[0][0, 0] for k in range(out.numel())])
    return jac.norm()


def test_longer_gaps_forget_the_first_visit_more():
    torch.manual_seed(0)
    block = TimeAwareMambaBlock(8, d_state=4).double()
    tokens = torch.randn(1, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    influence = []
    for years in (0.1, 1.0, 10.0):
        gap = torch.full((1, 5), years, dtype=torch.float64)
        gap[0, 0] = 0.0
        influence.append(_influence_of_first_visit(block, tokens, gap, at=4))
    assert influence[0] > influence[1] > influence[2], influence
    assert influence[2] < 0.5 * influence[0]
    # How strongly a visit writes does not depend on its gap, so the first (gap 0) is not erased.
    later = torch.full((1, 5), 0.5, dtype=torch.float64)
    first_at_zero = _influence_of_first_visit(block, tokens, later.index_fill(1, torch.tensor([0]), 0.0), at=1)
    first_at_five = _influence_of_first_visit(block, tokens, later.index_fill(1, torch.tensor([0]), 5.0), at=1)
    assert first_at_zero > 0
    torch.testing.assert_close(first_at_zero, first_at_five, rtol=1e-12, atol=0)


def test_time_gaps_change_the_posterior():
    tokens, gap, mask = _history([4, 3])
    enc = _encoder()
    a, b = enc.posterior(tokens, gap, mask), enc.posterior(tokens, gap * 3, mask)
    # Small at initialisation (the skip D x carries most of y), but an encoder blind to gaps gives 0.
    assert (a.mean - b.mean).abs().max() > 1e-6


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gradients_are_finite_and_padding_gets_none(backend):
    tokens, gap, mask = _history([4, 2, 3], L=5)
    tokens = tokens.masked_fill(~mask[..., None], 0.0).requires_grad_(True)
    enc = _encoder(backend=backend)
    q = enc.posterior(tokens, gap, mask)
    s = q.sample(3, torch.Generator().manual_seed(0))
    (s.square().sum() + q.log_prob(s).sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert torch.isfinite(tokens.grad).all() and (tokens.grad[~mask] == 0).all()
    assert tokens.grad[mask].abs().sum() > 0


def test_backends_agree_through_the_encoder():
    tokens, gap, mask = _history([3, 6, 1])
    q_torch = _encoder(backend="torch").posterior(tokens, gap, mask)
    q_ref = _encoder(backend="reference").posterior(tokens, gap, mask)
    torch.testing.assert_close(q_torch.mean, q_ref.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q_torch.log_std, q_ref.log_std, rtol=1e-12, atol=1e-12)


def test_deterministic_given_seeds_and_sampling_is_reparameterised():
    tokens, gap, mask = _history([3, 2])
    q1, q2 = _encoder(seed=5).posterior(tokens, gap, mask), _encoder(seed=5).posterior(tokens, gap, mask)
    assert torch.equal(q1.mean, q2.mean) and torch.equal(q1.log_std, q2.log_std)
    assert not torch.equal(q1.mean, _encoder(seed=6).posterior(tokens, gap, mask).mean)
    s1, s2 = q1.sample(4, torch.Generator().manual_seed(9)), q2.sample(4, torch.Generator().manual_seed(9))
    assert torch.equal(s1, s2)
    eps = torch.randn(s1.shape, generator=torch.Generator().manual_seed(9), dtype=s1.dtype)
    torch.testing.assert_close(s1, q1.mean + q1.log_std.exp() * eps, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(q1.log_prob(s1), q1.normal.log_prob(s1).sum(-1))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, g, m: (t, g, torch.tensor([[True, False, True], [True, True, False]])), "visits first and padding after"),
        (lambda t, g, m: (t, g, torch.zeros_like(m)), "visits first and padding after"),
        (lambda t, g, m: (t, g.index_put((torch.tensor([0]), torch.tensor([1])), torch.tensor(-1.0, dtype=g.dtype)), m), r"gap must be finite and >= 0"),
        (lambda t, g, m: (t, g[:, :2], m), r"gap must be \(B, L\) = \(2, 3\), got \(2, 2\)"),
        (lambda t, g, m: (t, g, m.float()), r"mask must be bool \(B, L\)"),
    ],
)
def test_bad_histories_say_what_was_expected(change, message):
    tokens, gap, mask = _history([3, 2], fill=0.0)
    with pytest.raises(ValueError, match=message):
        _encoder().posterior(*change(tokens, gap, mask))


# on a GPU: the kernel (where mamba-ssm's are installed, else the torch path) and autocast ----------

@pytest.fixture(scope="module")
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")


def _posterior_and_grads(encoder, tokens, gap, mask):
    q = encoder.posterior(tokens, gap, mask)
    (q.mean.float().square().sum() + q.log_std.float().sum()).backward()
    return q, {name: p.grad.detach().cpu() for name, p in encoder.named_parameters()}


def test_encoder_on_gpu_matches_the_cpu(gpu):
    tokens, gap, mask = _history([3, 6, 1, 4], dtype=torch.float32)
    q, grads = _posterior_and_grads(_encoder(torch.float32), tokens, gap, mask)
    q_gpu, grads_gpu = _posterior_and_grads(_encoder(torch.float32).cuda(), tokens.cuda(), gap.cuda(), mask.cuda())
    torch.testing.assert_close(q_gpu.mean.cpu(), q.mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q_gpu.log_std.cpu(), q.log_std, rtol=1e-4, atol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads_gpu[name], grads[name], rtol=1e-3, atol=1e-4, msg=lambda m: f"grad {name}: {m}")
    draws = [p.sample(5, torch.Generator().manual_seed(3)).detach().cpu() for p in (q, q_gpu)]
    torch.testing.assert_close(draws[1], draws[0], rtol=1e-4, atol=1e-4)  # same seed, same draws


def test_encoder_under_bfloat16_autocast_stays_near_float32(gpu):
    tokens, gap, mask = (t.cuda() for t in _history([3, 6, 1, 4], dtype=torch.float32))
    encoder = _encoder(torch.float32).cuda()
    q32 = encoder.posterior(tokens, gap, mask)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        q16, grads = _posterior_and_grads(encoder, tokens, gap, mask)
    torch.testing.assert_close(q16.mean.float(), q32.mean, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(q16.log_std.float(), q32.log_std, rtol=5e-2, atol=5e-2)
    for name, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
