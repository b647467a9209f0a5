"""Every config class of the project: TDSM's, CoCoDiff's and the GCN encoder's, one pydantic section per concern.

The machinery they share (the `Section` base, value bounds, YAML files, the flat dotted form, `build_config`) is in
`trainers.config`; the models and fit loops read these classes and never define their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from trainers.config import (
    MAX_BATCH,
    MAX_STEPS,
    MAX_THREADS,
    MAX_TIMESTEPS,
    MAX_WEIGHT,
    ClassCount,
    ClassId,
    Section,
    Seed,
)
from trainers.skeleton.splits import BENCHMARKS
from trainers.skeleton.synthetic import NUM_CLASSES as SYNTHETIC_CLASSES

# ----------------------------------------------------------------------------------------------
# TDSM (docs/METHODS.md §1)
# ----------------------------------------------------------------------------------------------

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's denoiser (docs/METHODS.md §1): C=768, B=12, 12 heads, ~261 M parameters with 2048-d text.
    "paper": {"hidden_size": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0},
    # CPU-friendly sizes for the embedded default, smoke sweeps and tests.
    "small": {"hidden_size": 256, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0},
    "tiny": {"hidden_size": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
}


class ModelConfig(Section):
    """Size of the CrossDiT denoiser; input widths come from the data and text encoder."""

    # What `build_config` clears from a base config when an override names another preset.
    presets: ClassVar[dict[str, dict[str, Any]]] = MODEL_PRESETS

    preset: Literal["paper", "small", "tiny", "custom"] = Field(
        "tiny", description="Named size; explicit hidden_size/depth/num_heads/mlp_ratio override it ('custom').")
    hidden_size: int = Field(64, ge=8, le=16384, description="Transformer width C.")
    depth: int = Field(2, ge=1, le=256, description="Number of CrossDiT blocks B.")
    num_heads: int = Field(2, ge=1, le=1024, description="Attention heads; must divide hidden_size.")
    mlp_ratio: float = Field(2.0, gt=0, le=64, description="MLP hidden width as a multiple of C.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Fill size fields from the preset; fields given explicitly win."""
        if isinstance(data, dict):
            preset = data.get("preset", "tiny")
            if preset in MODEL_PRESETS:
                data = {**MODEL_PRESETS[preset], **data}
        return data

    @model_validator(mode="after")
    def _check_sizes(self) -> "ModelConfig":
        """Heads must divide the width; a preset whose sizes were overridden is recorded as 'custom'."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.num_heads={self.num_heads} must divide model.hidden_size={self.hidden_size}")
        sizes = {k: getattr(self, k) for k in MODEL_PRESETS["tiny"]}
        if self.preset != "custom" and sizes != MODEL_PRESETS[self.preset]:
            object.__setattr__(self, "preset", "custom")
        return self


class DiffusionConfig(Section):
    """DDPM forward process and what the denoiser predicts."""

    num_train_timesteps: int = Field(50, ge=1, le=MAX_TIMESTEPS, description="Total diffusion steps T (paper: 50).")
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = Field(
        "scaled_linear", description="Beta schedule; scaled_linear is Stable Diffusion's (paper).")
    beta_start: float = Field(0.00085, gt=0, lt=1, description="First beta (linear schedules).")
    beta_end: float = Field(0.012, gt=0, lt=1, description="Last beta (linear schedules).")
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = Field(
        "epsilon", description="Regression target: noise (paper), x0, or velocity.")


class LossConfig(Section):
    """TDSM objective L = L_diff + lambda * L_TD."""

    margin: float = Field(1.0, ge=0, le=MAX_WEIGHT, description="τ (tau), the margin of L_TD (paper: 1).")
    triplet_weight: float = Field(
        1.0, ge=0, le=MAX_WEIGHT, description="λ (lambda), the weight of L_TD in L_diff + λ L_TD (paper: 1).")


class OptimConfig(Section):
    """AdamW with linear warm-up and cosine decay (paper: lr 1e-4, wd 0.01, 100 warm-up steps)."""

    lr: float = Field(1e-3, gt=0, description="Peak learning rate (paper: 1e-4 for the paper-size model).")
    weight_decay: float = Field(0.01, ge=0, le=MAX_WEIGHT, description="AdamW weight decay.")
    warmup_steps: int = Field(100, ge=0, le=MAX_STEPS, description="Linear warm-up steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    batch_size: int = Field(
        128, ge=1, le=MAX_BATCH, description="Samples per step (each gets a positive and a negative prompt).")
    grad_clip: float = Field(1.0, ge=0, le=MAX_WEIGHT, description="Max gradient norm; 0 disables clipping.")


class TrainConfig(Section):
    """Loop length, evaluation cadence, precision and reproducibility."""

    steps: int = Field(1000, ge=1, le=MAX_STEPS, description="Training iterations (paper: 50,000).")
    eval_every: int = Field(250, ge=1, le=MAX_STEPS, description="Evaluate on validation classes every N steps.")
    checkpoint_every: int = Field(250, ge=1, le=MAX_STEPS, description="Write a resumable checkpoint every N steps.")
    seed: Seed = Field(2025, description="Seed of model init, batches, training noise (paper: 2025).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast where the device supports it fast (auto), or force one.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    threads: int = Field(
        0, ge=0, le=MAX_THREADS, description="torch intra-op threads; 0 = auto: the process's CPUs (affinity, "
                         "cgroup quota, at most $OMP_NUM_THREADS), 1 for models narrower than 256 "
                         "(trainers.runtime.resolve_threads).")


class TDSMTrainConfig(TrainConfig):
    """TrainConfig plus what only the TDSM loop offers."""

    compile: bool = Field(False, description="torch.compile the training forward/backward: 1.19x faster paper-size "
                          "steps on one CPU core after a one-off compile of ~95 s (docs/benchmarks.md); worth it "
                          "for long runs, not for smoke runs.")


class SyntheticConfig(Section):
    """The embedded generated feature task (see README: what it is and is not)."""

    samples_per_class: int = Field(60, ge=4, le=100_000, description="Generated feature vectors per class.")
    feature_dim: int = Field(256, ge=8, le=16384, description="Width of the generated skeleton features.")
    noise: float = Field(0.6, ge=0, le=1000, description="Within-class spread relative to the class prototype scale.")
    text_components: int = Field(
        16, ge=1, le=4096, description="Leading principal directions of the class texts that shape the prototypes.")
    seed: Seed = Field(0, description="Seed of the generator (prototypes and samples).")


class DataConfig(Section):
    """Where skeleton features and the zero-shot split come from."""

    source: Literal["synthetic", "features"] = Field(
        "synthetic", description="'features': SA-DVAE layout in features_dir; 'synthetic': embedded task.")
    features_dir: Path | None = Field(
        None, description="Folder with train.npy, train_label.npy, ztest.npy, z_label.npy (and, for GZSL metrics, "
                          "optionally gtest.npy, g_label.npy).")
    unseen: Path | list[ClassId] | None = Field(
        None, description="Unseen (test) class ids: a ru*.npy file or a list; default for features: z_label's classes.")
    seen: Path | list[ClassId] | None = Field(
        None, description="Seen class ids (rs*.npy); default: the non-unseen classes with samples in train_label.npy.")
    val_unseen: Path | list[ClassId] | ClassCount = Field(
        5, description="Validation classes carved from the seen ones: a rv*.npy file, a list, or a count N (seeded).")
    val_seed: Seed = Field(0, description="Seed of the validation-class draw when val_unseen is a count.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)


class TextConfig(Section):
    """Which text encoder and which prompts (one per class per file)."""

    encoder: str = Field("minilm", description="'minilm' (offline) or 'open_clip:MODEL:PRETRAINED_OR_PATH'.")
    layer: Literal["last", "penultimate"] = Field(
        "last", description="Text-tower layer: 'last' = every block; 'penultimate' = all but the last block, then "
                            "the final LayerNorm (minilm: hidden_states[-2]). Paper: penultimate (SD 2.1's encoder).")
    pooled: Literal["projected", "eot"] = Field(
        "projected", description="Global feature: 'projected' = the encoder's sentence embedding over its full "
                                 "context (open_clip encode_text on 77 tokens; minilm mean-pooled); 'eot' = the "
                                 "end-of-text (minilm: [SEP]) state of the prompt tokenised to max_tokens, "
                                 "unprojected. Paper: eot.")
    max_tokens: int = Field(35, ge=1, le=1024, description="Local text tokens M_l; with pooled=eot also the tokenised "
                                                  "length (padded/truncated). Paper: 35.")
    class_names: Path | None = Field(None, description="One class name per line; default: embedded NTU-60 names.")
    descriptions: list[Path] | None = Field(
        None, description="Description files (one sentence per class); default: embedded NTU-60 descriptions.")
    num_classes: ClassCount | None = Field(
        None, description="Read only the first N rows of class_names and of each descriptions file (the "
                                "official code reads NTU-120's files for NTU-60: N=60); default: every row.")
    cache_dir: Path | None = Field(
        None, description="Encoded-text cache; default $SKELDIFF_CACHE or ~/.cache/skeldiff.")


class EvalConfig(Section):
    """Zero-shot scoring: noise at t_test, pick the class whose text denoises best."""

    t_test: int = Field(25, ge=0, le=MAX_TIMESTEPS, description="Inference step (paper: 25 of T=50); must be < T.")
    t_test_grid: list[Annotated[int, Field(ge=0, le=MAX_TIMESTEPS)]] | None = Field(
        None, description="t_test values evaluated from one model (Fig. 5 curve); default: 9 values over [1, T).")
    noise_draws: int = Field(3, ge=1, le=1000, description="Independent evaluation noise draws; accuracy is averaged.")
    tune_t_test: bool = Field(
        False, description="Score the whole grid at every evaluation and report its best point as zsl_top1 "
                           "(sweeps: t_test becomes an inference parameter chosen on validation).")
    seed: Seed = Field(1234, description="Seed of the evaluation noise, independent of training randomness.")
    batch_size: int = Field(
        64, ge=1, le=MAX_BATCH, description="Test samples per batched forward (x draws x candidates).")


class TDSMConfig(Section):
    """Everything one TDSM run reads."""

    method: Literal["tdsm"] = "tdsm"
    model: ModelConfig = Field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TDSMTrainConfig = Field(default_factory=TDSMTrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _derive_eval_grid(self) -> "TDSMConfig":
        """t_test and its grid must lie in [0, T); the default grid spans the schedule; every grid includes t_test."""
        T = self.diffusion.num_train_timesteps
        if self.eval.t_test >= T:
            raise ValueError(f"eval.t_test={self.eval.t_test} must be < diffusion.num_train_timesteps={T}")
        grid = self.eval.t_test_grid
        if grid is None:
            step = max(1, T // 10)
            grid = range(min(step, T - 1), T, step)
        # The reported accuracy is read at t_test, so the grid always holds it.
        grid = [*grid, self.eval.t_test]
        bad = [t for t in grid if not 0 <= t < T]
        if bad:
            raise ValueError(f"eval.t_test_grid values {bad} must be in [0, {T}) (diffusion.num_train_timesteps)")
        if self.eval.t_test_grid != sorted(set(grid)):
            # Bypass validate_assignment: assigning here would re-run this validator.
            object.__setattr__(self.eval, "t_test_grid", sorted(set(grid)))
        return self


# ----------------------------------------------------------------------------------------------
# CoCoDiff (docs/METHODS.md §2)
# ----------------------------------------------------------------------------------------------

# CLIP's cap on the learnable logit scale (GAP inherits it): beyond 100 the softmax is a hard arg-max.
MAX_LOGIT_SCALE = 100.0


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
                          "(docs/results.md: the detach ablation).")

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
        1, ge=0, le=MAX_THREADS, description="torch intra-op threads; 0 = auto as for TDSM, the backbone's feature "
                                             "width x_0 standing for the model width (trainers.runtime."
                                             "resolve_threads). One: small convolutions run fastest so on shared "
                                             "cores.")


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


# ----------------------------------------------------------------------------------------------
# GCN feature encoder of TDSM's skeleton chain (trainers.encoder_fit)
# ----------------------------------------------------------------------------------------------

SYNTHETIC_LABEL = "synthetic-skeleton"   # the generated skeleton set's name in run and experiment names


def dataset_label(cfg: CoCoDiffConfig) -> str:
    """Short name of the data a config trains on, for run and experiment names: 'synthetic-skeleton' or the
    benchmark (with '-synthetic-skeleton' for the generated set's X-View)."""
    if cfg.data.source == "synthetic":
        return SYNTHETIC_LABEL if cfg.data.benchmark == "ntu60-xsub" else f"{SYNTHETIC_LABEL}-{cfg.data.benchmark}"
    return cfg.data.benchmark


class EncoderConfig(Section):
    """A GCN encoder and how to train it on the seen classes."""

    name: Literal["stgcn", "shiftgcn", "ctrgcn"] = Field("stgcn", description="GCN architecture.")
    layout: Literal["ntu-rgb+d", "openpose"] = Field("ntu-rgb+d", description="Skeleton graph layout.")
    base_channels: int = Field(64, ge=4, le=4096, description="Width of the first stage; the feature is 4x this.")
    units_per_stage: list[Annotated[int, Field(ge=1, le=64)]] = Field(
        [1, 1, 1], min_length=1, max_length=16, description="GCN units per stage (paper models: 4, 3, 3).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout (per unit for ST-GCN, before the head otherwise).")
    stream: Literal["joint", "bone", "motion"] = Field("joint", description="Input stream.")
    steps: int = Field(400, ge=1, le=MAX_STEPS, description="Training iterations.")
    batch_size: int = Field(32, ge=1, le=MAX_BATCH, description="Sequences per step, shared by all DDP workers.")
    checkpoint_every: int = Field(100, ge=1, le=MAX_STEPS, description="Steps between resumable checkpoints (last.pt).")
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate (cosine decay, 5% warm-up).")
    weight_decay: float = Field(1e-4, ge=0, le=MAX_WEIGHT, description="AdamW weight decay.")
    seed: Seed = Field(0, description="Seed of init and batches.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="bf16 autocast where fast.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda'.")
