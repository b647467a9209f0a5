"""What the models share: adaLN modulation and the timestep embedder (the TDSM denoiser and the CoCoDiff module), and
the parameter count every method logs."""

from __future__ import annotations

import math

import torch
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with (N, C) modulation broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (freq_dim) -> MLP -> (N, C)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(N,) integer or float steps -> (N, dim) [cos | sin] features."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]                        # (N, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)   # (N, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = self.sinusoid(t, self.freq_dim)                        # (N, freq_dim), float32
        # Cast to the weights' dtype so a float64 copy of the model runs (exactness tests); autocast recasts anyway.
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))            # (N, C)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
