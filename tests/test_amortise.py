"""Amortised inference: visit tokens, the trained encoder against the Laplace posterior, warm starts, seeds."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from test_disease_course import cohort, truth_model
from twin.amortise import Amortiser, AmortiserConfig, amortised_posterior, fit_amortiser, history_prefixes, visit_tokens
from twin.errors import InputError
from twin.inference import posterior
from twin.model import Batch, DiseaseCourse

NAN = float("nan")
DOSE_SCALE = (10.0,)
SMALL = AmortiserConfig(d_model=16, d_state=4, prefixes=6, steps=400, batch_size=128, lr=1e-2, seed=0)


def _two_patients() -> Batch:
    """Patient 0: visits at 0, 1, 2.5 with one biomarker missing; patient 1: one visit. Doses at 0.5 and 2."""
    times = torch.tensor([[0.0, 1.0, 2.5], [0.0, NAN, NAN]])
    y = torch.tensor([[[0.1, -0.2], [NAN, 0.3], [0.5, 0.4]], [[1.0, 2.0], [NAN, NAN], [NAN, NAN]]])
    x = torch.tensor([[0.7], [-1.0]])
    dose_time = torch.tensor([[0.5, 2.0], [NAN, NAN]])
    dose = torch.tensor([[10.0, 20.0], [NAN, NAN]])
    return Batch(times, y, x, ((dose_time, dose),))


def test_tokens_read_each_visit_as_the_formula_says():
    tokens, gap, mask = visit_tokens(_two_patients(), DOSE_SCALE)
    assert tokens.shape == (2, 3, 2 * 2 + 1 + 2 * 1 + 1) and gap.shape == mask.shape == (2, 3)
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    torch.testing.assert_close(gap, torch.tensor([[0.0, 1.0, 1.5], [0.0, 0.0, 0.0]]))
    # patient 0, visit at t = 2.5: both measured, one dose of 10 then one of 20 before it, the last 0.5 years ago
    expected = [0.5, 0.4, 1.0, 1.0, 2.5, np.log1p(30 / 10), 0.5 / 2.0, 0.7]
    torch.testing.assert_close(tokens[0, 2], torch.tensor(expected, dtype=torch.float32))
    # visit at t = 1: first biomarker missing -> value 0, mask 0; the dose at 0.5 was 0.5 years ago
    expected = [0.0, 0.3, 0.0, 1.0, 1.0, np.log1p(1.0), 0.25, 0.7]
    torch.testing.assert_close(tokens[0, 1], torch.tensor(expected, dtype=torch.float32))
    # baseline: no dose yet reads as "long ago" (1) with no cumulative dose
    torch.testing.assert_close(tokens[0, 0, 5:7], torch.tensor([0.0, 1.0]))
    assert (tokens[1, 1:] == 0).all()  # padding is zero


def test_radiotherapy_fractions_become_two_more_features():
    batch = _two_patients()
    fractions = (torch.tensor([[0.2, 0.3, NAN], [NAN, NAN, NAN]]), torch.tensor([[2.0, 2.0, NAN], [NAN, NAN, NAN]]))
    tokens, _, _ = visit_tokens(replace(batch, fractions=fractions), DOSE_SCALE)
    without, _, _ = visit_tokens(batch, DOSE_SCALE)
    assert tokens.shape[-1] == without.shape[-1] + 2
    torch.testing.assert_close(tokens[..., :7], without[..., :7])  # the drug's features first, unchanged
    # at t = 1: two 2 Gy fractions before, the last 0.7 years ago; at baseline none
    torch.testing.assert_close(tokens[0, :2, 7:9], torch.tensor([[0.0, 1.0], [np.log1p(2.0), 0.35]], dtype=torch.float32))
    prefix, _ = history_prefixes(replace(batch, fractions=fractions), 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(prefix.fractions[0], fractions[0][[0, 1, 0, 1]], equal_nan=True)  # prefixes keep them


def test_padding_anywhere_changes_nothing():
    batch = _two_patients()
    tokens, gap, mask = visit_tokens(batch, DOSE_SCALE)
    # NaN-padded slots appended at the end, and a NaN slot in the middle of patient 0's history
    times = torch.tensor([[0.0, NAN, 1.0, 2.5, NAN], [0.0, NAN, NAN, NAN, NAN]])
    y = torch.full((2, 5, 2), NAN)
    y[0, [0, 2, 3]], y[1, 0] = batch.y[0], batch.y[1, 0]
    y[0, 1] = 9.0  # a value at a padded time is not a visit
    padded = Batch(times, y, batch.x, batch.doses)
    for a, b in zip((tokens, gap, mask), visit_tokens(padded, DOSE_SCALE)):
        assert torch.equal(a, b)
    # visits out of order are read in time order
    shuffled = Batch(batch.times[:, [2, 0, 1]], batch.y[:, [2, 0, 1]], batch.x, batch.doses)
    shuffled.times[1] = torch.tensor([NAN, 0.0, NAN])
    shuffled.y[1] = batch.y[1, [2, 0, 1]]
    for a, b in zip((tokens, gap, mask), visit_tokens(shuffled, DOSE_SCALE)):
        assert torch.equal(a, b)


def test_patient_without_visits_gets_the_prior_and_the_rest_are_unaffected():
    model = DiseaseCourse(2, 1, 1, hidden=0, dose_scale=DOSE_SCALE)
    amortiser = Amortiser.for_model(model, DOSE_SCALE, SMALL)
    batch = _two_patients()
    third = batch.take(torch.tensor([0, 1, 0]))
    empty = Batch(torch.cat([batch.times, torch.full((1, 3), NAN)]), third.y, third.x, third.doses)
    mean, cov = amortised_posterior(model, amortiser, empty)
    assert mean.shape == (3, model.n_effects) and cov.shape == (3, model.n_effects, model.n_effects)
    assert torch.equal(mean[2], torch.zeros(model.n_effects)) and torch.equal(cov[2], torch.eye(model.n_effects))
    alone, _ = amortised_posterior(model, amortiser, batch)
    torch.testing.assert_close(mean[:2], alone)
    assert torch.equal(cov[0], torch.diag(torch.diagonal(cov[0])))  # diagonal Gaussian


def test_prefixes_keep_the_first_k_visits_stratified_over_lengths():
    model = truth_model()
    batch, _, _ = cohort(model, 12, 3)
    prefix, patient = history_prefixes(batch, 3, torch.Generator().manual_seed(0))
    assert len(prefix) == 36 and torch.equal(patient, torch.arange(12).repeat(3))
    n = torch.isfinite(batch.times).sum(1)
    k = torch.isfinite(prefix.times).sum(1).reshape(3, 12)
    assert ((k >= 1) & (k <= n)).all()
    assert (k[0] <= torch.ceil(n / 3)).all() and (k[2] > torch.floor(2 * n / 3)).all()
    kept = torch.isfinite(prefix.times)
    assert torch.equal(prefix.times[kept], batch.take(patient).times[kept])  # a prefix, in time order
    assert (kept[:, 1:] <= kept[:, :-1]).all()


@pytest.fixture(scope="module")
def trained():
    model = truth_model()
    train, _, _ = cohort(model, 120, 11)
    amortiser, losses = fit_amortiser(model, train, DOSE_SCALE, SMALL)
    held_out, _, _ = cohort(model, 40, 12)
    # condition on the first 2..6 visits, so short and long histories are both read
    keep = torch.arange(6)[None, :] < (2 + torch.arange(40) % 5)[:, None]
    held_out = Batch(torch.where(keep, held_out.times, NAN), held_out.y, held_out.x, held_out.doses)
    return model, amortiser, losses, held_out


def test_amortiser_predicts_the_laplace_posterior_of_held_out_patients(trained):
    model, amortiser, losses, batch = trained
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])
    eta, cov = posterior(model, batch, steps=200)
    mean, enc_cov = amortised_posterior(model, amortiser, batch)
    for j in (0, 3, 4, 5):  # tau and the offsets: well identified
        assert np.corrcoef(mean[:, j], eta[:, j])[0, 1] > 0.8, j
    # the encoder's spread covers its error: not much narrower than the Laplace one
    enc_sd, sd = torch.linalg.diagonal(enc_cov).sqrt(), torch.linalg.diagonal(cov).sqrt()
    assert (enc_sd.median(0).values > 0.7 * sd.median(0).values).all()


def test_posterior_from_the_encoder_converges_to_the_same_map(trained):
    model, amortiser, _, batch = trained
    start = amortiser.mean(batch)
    from_zero, cov_zero = posterior(model, batch, steps=200)
    from_encoder, cov_encoder = posterior(model, batch, steps=200, init=start)
    torch.testing.assert_close(from_encoder, from_zero, rtol=0, atol=2e-2)
    torch.testing.assert_close(cov_encoder, cov_zero, rtol=0, atol=2e-2)
    joint = model.log_joint(from_encoder, batch).sum() - model.log_joint(from_zero, batch).sum()
    assert joint > -1e-2
    # the encoder's guess is already closer to the mode, and more probable, than the prior mean is
    assert (start - from_zero).norm() < 0.6 * from_zero.norm()
    assert model.log_joint(start, batch).sum() > model.log_joint(torch.zeros_like(start), batch).sum() + 100
    with pytest.raises(ValueError, match=r"init must be \(S, P\) = \(40, 6\), got \(40, 5\)"):
        posterior(model, batch, init=start[:, :5])


def test_same_seed_same_amortiser_and_the_global_rng_is_untouched():
    model = truth_model()
    train, _, _ = cohort(model, 16, 5)
    config = AmortiserConfig(d_model=8, d_state=2, prefixes=2, steps=5, batch_size=8, seed=3)
    torch.manual_seed(123)
    a, losses_a = fit_amortiser(model, train, DOSE_SCALE, config)
    after = torch.rand(1)
    torch.manual_seed(123)
    b, losses_b = fit_amortiser(model, train, DOSE_SCALE, config)
    assert torch.equal(torch.rand(1), after)
    assert losses_a == losses_b
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c, _ = fit_amortiser(model, train, DOSE_SCALE, AmortiserConfig(**{**config.to_dict(), "seed": 4}))
    assert not torch.equal(a.state_dict()["encoder.embed.weight"], c.state_dict()["encoder.embed.weight"])


def test_config_rejects_unknown_keys():
    assert AmortiserConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(InputError, match=r"^amortiser config: epoch: unknown keys \['epoch'\]"):
        AmortiserConfig.from_dict({"epoch": 3})
