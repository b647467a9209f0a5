"""GCN encoders on the seen classes (`trainers.encoder_fit`, `service.encoder`) and the cached skeleton chain.

A small generated NTU-format set is prepared once per module; encoders are tiny ST-GCNs trained for a few
steps. The Ray Train path (one and two DDP workers) runs on a real local Ray (slow).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CrashAfter
from mlflow.tracking import MlflowClient

from service.data.chain import default_synthetic_unseen, resolve_chain, synthetic_skeleton_features
from service.data.features import extract_to_folder, seen_class_data, train_encoder
from service.methods.common import train_encoder_logged
from service.storage import Storage
from trainers.configs import EncoderConfig
from trainers.encoder_fit import fit_encoder, load_encoder
from trainers.errors import InputError
from trainers.skeleton.prepare import prepare
from trainers.skeleton.synthetic import action_catalogue, write_synthetic_dataset
from trainers.tracking import ListReporter

ROOT = Path(__file__).resolve().parents[2]
UNSEEN = [1, 4]
TINY = {"name": "stgcn", "base_channels": 8, "units_per_stage": [1, 1], "batch_size": 8, "steps": 6,
        "checkpoint_every": 3, "precision": "fp32", "device": "cpu"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """8 generated classes x 6 samples, prepared (ntu60-xsub / ntu60-xview columns)."""
    root = tmp_path_factory.mktemp("enc")
    write_synthetic_dataset(root / "raw", num_classes=8, per_class=6, seed=3)
    prepare("synthetic", root / "raw", root / "prepared", progress=False, log=lambda m: None)
    return root / "prepared"


def tiny(**kw) -> EncoderConfig:
    return EncoderConfig(**{**TINY, **kw})


def test_seen_class_data_never_holds_an_unseen_class(prepared):
    x, y, seen, (hx, hy) = seen_class_data(prepared, UNSEEN)
    assert set(UNSEEN).isdisjoint(y.tolist()) and set(UNSEEN).isdisjoint(hy.tolist())
    assert seen == sorted(set(y.tolist())) and set(hy.tolist()) <= set(seen)
    assert x.shape[1:] == (3, 64, 25, 2) and len(x) == len(y) and len(hx) == len(hy) > 0


def test_resumed_training_equals_uninterrupted(prepared, tmp_path):
    x, y, seen, held = seen_class_data(prepared, UNSEEN)
    straight = fit_encoder(tiny(), x, y, seen, ListReporter(), tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit_encoder(tiny(), x, y, seen, CrashAfter(3), tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "encoder.pt").exists()
    rep = ListReporter()
    resumed = fit_encoder(tiny(), x, y, seen, rep, tmp_path / "b", progress=False, held_out=held)
    assert [s for s, *_ in rep.evaluations] == [6]                    # only the remaining checkpoint
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed.held_out_top1 is not None and 0 <= resumed.held_out_top1 <= 100
    assert (tmp_path / "b" / "encoder.pt").is_file()


def test_a_checkpoint_of_another_config_is_refused(prepared, tmp_path):
    x, y, seen, _ = seen_class_data(prepared, UNSEEN)
    fit_encoder(tiny(steps=3), x, y, seen, ListReporter(), tmp_path, progress=False)
    with pytest.raises(InputError, match="different training config"):
        fit_encoder(tiny(lr=5e-3), x, y, seen, ListReporter(), tmp_path, progress=False)


def test_train_then_extract_writes_the_sa_dvae_layout(prepared, tmp_path):
    path = train_encoder(prepared, UNSEEN, tiny(), tmp_path / "enc", progress=False)
    model, cfg, seen = load_encoder(path)
    assert set(UNSEEN).isdisjoint(seen)
    out = extract_to_folder(prepared, path, UNSEEN, tmp_path / "feats")
    labels = np.load(prepared / "label.npy")
    train, ztest, gtest = (np.load(out / f"{n}.npy") for n in ("train", "ztest", "gtest"))
    assert train.shape[1] == ztest.shape[1] == gtest.shape[1] == model.feature_dim == 16   # 8 * 2 stages
    assert set(np.load(out / "z_label.npy").tolist()) <= set(UNSEEN)
    assert set(UNSEEN).isdisjoint(np.load(out / "train_label.npy").tolist())
    header, *rows = [r.split("\t") for r in (prepared / "index.tsv").read_text().splitlines()]
    is_train = np.array([r[header.index("ntu60-xsub")] == "train" for r in rows])
    is_unseen = np.isin(labels, UNSEEN)
    assert (len(train), len(ztest), len(gtest)) == ((is_train & ~is_unseen).sum(), (~is_train & is_unseen).sum(),
                                                    (~is_train).sum())
    with pytest.raises(InputError, match="unseen here"):
        extract_to_folder(prepared, path, [seen[0]], tmp_path / "leak")


def test_cli_bad_input_exits_2_with_one_line(prepared, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "service.encoder", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=300)

    res = run("train", "--data", str(tmp_path / "none"), "--unseen", "1,2", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "label.npy" in res.stderr
    res = run("train", "--data", str(prepared), "--unseen", "1,x", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "--unseen" in res.stderr
    res = run("train", "--data", str(prepared), "--unseen", "1", "--out", str(tmp_path / "o"),
              "--set", "name=agcn", "--in-process")
    assert res.returncode == 2 and "name" in res.stderr


def test_chain_stages_are_cached_and_keyed_by_their_inputs(tmp_path):
    logs: list[str] = []
    cfg = EncoderConfig(**{**TINY, "steps": 2})
    unseen = default_synthetic_unseen(4)
    first = synthetic_skeleton_features(tmp_path, 2, cfg, unseen, log=logs.append)
    assert any("training stgcn" in m for m in logs)
    logs.clear()
    again = synthetic_skeleton_features(tmp_path, 2, cfg, unseen, log=logs.append)
    assert again == first and any("encoder up to date" in m for m in logs)
    assert any("features up to date" in m for m in logs)
    logs.clear()
    other = synthetic_skeleton_features(tmp_path, 2, EncoderConfig(**{**TINY, "steps": 3}), unseen, log=logs.append)
    assert other["features_dir"] != first["features_dir"] and any("training stgcn" in m for m in logs)
    names = Path(first["class_names"]).read_text().splitlines()
    assert len(names) == len(action_catalogue())
    z_labels = set(np.load(Path(first["features_dir"]) / "z_label.npy").tolist())
    assert z_labels and z_labels <= set(unseen)           # 2 per class: an unseen class may lack test samples


def test_a_chain_build_logs_its_encoder_as_an_mlflow_run(tmp_path):
    """The trainer service.run (and final) passes to the chain: an MLflow run `stgcn-encoder-<key>` in experiment
    `encoder-prepared-raw-<n>x46-s0` (README, the embedded default) with params, curves and held-out top-1."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    overrides = {"chain": {"per_class": 3, "unseen_count": 4, "encoder": {**TINY, "steps": 4, "checkpoint_every": 2}}}
    trainer = functools.partial(train_encoder_logged, tracking_uri=uri, progress=False)
    storage = Storage.parse(str(tmp_path / "results"))
    resolved = resolve_chain(overrides, storage, trainer, progress=False)
    key = Path(resolved["data.features_dir"]).name.removeprefix("features-")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("encoder-prepared-raw-3x46-s0")
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == f"stgcn-encoder-{key}" and run.info.status == "FINISHED"
    assert run.data.tags["phase"] == "encoder"
    assert run.data.params["encoder.steps"] == "4" and run.data.params["encoder.base_channels"] == "8"
    assert json.loads(run.data.params["encoder.unseen"]) == resolved["data.unseen"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "encoder/loss")] == [1, 2, 3, 4]
    assert {"encoder/train_top1", "encoder/lr", "encoder/held_out_top1"} <= set(run.data.metrics)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/encoder.pt"]
    resolve_chain(overrides, storage, trainer, progress=False)      # cached: nothing trains, no second run
    assert len(client.search_runs([experiment.experiment_id])) == 1


@pytest.mark.parametrize("count", [6, 12])
def test_default_unseen_classes_are_new_combinations_of_seen_primitives_and_parts(count):
    cat = action_catalogue()
    unseen = default_synthetic_unseen(count)
    assert len(unseen) == count
    seen = [c for c in cat if c.index not in unseen]
    for k in unseen:
        assert any(s.primitive == cat[k].primitive for s in seen)
        assert any(s.part == cat[k].part for s in seen)


# ----------------------------------------------------------------------------------------------
# Ray Train workers
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("workers", [2])
def test_service_encoder_train_on_ray_workers(prepared, tmp_path, workers):
    """`service.encoder train` on a local Ray: checkpoints, an MLflow run, encoder.pt; DDP with 2 workers."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [f"--set={k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in {**TINY, "steps": 4}.items()]
    res = subprocess.run(
        [sys.executable, "-m", "service.encoder", "train", "--data", str(prepared), "--unseen", "1,4",
         "--out", str(tmp_path / "enc"), "--workers", str(workers), "--storage-path", str(tmp_path / "ray"),
         "--tracking-uri", uri, *sets], capture_output=True, text=True, cwd=tmp_path, timeout=600,
        env={**__import__("os").environ, "RAY_ADDRESS": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    model, cfg, seen = load_encoder(Path(out["encoder"]))
    assert cfg.steps == 4 and set(seen).isdisjoint(UNSEEN)
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("encoder-prepared").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["encoder.workers"] == str(workers)
    assert "encoder/held_out_top1" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "encoder/loss")][-1] == 4
    assert "checkpoints/encoder.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}


# ----------------------------------------------------------------------------------------------
# The chain as a named split / the embedded default
# ----------------------------------------------------------------------------------------------

def test_names_data_decides_whether_the_embedded_default_applies(tmp_path):
    from service.cli.options import default_splits
    from service.methods import METHODS
    from service.run import build_parser

    def parsed(*argv):
        return build_parser().parse_args(["tdsm", *argv])

    assert default_splits(METHODS["tdsm"], parsed()) == ["synthetic-skeleton"]
    assert default_splits(METHODS["tdsm"], parsed("--set", "optim.lr=1e-3",
                                         "--text-encoder", "minilm")) == ["synthetic-skeleton"]
    assert default_splits(METHODS["tdsm"], parsed("--features", "x")) is None
    assert default_splits(METHODS["tdsm"], parsed("--set", "data.val_unseen=3")) is None
    assert default_splits(METHODS["tdsm"], parsed("--set", "text.class_names=n.txt")) is None
    (tmp_path / "c.yaml").write_text("data:\n  val_unseen: 3\n")
    assert default_splits(METHODS["tdsm"], parsed("--config", str(tmp_path / "c.yaml"))) is None
    assert default_splits(METHODS["cocodiff"], build_parser().parse_args(["cocodiff"])) is None


def test_service_run_on_a_chain_split_trains_tdsm_on_the_extracted_features(tmp_path):
    """`service.run tdsm --split NAME` with a tiny chain: generate -> prepare -> encoder -> features -> TDSM."""
    (tmp_path / "splits.yaml").write_text(
        "tiny-chain:\n  chain:\n    per_class: 3\n    unseen_count: 4\n"
        "    encoder: {name: stgcn, base_channels: 8, units_per_stage: [1, 1], steps: 4, batch_size: 8}\n"
        "  data.val_unseen: 4\n")
    tiny_tdsm = ["--set", "model.preset=tiny", "--set", "train.steps=4", "--set", "train.eval_every=2",
                 "--set", "train.checkpoint_every=2", "--set", "optim.batch_size=8", "--set", "optim.warmup_steps=1",
                 "--set", "eval.noise_draws=1", "--set", "eval.t_test_grid=[10, 25]", "--set", "train.threads=1"]
    env = {**__import__("os").environ, "SKELDIFF_RESULTS": str(tmp_path / "results")}
    res = subprocess.run([sys.executable, "-m", "service.run", "tdsm", "--split", "tiny-chain", "--splits-file",
                          str(tmp_path / "splits.yaml"), *tiny_tdsm, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                          "--run-dir", str(tmp_path / "run"), "--no-progress"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0 <= metrics["test/zsl_top1"] <= 100 and 0 <= metrics["val/zsl_top1_max"] <= 100
    assert list((tmp_path / "results" / "chain").glob("features-*/done.json"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    [encoder_run] = client.search_runs([client.get_experiment_by_name("encoder-prepared-raw-3x46-s0").experiment_id])
    assert encoder_run.info.status == "FINISHED" and "encoder/held_out_top1" in encoder_run.data.metrics
    res = subprocess.run([sys.executable, "-m", "service.run", "tdsm", "--split", "nope", "--splits-file",
                          str(tmp_path / "splits.yaml")], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert res.returncode == 2 and "nope" in res.stderr and res.stderr.strip().count("\n") == 0
