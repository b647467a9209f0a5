"""CoCoDiff (docs/METHODS.md §2): coarse-fine text co-guided latent diffusion as a training-only plug-in.

A GCN backbone gives a pooled feature x_0 (N, D). During training a latent denoiser, conditioned on the
class's *fine* text (a per-class motion description) added to the time embedding, turns a noised x_t back
into a generated feature x̂_0; x̂_0 is classified by the same head and aligned with the class's *coarse* text
(label + synonyms) by a symmetric KL contrastive loss. At inference only backbone + head run.

The module never owns the schedule: `trainers.diffusion.NoiseSchedule` is passed in, and the losses are
functions of tensors. This file holds the configuration, the denoiser, the module and the losses; the fit
loop, evaluation and export live in `trainers.cocodiff_fit`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from trainers.config import (
    MAX_BATCH,
    MAX_STEPS,
    MAX_THREADS,
    MAX_TIMESTEPS,
    MAX_WEIGHT,
    OptimConfig,
    Section,
    Seed,
    TrainConfig,
)
from trainers.diffusion import NoiseSchedule
from trainers.layers import TimestepEmbedder, modulate
from trainers.skeleton.splits import BENCHMARKS
from trainers.skeleton.synthetic import NUM_CLASSES as SYNTHETIC_CLASSES

# CLIP's cap on the learnable logit scale (GAP inherits it): beyond 100 the softmax is a hard arg-max.
MAX_LOGIT_SCALE = 100.0


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

class BackboneConfig(Section):
    """The GCN feature extractor + linear head: everything that also runs at inference.

    Defaults are sized for the embedded default on 2 CPU cores (a light ST-GCN, 32-d x_0); the paper-scale plan
    (CTR-GCN, 64 base channels, units 4,3,3, 256-d x_0) is service/configs/cocodiff_paper.yaml.
    """

    encoder: Literal["stgcn", "shiftgcn", "ctrgcn"] = Field(
        "stgcn", description="GCN encoder (docs/METHODS.md §2: CTR-GCN at paper scale; ST-GCN as the light option).")
    base_channels: int = Field(
        8, ge=1, le=4096, description="Width of the first stage; x_0 is 4x this with three stages "
                                                   "(paper scale: 64 -> 256-d).")
    units_per_stage: list[Annotated[int, Field(ge=1, le=64)]] = Field(
        [1, 1, 1], min_length=1, max_length=16,
        description="GCN units per stage; stages double the width (paper plan: 4,3,3).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Encoder dropout (ST-GCN: per unit; others: before the head).")
    stream: Literal["joint", "bone", "motion"] = Field(
        "joint", description="Input stream computed from the joint array; ensemble streams by their logits.")
    layout: Literal["ntu-rgb+d", "openpose"] = Field(
        "ntu-rgb+d", description="Skeleton graph: NTU-25 joints or OpenPose-18 (Kinetics-Skeleton).")


class CoCoDiffModuleConfig(Section):
    """The training-only diffusion module and its guidance weights (the loss of docs/METHODS.md §2)."""

    enabled: bool = Field(True, description="Train with the module; False is the plain backbone baseline.")
    num_train_timesteps: int = Field(
        100, ge=1, le=MAX_TIMESTEPS, description="Diffusion steps T of the feature-space schedule.")
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = Field(
        "cosine", description="Beta schedule; cosine reaches pure noise at t = T-1, the linear ones may not.")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="First beta (linear schedules only).")
    beta_end: float = Field(0.02, gt=0, lt=1, description="Last beta (linear schedules only).")
    hidden: int = Field(128, ge=8, le=16384, description="Width of the residual-MLP denoiser (paper scale: 512).")
    depth: int = Field(2, ge=1, le=256, description="Residual MLP blocks of the denoiser (paper scale: 3).")
    align_dim: int = Field(64, ge=8, le=16384, description="Width of the shared space where x̂_0 meets the coarse text "
                                                 "(paper scale: 256).")
    w_diff: float = Field(1.0, ge=0, le=MAX_WEIGHT, description="Weight of ||x̂_0 - sg(x_0)||² (mean over elements).")
    w_gen: float = Field(
        0.5, ge=0, le=MAX_WEIGHT, description="Weight of CE(head(x̂_0)): classifying the generated features.")
    w_coarse: float = Field(
        0.1, ge=0, le=MAX_WEIGHT, description="Weight of the symmetric KL contrastive loss of x̂_0 vs coarse text.")
    kl_temperature: float = Field(
        0.07, gt=1.0 / MAX_LOGIT_SCALE, le=1e3,
        description="Initial temperature; the logit scale 1/τ is learnable (≤ 100).")
    fine_dropout: float = Field(
        0.0, ge=0, lt=1, description="Probability of dropping a sample's fine-text conditioning (zero vector).")
    detach_diffusion_input: bool = Field(
        True, description="Build the x_t of the diffusion term ||x̂_0 - sg(x_0)||² from sg(x_0), so that term trains "
                          "the denoiser only; CE(head(x̂_0)) and the coarse KL still reach the backbone through x_t "
                          "(README, Results: the detach ablation).")

    @model_validator(mode="after")
    def _check_betas(self) -> CoCoDiffModuleConfig:
        if self.beta_schedule != "cosine" and self.beta_start >= self.beta_end:
            raise ValueError(f"module.beta_start={self.beta_start} must be < module.beta_end={self.beta_end}")
        return self


class SyntheticDataConfig(Section):
    """The embedded default: the generated NTU-format action set of `trainers.skeleton.synthetic`.

    46 classes (a motion primitive applied to a body part, e.g. "raise left arm") with generated class names and
    one-sentence descriptions; performers, cameras and setups vary as in NTU, so the set has NTU-60-style X-Sub
    and X-View columns. The service layer generates and prepares it once (cached under $SKELDIFF_CACHE/synthetic).
    """

    per_class: int = Field(
        20, ge=2, le=10_000, description="Generated sequences per class (before the benchmark's train/test split).")
    seed: Seed = Field(0, description="Seed of the generator (performers, cameras, speeds, noise).")


# The generated set as NTU files (X-Sub, X-View columns), as a Kinetics-Skeleton release and as a PKU-MMD release
# (trainers/skeleton/synthetic_release.py): the same 46 actions through each protocol's reader and split.
SYNTHETIC_BENCHMARKS = ("ntu60-xsub", "ntu60-xview", "kinetics", "pku-xsub", "pku-xview")


class SkeletonDataConfig(Section):
    """Where the skeleton arrays come from and how train / validation / test are split."""

    source: Literal["synthetic", "prepared"] = Field(
        "synthetic", description="'prepared': data.npy/label.npy/index.tsv of `service.prepare` in data.prepared_dir; "
                                 "'synthetic': the generated action set (data.synthetic), prepared the same way.")
    prepared_dir: Path | None = Field(
        None, description="Output folder of `python -m service.prepare` (source=prepared).")
    benchmark: str = Field(
        "ntu60-xsub", description=f"Column of index.tsv that splits train/test: {', '.join(BENCHMARKS)} "
                                  f"(the synthetic set: {', '.join(SYNTHETIC_BENCHMARKS)}; kinetics "
                                  "needs backbone.layout=openpose).")
    val_fraction: float = Field(
        0.1, gt=0, lt=1,
        description="Training samples held out for validation (checkpoint choice; never the test split).")
    val_seed: Seed = Field(0, description="Seed of the validation draw.")
    synthetic: SyntheticDataConfig = Field(default_factory=SyntheticDataConfig)

    @field_validator("benchmark")
    @classmethod
    def _known_benchmark(cls, value: str) -> str:
        if value not in BENCHMARKS:
            raise ValueError(f"expected one of {', '.join(BENCHMARKS)}")
        return value

    @model_validator(mode="after")
    def _prepared_needs_dir(self) -> SkeletonDataConfig:
        if self.source == "prepared" and self.prepared_dir is None:
            raise ValueError("data.prepared_dir is required with data.source=prepared")
        if self.source == "synthetic" and self.benchmark not in SYNTHETIC_BENCHMARKS:
            raise ValueError(f"data.benchmark={self.benchmark}: the synthetic set comes as "
                             f"{', '.join(SYNTHETIC_BENCHMARKS)}")
        return self

    @property
    def num_classes(self) -> int:
        """Classes of the head and text tables: the synthetic catalogue's, else the benchmark's."""
        return SYNTHETIC_CLASSES if self.source == "synthetic" else BENCHMARKS[self.benchmark].num_classes


class CoCoDiffTextConfig(Section):
    """Coarse (label + synonyms) and fine (description) prompt files, one line per class each."""

    encoder: str = Field("minilm", description="'minilm' (offline) or 'open_clip:MODEL:PRETRAINED_OR_PATH'.")
    class_names: Path | None = Field(
        None, description="Coarse text: one class name per line; default: the synthetic set's generated names "
                          "(source=synthetic) or the embedded NTU-60 names.")
    synonyms: list[Path] | None = Field(
        None, description="More coarse files (synonyms, one line per class), concatenated with the names along "
                          "channels; default: the embedded synonyms of the synthetic set (source=synthetic), "
                          "else none.")
    descriptions: list[Path] | None = Field(
        None, description="Fine text files (one description per class); default: the synthetic set's generated "
                          "descriptions (source=synthetic) or the embedded NTU-60 descriptions.")
    cache_dir: Path | None = Field(
        None, description="Encoded-text cache; default $SKELDIFF_CACHE or ~/.cache/skeldiff.")


class CoCoDiffEvalConfig(Section):
    """Classification on the validation split."""

    batch_size: int = Field(256, ge=1, le=MAX_BATCH, description="Sequences per evaluation forward.")


class CoCoDiffOptimConfig(OptimConfig):
    """AdamW as for TDSM, with defaults sized for the embedded default on 2 CPU cores (paper: batch 64 on NTU,
    128 on Kinetics; see service/configs/cocodiff_paper.yaml). Subclassed rather than built with other values
    in a default factory, so that overriding one field (`--set optim.lr=...`) keeps the others' defaults."""

    lr: float = Field(3e-3, gt=0, description="Peak learning rate (paper scale: 1e-3).")
    warmup_steps: int = Field(20, ge=0, le=MAX_STEPS, description="Linear warm-up steps.")
    batch_size: int = Field(
        16, ge=1, le=MAX_BATCH, description="Sequences per step (per rank under DDP; paper: 64 on NTU).")


class CoCoDiffTrainConfig(TrainConfig):
    """Loop length and cadence of the embedded default (a few minutes on 2 CPU cores)."""

    steps: int = Field(600, ge=1, le=MAX_STEPS, description="Training iterations.")
    eval_every: int = Field(100, ge=1, le=MAX_STEPS, description="Evaluate on the validation split every N steps.")
    checkpoint_every: int = Field(100, ge=1, le=MAX_STEPS, description="Write a resumable checkpoint every N steps.")
    threads: int = Field(
        1, ge=0, le=MAX_THREADS, description="torch intra-op threads; 0 keeps torch's default. One: small "
                                             "convolutions run fastest so on shared cores.")


class CoCoDiffConfig(Section):
    """Everything one CoCoDiff (or baseline) run reads."""

    method: Literal["cocodiff"] = "cocodiff"
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    module: CoCoDiffModuleConfig = Field(default_factory=CoCoDiffModuleConfig)
    optim: CoCoDiffOptimConfig = Field(default_factory=CoCoDiffOptimConfig)
    train: CoCoDiffTrainConfig = Field(default_factory=CoCoDiffTrainConfig)
    data: SkeletonDataConfig = Field(default_factory=SkeletonDataConfig)
    text: CoCoDiffTextConfig = Field(default_factory=CoCoDiffTextConfig)
    eval: CoCoDiffEvalConfig = Field(default_factory=CoCoDiffEvalConfig)

    @model_validator(mode="after")
    def _layout_fits_data(self) -> CoCoDiffConfig:
        joints = "openpose" if BENCHMARKS[self.data.benchmark].family == "kinetics" else "ntu-rgb+d"
        if self.backbone.layout != joints:
            raise ValueError(f"backbone.layout={self.backbone.layout} but data.benchmark={self.data.benchmark} "
                             f"has {'OpenPose-18' if joints == 'openpose' else 'NTU-25'} joints: "
                             f"set backbone.layout={joints}")
        return self


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
    "BackboneConfig", "CoCoDiffConfig", "CoCoDiffEvalConfig", "CoCoDiffModule", "CoCoDiffModuleConfig",
    "CoCoDiffOptimConfig", "CoCoDiffTextConfig", "CoCoDiffTrainConfig", "LatentDenoiser", "SkeletonDataConfig",
    "SyntheticDataConfig", "build_module", "build_schedule", "classification_loss", "cocodiff_loss",
    "draw_diffusion_inputs", "kl_contrastive_loss",
]
