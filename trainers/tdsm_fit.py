"""TDSM fit loop: triplet diffusion training, periodic zero-shot evaluation, resumable checkpoints.

The loop reports through `trainers.tracking.Reporter`; it runs the same in a unit test, a local run and a
Ray Train worker. Randomness comes from one seeded generator whose state is checkpointed, so a resumed run
draws the same batches as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from trainers import checkpoint
from trainers.checkpoint import BEST, LAST
from trainers.config import MAX_STEPS, flatten, to_plain
from trainers.configs import TDSMConfig
from trainers.data import FeatureSplit, ZSLTask
from trainers.diffusion import NoiseSchedule
from trainers.errors import InputError
from trainers.fit_loop import DIVERGED_HINT, FitParts, LossGuard, build_adamw, optimizer_step, run_fit, step_plan
from trainers.io import load_checkpoint, stable_hash
from trainers.losses import sample_negative_classes, triplet_diffusion_loss
from trainers.runtime import apply_thread_policy, autocast, resolve_device, resolve_precision, seed_everything
from trainers.tdsm_model import TDSMDenoiser
from trainers.text import TextFeatures
from trainers.tracking import Reporter
from trainers.zsl import ZSLCurve, ZSLMetrics, evaluate_gzsl, evaluate_zsl

# Config keys that do not change what training computes: a checkpoint stays valid when only these differ.
NON_TRAINING_KEYS = ("eval.", "train.eval_every", "train.checkpoint_every", "train.device", "train.threads",
                     "train.compile", "text.cache_dir")


def build_schedule(cfg: TDSMConfig) -> NoiseSchedule:
    d = cfg.diffusion
    return NoiseSchedule(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end, d.prediction_type)


def build_model(cfg: TDSMConfig, feature_dim: int, text: TextFeatures) -> TDSMDenoiser:
    """The denoiser sized by the config, with input widths taken from the data and the encoded text."""
    return TDSMDenoiser(cfg.model, feature_dim, text.global_feats.shape[-1], text.local_feats.shape[-1],
                        text.local_feats.shape[1])


def build_optimizer(cfg: TDSMConfig, model: nn.Module) -> torch.optim.AdamW:
    """AdamW (fit_loop.build_adamw), fused on CPU and CUDA."""
    # Every parameter decayed, biases and norms too (one group): decaying matrices only would change the pinned traces.
    return build_adamw(model, cfg.optim.lr, cfg.optim.weight_decay, decay_all=True)


# Keys added after checkpoints existed: unset, they leave the fingerprint as it was (a run dir of before resumes).
NEW_KEYS_UNSET = ("text.num_classes",)


def training_fingerprint(cfg: TDSMConfig) -> str:
    """Hash of everything that changes what training computes (resuming under another config is refused)."""
    flat = flatten(to_plain(cfg))
    unset = [k for k in NEW_KEYS_UNSET if flat.get(k) is None]
    return checkpoint.training_fingerprint(flat, NON_TRAINING_KEYS, names=unset)


def zsl_metric_dict(curve: ZSLCurve, t_test: int, prefix: str, tuned: bool = False,
                    selection: bool = False) -> dict[str, float]:
    """Scalars of a curve: accuracy at t_test (at the best grid point when `tuned`), every grid point, and, on a
    split that may choose t_test (`selection`: validation, never test), the best grid point and its t_test."""
    if (selection or tuned) and prefix == "test":
        raise ValueError("t_test is never chosen on the test classes: no best-of-grid metrics for prefix 'test'")
    if tuned and not selection:
        raise ValueError("tuned=True reads the best grid point: it needs selection=True")
    best = curve.best()
    at = best if tuned else curve.at(t_test)
    out = {
        f"{prefix}/zsl_top1": at.top1,
        f"{prefix}/zsl_top1_std": at.top1_std,
        f"{prefix}/zsl_top1_ensemble": at.top1_ensemble,
    }
    if selection:
        out[f"{prefix}/zsl_top1_best"] = best.top1
        out[f"{prefix}/best_t_test"] = float(best.t_test)
    if at.top5 is not None:
        out[f"{prefix}/zsl_top5"] = at.top5
    for t, m in curve.by_t.items():
        out[f"{prefix}/zsl_top1_t{t:03d}"] = m.top1
    return out


@dataclass
class TrainBatch:
    """One TDSM training batch."""

    x0: torch.Tensor      # (B, D_x) skeleton features
    y: torch.Tensor       # (B,) positive class ids
    neg: torch.Tensor     # (B,) negative class ids (may equal y: those pairs are masked)
    t: torch.Tensor       # (B,) diffusion steps
    eps: torch.Tensor     # (B, D_x) training noise


def draw_batch(x_all: torch.Tensor, y_all: torch.Tensor, pool: torch.Tensor, batch_size: int, num_steps: int,
               gen: torch.Generator) -> TrainBatch:
    """Samples, negatives, t and eps from one generator (its state is checkpointed: resumes are exact)."""
    device = x_all.device
    idx = torch.randint(len(x_all), (batch_size,), generator=gen).to(device)
    y = y_all[idx]
    neg = sample_negative_classes(y, pool, gen)
    t = torch.randint(num_steps, (batch_size,), generator=gen).to(device)
    eps = torch.randn(batch_size, x_all.shape[1], generator=gen).to(device)
    return TrainBatch(x_all[idx], y, neg, t, eps)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, schedule: NoiseSchedule, cfg: TDSMConfig,
               b: TrainBatch, text_g: torch.Tensor, text_l: torch.Tensor,
               amp: Callable[[], Any]) -> dict[str, torch.Tensor]:
    """One optimisation step: positive and negative prompts share t and eps (paper §3.3), one forward of 2B rows.

    text_g (C, D_g) and text_l (C, M_l, D_l) are per-class tables. When there are fewer classes than rows, each
    class's text is embedded once and rows read theirs (`candidate=`, the same maths as repeating it per row);
    otherwise only the rows' classes are gathered first.
    """
    z_t = schedule.add_noise(b.x0, b.eps, b.t)                                           # (B, D_x)
    cls = torch.cat([b.y, b.neg])                                                         # (2B,)
    texts = (text_g, text_l, cls) if len(text_g) < len(cls) else (text_g[cls], text_l[cls], None)
    with amp():
        pred = model(torch.cat([z_t, z_t]), torch.cat([b.t, b.t]), *texts)               # (2B, D_x)
    pred_pos, pred_neg = pred.float().chunk(2)                                            # 2 x (B, D_x)
    losses = triplet_diffusion_loss(schedule.target(b.x0, b.eps, b.t), pred_pos, pred_neg, b.neg != b.y,
                                    cfg.loss.margin, cfg.loss.triplet_weight)
    optimizer_step(opt, losses["loss"], model, cfg.optim.grad_clip)
    return losses


@dataclass
class FitResult:
    """The trained model (best-on-eval weights are in run_dir/best.pt when evaluation ran)."""

    model: TDSMDenoiser
    last_curve: ZSLCurve | None
    last_metrics: dict[str, float]
    best_metric: float
    step: int


def fit_tdsm(cfg: TDSMConfig, train: FeatureSplit, train_classes: list[int], evaluation: FeatureSplit | None,
             eval_classes: list[int], text: TextFeatures, reporter: Reporter, run_dir: Path | None = None,
             eval_prefix: str = "val", progress: bool = True,
             wrap_model: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0) -> FitResult:
    """Train a TDSM denoiser on `train` (classes `train_classes`), evaluating zero-shot on `evaluation`.

    text: features of *all* classes (rows indexed by class id). run_dir holds last.pt (resumable) and
    best.pt (best `eval_prefix/zsl_top1`); pass None to keep nothing on disk. wrap_model (e.g. Ray Train's
    prepare_model for DDP) wraps the denoiser for the training forward; checkpoints hold the unwrapped weights.
    rank: the DDP rank. Every rank builds the same config (and the same init); ranks > 0 draw their batches
    from a generator seeded by (seed, rank, step), so a resumed rank never replays rank 0's batches.
    """
    if len(train) == 0:
        raise InputError("no training samples for the training classes")
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    apply_thread_policy(cfg.train.threads, cfg.model.hidden_size)
    # RNG: batches, negatives and noise come from one generator whose state last.pt holds, not from draws keyed by
    # the step (fit_loop's policy): drawing those would change the pinned batches and metric traces.
    gen = seed_everything(cfg.train.seed)
    schedule = build_schedule(cfg)
    model = build_model(cfg, train.features.shape[1], text).to(device)
    opt = build_optimizer(cfg, model)
    amp = lambda: autocast(device, precision)  # noqa: E731  (a fresh context per use)

    x_all, y_all = train.features.to(device), train.labels.to(device)
    text_g, text_l = text.global_feats.to(device), text.local_feats.to(device)
    pool = torch.tensor(train_classes, dtype=torch.long)
    fingerprint = training_fingerprint(cfg)
    step, best = 0, -1.0
    if run_dir is not None and (Path(run_dir) / LAST).is_file():
        step, best = _resume(Path(run_dir) / LAST, fingerprint, model, opt, gen, cfg.train.steps)
    if rank > 0:
        gen.manual_seed(int(stable_hash({"seed": cfg.train.seed, "rank": rank, "step": step})[:15], 16))

    evaluating = evaluation is not None and len(evaluation) > 0
    if evaluating and eval_prefix == "test":
        # The in-loop evaluation keeps best.pt and may choose t_test: that is selection, never done on test.
        raise ValueError("fit_tdsm selects on its evaluation split: eval_prefix='test' is not allowed")

    train_model = wrap_model(model) if wrap_model is not None else model
    if cfg.train.compile:       # the training forward and backward only: evaluation shapes vary, checkpoints and
        # evaluation use the plain module (same parameters). A fresh compile cache per fit: a process that runs
        # many fits (a reused Tune trial process) would otherwise reach dynamo's recompile limit and fall back to
        # eager without a word.
        torch._dynamo.reset()
        train_model = torch.compile(train_model)
    plan = step_plan(cfg.train, cfg.optim)
    headline = f"{eval_prefix}/zsl_top1"
    curve, last_metrics = None, {}

    def train(_: int) -> dict[str, torch.Tensor]:
        batch = draw_batch(x_all, y_all, pool, cfg.optim.batch_size, cfg.diffusion.num_train_timesteps, gen)
        return train_step(train_model, opt, schedule, cfg, batch, text_g, text_l, amp)

    def scalars(losses: dict[str, torch.Tensor]) -> dict[str, float]:
        return {**{f"train/{k}": float(v.detach()) for k, v in losses.items()}, "train/lr": opt.param_groups[0]["lr"]}

    def evaluate(at: int) -> tuple[dict[str, float], dict[str, Any]]:
        nonlocal curve, last_metrics
        # Intermediate evaluations score t_test only; the last one scores the whole grid (the curve).
        grid = cfg.eval.t_test_grid if at == plan.total or cfg.eval.tune_t_test else [cfg.eval.t_test]
        curve = evaluate_zsl(model, schedule, evaluation.features.to(device), evaluation.labels, eval_classes,
                             text_g, text_l, grid, cfg.eval.noise_draws, cfg.eval.seed,
                             cfg.eval.batch_size * cfg.eval.noise_draws * len(eval_classes), amp)
        last_metrics = zsl_metric_dict(curve, cfg.eval.t_test, eval_prefix, cfg.eval.tune_t_test, selection=True)
        return last_metrics, {"zsl_curve": curve}

    def record(at: int, metrics: dict[str, float] | None) -> None:
        nonlocal best
        if run_dir is None:
            return
        if metrics is not None and metrics[headline] > best:
            best = metrics[headline]
            checkpoint.save(Path(run_dir) / BEST, {"model": model.state_dict(), "step": at, "metrics": metrics,
                                                   "config": to_plain(cfg)})
        _save_last(Path(run_dir) / LAST, fingerprint, model, opt, gen, at, best, cfg)

    parts = FitParts(train, scalars, evaluate if evaluating else None, record, headline)
    step = run_fit(plan, parts, model, opt, step, reporter, run_dir, LossGuard(device, DIVERGED_HINT), "tdsm",
                   progress)
    return FitResult(model, curve, last_metrics, best, step)


def _save_last(path: Path, fingerprint: str, model, opt, gen: torch.Generator, step: int, best: float,
               cfg: TDSMConfig) -> None:
    checkpoint.save(path, {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
        **checkpoint.rng_state(), "step": step, "best": best, "fingerprint": fingerprint, "config": to_plain(cfg),
    })


def _resume(path: Path, fingerprint: str, model, opt, gen: torch.Generator, total: int) -> tuple[int, float]:
    """Load last.pt into model/optimizer/generator; refuse a checkpoint written under another config, or whose
    contents do not fit this model and config (checkpoint.check_last)."""
    state = checkpoint.restore(path, fingerprint, ("model", "optimizer", "generator", "torch_rng", "step", "best"),
                               {"model": model}, opt, total)
    checkpoint.set_rng_entry(path, "generator", state["generator"], gen.set_state, gen.get_state())
    best = checkpoint.check_score(path, "best", state["best"])
    if (Path(path).parent / BEST).is_file():    # a bad best.pt fails now, not after the whole run has trained
        load_best(Path(path).parent, model, total)
    return state["step"], best


def load_best_weights(model: TDSMDenoiser, run_dir: Path) -> bool:
    """Load run_dir/best.pt into model when present; returns whether it did."""
    path = Path(run_dir) / BEST
    if not path.is_file():
        return False
    model.load_state_dict(load_best(run_dir, model)["model"])
    return True


def load_best(run_dir: Path, model: TDSMDenoiser, max_step: int | None = None) -> dict[str, Any]:
    """run_dir/best.pt (weights, step, metrics, config) checked against `model` (keys, shapes, finite weights)
    and, given max_step, its step; one-line InputError when it is unreadable or does not fit."""
    path = Path(run_dir) / BEST
    state = load_checkpoint(path, keys=("model", "metrics"))
    checkpoint.check_weights(path, "model", state["model"], model)
    checkpoint.check_metrics(path, "metrics", state["metrics"])
    if "step" in state:
        checkpoint.check_step(path, "step", state["step"], max_step if max_step is not None else MAX_STEPS)
    return state


def evaluate_split(cfg: TDSMConfig, model: TDSMDenoiser, split: FeatureSplit, classes: list[int],
                   text: TextFeatures, prefix: str) -> tuple[dict[str, float], ZSLCurve]:
    """Zero-shot metrics of a trained model on one split (e.g. the unseen test classes, once, at the end).

    Read at cfg.eval.t_test only: the whole grid is reported point by point, but nothing is chosen on it.
    """
    device = next(model.parameters()).device
    precision = resolve_precision(cfg.train.precision, device)
    curve = evaluate_zsl(model, build_schedule(cfg), split.features.to(device), split.labels, classes,
                         text.global_feats.to(device), text.local_feats.to(device), cfg.eval.t_test_grid,
                         cfg.eval.noise_draws, cfg.eval.seed, cfg.eval.batch_size * cfg.eval.noise_draws * len(classes),
                         lambda: autocast(device, precision))
    return zsl_metric_dict(curve, cfg.eval.t_test, prefix), curve


def evaluate_gzsl_split(cfg: TDSMConfig, model: TDSMDenoiser, task: ZSLTask, text: TextFeatures) -> dict[str, float]:
    """Generalised zero-shot metrics of a trained model on the task's GZSL test set (seen + unseen samples, every
    seen and unseen class a candidate) at cfg.eval.t_test; {} when the task has no GZSL test set. Uncalibrated: no
    bias is subtracted from the seen classes' scores (docs/results.md: GZSL)."""
    split = task.gzsl_split()
    if split is None:
        return {}
    gtest, classes, seen = split
    device = next(model.parameters()).device
    precision = resolve_precision(cfg.train.precision, device)
    m = evaluate_gzsl(model, build_schedule(cfg), gtest.features.to(device), gtest.labels, classes, seen,
                      text.global_feats.to(device), text.local_feats.to(device), cfg.eval.t_test,
                      cfg.eval.noise_draws, cfg.eval.seed, cfg.eval.batch_size * cfg.eval.noise_draws * len(classes),
                      lambda: autocast(device, precision))
    return {"test/gzsl_seen": m.seen, "test/gzsl_unseen": m.unseen, "test/gzsl_h": m.h}


__all__ = ["FitResult", "ZSLMetrics", "build_model", "build_optimizer", "build_schedule", "evaluate_gzsl_split",
           "evaluate_split", "fit_tdsm", "load_best", "load_best_weights", "zsl_metric_dict"]
