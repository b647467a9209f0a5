"""TDSM denoiser: a Diffusion Transformer of CrossDiT blocks over a skeleton token and text tokens.

Follows docs/METHODS.md §1 (Do & Kim, ICCV 2025): two token streams (skeleton `x`, local text `l`) with their own
LayerNorm, adaLN modulation, QKV/output projections and MLPs; one joint attention over the concatenated
tokens; conditioning c = t_emb + fc_emb(global text). The schedule lives in `trainers.diffusion`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from trainers.configs import ModelConfig
from trainers.layers import TimestepEmbedder, modulate

# ----------------------------------------------------------------------------------------------
# CrossDiT block
# ----------------------------------------------------------------------------------------------

class StreamParams(nn.Module):
    """Per-stream weights of a CrossDiT block: norms, adaLN, QKV, output projection, MLP."""

    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden_size))
        # shift/scale/gate for attention and for the MLP: six (N, C) vectors from c.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))


class CrossDiTBlock(nn.Module):
    """Joint attention over [skeleton tokens; text tokens] with separate per-stream weights."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.x_stream = StreamParams(hidden_size, mlp_ratio)
        self.l_stream = StreamParams(hidden_size, mlp_ratio)

    def forward(self, x: torch.Tensor, l: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, M_x, C), l (N, M_l, C), c (N, C) -> updated (x, l)."""
        mx = x.shape[1]
        mods = []
        qkvs = []
        for h, s in ((x, self.x_stream), (l, self.l_stream)):
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = s.adaLN_modulation(c).chunk(6, dim=-1)  # 6 x (N, C)
            mods.append((gate_a, shift_m, scale_m, gate_m))
            qkvs.append(s.qkv(modulate(s.norm1(h), shift_a, scale_a)))  # (N, M_s, 3C)
        qkv = torch.cat(qkvs, dim=1)                                        # (N, M_x + M_l, 3C)
        q, k, v = rearrange(qkv, "n m (three h d) -> three n h m d", three=3, h=self.num_heads)
        attn = F.scaled_dot_product_attention(q, k, v)                      # (N, H, M, D)
        attn = rearrange(attn, "n h m d -> n m (h d)")                      # (N, M_x + M_l, C)
        outs = []
        for h, a, s, (gate_a, shift_m, scale_m, gate_m) in (
            (x, attn[:, :mx], self.x_stream, mods[0]), (l, attn[:, mx:], self.l_stream, mods[1]),
        ):
            h = h + gate_a.unsqueeze(1) * s.proj(a)
            h = h + gate_m.unsqueeze(1) * s.mlp(modulate(s.norm2(h), shift_m, scale_m))
            outs.append(h)
        return outs[0], outs[1]


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + Linear(C -> skeleton_dim) on the skeleton token."""

    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------------------------
# TDSM denoiser
# ----------------------------------------------------------------------------------------------

class TDSMDenoiser(nn.Module):
    """eps/x0/v predictor for a skeleton feature conditioned on one class's global + local text."""

    def __init__(self, cfg: ModelConfig, skeleton_dim: int, text_global_dim: int, text_local_dim: int,
                 text_tokens: int):
        super().__init__()
        C = cfg.hidden_size
        self.skeleton_dim = skeleton_dim
        self.text_tokens = text_tokens
        self.x_embedder = nn.Linear(skeleton_dim, C)
        self.fl_embedder = nn.Linear(text_local_dim, C)
        self.pos_embed = nn.Parameter(torch.zeros(1, text_tokens, C))
        self.t_embedder = TimestepEmbedder(C)
        self.fc_embedder = nn.Sequential(nn.Linear(text_global_dim, C), nn.SiLU(), nn.Linear(C, C))
        self.blocks = nn.ModuleList(CrossDiTBlock(C, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(C, skeleton_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, N(0, 0.02) embeddings; adaLN-Zero: every modulation and the output are zero at init.

        Zero gates make each block the identity at start (DiT §3.2), and a zero final layer makes the initial
        prediction exactly zero, which is what stabilises early diffusion training.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.blocks:
            for s in (block.x_stream, block.l_stream):
                nn.init.zeros_(s.adaLN_modulation[-1].weight)
                nn.init.zeros_(s.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, text_global: torch.Tensor,
                text_local: torch.Tensor, candidate: torch.Tensor | None = None) -> torch.Tensor:
        """z_t (N, D_x), t (N,), text_global (N, D_g), text_local (N, M_l, D_l) -> prediction (N, D_x).

        With `candidate` (N,) the texts are per-class tables, text_global (C, D_g) and text_local (C, M_l, D_l):
        each class's text is embedded once and row i reads class candidate[i]. The result equals passing the
        texts repeated per row, without building the (N, M_l, D_l) copy (zero-shot scoring: N = K x n x C rows).
        """
        x = self.x_embedder(z_t).unsqueeze(1)                        # (N, 1, C)   M_x = 1
        l = self.fl_embedder(text_local) + self.pos_embed            # (N or C, M_l, C)
        g = self.fc_embedder(text_global)                            # (N or C, C)
        if candidate is not None:
            l, g = l[candidate], g[candidate]                        # (N, M_l, C), (N, C)
        c = self.t_embedder(t) + g                                   # (N, C)
        for block in self.blocks:
            x, l = block(x, l, c)                                    # (N, 1, C), (N, M_l, C)
        return self.final_layer(x, c).squeeze(1)                     # (N, D_x)
