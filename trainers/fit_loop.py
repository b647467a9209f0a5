"""The skeleton every fit loop shares (TDSM, CoCoDiff, the GCN encoder): the step schedule of logging, evaluation
and checkpoints, the optimizer and its step, the divergence guard, the learning-rate schedule, the progress bar,
and the report again of a run resumed past its end. Each loop keeps what is its own: model, batches, losses,
evaluation and checkpoint contents (`FitParts`).

The policies, one place each:
- Threads, all three loops: `runtime.apply_thread_policy(threads, model width)` before the first step (0 = auto:
  the CPUs this process may use, at most $OMP_NUM_THREADS, which Ray sets to a worker's CPUs; one thread for a
  narrow model). The encoder has no threads field: always auto.
- RNG, the target (CoCoDiff today): `runtime.seed_everything(seed)` before the model is built (the same init on
  every rank); batches and training noise are pure functions of (seed, step, rank), so a resumed run draws what an
  uninterrupted one would. TDSM draws from one generator whose state last.pt holds (resumes are exact too); the
  encoder's dropout uses torch's global RNG, which its last.pt does not hold.
- Weight decay, the target (CoCoDiff today): matrices and conv kernels only, not biases, norms, scales and shifts
  (`build_adamw`). TDSM and the encoder decay every parameter (the encoder with the per-tensor AdamW).
Moving TDSM and the encoder to the target policies changes their numbers (the golden traces of
tests/component/test_pinned.py), so it waits for a change that re-pins
them on purpose; each departure says so where it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainers.configs import OptimConfig, TrainConfig
from trainers.errors import TrainingDivergedError
from trainers.schedule import build_lr_scheduler, log_every, progress_bar
from trainers.tracking import Artifacts, Reporter

Losses = Mapping[str, torch.Tensor]           # one step's loss terms; "loss" is the total that was back-propagated
# What a diverged run of a method config (`optim.lr`, `optim.grad_clip`: TDSM, CoCoDiff) is advised to change.
DIVERGED_HINT = "lower optim.lr or set optim.grad_clip > 0"


_NO_BAD_STEP = 2**62                      # "no non-finite loss seen yet" on the device-side tracker


class LossGuard:
    """Raises TrainingDivergedError naming the first step whose loss is not finite.

    On CPU the check costs nothing and runs every step. On an accelerator reading the loss every step would sync
    the host each step, so the first bad step is tracked on the device and read at `flush()` (the caller flushes
    at its logging cadence and before every evaluation or checkpoint, so nothing diverged is ever saved).
    """

    def __init__(self, device: torch.device, hint: str):
        self.hint = hint
        self.every_step = torch.device(device).type == "cpu"
        self._first_bad: torch.Tensor | None = None

    def update(self, loss: torch.Tensor, step: int) -> None:
        """`loss` (scalar) of 1-based `step`."""
        finite = torch.isfinite(loss.detach())
        if self.every_step:
            if not bool(finite):
                self._raise(step, float(loss.detach()))
            return
        bad_at = torch.where(finite, torch.full_like(finite, _NO_BAD_STEP, dtype=torch.long),
                             torch.full_like(finite, step, dtype=torch.long))
        self._first_bad = bad_at if self._first_bad is None else torch.minimum(self._first_bad, bad_at)

    def flush(self) -> None:
        """Raise now if any step since the last flush had a non-finite loss (one host sync)."""
        if self._first_bad is not None:
            step = int(self._first_bad)
            self._first_bad = None
            if step != _NO_BAD_STEP:
                self._raise(step, float("nan"))

    def _raise(self, step: int, value: float) -> None:
        shown = "" if np.isnan(value) and not self.every_step else f"loss={value}; "
        raise TrainingDivergedError(f"training diverged: non-finite loss at step {step} ({shown}{self.hint})")


@dataclass(frozen=True)
class StepPlan:
    """How long a fit runs, its learning rate, and which 1-based steps log, evaluate and checkpoint (the last step
    does all three)."""

    total: int
    lr: float
    warmup: int
    min_lr_ratio: float
    log_every: int
    eval_every: int
    checkpoint_every: int

    def logs(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total

    def evaluates(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.total

    def checkpoints(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.total


def step_plan(train: TrainConfig, optim: OptimConfig) -> StepPlan:
    """The plan a method config's `train` and `optim` sections give (TDSM, CoCoDiff)."""
    return StepPlan(train.steps, optim.lr, optim.warmup_steps, optim.min_lr_ratio, log_every(train.steps),
                    train.eval_every, train.checkpoint_every)


@dataclass
class FitParts:
    """What one method does at each point of the shared loop."""

    train: Callable[[int], Losses]                       # one optimisation step at 0-based `step` -> its loss terms
    scalars: Callable[[Losses], dict[str, float]]        # the training scalars logged at a logging step
    # An evaluation at 1-based `step` -> (metrics, artifacts for the reporter); None: nothing to evaluate on.
    evaluate: Callable[[int], tuple[dict[str, float], Artifacts]] | None
    # After each evaluation and at each checkpoint step: keep the best weights (`metrics`: the evaluation just made,
    # None at a checkpoint without one) and write last.pt where the run has a folder.
    record: Callable[[int, dict[str, float] | None], None]
    headline: str | None = None                          # the metric the progress bar shows after an evaluation
    # Before each evaluation or checkpoint (DDP: average the BatchNorm statistics over the ranks).
    sync: Callable[[], None] | None = None
    # The progress bar's fields at a logging step (default: the loss).
    postfix: Callable[[dict[str, float]], dict[str, str]] | None = None


def run_fit(plan: StepPlan, parts: FitParts, model: nn.Module, opt: torch.optim.Optimizer, step: int,
            reporter: Reporter, run_dir: Path | None, guard: LossGuard, desc: str, progress: bool) -> int:
    """Train from `step` (0, or the step a resumed last.pt holds) to plan.total; returns the final step.

    Each step: parts.train, the divergence guard (read before anything is logged, evaluated or saved), the training
    scalars at logging steps, then at evaluation steps the evaluation, parts.record and `reporter.log_evaluation`,
    at checkpoint steps parts.record; the lr moves on after logging, so the logged lr is the one the step used. A run
    resumed at or past its end trains nothing and reports its final evaluation again, for whoever restarted it (a
    Tune scheduler, a resumed sweep, a Ray Train restart)."""
    start = step
    bar = progress_bar(plan.total, step, desc, progress)
    sched = build_lr_scheduler(opt, plan.lr, plan.total, plan.warmup, plan.min_lr_ratio, step)
    model.train()
    while step < plan.total:
        losses = parts.train(step)
        step += 1
        guard.update(losses["loss"], step)
        bar.update(1)
        evaluating = parts.evaluate is not None and plan.evaluates(step)
        if plan.logs(step) or plan.evaluates(step) or plan.checkpoints(step):
            guard.flush()                  # nothing diverged is logged as a metric or saved
        if plan.logs(step):
            scalars = parts.scalars(losses)
            reporter.log_metrics(scalars, step)
            fields = parts.postfix(scalars) if parts.postfix else {"loss": f"{float(losses['loss'].detach()):.4f}"}
            bar.set_postfix(fields, refresh=False)
        if parts.sync is not None and (evaluating or plan.checkpoints(step)):
            parts.sync()
        metrics = None
        if evaluating:
            metrics, artifacts = parts.evaluate(step)
            if parts.headline is not None:
                bar.set_postfix(loss=f"{float(losses['loss'].detach()):.4f}",
                                **{parts.headline.split("/")[0]: f"{metrics[parts.headline]:.1f}"})
        if evaluating or plan.checkpoints(step):
            parts.record(step, metrics)
        if evaluating:
            reporter.log_evaluation(metrics, step, artifacts, run_dir)
        sched.step()                       # after logging: the logged lr is the lr this step used
    if start >= plan.total and parts.evaluate is not None:
        metrics, artifacts = parts.evaluate(step)
        reporter.log_evaluation(metrics, step, artifacts, run_dir)
    bar.close()
    model.eval()
    return step


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------

def build_adamw(model: nn.Module, lr: float, weight_decay: float, decay_all: bool = False,
                fused: bool = True) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on matrices and conv kernels (ndim >= 2) only, in a group
    of their own before the rest; `decay_all` decays every parameter instead (one group).

    fused: one kernel over all tensors where every parameter is a float on CPU or CUDA (the same update up to
    rounding; 6x faster than the per-tensor loop on a 47 M-parameter TDSM on one CPU core, and ~3 ms less per
    step for the ~70 small tensors of the default CoCoDiff model on one thread)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = ([{"params": params}] if decay_all else
              [{"params": [p for p in params if p.ndim >= 2]}, {"params": [p for p in params if p.ndim < 2],
                                                                 "weight_decay": 0.0}])
    fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=(fused and fusable) or None)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, model: nn.Module, grad_clip: float = 0.0) -> None:
    """Backward from `loss`, clip the gradient norm of model's parameters to grad_clip (0: no clipping), step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
