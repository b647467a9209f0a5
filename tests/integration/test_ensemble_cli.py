"""Score-level stream ensembles end to end (slow): `python -m service.final --streams joint bone` trains a classifier
per stream, fuses them per seed (a row per stream + 'ensemble'), registers the fused model, and `service.ensemble`
on its seed-0 stream runs reproduces the seed-0 ensemble child. `service.ensemble` and the refusals of
`service.final --streams` in process: tests/component/test_ensemble.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from service.ensemble import main
from trainers.config import build_config, to_plain
from trainers.configs import CoCoDiffConfig

ROOT = Path(__file__).resolve().parents[2]


def run_cli(capsys, *argv: str) -> tuple[int, dict | None, str]:
    """`service.ensemble` in process: its exit code, its JSON line (on success) and its stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]) if code == 0 else None, err


TINY = {"backbone.encoder": "stgcn", "backbone.base_channels": 8, "backbone.units_per_stage": [1, 1, 1],
        "module.enabled": False, "optim.batch_size": 16, "optim.warmup_steps": 2, "optim.lr": 3e-3,
        "train.steps": 10, "train.eval_every": 10, "train.checkpoint_every": 10, "train.threads": 1,
        "data.synthetic.per_class": 8}


def last_json(module: str, cwd: Path, *args: str) -> dict:
    """Run `python -m module args` as a user would; its last stdout line as JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_final_streams_trains_each_stream_and_fuses_them_per_seed(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(to_plain(build_config(CoCoDiffConfig, {}, TINY))))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rows = last_json("service.final", tmp_path, "--from", str(config), "--seeds", "2", "--streams", "joint", "bone",
                     "--tracking-uri", uri, "--out", str(tmp_path / "final"), "--no-progress")["rows"]
    assert [(r["arm"], r["stream"], r["seeds"]) for r in rows] == [("baseline", "joint", 2), ("baseline", "bone", 2),
                                                                   ("baseline", "ensemble", 2)]
    assert "registered_version" in rows[-1] and not any("registered_version" in r for r in rows[:-1])
    table = (tmp_path / "final" / "final-cocodiff-synthetic-skeleton-joint+bone.md").read_text()
    assert "| baseline | joint |" in table and "| baseline | bone |" in table and "| baseline | ensemble |" in table

    client = MlflowClient(uri)
    children = client.search_runs([client.get_experiment_by_name("cocodiff-synthetic-skeleton").experiment_id],
                                  f"tags.mlflow.parentRunId = '{rows[0]['parent_run_id']}'")
    by_name = {r.info.run_name: r for r in children}
    assert sorted(by_name) == sorted(f"final-synthetic-skeleton-baseline-{s}-seed{i}"
                                     for s in ("joint", "bone", "ensemble") for i in (0, 1))
    assert by_name["final-synthetic-skeleton-baseline-bone-seed1"].data.params["backbone.stream"] == "bone"

    def logits(name: str) -> np.ndarray:
        return np.load(client.download_artifacts(by_name[name].info.run_id, "predictions/test_logits.npy",
                                                 str(tmp_path / name)))

    for i in (0, 1):   # each seed's ensemble child holds the sum of that seed's stream logits
        fused = f"final-synthetic-skeleton-baseline-ensemble-seed{i}"
        np.testing.assert_allclose(logits(fused), logits(f"final-synthetic-skeleton-baseline-joint-seed{i}")
                                   + logits(f"final-synthetic-skeleton-baseline-bone-seed{i}"), rtol=1e-6)
        assert by_name[fused].data.metrics["test/top1"] == pytest.approx(rows[2]["test/top1_per_seed"][i], abs=1e-3)
    assert rows[2]["test/top1_mean"] == pytest.approx(np.mean(rows[2]["test/top1_per_seed"]), abs=1e-2)

    # the registered model holds both seed-0 stream classifiers and predicts the argmax of their summed logits
    import mlflow

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/cocodiff-synthetic-skeleton-joint-bone@final")
    members = model.unwrap_python_model().ensemble.models
    assert [m.stream for m in members] == ["joint", "bone"]
    x = torch.randn(5, 3, 64, 25, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = (members[0](x) + members[1](x)).argmax(-1).numpy()
    np.testing.assert_array_equal(model.predict(x.numpy()), expected)

    # service.ensemble on the seed-0 stream runs reproduces the seed-0 ensemble child
    code, out, _ = run_cli(capsys, by_name["final-synthetic-skeleton-baseline-joint-seed0"].info.run_id,
                           by_name["final-synthetic-skeleton-baseline-bone-seed0"].info.run_id, "--tracking-uri", uri)
    assert code == 0
    assert [s["stream"] for s in out["sources"]] == ["joint", "bone"]
    assert out["ensemble"]["top1"] == pytest.approx(
        by_name["final-synthetic-skeleton-baseline-ensemble-seed0"].data.metrics["test/top1"], abs=1e-3)
