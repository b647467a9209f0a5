"""CoCoDiff through `service/` as a user runs it, each command in its own process: `service.run cocodiff` end to end
(JSON line, MLflow params, metrics and artifacts), `service.final` (seeds, registry, ablation, --splits), and (slow)
a real smoke sweep on a local Ray whose child runs are read back from MLflow. The embedded default, the refusals,
the search space and the named splits in process: tests/component/test_cocodiff_service.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from trainers.config import build_config, to_plain
from trainers.configs import CoCoDiffConfig

ROOT = Path(__file__).resolve().parents[2]
PER_CLASS = 8   # generated sequences per class in these tests (46 classes)
TINY = {"backbone.encoder": "stgcn", "backbone.base_channels": 8, "backbone.units_per_stage": "[1, 1, 1]",
        "module.hidden": 32, "module.depth": 1, "module.align_dim": 16, "optim.batch_size": 16,
        "optim.warmup_steps": 2, "optim.lr": 3e-3, "train.steps": 20, "train.eval_every": 10,
        "train.checkpoint_every": 10, "train.threads": 1, "data.synthetic.per_class": PER_CLASS}


def sets(overrides: dict) -> list[str]:
    return [arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}")]


def env() -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true", "PYTHONUNBUFFERED": "1"}
    out.pop("MLFLOW_TRACKING_URI", None)
    out.pop("RAY_ADDRESS", None)
    return out


def run_module(module: str, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# service.run cocodiff
# ----------------------------------------------------------------------------------------------

def test_run_cocodiff_logs_metrics_and_artifacts(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = last_json(run_module("service.run", tmp_path, "cocodiff", *sets(TINY), "--tracking-uri", uri,
                               "--no-progress"))
    for key in ("val/top1_max", "test/top1", "test/top5"):
        assert 0.0 <= out[key] <= 100.0
    assert out["best_step"] in (10, 20)
    run_dir = tmp_path / out["run_dir"]
    assert (run_dir / "best.pt").is_file() and (run_dir / "last.pt").is_file()

    client = MlflowClient(uri)
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "cocodiff-synthetic-skeleton"
    params = run.data.params
    assert params["method"] == "cocodiff" and params["module.w_diff"] == "1.0" and params["backbone.encoder"] == "stgcn"
    assert int(params["derived.num_parameters_module"]) > 0 and int(params["derived.num_classes"]) == 46
    n_test = int(params["derived.test_samples"])
    assert 0 < n_test < PER_CLASS * 46 == (
        n_test + int(params["derived.train_samples"]) + int(params["derived.val_samples"]))
    assert run.data.metrics["test/top1"] == pytest.approx(out["test/top1"], abs=1e-3)
    assert all(round(run.data.metrics[k], 4) == out[k] for k in out if "/" in k)     # the JSON's numbers, by name
    assert int(run.data.tags["best_step"]) == out["best_step"]
    assert {"train/loss", "train/loss_diff", "train/loss_coarse", "val/top1"} <= set(run.data.metrics)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints", "plots", "predictions"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/val_confusion.png",
                                                                                  "plots/test_confusion.png"}
    logits = np.load(client.download_artifacts(run.info.run_id, "predictions/test_logits.npy", str(tmp_path)))
    labels = np.load(client.download_artifacts(run.info.run_id, "predictions/test_labels.npy", str(tmp_path)))
    assert logits.shape == (n_test, 46) and labels.shape == (n_test,)
    assert (logits.argmax(1) == labels).mean() * 100 == pytest.approx(out["test/top1"], abs=1e-3)
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
    assert build_config(CoCoDiffConfig, config).backbone.base_channels == 8


# ----------------------------------------------------------------------------------------------
# service.final
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_config_file(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(to_plain(build_config(CoCoDiffConfig, {}, {
        **TINY, "backbone.units_per_stage": [1, 1, 1]}))))
    return path


def test_final_trains_each_seed_tests_once_and_registers_the_classifier(tmp_path, tiny_config_file):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = last_json(run_module("service.final", tmp_path, "--from", str(tiny_config_file), "--seeds", "2",
                               "--tracking-uri", uri, "--out", str(tmp_path / "final"), "--no-progress"))
    (row,) = out["rows"]
    assert row["arm"] == "cocodiff" and row["seeds"] == 2 and len(row["test/top1_per_seed"]) == 2
    assert row["train_samples"] + row["test_samples"] == PER_CLASS * 46   # train + validation: nothing held out
    assert row["classes"] == 46 and row["registered_version"] == "1"
    assert "± " in (tmp_path / "final" / "final-cocodiff-synthetic-skeleton.md").read_text()

    import mlflow

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/cocodiff-synthetic-skeleton@final")
    pred = model.predict(np.zeros((3, 3, 64, 25, 2), dtype=np.float32))
    assert pred.shape == (3,) and set(pred.tolist()) <= set(range(46))
    client = MlflowClient(uri)
    children = client.search_runs([client.get_experiment_by_name("cocodiff-synthetic-skeleton").experiment_id],
                                  f"tags.mlflow.parentRunId = '{row['parent_run_id']}'")
    assert len(children) == 2 and all("test/top1" in r.data.metrics for r in children)


def test_ablation_reports_both_arms_and_their_paired_difference(tmp_path, tiny_config_file):
    """--splits re-targets the config: here the generated set's X-View split."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = last_json(run_module("service.final", tmp_path, "--from", str(tiny_config_file), "--ablation", "--seeds",
                               "2", "--set", "train.steps=10", "--splits", "synthetic-skeleton-xview",
                               "--tracking-uri", uri, "--out", str(tmp_path / "final"), "--no-progress"))
    baseline, cocodiff = out["rows"]
    assert (baseline["arm"], cocodiff["arm"]) == ("baseline", "cocodiff")
    assert baseline["split"] == cocodiff["split"] == "synthetic-skeleton-xview"
    assert "registered_version" not in cocodiff
    expected = np.mean(np.array(cocodiff["test/top1_per_seed"]) - np.array(baseline["test/top1_per_seed"]))
    assert cocodiff["delta/top1_mean"] == pytest.approx(expected, abs=1e-2)
    assert -100 <= cocodiff["delta/top5_mean"] <= 100 and cocodiff["delta/top5_std_seeds"] >= 0
    table = (tmp_path / "final" / "ablation-cocodiff-synthetic-skeleton-xview.md").read_text()
    assert "| baseline |" in table and "| cocodiff |" in table and "paired by seed" in table


# ----------------------------------------------------------------------------------------------
# Smoke sweep on a real local Ray (slow)
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_sweep_leaves_child_runs_with_the_guidance_weights(tmp_path):
    """Also the `train` trial driver (a TorchTrainer per trial, what DDP sweeps use) end to end."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = last_json(run_module(
        "service.sweep", tmp_path, "cocodiff", "--smoke", "--num-samples", "2", "--trial-driver", "train",
        *sets({"train.steps": 40, "train.eval_every": 20, "train.checkpoint_every": 20,
               "data.synthetic.per_class": PER_CLASS}),
        "--tracking-uri", uri, "--storage-path", str(tmp_path / "results"), timeout=1200))
    (summary,) = out["sweeps"]
    assert summary["metric"] == "val/top1_max" and summary["errors"] == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cocodiff-synthetic-skeleton-sweeps")
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert len(kids) >= 2
    for kid in kids:
        assert {"module.w_diff", "module.w_gen", "module.w_coarse", "module.num_train_timesteps",
                "optim.lr"} <= set(kid.data.params)
        assert {"val/top1", "val/top1_max"} <= set(kid.data.metrics)
        assert kid.data.tags["trial_state"] in {"finished", "early_stopped"}
        assert kid.data.metrics["trial/start_to_first_metric_s"] > 0
    assert summary["start_to_first_metric_s_max"] > 0
    best = Path(summary["best_config"])
    cfg = build_config(CoCoDiffConfig, yaml.safe_load(best.read_text()))
    assert cfg.backbone.base_channels == 8 and cfg.train.steps == 40
    assert summary["best_metric"] == pytest.approx(max(k.data.metrics["val/top1_max"] for k in kids), abs=1e-3)
