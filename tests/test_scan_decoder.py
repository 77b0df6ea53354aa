"""The scan decoder: its mean change is linear in the state change, it learns a planted change, it samples."""

from __future__ import annotations

import pytest
import torch

from twin import InputError
from twin.scan_decoder import ChangeBasis, DecoderConfig, Pairs, ScanDecoder


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_mean_change_is_linear_in_the_state_change():
    torch.manual_seed(0)
    basis = ChangeBasis(channels=1, dims=2, state_dim=2, factor=4, width=8)
    torch.nn.init.normal_(basis.net[-1].weight)  # a trained-looking last layer instead of zeros
    ref, mask = torch.rand(3, 1, 32, 32), torch.ones(3, 32, 32, dtype=torch.bool)
    B = basis(ref, mask, torch.randn(3, 2))
    assert B.shape == (3, 2, 3, 8, 8)  # (batch, state, code channels, grid)
    dy = torch.randn(3, 2)
    mu = basis.mean(B, dy)
    assert torch.allclose(basis.mean(B, 2 * dy), 2 * mu, atol=1e-5)
    assert basis.mean(B, torch.zeros(3, 2)).abs().max() == 0  # no progression, no change


def test_decoder_learns_a_planted_change_and_samples_deterministically():
    g = torch.Generator().manual_seed(1)
    N = 96
    ref = torch.rand(N, 1, 32, 32, generator=g)
    mask = torch.ones(N, 32, 32, dtype=torch.bool)
    dy = torch.randn(N, 1, generator=g)
    pattern = torch.zeros(3, 8, 8)
    pattern[0, 2:6, 2:6] = 1.0  # the code moves a block by dy voxels
    code = dy[:, :, None, None] * pattern + 0.05 * torch.randn(N, 3, 8, 8, generator=g)
    pairs = Pairs(ref, mask, torch.ones(N), torch.zeros(N, 1), dy, code)
    decoder = ScanDecoder(1, 2, 1, DecoderConfig(basis_iterations=300, iterations=30, width=8, basis_width=8,
                                                 batch=32, lr=5e-3, sampler_steps=5))
    record = decoder.fit(pairs, progress=False)
    assert record["explained_variance"] > 0.8  # the planted change is found under the noise
    mu = decoder.mean_code(ref[:4], mask[:4], torch.zeros(4, 1), torch.ones(4, 1))
    assert torch.allclose(mu[:, 0, 3, 3], torch.ones(4), atol=0.2)
    args = (ref[:4], mask[:4], torch.zeros(4, 1), dy[:4], torch.ones(4))
    a, mu_a = decoder.sample_codes(*args, torch.Generator().manual_seed(5))
    b, _ = decoder.sample_codes(*args, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (4, 3, 8, 8)
    assert torch.allclose(mu_a, decoder.mean_code(ref[:4], mask[:4], torch.zeros(4, 1), dy[:4]))
    scan = decoder.decode(ref[:4], a, mask[:4]).scan
    assert scan.shape == ref[:4].shape and torch.isfinite(scan).all()


def test_config_is_strict():
    with pytest.raises(InputError, match="width"):
        DecoderConfig(width=0)
    with pytest.raises(InputError, match="unknown setting"):
        DecoderConfig.from_dict({"widht": 8})
    with pytest.raises(InputError, match="sampler_steps"):
        DecoderConfig(timesteps=10, sampler_steps=20)
