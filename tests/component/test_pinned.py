"""Pinned values of the three fit loops (#13 redesign guard): training fingerprints (they name run dirs and gate
resumes), batch ids, checkpoint key sets and the logged learning-rate trace. A change here breaks old run dirs
and checkpoints, so each value is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from trainers import cocodiff_fit, encoder_fit, tdsm_fit
from trainers.cocodiff_fit import fit_cocodiff
from trainers.config import build_config
from trainers.configs import CoCoDiffConfig, EncoderConfig, TDSMConfig
from trainers.data import FeatureSplit
from trainers.encoder_fit import fit_encoder
from trainers.schedule import batch_indices, epoch_indices, lr_at
from trainers.tdsm_fit import fit_tdsm
from trainers.text import TextFeatures
from trainers.tracking import ListReporter

C = 4


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# (a) fingerprints, (b) batch ids
# ----------------------------------------------------------------------------------------------

def test_training_fingerprints_are_pinned():
    x = torch.zeros(10, 3, 64, 25, 2)
    coco = build_config(CoCoDiffConfig, {})
    # CoCoDiff's values are those after e8e3eef (train.compile left its config), not plan13's B.1 of fe30ff1.
    assert tdsm_fit.training_fingerprint(build_config(TDSMConfig, {})) == \
        "b59ac8626c1dcdc7ab0b2e26a7e0561260aa3b5b2b62dc1c5f509ec44729ee55"
    assert cocodiff_fit.training_fingerprint(coco, x, 46, (384, 768)) == \
        "cc994702673d9ccf3b15c8e7d26dba7c5e8bdb4e9173f9c6613cd65a9356159f"
    assert cocodiff_fit.training_fingerprint(coco, x, 46, None) == \
        "23368a6e6dedfbcf3d6318439b6a189a67006bda8e7e0050f36ee766d5195174"
    assert encoder_fit.training_fingerprint(EncoderConfig(), x, [0, 1, 2]) == \
        "e48b245af51f2abadbc17647b83e2dd6bfac40615d3805cca124e6bfaec50176"


def test_batch_ids_are_pinned():
    assert batch_indices(5, 4, 30, 7, rank=1, world_size=2).tolist() == [9, 1, 14, 19]
    assert epoch_indices(5, 8, 30, 7).tolist() == [5, 29, 3, 24, 9, 1, 14, 19]
    for step in range(12):
        assert torch.equal(epoch_indices(step, 8, 30, 7), batch_indices(step, 8, 30, 7, 0, 1))


# ----------------------------------------------------------------------------------------------
# Tiny fits of the three loops: (c) checkpoint key sets, (d) logged lr = lr_at(step - 1)
# ----------------------------------------------------------------------------------------------

def _keys(path: Path) -> set[str]:
    return set(torch.load(path, weights_only=True))


@pytest.fixture(scope="module")
def skeletons():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(C).repeat_interleave(10)
    x = torch.randn(len(y), 3, 8, 25, 2, generator=g) + y.float()[:, None, None, None, None] * .5
    return x, y


@pytest.fixture(scope="module")
def tdsm_run(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    proto, lab = torch.randn(6, 16, generator=g), torch.arange(6).repeat_interleave(8)
    allx = FeatureSplit(proto[lab] + 0.3 * torch.randn(48, 16, generator=g), lab)
    text = TextFeatures(proto @ torch.randn(16, 12, generator=g), torch.randn(6, 4, 10, generator=g))
    cfg = tiny_config(**{"train.steps": 8, "train.eval_every": 4, "train.checkpoint_every": 4,
                         "optim.warmup_steps": 3, "train.precision": "fp32"})
    run_dir, rep = tmp_path_factory.mktemp("tdsm"), ListReporter()
    fit_tdsm(cfg, allx.select([0, 1, 2, 3]), [0, 1, 2, 3], allx.select([4, 5]), [4, 5], text, rep, run_dir,
             progress=False)
    return run_dir, rep


COCO = {"backbone.base_channels": 8, "backbone.units_per_stage": [1, 1], "module.hidden": 32, "module.depth": 1,
        "module.align_dim": 16, "optim.batch_size": 8, "optim.warmup_steps": 3, "optim.min_lr_ratio": 0.1,
        "train.steps": 8, "train.eval_every": 4, "train.checkpoint_every": 4, "train.device": "cpu",
        "train.precision": "fp32", "train.threads": 1}


@pytest.fixture(scope="module")
def cocodiff_run(tmp_path_factory, skeletons):
    x, y = skeletons
    g = torch.Generator().manual_seed(1)
    cfg = build_config(CoCoDiffConfig, {}, COCO)
    run_dir, rep = tmp_path_factory.mktemp("cocodiff"), ListReporter()
    fit_cocodiff(cfg, x, y, x[:12], y[:12], torch.randn(C, 12, generator=g), torch.randn(C, 10, generator=g), rep,
                 run_dir, progress=False, num_classes=C)
    return run_dir, rep, cfg


ENCODER = EncoderConfig(base_channels=4, units_per_stage=[1, 1], steps=40, batch_size=8, checkpoint_every=20,
                        device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, skeletons):
    x, y = skeletons
    run_dir, rep = tmp_path_factory.mktemp("encoder"), ListReporter()
    fit_encoder(ENCODER, x, y, list(range(C)), rep, run_dir, progress=False)
    return run_dir, rep


def test_tdsm_checkpoint_keys_are_pinned(tdsm_run):
    run_dir, _ = tdsm_run
    assert _keys(run_dir / "last.pt") == {"model", "optimizer", "generator", "torch_rng", "step", "best",
                                          "fingerprint", "config"}
    assert _keys(run_dir / "best.pt") == {"model", "step", "metrics", "config"}


def test_cocodiff_checkpoint_keys_are_pinned(cocodiff_run):
    run_dir = cocodiff_run[0]
    assert _keys(run_dir / "last.pt") == {"classifier", "module", "optimizer", "torch_rng", "cuda_rng", "step",
                                          "best", "best_step", "best_metrics", "last_metrics", "fingerprint",
                                          "config"}
    assert _keys(run_dir / "best.pt") == {"classifier", "step", "metrics", "val_logits", "val_labels",
                                          "num_classes", "in_channels", "config"}


def test_encoder_checkpoint_keys_are_pinned(encoder_run):
    run_dir, _ = encoder_run
    assert _keys(run_dir / "last.pt") == {"model", "optimizer", "step", "fingerprint", "metrics"}
    assert _keys(run_dir / "encoder.pt") == {"config", "classes", "in_channels", "model"}


def test_cocodiff_logs_the_lr_its_step_used(cocodiff_run):
    _, rep, cfg = cocodiff_run
    logged = {step: m["train/lr"] for step, m in rep.metrics if "train/lr" in m}
    o = cfg.optim
    assert sorted(logged) == list(range(1, 9))
    # Exact: the logged value is the lr the step's optimizer update read.
    assert all(lr == lr_at(step - 1, 8, o.lr, o.warmup_steps, o.min_lr_ratio) for step, lr in logged.items())


def test_encoder_logs_the_lr_its_step_used(encoder_run):
    _, rep = encoder_run
    logged = {step: m["encoder/lr"] for step, m in rep.metrics if "encoder/lr" in m}
    warmup = max(1, ENCODER.steps // 20)                   # the encoder's own warm-up: 5% of its steps
    assert sorted(logged) == list(range(2, 41, 2))
    assert all(lr == lr_at(step - 1, ENCODER.steps, ENCODER.lr, warmup, 0.0) for step, lr in logged.items())


# ----------------------------------------------------------------------------------------------
# (e) metric traces: every value the three loops log, against the trace the code before the #23 redesign logged
# ----------------------------------------------------------------------------------------------

GOLDEN = Path(__file__).with_name("golden_traces.json")


def cpu_signature() -> str:
    """The CPU model, its SIMD extensions and the torch version: which float32 kernels run, and so their reduction
    order and the last bits of a trace, depends on all three (a virtual CPU may name only "AMD EPYC")."""
    import platform
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    simd = ",".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4"))))
    return f"{model} | {simd} | torch {torch.__version__}"


# Evaluation values are counts of samples (top-k %), a chosen grid point or their spread over draws: on another CPU a
# near-tie may flip one sample, which no small tolerance covers, so there only their keys and steps are compared.
DISCRETE = ("top1", "top5", "best_t_test")


def traces(tdsm_run, cocodiff_run, encoder_run) -> dict[str, list]:
    """Every logged metric as (step, key, value), in logging order: training scalars and evaluations."""
    out = {}
    for name, rep in (("tdsm", tdsm_run[1]), ("cocodiff", cocodiff_run[1]), ("encoder", encoder_run[1])):
        rows = [[step, k, float(v)] for step, m in rep.metrics for k, v in sorted(m.items())]
        rows += [[ev[0], k, float(v)] for ev in rep.evaluations for k, v in sorted(ev[1].items())]
        out[name] = rows
    return out


def test_metric_traces_are_pinned(tdsm_run, cocodiff_run, encoder_run):
    """Bit for bit on the machine (CPU model, SIMD extensions, torch version) that recorded the golden file.
    Elsewhere other kernels sum in another order: each float32 op then differs by about 1e-7 relative, and through
    eight to forty steps of a tiny model on one thread (Adam's normalised steps do not amplify it) the training
    scalars (losses, lr, norms) stay within 1e-3 relative (+ 1e-4 absolute for values near zero); the discrete
    evaluation values are compared by key and step only (DISCRETE)."""
    import json
    golden = json.loads(GOLDEN.read_text())
    got = traces(tdsm_run, cocodiff_run, encoder_run)
    for name, rows in golden["traces"].items():
        assert [r[:2] for r in got[name]] == [r[:2] for r in rows], name        # the same keys at the same steps
        if golden["cpu"] == cpu_signature():
            assert [r[2] for r in got[name]] == [r[2] for r in rows], name
        else:
            scalars = [i for i, r in enumerate(rows) if not any(d in r[1] for d in DISCRETE)]
            assert [got[name][i][2] for i in scalars] == pytest.approx([rows[i][2] for i in scalars], rel=1e-3,
                                                                       abs=1e-4), name


def test_record_golden(tdsm_run, cocodiff_run, encoder_run):
    """Writes the golden file only when asked:
    SKELDIFF_RECORD_GOLDEN=1 python -m pytest tests/component/test_pinned.py."""
    import json
    import os
    if not os.environ.get("SKELDIFF_RECORD_GOLDEN"):
        pytest.skip("set SKELDIFF_RECORD_GOLDEN=1 to re-record the golden traces")
    got = traces(tdsm_run, cocodiff_run, encoder_run)
    body = ",\n".join(f'"{name}": [\n' + ",\n".join(json.dumps(r) for r in rows) + "\n]" for name, rows in got.items())
    GOLDEN.write_text(f'{{"cpu": {json.dumps(cpu_signature())},\n"traces": {{\n{body}\n}}}}\n')
