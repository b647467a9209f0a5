"""DDPM noise schedule: betas, `add_noise`, prediction targets. The model never sees this maths."""

from __future__ import annotations

import math
from typing import Literal

import torch

BetaSchedule = Literal["linear", "scaled_linear", "cosine"]
PredictionType = Literal["epsilon", "sample", "v_prediction"]


def make_betas(num_steps: int, schedule: BetaSchedule, beta_start: float = 0.00085,
               beta_end: float = 0.012) -> torch.Tensor:
    """Betas (T,) in float64 for the named schedule."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if schedule == "scaled_linear":
        # Stable Diffusion's schedule (TDSM §4): linear in sqrt(beta).
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    if schedule == "cosine":
        # Nichol & Dhariwal 2021: abar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), betas clipped at 0.999.
        s = 0.008
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {schedule!r}")


class NoiseSchedule:
    """Forward process q(z_t | z_0) and the regression targets for each prediction type."""

    def __init__(self, num_steps: int, schedule: BetaSchedule = "scaled_linear",
                 beta_start: float = 0.00085, beta_end: float = 0.012,
                 prediction_type: PredictionType = "epsilon"):
        self.num_steps = num_steps
        self.prediction_type = prediction_type
        self.betas = make_betas(num_steps, schedule, beta_start, beta_end)
        abar = torch.cumprod(1.0 - self.betas, dim=0)
        self.alphas_cumprod = abar.float()
        self._sqrt_abar = abar.sqrt().float()
        self._sqrt_one_minus_abar = (1.0 - abar).sqrt().float()

    def _coeffs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t), sqrt(1-abar_t) gathered at t and broadcast to `like`."""
        shape = (-1,) + (1,) * (like.dim() - 1)
        a = self._sqrt_abar.to(like.device)[t].view(shape).to(like.dtype)
        s = self._sqrt_one_minus_abar.to(like.device)[t].view(shape).to(like.dtype)
        return a, s

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps."""
        a, s = self._coeffs(t, z0)
        return a * z0 + s * noise

    def get_velocity(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0 (Salimans & Ho 2022)."""
        a, s = self._coeffs(t, z0)
        return a * noise - s * z0

    def target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser regresses for this schedule's prediction type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return z0
        return self.get_velocity(z0, noise, t)

    def predict_sample(self, zt: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Recover the z_0 estimate from a model output of this schedule's prediction type."""
        a, s = self._coeffs(t, zt)
        if self.prediction_type == "epsilon":
            return (zt - s * model_out) / a
        if self.prediction_type == "sample":
            return model_out
        return a * zt - s * model_out
