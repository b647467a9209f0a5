import math

import pytest
import torch

from trainers.diffusion import NoiseSchedule, make_betas


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_betas_valid_and_monotone(schedule):
    betas = make_betas(50, schedule)
    assert betas.shape == (50,)
    assert torch.all(betas > 0) and torch.all(betas < 1)
    assert torch.all(betas[1:] >= betas[:-1] - 1e-12)


def test_scaled_linear_matches_stable_diffusion_definition():
    betas = make_betas(50, "scaled_linear", 0.00085, 0.012)
    assert betas[0].item() == pytest.approx(0.00085)
    assert betas[-1].item() == pytest.approx(0.012)
    mid = ((0.00085**0.5 + 0.012**0.5) / 2) ** 2
    assert make_betas(3, "scaled_linear")[1].item() == pytest.approx(mid)


def test_cosine_alphas_cumprod_follow_the_cosine():
    T = 100
    s = NoiseSchedule(T, "cosine")
    f = lambda t: math.cos(((t / T) + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert s.alphas_cumprod[49].item() == pytest.approx(f(50) / f(0), rel=1e-4)


@pytest.mark.parametrize("ptype", ["epsilon", "sample", "v_prediction"])
def test_predict_sample_inverts_targets(ptype, gen):
    s = NoiseSchedule(50, prediction_type=ptype)
    z0, eps = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
    t = torch.randint(50, (8,), generator=gen)
    zt = s.add_noise(z0, eps, t)
    assert torch.allclose(s.predict_sample(zt, s.target(z0, eps, t), t), z0, atol=1e-4)


def test_add_noise_statistics(gen):
    s = NoiseSchedule(50)
    t = torch.full((20000,), 49)
    zt = s.add_noise(torch.ones(20000, 4), torch.randn(20000, 4, generator=gen), t)
    a = s.alphas_cumprod[49].sqrt().item()
    assert zt.mean().item() == pytest.approx(a, abs=0.02)
    assert zt.var().item() == pytest.approx(1 - a * a, abs=0.03)
