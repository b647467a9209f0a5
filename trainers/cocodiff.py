"""CoCoDiff (docs/METHODS.md §2): coarse-fine text co-guided latent diffusion as a training-only plug-in.

A GCN backbone gives a pooled feature x_0 (N, D). During training a latent denoiser, conditioned on the
class's *fine* text (a per-class motion description) added to the time embedding, turns a noised x_t back
into a generated feature x̂_0; x̂_0 is classified by the same head and aligned with the class's *coarse* text
(label + synonyms) by a symmetric KL contrastive loss. At inference only backbone + head run.

The module never owns the schedule: `trainers.diffusion.NoiseSchedule` is passed in, and the losses are
functions of tensors. This file holds the denoiser, the module and the losses; the configuration is in
`trainers.configs`, the fit loop, evaluation and export in `trainers.cocodiff_fit`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainers.configs import MAX_LOGIT_SCALE, CoCoDiffModuleConfig
from trainers.diffusion import NoiseSchedule
from trainers.layers import TimestepEmbedder, modulate


def build_schedule(cfg: CoCoDiffModuleConfig) -> NoiseSchedule:
    """The feature-space forward process; the denoiser predicts x_0 (prediction_type 'sample')."""
    return NoiseSchedule(cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end, "sample")


# ----------------------------------------------------------------------------------------------
# Latent denoiser
# ----------------------------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    """adaLN-modulated MLP with a gated residual: x + gate · MLP(modulate(LN(x), shift, scale))."""

    def __init__(self, hidden: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.SiLU(), nn.Linear(inner, hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 3 * hidden))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """h (N, H), c (N, H) -> (N, H)."""
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=-1)               # 3 x (N, H)
        # modulate() broadcasts over a token axis: give the single feature one.
        x = modulate(self.norm(h).unsqueeze(1), shift, scale).squeeze(1)            # (N, H)
        return h + gate * self.mlp(x)                                                # (N, H)


class LatentDenoiser(nn.Module):
    """Residual MLP predicting x_0 from x_t, conditioned on c = t_emb(t) + proj(fine text) (docs/METHODS.md §2).

    The output is x_t + final(h): with the adaLN-Zero init below every block is the identity and the final
    layer is zero, so at init x̂_0 == x_t exactly, i.e. the module starts as plain Gaussian feature noise and
    learns to denoise from there.
    """

    def __init__(self, feature_dim: int, fine_dim: int, hidden: int, depth: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.x_embedder = nn.Linear(feature_dim, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = nn.Sequential(nn.Linear(fine_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(ResidualBlock(hidden, mlp_ratio) for _ in range(depth))
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.final_linear = nn.Linear(hidden, feature_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, N(0, 0.02) timestep MLP; adaLN-Zero modulations and a zero output layer (DiT §3.2)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for lin in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_adaLN[-1], self.final_linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, fine: torch.Tensor,
                fine_keep: torch.Tensor | None = None) -> torch.Tensor:
        """x_t (N, D), t (N,), fine (N, D_f), fine_keep (N,) bool or None -> x̂_0 (N, D)."""
        y = self.y_embedder(fine)                                          # (N, H)
        if fine_keep is not None:
            y = y * fine_keep.to(y.dtype).unsqueeze(-1)                    # dropped samples: time only
        c = self.t_embedder(t) + y                                         # (N, H)
        h = self.x_embedder(x_t)                                           # (N, H)
        for block in self.blocks:
            h = block(h, c)                                                # (N, H)
        shift, scale = self.final_adaLN(c).chunk(2, dim=-1)                # 2 x (N, H)
        h = modulate(self.norm_final(h).unsqueeze(1), shift, scale).squeeze(1)
        return x_t + self.final_linear(h)                                  # (N, D)


# ----------------------------------------------------------------------------------------------
# The plug-in module
# ----------------------------------------------------------------------------------------------

class CoCoDiffModule(nn.Module):
    """Training-only parts: the denoiser, the coarse-alignment projections and the learnable logit scale."""

    def __init__(self, feature_dim: int, fine_dim: int, coarse_dim: int, hidden: int = 512, depth: int = 3,
                 align_dim: int = 256, kl_temperature: float = 0.07):
        super().__init__()
        self.denoiser = LatentDenoiser(feature_dim, fine_dim, hidden, depth)
        self.skeleton_proj = nn.Linear(feature_dim, align_dim)
        self.coarse_proj = nn.Linear(coarse_dim, align_dim)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / kl_temperature)))

    def logit_scale(self) -> torch.Tensor:
        """exp of the learnable log-scale, capped at MAX_LOGIT_SCALE (scalar)."""
        return self.log_logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def forward(self, x0: torch.Tensor, fine: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                schedule: NoiseSchedule, fine_keep: torch.Tensor | None = None) -> torch.Tensor:
        """One-step generation: x0 (N, D), fine (N, D_f), t (N,), noise (N, D) -> x̂_0 (N, D)."""
        x_t = schedule.add_noise(x0, noise, t)                             # (N, D)
        out = self.denoiser(x_t, t, fine, fine_keep)                       # (N, D)
        return schedule.predict_sample(x_t, out, t)                        # (N, D)

    def align(self, feats: torch.Tensor, coarse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (N, D), coarse text (M, D_c) -> embeddings (N, A), (M, A) in the shared alignment space."""
        return self.skeleton_proj(feats), self.coarse_proj(coarse)


def build_module(cfg: CoCoDiffModuleConfig, feature_dim: int, fine_dim: int, coarse_dim: int) -> CoCoDiffModule:
    """The module sized by the config; input widths come from the backbone and the encoded texts."""
    return CoCoDiffModule(feature_dim, fine_dim, coarse_dim, cfg.hidden, cfg.depth, cfg.align_dim, cfg.kl_temperature)


def draw_diffusion_inputs(n: int, feature_dim: int, num_steps: int, fine_dropout: float,
                          generator: torch.Generator, device: torch.device | str = "cpu"
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A random t per sample (N,), Gaussian noise (N, D) and the fine-text keep mask (N,) (None: keep all).

    Drawn on the CPU from `generator` (whose state the fit loop checkpoints), then moved to `device`.
    """
    t = torch.randint(num_steps, (n,), generator=generator)
    noise = torch.randn(n, feature_dim, generator=generator)
    keep = torch.rand(n, generator=generator) >= fine_dropout if fine_dropout > 0 else None
    return t.to(device), noise.to(device), keep.to(device) if keep is not None else None


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------

def kl_contrastive_loss(feat: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor,
                        text_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric KL contrastive loss (GAP style): samples of one class all count as positives.

    feat (N, A) skeleton embeddings with class ids labels (N,); text (M, A) text embeddings with class ids
    text_labels (M,) (default: labels, one text per sample; pass arange(C) for C class texts). Logits are
    cosine similarities × logit_scale; the target of each row is the same-label indicator normalised to sum
    to one, so duplicates of a class share the probability mass instead of counting as negatives (why KL and
    not CE). Skeleton→text rows and text→skeleton rows are averaged; rows without any positive are skipped.
    """
    text_labels = labels if text_labels is None else text_labels
    logits = logit_scale * F.normalize(feat.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T   # (N, M)
    same = (labels[:, None] == text_labels[None, :]).float()                                         # (N, M)

    def kl_rows(lg: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        has_pos = target.sum(-1) > 0                                                 # (R,)
        p = target[has_pos] / target[has_pos].sum(-1, keepdim=True)                 # (R', K)
        log_q = F.log_softmax(lg[has_pos], dim=-1)                                  # (R', K)
        # KL(p || q) = Σ p log p − p log q; xlogy gives 0·log 0 = 0 for the non-positives.
        return (torch.special.xlogy(p, p) - p * log_q).sum(-1).mean()

    return 0.5 * (kl_rows(logits, same) + kl_rows(logits.T, same.T))


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The baseline objective: CE(head(x_0)) (keys as in `cocodiff_loss`)."""
    ce = F.cross_entropy(logits.float(), labels)
    return {"loss": ce, "loss_cls": ce}


def cocodiff_loss(logits: torch.Tensor, logits_gen: torch.Tensor, x0: torch.Tensor, x0_hat: torch.Tensor,
                  skel_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor,
                  w_diff: float, w_gen: float, w_coarse: float,
                  x0_hat_diff: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """CE(head(x_0)) + w_diff·||x̂_0 − sg(x_0)||² + w_gen·CE(head(x̂_0)) + w_coarse·L_KL(x̂_0, coarse); docs/METHODS.md §2.

    logits, logits_gen (N, C): head of x_0 and of x̂_0; x0, x0_hat (N, D); skel_emb (N, A) the aligned x̂_0,
    text_emb (N, A) the aligned coarse text of each sample's class. x0_hat_diff (N, D): the prediction the
    diffusion term uses (default x0_hat), e.g. one denoised from an x_t built of sg(x_0)
    (module.detach_diffusion_input). The diffusion term is a mean over elements with x_0 detached as target; it
    reaches the backbone only through x_t, and not at all from an x_t of sg(x_0). Every term is returned
    undetached so each can be inspected or back-propagated alone.
    """
    x0_hat_diff = x0_hat if x0_hat_diff is None else x0_hat_diff
    terms = {
        "loss_cls": F.cross_entropy(logits.float(), labels),
        "loss_diff": (x0_hat_diff.float() - x0.detach().float()).pow(2).mean(),
        "loss_gen": F.cross_entropy(logits_gen.float(), labels),
        "loss_coarse": kl_contrastive_loss(skel_emb, text_emb, labels, logit_scale),
    }
    terms["loss"] = (terms["loss_cls"] + w_diff * terms["loss_diff"] + w_gen * terms["loss_gen"]
                     + w_coarse * terms["loss_coarse"])
    return terms


__all__ = [
    "CoCoDiffModule", "LatentDenoiser", "build_module", "build_schedule", "classification_loss", "cocodiff_loss",
    "draw_diffusion_inputs", "kl_contrastive_loss",
]
