"""CoCoDiff (docs/METHODS.md §2): config, denoiser init, KL contrastive loss, gradients of every loss term, no
inference cost of the exported classifier, a short fit on a separable toy task, resume, data, texts and helpers.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CrashAfter
from pydantic import BaseModel

from service.benchmarks.cocodiff import step_times
from trainers import cocodiff_data
from trainers.checkpoint import BEST, LAST
from trainers.cocodiff import (
    CoCoDiffModule,
    LatentDenoiser,
    build_module,
    build_schedule,
    cocodiff_loss,
    draw_diffusion_inputs,
    kl_contrastive_loss,
)
from trainers.cocodiff_classifier import SkeletonClassifier, build_classifier, export_classifier, load_classifier
from trainers.cocodiff_data import (
    SkeletonData,
    class_prompts,
    encode_cocodiff_texts,
    load_cocodiff_data,
    load_prepared,
    prepare_cocodiff,
    synthetic_prompts,
)
from trainers.cocodiff_eval import accuracy_metrics, ensemble_logits, evaluate_classifier
from trainers.cocodiff_fit import TrainingModel, compute_losses, fit_cocodiff, step_generator
from trainers.config import build_config, flatten, to_plain
from trainers.configs import CoCoDiffConfig, dataset_label
from trainers.errors import InputError
from trainers.layers import count_parameters
from trainers.schedule import batch_indices
from trainers.skeleton.gcn import build_encoder
from trainers.skeleton.synthetic import NUM_CLASSES as SYNTHETIC_CLASSES
from trainers.skeleton.synthetic import action_catalogue
from trainers.text import TextFeatures
from trainers.tracking import ListReporter, NullReporter

ROOT = Path(__file__).resolve().parents[2]
NUM_CLASSES, FINE_DIM, COARSE_DIM = 4, 24, 20
TINY = {"backbone.encoder": "stgcn", "backbone.base_channels": 8, "backbone.units_per_stage": [1, 1, 1],
        "module.hidden": 32, "module.depth": 1, "module.align_dim": 16, "optim.batch_size": 16,
        "optim.warmup_steps": 5, "optim.lr": 3e-3, "train.steps": 60, "train.eval_every": 30,
        "train.checkpoint_every": 30, "train.device": "cpu", "train.precision": "fp32"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides) -> CoCoDiffConfig:
    return build_config(CoCoDiffConfig, {}, {**TINY, **overrides})


def texts(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_CLASSES, FINE_DIM, generator=g), torch.randn(NUM_CLASSES, COARSE_DIM, generator=g)


def toy_skeletons(per_class: int, seed: int, frames: int = 16, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """A separable toy task (N, 3, T, 25, 2), (N,): class k oscillates joints {v : v mod 4 = k} along axis k mod 3,
    1 + k // 3 cycles per clip, random phase and amplitude, jitter `noise`; the second person is absent (zeros)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)                                   # (N,)
    pose = torch.randn(3, 25, generator=torch.Generator().manual_seed(0)) * 0.3                  # (3, V)
    k = torch.arange(NUM_CLASSES)
    mask = torch.zeros(NUM_CLASSES, 3, 25)
    mask[k[:, None], (k % 3)[:, None], torch.arange(25)[None]] = (
        torch.arange(25)[None] % NUM_CLASSES == k[:, None]).float()
    s = torch.linspace(0, 1, frames)                                                             # (T,)
    phase = torch.rand(len(y), 1, generator=g) * 2 * torch.pi
    amp = 0.5 + 0.5 * torch.rand(len(y), 1, generator=g)
    motion = amp * torch.sin(2 * torch.pi * (1 + k // 3).float()[y][:, None] * s[None] + phase)  # (N, T)
    x = pose[None, :, None, :] + mask[y][:, :, None, :] * motion[:, None, :, None]               # (N, 3, T, V)
    x = x + noise * torch.randn(x.shape, generator=g)
    return torch.stack([x, torch.zeros_like(x)], dim=-1), y                                     # (N, 3, T, V, 2)


@pytest.fixture(scope="module")
def toy():
    """The toy task (24 / 12 / 12 sequences per class for train / val / test) and random class texts."""
    data = SkeletonData(*toy_skeletons(24, 0), *toy_skeletons(12, 1), *toy_skeletons(12, 2), NUM_CLASSES)
    return data, *texts()


def write_prepared(folder: Path, labels: np.ndarray, split: list[str], column: str = "ntu60-xsub") -> Path:
    """A `service.prepare`-layout folder: data.npy (N, 3, 2, 2, 1) = arange, label.npy, index.tsv with one column."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "data.npy", np.arange(len(labels) * 12, dtype=np.float32).reshape(len(labels), 3, 2, 2, 1))
    np.save(folder / "label.npy", np.asarray(labels))
    rows = [f"name\tlabel\tsetup\tcamera\tperformer\treplication\t{column}"]
    rows += [f"S{i}\t0\t1\t1\t1\t1\t{s}" for i, s in enumerate(split)]
    (folder / "index.tsv").write_text("\n".join(rows) + "\n")
    return folder


def fit(cfg, toy, run_dir=None, reporter=None):
    data, fine, coarse = toy
    return fit_cocodiff(cfg, data.train_x, data.train_y, data.val_x, data.val_y, fine, coarse,
                        reporter or ListReporter(), run_dir, progress=False)


def weights(*modules) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

def test_defaults_follow_methods_md():
    cfg = CoCoDiffConfig()
    assert cfg.module.num_train_timesteps == 100 and (cfg.module.w_diff, cfg.module.w_gen, cfg.module.w_coarse) == \
        (1.0, 0.5, 0.1)
    # The embedded default is the generated 46-class set, with as many classes in the head and the texts.
    assert cfg.data.source == "synthetic" and cfg.data.num_classes == SYNTHETIC_CLASSES == 46
    assert build_config(CoCoDiffConfig, {}, {"data.source": "prepared", "data.prepared_dir": "x",
                                             "data.benchmark": "ntu120-xset"}).data.num_classes == 120
    # Overriding one field of a section keeps the CoCoDiff defaults of the others (not the shared TDSM ones).
    cfg = build_config(CoCoDiffConfig, {}, {"train.steps": 5, "optim.lr": 1e-3})
    assert (cfg.train.threads, cfg.train.eval_every, cfg.optim.batch_size, cfg.optim.warmup_steps) == (1, 100, 16, 20)


@pytest.mark.parametrize("key, value, message", [
    ("module.w_gan", 1.0, "unknown config key 'module.w_gan'"),
    ("data.benchmark", "ntu61-xsub", "data.benchmark"),
    ("data.source", "prepared", "data.prepared_dir is required"),
    ("data.benchmark", "ntu120-xsub", "the synthetic set comes as ntu60-xsub, ntu60-xview, kinetics"),
    ("backbone.units_per_stage", [2, 0], "backbone.units_per_stage"),
    ("module.beta_start", 0.5, "module.beta_start=0.5 must be < module.beta_end"),
])
def test_bad_config_is_one_line_error(key, value, message):
    overrides = {key: value, **({"module.beta_schedule": "linear"} if key == "module.beta_start" else {})}
    with pytest.raises(InputError, match=message):
        build_config(CoCoDiffConfig, {}, overrides)


def _leaves(cls: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in cls.model_fields.items():
        sub = (field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
               else None)
        out += _leaves(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
    return out


def test_every_config_field_is_read():
    """Each leaf is read as an attribute somewhere outside the config classes (method: a constant tag)."""
    read = set()
    for name in ("trainers/cocodiff.py", "trainers/cocodiff_classifier.py", "trainers/cocodiff_data.py",
                 "trainers/cocodiff_eval.py", "trainers/cocodiff_fit.py", "trainers/fit_loop.py",
                 "service/methods/cocodiff.py", "service/data/generated.py"):
        tree = ast.parse((ROOT / name).read_text())
        code = [n for n in tree.body if not (isinstance(n, ast.ClassDef) and n.name.endswith("Config"))]
        read |= {n.attr for node in code for n in ast.walk(node) if isinstance(n, ast.Attribute)}
    leaves = _leaves(CoCoDiffConfig)
    assert set(leaves) == set(flatten(to_plain(CoCoDiffConfig())))
    unread = [k for k in leaves if k.rsplit(".", 1)[-1] not in read and k != "method"]
    assert not unread, f"config fields that no code reads: {unread}"


# ----------------------------------------------------------------------------------------------
# Denoiser and module
# ----------------------------------------------------------------------------------------------

def test_module_shapes_and_identity_at_init():
    """x̂_0 == x_t at init (adaLN-Zero blocks, zero output layer over the x_t skip)."""
    cfg = tiny_config()
    module = build_module(cfg.module, 32, FINE_DIM, COARSE_DIM)
    schedule = build_schedule(cfg.module)
    g = torch.Generator().manual_seed(0)
    x0, fine = torch.randn(6, 32, generator=g), torch.randn(6, FINE_DIM, generator=g)
    t, noise, keep = draw_diffusion_inputs(6, 32, cfg.module.num_train_timesteps, 0.5, g)
    assert t.shape == (6,) and noise.shape == (6, 32) and keep.dtype == torch.bool
    x0_hat = module(x0, fine, t, noise, schedule, keep)
    assert x0_hat.shape == (6, 32)
    torch.testing.assert_close(x0_hat, schedule.add_noise(x0, noise, t))
    skel, text = module.align(x0_hat, torch.randn(4, COARSE_DIM))
    assert skel.shape == (6, 16) and text.shape == (4, 16)
    assert math.isclose(float(module.logit_scale().detach()), 1 / 0.07, rel_tol=1e-5)
    # t = 0 of the cosine schedule is almost noise-free, so the initial module almost returns x_0.
    zero = torch.zeros(6, dtype=torch.long)
    assert (module(x0, fine, zero, noise, schedule) - x0).std() < 0.05      # sqrt(1 - abar_0) ≈ 0.025
    assert draw_diffusion_inputs(6, 32, 10, 0.0, g)[2] is None


def test_denoiser_uses_time_and_fine_text_once_trained_away_from_init():
    den = LatentDenoiser(8, 5, 16, 2)
    for p in den.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t, fine = torch.randn(3, 8), torch.tensor([0, 5, 9]), torch.randn(3, 5)
    base = den(x, t, fine)
    assert not torch.allclose(base, den(x, t + 1, fine))
    assert not torch.allclose(base, den(x, t, fine + 1))
    dropped = den(x, t, fine, torch.tensor([False, True, True]))
    assert torch.allclose(dropped[1:], base[1:]) and not torch.allclose(dropped[0], base[0])
    # A dropped sample's prediction does not depend on its fine text.
    torch.testing.assert_close(dropped[:1], den(x[:1], t[:1], torch.randn(1, 5), torch.tensor([False])))


# ----------------------------------------------------------------------------------------------
# KL contrastive loss
# ----------------------------------------------------------------------------------------------

def test_kl_loss_near_zero_when_aligned_larger_when_shuffled():
    g = torch.Generator().manual_seed(0)
    class_text = torch.linalg.qr(torch.randn(16, NUM_CLASSES, generator=g))[0].T     # (C, 16) orthonormal
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 0])                           # duplicates of each class
    scale = torch.tensor(100.0)
    aligned = kl_contrastive_loss(class_text[labels], class_text[labels], labels, scale)
    shuffled = kl_contrastive_loss(class_text[labels.roll(1)], class_text[labels], labels, scale)
    assert aligned < 1e-3 and shuffled > 1.0
    # Class texts instead of one text per sample: same answer when features sit on their class text.
    per_class = kl_contrastive_loss(class_text[labels], class_text, labels, scale, torch.arange(NUM_CLASSES))
    assert per_class < 1e-3


def test_kl_loss_is_symmetric_in_its_two_directions():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1])
    torch.testing.assert_close(kl_contrastive_loss(a, b, labels, torch.tensor(10.0)),
                               kl_contrastive_loss(b, a, labels, torch.tensor(10.0)))


def test_kl_loss_targets_are_row_normalised_same_label_matrices():
    """Against a hand-written KL: class 0 appears twice, so each of its rows puts 1/2 on both positives."""
    g = torch.Generator().manual_seed(2)
    feat, text = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    labels, scale = torch.tensor([0, 0, 1]), torch.tensor(4.0)
    logits = scale * torch.nn.functional.normalize(feat, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    target = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])

    def kl(lg):
        logq = lg.log_softmax(-1)
        return sum(p * (math.log(p) - logq[i, j]) for i in range(3) for j in range(3)
                   if (p := float(target[i, j])) > 0) / 3

    torch.testing.assert_close(kl_contrastive_loss(feat, text, labels, scale), 0.5 * (kl(logits) + kl(logits.T)))


# ----------------------------------------------------------------------------------------------
# Gradients and the classifier
# ----------------------------------------------------------------------------------------------

def toy_losses(toy, **overrides) -> tuple[dict[str, torch.Tensor], SkeletonClassifier, CoCoDiffModule]:
    """compute_losses of one toy batch of 8 (seeded weights and draws), the classifier and the module."""
    data, fine, coarse = toy
    cfg = tiny_config(**overrides)
    torch.manual_seed(0)
    classifier = build_classifier(cfg.backbone, NUM_CLASSES)
    module = build_module(cfg.module, classifier.encoder.feature_dim, FINE_DIM, COARSE_DIM)
    x, y = data.train_x[:8], data.train_y[:8]
    losses = compute_losses(TrainingModel(classifier, module), build_schedule(cfg.module), cfg, x, y, fine, coarse,
                            torch.Generator().manual_seed(0), lambda: torch.autocast("cpu", enabled=False))
    return losses, classifier, module


def test_every_loss_term_reaches_the_backbone(toy):
    losses, classifier, _ = toy_losses(toy, **{"module.detach_diffusion_input": False})
    assert set(losses) == {"loss", "loss_cls", "loss_diff", "loss_gen", "loss_coarse", "x0_norm"}
    assert not losses["x0_norm"].requires_grad and float(losses["x0_norm"]) > 0
    backbone = list(classifier.encoder.units.parameters())
    for term in ("loss_cls", "loss_diff", "loss_gen", "loss_coarse"):
        grads = torch.autograd.grad(losses[term], backbone, retain_graph=True, allow_unused=True)
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0, term
    # The diffusion target is detached: its gradient reaches the backbone only through x_t.
    x0 = torch.randn(4, 3, requires_grad=True)
    x0_hat = torch.zeros(4, 3, requires_grad=True)
    cocodiff_loss(torch.zeros(4, 2), torch.zeros(4, 2), x0, x0_hat, torch.randn(4, 2), torch.randn(4, 2),
                  torch.tensor([0, 1, 0, 1]), torch.tensor(1.0), 1.0, 1.0, 1.0)["loss_diff"].backward()
    assert x0.grad is None and x0_hat.grad.abs().sum() > 0


def test_detach_diffusion_input_cuts_only_the_diffusion_term_from_the_backbone(toy):
    on, classifier_on, module_on = toy_losses(toy, **{"module.detach_diffusion_input": True})
    off, classifier_off, module_off = toy_losses(toy, **{"module.detach_diffusion_input": False})
    backbone_on, backbone_off = list(classifier_on.parameters()), list(classifier_off.parameters())
    # Same seeded weights and draws: every term has the same value either way (x̂_0 is the same function of x_0).
    for k in off:
        torch.testing.assert_close(on[k], off[k], rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(on["loss_diff"], backbone_on, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)
    grads = torch.autograd.grad(off["loss_diff"], backbone_off, retain_graph=True, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    # The other module terms still reach the backbone through x_t: with detach on, the backbone's gradient of the
    # total is that of the total without the diffusion term with detach off; the module's gradient is unchanged.
    # fp32 sums over a few thousand products: agreement to ~1e-5 relative, not bit for bit.
    w_diff = tiny_config().module.w_diff
    for params_on, params_off, ref in ((backbone_on, backbone_off, off["loss"] - w_diff * off["loss_diff"]),
                                       (list(module_on.parameters()), list(module_off.parameters()), off["loss"])):
        got = torch.autograd.grad(on["loss"], params_on, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(ref, params_off, retain_graph=True, allow_unused=True)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert any(g is not None and g.any() for g in torch.autograd.grad(
        on["loss_gen"] + on["loss_coarse"], backbone_on, retain_graph=True, allow_unused=True))


def test_fit_logs_the_feature_norm(toy):
    data, fine, coarse = toy
    reporter = ListReporter()
    fit_cocodiff(tiny_config(**{"train.steps": 4, "train.eval_every": 4}), data.train_x, data.train_y, None, None,
                 fine, coarse, reporter, progress=False)
    norms = [m["train/x0_norm"] for _, m in reporter.metrics if "train/x0_norm" in m]
    assert len(norms) == 4 and all(v > 0 and math.isfinite(v) for v in norms)


@pytest.mark.parametrize("stream", ["joint", "bone", "motion"])
def test_classifier_shapes_and_streams(stream):
    cfg = tiny_config(**{"backbone.stream": stream})
    model = build_classifier(cfg.backbone, NUM_CLASSES).eval()
    x, _ = toy_skeletons(1, 0, noise=0.1)
    assert x.shape == (NUM_CLASSES, 3, 16, 25, 2)
    assert model(x).shape == (NUM_CLASSES, NUM_CLASSES) and model.features(x).shape == (NUM_CLASSES, 32)
    if stream == "joint":
        assert torch.equal(model.to_stream(x), x)
    else:
        assert not torch.equal(model.to_stream(x), x)


# ----------------------------------------------------------------------------------------------
# Fit, export, no inference cost, resume
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(toy, tmp_path_factory):
    """60-step runs of the baseline and of +module (the latter with checkpoints)."""
    run_dir = tmp_path_factory.mktemp("cocodiff")
    reporter = ListReporter()
    return {"baseline": fit(tiny_config(**{"module.enabled": False}), toy),
            "cocodiff": fit(tiny_config(), toy, run_dir, reporter), "run_dir": run_dir, "reporter": reporter}


@pytest.mark.parametrize("arm", ["baseline", "cocodiff"])
def test_short_fit_beats_chance(runs, arm):
    result = runs[arm]
    assert result.step == 60 and result.best_metric > 2 * 100 / NUM_CLASSES       # chance is 25 %
    assert (result.module is None) == (arm == "baseline")


def test_reports_and_checkpoints(runs):
    reporter, run_dir = runs["reporter"], runs["run_dir"]
    assert [s for s, *_ in reporter.evaluations] == [30, 60]
    _, metrics, artifacts, ckpt = reporter.evaluations[-1]
    assert set(metrics) == {"val/top1", "val/top5"} and artifacts == {} and ckpt == run_dir
    logged = reporter.metrics[-1][1]
    assert {"train/loss", "train/loss_diff", "train/loss_gen", "train/loss_coarse", "train/lr"} <= set(logged)
    best = torch.load(run_dir / BEST, weights_only=True)
    assert set(best["classifier"]) == set(runs["cocodiff"].classifier.state_dict())   # no module weights
    assert best["val_logits"].shape == (len(best["val_labels"]), NUM_CLASSES)
    assert accuracy_metrics(best["val_logits"], best["val_labels"]) == best["metrics"]


def test_exported_classifier_costs_nothing_extra(runs, toy):
    """Same parameter count and outputs as a backbone+head built without the module."""
    cfg, result = tiny_config(), runs["cocodiff"]
    exported = export_classifier(result)
    plain = build_encoder("stgcn", NUM_CLASSES, 3, "ntu-rgb+d", 8, (1, 1, 1), 0.0)
    assert count_parameters(exported) == count_parameters(plain) == count_parameters(build_classifier(cfg.backbone, 4))
    assert not any(isinstance(m, (CoCoDiffModule, LatentDenoiser)) for m in exported.modules())
    plain.load_state_dict(exported.encoder.state_dict())
    x = toy[0].val_x[:8]
    with torch.no_grad():
        torch.testing.assert_close(exported(x), plain.eval()(x))
    assert export_classifier(result, "last").training is False


def test_evaluation_never_builds_the_module(runs, toy, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("diffusion part constructed during evaluation")

    monkeypatch.setattr(LatentDenoiser, "__init__", refuse)
    monkeypatch.setattr(CoCoDiffModule, "__init__", refuse)
    data = toy[0]
    metrics, logits = evaluate_classifier(export_classifier(runs["cocodiff"]), data.val_x, data.val_y, batch_size=7)
    assert metrics == runs["cocodiff"].best_metrics and logits.shape == (len(data.val_y), NUM_CLASSES)
    loaded, ckpt = load_classifier(runs["run_dir"] / BEST)
    assert isinstance(loaded, SkeletonClassifier)
    torch.testing.assert_close(evaluate_classifier(loaded, data.val_x, data.val_y)[1], ckpt["val_logits"])


def test_resume_gives_identical_weights(runs, toy, tmp_path):
    cfg = tiny_config()
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, toy, tmp_path, CrashAfter(30))
    assert torch.load(tmp_path / LAST, weights_only=True)["step"] == 30
    reporter = ListReporter()
    resumed = fit(cfg, toy, tmp_path, reporter)
    assert resumed.step == 60 and min(step for step, _ in reporter.metrics) > 30
    full = runs["cocodiff"]
    assert_same_weights(weights(resumed.classifier, resumed.module), weights(full.classifier, full.module))
    assert resumed.best_metrics == full.best_metrics and torch.equal(resumed.val_logits, full.val_logits)


def test_resume_refused_under_another_training_config(runs, toy):
    with pytest.raises(InputError, match="different training config"):
        fit(tiny_config(**{"module.w_gen": 0.7}), toy, runs["run_dir"])


# ----------------------------------------------------------------------------------------------
# Data, ensembles, ablation, step cost
# ----------------------------------------------------------------------------------------------

def test_batches_are_a_pure_function_of_the_step():
    epoch = torch.cat([batch_indices(s, 4, 10, 3) for s in range(2)])
    assert epoch.unique().numel() == 8 and torch.equal(batch_indices(1, 4, 10, 3), batch_indices(1, 4, 10, 3))
    assert not torch.equal(batch_indices(0, 4, 10, 3), batch_indices(2, 4, 10, 3))     # a new epoch reshuffles
    assert len(batch_indices(5, 16, 10, 0)) == 10                                       # fewer samples than a batch


def test_ranks_get_disjoint_shards_of_one_global_batch():
    shards = [batch_indices(3, 4, 50, 7, rank, 2) for rank in range(2)]
    assert [len(s) for s in shards] == [4, 4] and not set(shards[0].tolist()) & set(shards[1].tolist())
    # the two shards are exactly the single-process global batch of 8
    assert torch.equal(torch.cat(shards), batch_indices(3, 8, 50, 7))
    # fewer samples than a global batch: split as evenly as possible, no rank left empty
    assert [len(batch_indices(0, 16, 5, 0, r, 2)) for r in range(2)] == [3, 2]


def test_diffusion_draws_are_pure_per_step_and_differ_by_rank():
    def draw(step, rank):
        return draw_diffusion_inputs(6, 4, 100, 0.5, step_generator(0, step, rank))

    assert all(torch.equal(a, b) for a, b in zip(draw(3, 0), draw(3, 0)))
    assert not torch.equal(draw(3, 0)[1], draw(3, 1)[1]) and not torch.equal(draw(3, 0)[1], draw(4, 0)[1])


def test_load_prepared_splits_by_benchmark(tmp_path):
    write_prepared(tmp_path, np.arange(26) % 60, ["train"] * 20 + ["test"] * 5 + ["-"])
    data = load_prepared(tmp_path, "ntu60-xsub", 0.1, 0)
    assert (len(data.train_y), len(data.val_y), len(data.test_y), data.num_classes) == (18, 2, 5, 60)
    assert torch.equal(data.test_y, torch.arange(20, 25))
    assert set(data.train_y.tolist()) | set(data.val_y.tolist()) == set(range(20))
    torch.testing.assert_close(data.test_x[0].flatten(), torch.arange(240, 252, dtype=torch.float32))
    with pytest.raises(InputError, match="no 'ntu60-xview' column"):
        load_prepared(tmp_path, "ntu60-xview", 0.1, 0)
    with pytest.raises(InputError, match=r"labels outside 0..15"):
        load_prepared(tmp_path, "ntu60-xsub", 0.1, 0, num_classes=16)


def test_synthetic_source_reads_its_folder_with_46_classes_and_the_generated_names(tmp_path):
    folder = write_prepared(tmp_path / "syn", np.arange(30) % SYNTHETIC_CLASSES, ["train"] * 20 + ["test"] * 10)
    cfg = tiny_config(**{"module.enabled": False})
    with pytest.raises(InputError, match="made by the service layer"):
        load_cocodiff_data(cfg)
    data, names, fine, coarse = prepare_cocodiff(cfg, folder)
    assert data.num_classes == SYNTHETIC_CLASSES and names == [c.name for c in action_catalogue()]
    assert fine is None and coarse is None                                   # the baseline encodes no text
    assert dataset_label(cfg) == "synthetic-skeleton"
    assert dataset_label(tiny_config(**{"data.benchmark": "ntu60-xview"})) == "synthetic-skeleton-ntu60-xview"
    # a prepared NTU folder keeps the benchmark's class count and the embedded NTU-60 names
    ntu = tiny_config(**{"module.enabled": False, "data.source": "prepared", "data.prepared_dir": str(folder)})
    data, names, _, _ = prepare_cocodiff(ntu)
    assert data.num_classes == 60 and names[0] == "drink water" and dataset_label(ntu) == "ntu60-xsub"


def test_synthetic_prompts_are_one_line_per_generated_class():
    sets = synthetic_prompts()
    catalogue = action_catalogue()
    assert sets.names == [c.name for c in catalogue] and sets.descriptions == [[c.description for c in catalogue]]
    [synonyms] = sets.synonyms
    assert len(synonyms) == SYNTHETIC_CLASSES and len(set(synonyms)) == SYNTHETIC_CLASSES
    assert not set(synonyms) & set(sets.names)                            # a different wording, not a copy


def test_texts_split_into_coarse_and_fine(tmp_path, monkeypatch):
    """Names + synonyms are the coarse text, descriptions the fine text; set k of the fake encoder reads k."""
    calls = []

    def fake_encode(spec, sets, max_tokens, cache_dir):
        calls.append([list(s) for s in sets])
        feats = torch.cat([torch.full((len(sets[0]), 3), float(k)) for k in range(len(sets))], dim=1)
        return TextFeatures(feats, torch.zeros(len(sets[0]), max_tokens, 3))

    monkeypatch.setattr(cocodiff_data, "encode_prompt_sets", fake_encode)
    files = {}
    for name in ("names", "synonyms", "fine"):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("".join(f"{name} {c}\n" for c in range(NUM_CLASSES)))
    prepared = {"data.source": "prepared", "data.prepared_dir": str(tmp_path)}
    cfg = tiny_config(**prepared, **{"text.class_names": str(files["names"]), "text.synonyms": [str(files["synonyms"])],
                                     "text.descriptions": [str(files["fine"])]})
    names, fine, coarse = encode_cocodiff_texts(cfg, NUM_CLASSES)
    assert names == [f"names {c}" for c in range(NUM_CLASSES)] and len(calls) == 1
    assert torch.equal(coarse, torch.cat([torch.zeros(4, 3), torch.ones(4, 3)], 1))
    assert torch.equal(fine, torch.full((4, 3), 2.0))
    # The synthetic default: generated names + the embedded synonyms (coarse), generated descriptions (fine).
    names, fine, coarse = encode_cocodiff_texts(tiny_config(), SYNTHETIC_CLASSES)
    expected = synthetic_prompts()
    assert calls[-1] == [expected.names, *expected.synonyms, *expected.descriptions]
    assert names[0] == "raise left arm"
    assert coarse.shape == (SYNTHETIC_CLASSES, 6) and fine.shape == (SYNTHETIC_CLASSES, 3)
    with pytest.raises(InputError, match="6 prompts, expected 4"):
        files["fine"].write_text("x\n" * 6)
        encode_cocodiff_texts(cfg, NUM_CLASSES)
    with pytest.raises(InputError, match="text.descriptions"):
        encode_cocodiff_texts(tiny_config(**prepared, **{"text.class_names": str(files["names"])}), NUM_CLASSES)
    with pytest.raises(InputError, match="default class names have 60 lines but the data has 120 classes"):
        class_prompts(tiny_config(**prepared, **{"data.benchmark": "ntu120-xsub"}), 120)


def test_ensemble_logits():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    torch.testing.assert_close(ensemble_logits([a, b], [2.0, 1.0]), torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(ensemble_logits([a, b]), a + b)
    with pytest.raises(InputError, match="weights"):
        ensemble_logits([a, b], [1.0])
    with pytest.raises(InputError, match="shape"):
        ensemble_logits([a, torch.zeros(2, 2)])


def test_step_times_measures_both_arms(toy):
    data = toy[0]
    times = step_times(tiny_config(), (data.train_x[:8], data.train_y[:8]), *texts(), iters=1, warmup=0)
    assert set(times) == {"baseline_s", "cocodiff_s", "overhead", "baseline_cpu_share", "cocodiff_cpu_share"}
    assert times["baseline_s"] > 0 < times["cocodiff_s"] and 0 < times["baseline_cpu_share"] <= 1.5


def test_fit_input_errors(toy):
    data, fine, coarse = toy
    with pytest.raises(InputError, match="needs fine_text and coarse_text"):
        fit_cocodiff(tiny_config(), data.train_x, data.train_y, None, None, None, None, NullReporter(), progress=False)
    with pytest.raises(InputError, match="classes"):
        fit_cocodiff(tiny_config(), data.train_x, data.train_y, None, None, fine, coarse[:3], NullReporter(),
                     progress=False)
    with pytest.raises(InputError, match="rank 2 of 2"):
        fit_cocodiff(tiny_config(), data.train_x, data.train_y, None, None, fine, coarse, NullReporter(),
                     progress=False, rank=2, world_size=2)
