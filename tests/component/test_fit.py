"""TDSM fit loop: learning-rate schedule, resumable checkpoints, atomic writes, best-on-validation weights,
and a component test that learns unseen classes from their text on the generated task."""

from __future__ import annotations

import math
import time
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from conftest import CrashAfter, tiny_config

from trainers.data import FeatureSplit
from trainers.errors import InputError
from trainers.io import atomic_torch_save
from trainers.schedule import lr_at
from trainers.tdsm_fit import BEST, LAST, build_model, evaluate_split, fit_tdsm, load_best_weights, zsl_metric_dict
from trainers.tdsm_task import prepare_tdsm
from trainers.text import TextFeatures
from trainers.tracking import ListReporter

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule
# ----------------------------------------------------------------------------------------------


def test_lr_warmup_is_linear_to_peak():
    lrs = [lr_at(s, 100, 1e-3, 10, 0.0) for s in range(10)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-3)
    assert all(b - a == pytest.approx(1e-4) for a, b in pairwise(lrs))


def test_lr_cosine_after_warmup():
    assert lr_at(10, 110, 1.0, 10, 0.0) == pytest.approx(1.0)
    assert lr_at(60, 110, 1.0, 10, 0.0) == pytest.approx(0.5)
    assert lr_at(35, 110, 1.0, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    lrs = [lr_at(s, 110, 1.0, 10, 0.0) for s in range(10, 111)]
    assert all(b <= a for a, b in pairwise(lrs))


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_lr_floor(floor):
    assert lr_at(110, 110, 2.0, 10, floor) == pytest.approx(2.0 * floor)
    assert lr_at(500, 110, 2.0, 10, floor) == pytest.approx(2.0 * floor)     # stays at the floor past the end
    assert min(lr_at(s, 110, 2.0, 10, floor) for s in range(111)) >= 2.0 * floor - 1e-12


def test_lr_without_warmup_starts_at_peak():
    assert lr_at(0, 50, 3e-4, 0, 0.0) == pytest.approx(3e-4)


def test_fit_uses_the_schedule(tiny_task):
    cfg = tiny_config(**{"train.steps": 8, "optim.warmup_steps": 3, "optim.min_lr_ratio": 0.1, "optim.lr": 1e-3})
    reporter = ListReporter()
    fit_tdsm(cfg, *tiny_task.fit_args, reporter, None, progress=False)
    logged = {step: m["train/lr"] for step, m in reporter.metrics if "train/lr" in m}
    assert logged and all(lr == pytest.approx(lr_at(step - 1, 8, 1e-3, 3, 0.1)) for step, lr in logged.items())


# ----------------------------------------------------------------------------------------------
# A tiny task: random features and text, 4 training and 2 evaluation classes
# ----------------------------------------------------------------------------------------------

class TinyTask:
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        proto = torch.randn(6, 16, generator=g)
        labels = torch.arange(6).repeat_interleave(8)
        x = proto[labels] + 0.3 * torch.randn(48, 16, generator=g)
        everything = FeatureSplit(x, labels)
        self.train = everything.select([0, 1, 2, 3])
        self.val = everything.select([4, 5])
        self.text = TextFeatures(proto @ torch.randn(16, 12, generator=g), torch.randn(6, 4, 10, generator=g))

    @property
    def fit_args(self):
        """(train, train classes, evaluation, evaluation classes, text) as fit_tdsm takes them."""
        return self.train, [0, 1, 2, 3], self.val, [4, 5], self.text


@pytest.fixture(scope="module")
def tiny_task() -> TinyTask:
    return TinyTask()


def resumable_config(**overrides):
    return tiny_config(**{"train.steps": 12, "train.checkpoint_every": 6, "train.eval_every": 6, **overrides})


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


def run_until_crash(cfg, task, run_dir: Path, step: int) -> None:
    with pytest.raises(KeyboardInterrupt):
        fit_tdsm(cfg, *task.fit_args, CrashAfter(step), run_dir, progress=False)
    assert torch.load(run_dir / LAST, weights_only=True)["step"] == step


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tiny_task, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = fit_tdsm(resumable_config(), *tiny_task.fit_args, ListReporter(), run_dir, progress=False)
    return weights(result.model), run_dir


def test_resume_gives_identical_weights(tiny_task, uninterrupted, tmp_path):
    cfg = resumable_config()
    run_until_crash(cfg, tiny_task, tmp_path, 6)
    reporter = ListReporter()
    result = fit_tdsm(cfg, *tiny_task.fit_args, reporter, tmp_path, progress=False)
    assert result.step == 12 and min(step for step, _ in reporter.metrics) == 7   # steps 1..6 not repeated
    assert_same_weights(weights(result.model), uninterrupted[0])
    assert torch.load(tmp_path / LAST, weights_only=True)["step"] == 12


def test_a_ddp_rank_resumes_from_rank0s_checkpoint_with_its_own_batches(tiny_task, uninterrupted, tmp_path):
    """Every rank restores rank 0's last.pt (same config and fingerprint); ranks > 0 then draw other batches."""
    import shutil

    cfg = resumable_config()
    run_until_crash(cfg, tiny_task, tmp_path / "rank0", 6)
    (tmp_path / "rank1").mkdir()
    shutil.copy2(tmp_path / "rank0" / LAST, tmp_path / "rank1" / LAST)
    rank1 = fit_tdsm(cfg, *tiny_task.fit_args, ListReporter(), tmp_path / "rank1", progress=False, rank=1)
    rank0 = fit_tdsm(cfg, *tiny_task.fit_args, ListReporter(), tmp_path / "rank0", progress=False)
    assert rank1.step == rank0.step == 12
    assert_same_weights(weights(rank0.model), uninterrupted[0])        # rank 0 resumes exactly
    assert any(not torch.equal(a, b) for a, b in zip(weights(rank1.model).values(), uninterrupted[0].values()))


def test_resume_of_finished_run_trains_nothing(tiny_task, uninterrupted):
    reporter = ListReporter()
    result = fit_tdsm(resumable_config(), *tiny_task.fit_args, reporter, uninterrupted[1], progress=False)
    assert result.step == 12 and not reporter.metrics
    assert_same_weights(weights(result.model), uninterrupted[0])


@pytest.mark.parametrize("change", [{"optim.lr": 5e-4}, {"train.seed": 1}, {"model.depth": 1},
                                    {"loss.margin": 0.5}, {"train.steps": 14}])
def test_resume_refused_when_training_config_changed(tiny_task, tmp_path, change):
    run_until_crash(resumable_config(), tiny_task, tmp_path, 6)
    with pytest.raises(InputError, match="different training config") as err:
        fit_tdsm(resumable_config(**change), *tiny_task.fit_args, ListReporter(), tmp_path, progress=False)
    assert str(err.value).startswith(str(tmp_path / LAST)) and "\n" not in str(err.value)


def test_resume_allowed_when_only_evaluation_changed(tiny_task, uninterrupted, tmp_path):
    run_until_crash(resumable_config(), tiny_task, tmp_path, 6)
    changed = resumable_config(**{"eval.noise_draws": 1, "eval.seed": 7, "eval.t_test": 10, "train.eval_every": 4,
                                  "train.checkpoint_every": 3})
    result = fit_tdsm(changed, *tiny_task.fit_args, ListReporter(), tmp_path, progress=False)
    assert result.step == 12
    assert_same_weights(weights(result.model), uninterrupted[0])      # evaluation never touches training


def test_unreadable_checkpoint_is_one_line_error(tiny_task, tmp_path):
    (tmp_path / LAST).write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="unreadable checkpoint") as err:
        fit_tdsm(resumable_config(), *tiny_task.fit_args, ListReporter(), tmp_path, progress=False)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def failing_save(monkeypatch):
    """torch.save that writes half a file and then fails, like a full disk or a kill mid-write."""
    def save(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 partial")          # atomic_torch_save hands torch.save an open file
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_save_crash_leaves_no_file(tmp_path, failing_save):
    with pytest.raises(OSError):
        atomic_torch_save({"a": 1}, tmp_path / LAST)
    assert not (tmp_path / LAST).exists() and not leftovers(tmp_path)


def test_atomic_save_crash_keeps_old_file(tmp_path, monkeypatch):
    atomic_torch_save({"step": 3}, tmp_path / LAST)
    before = (tmp_path / LAST).read_bytes()
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **kw: (f.write(b"junk"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        atomic_torch_save({"step": 4}, tmp_path / LAST)
    assert (tmp_path / LAST).read_bytes() == before and not leftovers(tmp_path)
    assert torch.load(tmp_path / LAST)["step"] == 3


def test_fit_crash_in_first_checkpoint_leaves_no_checkpoint(tiny_task, tmp_path, failing_save):
    with pytest.raises(OSError):
        fit_tdsm(resumable_config(), *tiny_task.fit_args, ListReporter(), tmp_path, progress=False)
    assert not (tmp_path / LAST).exists() and not leftovers(tmp_path)


def test_fit_crash_in_checkpoint_keeps_previous_one(tiny_task, tmp_path, monkeypatch):
    run_until_crash(resumable_config(), tiny_task, tmp_path, 6)
    before = (tmp_path / LAST).read_bytes()
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **kw: (f.write(b"junk"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        fit_tdsm(resumable_config(), *tiny_task.fit_args, ListReporter(), tmp_path, progress=False)
    assert (tmp_path / LAST).read_bytes() == before and not leftovers(tmp_path)
    monkeypatch.undo()
    assert torch.load(tmp_path / LAST, weights_only=True)["step"] == 6


# ----------------------------------------------------------------------------------------------
# Best-on-validation weights
# ----------------------------------------------------------------------------------------------

def test_best_checkpoint_holds_best_val_metric(tiny_task, tmp_path):
    cfg = tiny_config(**{"train.steps": 12, "train.eval_every": 2, "optim.lr": 3e-3})
    reporter = ListReporter()
    fit_tdsm(cfg, *tiny_task.fit_args, reporter, tmp_path, progress=False)
    scores = [(m["val/zsl_top1"], step) for step, m, _, _ in reporter.evaluations]
    assert [s for _, s in scores] == [2, 4, 6, 8, 10, 12]
    top = max(s for s, _ in scores)
    best = torch.load(tmp_path / BEST, weights_only=True)
    assert best["metrics"]["val/zsl_top1"] == top
    assert best["step"] == min(step for s, step in scores if s == top)      # the first time it was reached
    assert torch.load(tmp_path / LAST, weights_only=True)["best"] == top
    # The stored weights are the ones that scored it.
    model = build_model(cfg, tiny_task.train.features.shape[1], tiny_task.text)
    assert load_best_weights(model, tmp_path)
    metrics, _ = evaluate_split(cfg, model.eval(), tiny_task.val, [4, 5], tiny_task.text, "val")
    assert metrics["val/zsl_top1"] == top


def test_no_evaluation_no_best_checkpoint(tiny_task, tmp_path):
    train, classes, _, _, text = tiny_task.fit_args
    result = fit_tdsm(tiny_config(**{"train.steps": 4}), train, classes, None, [], text, ListReporter(), tmp_path,
                      progress=False)
    assert result.step == 4 and result.last_curve is None
    assert not (tmp_path / BEST).exists() and (tmp_path / LAST).exists()


# ----------------------------------------------------------------------------------------------
# Nothing chosen on test
# ----------------------------------------------------------------------------------------------

def test_validation_may_choose_t_test_test_never(tiny_task):
    cfg = tiny_config(**{"train.steps": 2, "eval.t_test_grid": [10, 25]})
    reporter = ListReporter()
    result = fit_tdsm(cfg, *tiny_task.fit_args, reporter, None, progress=False)
    val = reporter.evaluations[-1][1]
    assert {"val/zsl_top1_best", "val/best_t_test"} <= set(val)              # selection on validation is legit
    test, curve = evaluate_split(cfg, result.model, tiny_task.val, [4, 5], tiny_task.text, "test")
    assert not [k for k in test if "best" in k]
    assert test["test/zsl_top1"] == curve.at(25).top1                         # read at t_test, not at the best t
    assert {"test/zsl_top1_t010", "test/zsl_top1_t025"} <= set(test)          # the curve stays, point by point
    for kw in ({"selection": True}, {"tuned": True, "selection": True}):
        with pytest.raises(ValueError, match="never chosen on the test classes"):
            zsl_metric_dict(curve, 25, "test", **kw)
    with pytest.raises(ValueError, match="eval_prefix='test'"):
        fit_tdsm(cfg, *tiny_task.fit_args, ListReporter(), None, eval_prefix="test", progress=False)


def test_no_training_samples_is_input_error(tiny_task):
    empty = tiny_task.train.select([5])
    with pytest.raises(InputError, match="no training samples"):
        fit_tdsm(tiny_config(), empty, [5], None, [], tiny_task.text, ListReporter(), None, progress=False)


# ----------------------------------------------------------------------------------------------
# Component: learn the unseen classes of the generated task from their text
# ----------------------------------------------------------------------------------------------

# Measured (fp32, batch 64): 200 steps reach 74-77% top-1 on the 5 unseen classes (seeds 2025 and 1), 300-600 steps
# about the same; one thread trains them in ~15 s of CPU.
COMPONENT_STEPS = 200


def test_learns_unseen_classes_from_text():
    cfg = tiny_config(**{"train.steps": COMPONENT_STEPS, "optim.batch_size": 64, "optim.lr": 1e-3,
                         "optim.warmup_steps": 20, "train.eval_every": COMPONENT_STEPS,
                         "train.checkpoint_every": COMPONENT_STEPS, "train.precision": "fp32",
                         "data.synthetic.samples_per_class": 30, "eval.t_test_grid": [25], "eval.noise_draws": 2})
    task, _, text = prepare_tdsm(cfg)
    train, test, seen = task.final_split()
    assert len(task.unseen) == 5 and len(test) == 5 * 30
    start = time.perf_counter()
    result = fit_tdsm(cfg, train, seen, None, [], text, ListReporter(), None, progress=False)
    metrics, _ = evaluate_split(cfg, result.model, test, task.unseen, text, "test")
    print(f"component: {COMPONENT_STEPS} steps in {time.perf_counter() - start:.1f}s, "
          f"test/zsl_top1 {metrics['test/zsl_top1']:.1f}%")
    assert metrics["test/zsl_top1"] > 50.0          # chance: 20% over 5 unseen classes


# ----------------------------------------------------------------------------------------------
# Speed switches keep the maths
# ----------------------------------------------------------------------------------------------

def test_train_step_embeds_each_class_text_once_with_the_same_update(tiny_task):
    """Fewer classes than rows: each class's text is embedded once (`candidate=`). The update equals the one from
    texts gathered per row (float64: the two paths only reorder sums, ~1e-15 relative)."""
    from trainers.tdsm_fit import TrainBatch, build_optimizer, build_schedule, train_step

    cfg = tiny_config(**{"optim.grad_clip": 0.0})
    g, l = tiny_task.text.global_feats.double(), tiny_task.text.local_feats.double()     # 6 classes
    gen = torch.Generator().manual_seed(1)
    b = TrainBatch(torch.randn(8, 16, generator=gen, dtype=torch.float64), torch.randint(4, (8,), generator=gen),
                   torch.randint(4, (8,), generator=gen), torch.randint(10, (8,), generator=gen),
                   torch.randn(8, 16, generator=gen, dtype=torch.float64))             # 16 rows > 6 classes
    updated = []
    for tables in ((g, l), (g.repeat(3, 1), l.repeat(3, 1, 1))):     # 18 >= 16 rows: the per-row gather path
        torch.manual_seed(0)
        model = build_model(cfg, 16, tiny_task.text).double()
        with torch.no_grad():                     # open the adaLN-Zero gates so every weight gets a gradient
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()),
                                          dtype=p.dtype))
        opt = build_optimizer(cfg, model)
        losses = train_step(model, opt, build_schedule(cfg), cfg, b, *tables,
                            lambda: torch.autocast("cpu", enabled=False))
        updated.append((losses["loss"].item(), weights(model)))
    assert updated[0][0] == pytest.approx(updated[1][0], rel=1e-12)
    for key, value in updated[0][1].items():
        torch.testing.assert_close(value, updated[1][1][key], rtol=0, atol=1e-12, msg=key)


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_task):
    """train.compile: the same losses and weights as eager up to fp32 rounding (inductor fuses and reorders
    elementwise ops: ~1e-6 relative per step; 1e-4 over 4 steps of a tiny model is ample)."""
    results = []
    for compiled in (False, True):
        reporter = ListReporter()
        cfg = tiny_config(**{"train.steps": 4, "train.compile": compiled, "train.precision": "fp32"})
        results.append((fit_tdsm(cfg, *tiny_task.fit_args[:2], None, [], tiny_task.text, reporter, None,
                                 progress=False), reporter))
    (eager, rep_e), (comp, rep_c) = results
    loss_e = [m["train/loss"] for _, m in rep_e.metrics if "train/loss" in m]
    loss_c = [m["train/loss"] for _, m in rep_c.metrics if "train/loss" in m]
    assert len(loss_e) == 4 and loss_c == pytest.approx(loss_e, rel=1e-4)
    for key, value in weights(eager.model).items():
        torch.testing.assert_close(weights(comp.model)[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_resuming_a_per_tensor_adamw_state_keeps_the_fused_optimizer(tiny_task):
    """Checkpoints written before fused AdamW load into it without switching fusing off, and step on equally."""
    from trainers.checkpoint import load_optimizer_state
    from trainers.tdsm_fit import build_optimizer

    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg, 16, tiny_task.text)
    old = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)            # the former optimizer
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    old.step()
    opt = build_optimizer(cfg, model)
    load_optimizer_state(opt, old.state_dict())
    assert opt.param_groups[0]["fused"] is True and old.param_groups[0]["fused"] in (None, False)
    assert all(opt.state[p]["step"].item() == 1 for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    old.step()
    after_old = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(before)
    opt.step()                                         # the same second update (fused: to rounding)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, after_old[key], rtol=1e-6, atol=1e-7)


def test_sigterm_during_a_checkpoint_write_is_delivered_after_it(tmp_path, monkeypatch):
    """A signal in the middle of torch.save (its writer calls back into Python) waits until the file is whole, then
    reaches the process's handler: the interrupt, not torch's "unexpected pos" RuntimeError."""
    import os
    import signal

    class Stop(Exception):
        pass

    def handler(signum, frame):
        raise Stop

    real_save = torch.save

    def save(obj, f, *a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)          # lands while the checkpoint is being written
        real_save(obj, f, *a, **kw)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        monkeypatch.setattr(torch, "save", save)
        with pytest.raises(Stop):
            atomic_torch_save({"step": 7}, tmp_path / LAST)
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.undo()
    assert torch.load(tmp_path / LAST)["step"] == 7 and not leftovers(tmp_path)     # written whole first
