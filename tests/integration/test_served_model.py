"""The registered zero-shot chain end to end (#20): `service.final` on a tiny skeleton chain registers
`tdsm-<split>@final`; `service.predict` on the test split's raw `.skeleton` files answers what final logged as the
registered model's top-1; `mlflow models serve` answers real HTTP requests as in-process predict does and refuses
bad ones with 4xx while it keeps serving; the model loads and predicts in a fresh virtual environment holding only
its requirements.txt (slow: a pip install of torch and mlflow).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from servers import free_port, wait_for_health

pytestmark = pytest.mark.slow
SPLIT = "tiny-chain"
MODEL = f"models:/tdsm-{SPLIT}@final"
SPLITS = (f"{SPLIT}:\n  chain:\n    per_class: 3\n    unseen_count: 4\n"
          "    encoder: {name: stgcn, base_channels: 8, units_per_stage: [1, 1], steps: 4, batch_size: 8}\n"
          "  data.val_unseen: 4\n")
CONFIG = ("method: tdsm\nmodel: {preset: tiny}\ntrain: {steps: 6, eval_every: 3, checkpoint_every: 3, threads: 1}\n"
          "optim: {batch_size: 8, warmup_steps: 1}\neval: {noise_draws: 1, t_test_grid: [10, 25]}\n")


@pytest.fixture(scope="module")
def final(tmp_path_factory):
    """(folder, tracking uri, env, seed-0 child run metrics) after `service.final` on the tiny chain."""
    tmp = tmp_path_factory.mktemp("served")
    (tmp / "splits.yaml").write_text(SPLITS)
    (tmp / "cfg.yaml").write_text(CONFIG)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {**os.environ, "SKELDIFF_RESULTS": str(tmp / "results"), "MLFLOW_TRACKING_URI": uri}
    res = subprocess.run([sys.executable, "-m", "service.final", "--from", "cfg.yaml", "--splits", SPLIT,
                          "--splits-file", "splits.yaml", "--seeds", "1", "--noise-draws", "2", "--no-progress"],
                         capture_output=True, text=True, cwd=tmp, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    import mlflow

    client = mlflow.MlflowClient(uri)
    [child] = client.search_runs([client.get_experiment_by_name(f"tdsm-{SPLIT}").experiment_id],
                                 f"attributes.run_name = 'final-{SPLIT}-seed0'")
    return tmp, uri, env, child.data.metrics


@pytest.fixture(scope="module")
def loaded(final):
    import mlflow

    mlflow.set_tracking_uri(final[1])
    return mlflow.pyfunc.load_model(MODEL)


def unseen_test_files(tmp: Path) -> tuple[list[Path], list[int]]:
    """The raw .skeleton files behind ztest.npy (test rows of the unseen classes), and their class ids."""
    chain = tmp / "results" / "chain"
    [features] = chain.glob("features-*")
    source = json.loads((features / "source.json").read_text())
    unseen = set(np.load(features / "z_label.npy").tolist())
    [raw] = chain.glob("raw-*")
    rows = [r.split("\t") for r in (Path(source["prepared"]) / "index.tsv").read_text().splitlines()[1:]]
    picked = [(raw / f"{r[0]}.skeleton", int(r[1])) for r in rows if r[6] == "test" and int(r[1]) in unseen]
    return [p for p, _ in picked], [c for _, c in picked]


def test_predict_on_raw_files_answers_what_final_logged(final):
    tmp, uri, env, metrics = final
    files, labels = unseen_test_files(tmp)
    bad = tmp / "broken.skeleton"
    bad.write_text("12\nnot a skeleton\n")
    names = (next((tmp / "results" / "chain").glob("raw-*")) / "class_names.txt").read_text().splitlines()
    unseen = [names[c] for c in sorted(set(labels))]           # the unseen class names, given as any names are
    res = subprocess.run([sys.executable, "-m", "service.predict", "--model", MODEL, *map(str, files), str(bad),
                          "--classes", *unseen, "--top-k", "3", "--out", str(tmp / "predictions.csv")],
                         capture_output=True, text=True, cwd=tmp, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"skipped {bad}" in res.stderr
    rows = list(csv.DictReader((tmp / "predictions.csv").open()))
    assert [r["sample"] for r in rows] == [str(f) for f in files]
    top1 = 100.0 * np.mean([r["label"] == names[c] for r, c in zip(rows, labels)])
    assert top1 == pytest.approx(metrics["test/zsl_top1_served"], abs=1e-9)
    assert all(len(r["top_3"].split("; ")) == 3 for r in rows)


def test_predict_with_new_class_texts_and_a_prepared_folder(final, tmp_path):
    tmp, _, env, _ = final
    (tmp_path / "classes.txt").write_text("wave a hand\njump on the spot\nsit on a chair\n")
    (tmp_path / "descriptions.txt").write_text("one hand moves side to side\nboth feet leave the ground\n"
                                               "the hips go down onto a seat\n")
    prepared = next((tmp / "results" / "chain").glob("prepared-*"))
    res = subprocess.run([sys.executable, "-m", "service.predict", "--model", MODEL, str(prepared), "--classes-file",
                          str(tmp_path / "classes.txt"), "--descriptions-file", str(tmp_path / "descriptions.txt"),
                          "--top-k", "2"], capture_output=True, text=True, cwd=tmp, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "sample,label,score,error,top_2" and len(lines) - 1 == len(np.load(prepared / "label.npy"))
    assert {line.split(",")[1] for line in lines[1:]} <= {"wave a hand", "jump on the spot", "sit on a chair"}
    res = subprocess.run([sys.executable, "-m", "service.predict", "--model", MODEL, str(prepared), "--classes",
                          "a", "a"], capture_output=True, text=True, cwd=tmp, env=env, timeout=600)
    assert res.returncode == 2 and "repeated" in res.stderr and res.stderr.strip().count("\n") == 0


def post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@contextlib.contextmanager
def serving(model: str, env: dict, cwd: Path, log: Path):
    """`mlflow models serve -m MODEL --env-manager local` on a free loopback port; yields its invocations URL."""
    port = free_port()
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}   # its uvicorn: the venv's
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager",
                                 "local", "-h", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, log, proc)
        yield f"{url}/invocations"
    finally:
        proc.terminate()
        proc.wait(30)


def assert_refused_then_serving(url: str, bad: list[bytes], good: bytes) -> None:
    """Each bad request: HTTP 4xx with a message; the next good one is still answered."""
    for body in bad:
        status, answer = post(url, body)
        assert 400 <= status < 500, (status, str(answer)[:300])
        assert answer.get("message")
        assert post(url, good)[0] == 200


def test_http_serving_answers_as_in_process_and_refuses_bad_requests(final, loaded, tmp_path):
    tmp, uri, env, _ = final
    prepared = next((tmp / "results" / "chain").glob("prepared-*"))
    x = np.load(prepared / "data.npy")[:32].astype(np.float32)
    with serving(MODEL, env, tmp, tmp_path / "serve.log") as url:
        cases = [(x[:1], {}), (x, {}), (x[:4], {"classes": ["wave a hand", "jump on the spot"], "top_k": 1}),
                 (x[:3], {"classes": ["raise both arms", "clap"], "descriptions": ["arms up", "hands meet"]})]
        for inputs, params in cases:
            status, body = post(url, json.dumps({"inputs": inputs.tolist(), "params": params}).encode())
            assert status == 200, body
            expected = loaded.predict(inputs, params=params)
            got = body["predictions"]
            assert [r["label"] for r in got] == expected["label"].tolist()
            np.testing.assert_allclose([r["score"] for r in got], expected["score"], rtol=1e-6)
            assert [r["top_k_labels"] for r in got] == [list(v) for v in expected["top_k_labels"]]
        nan = x[:1].copy()
        nan[0, 0, 0, 0, 0] = np.nan
        one = x[:1].tolist()
        assert_refused_then_serving(url, [
            json.dumps({"inputs": x[:1, :, :, :5].tolist()}).encode(),                           # wrong shape
            json.dumps({"inputs": nan.tolist()}).encode(),                                       # NaN
            json.dumps({"inputs": one, "params": {"classes": []}}).encode(),
            json.dumps({"inputs": one, "params": {"classes": ["a", "a"]}}).encode(),
            json.dumps({"inputs": one, "params": {"classes": [f"c{i}" for i in range(10_000)]}}).encode(),
            b'{"inputs": [' + b"0.5, " * 10_000_000 + b"0.5]}",                                  # a 50 MB body
        ], json.dumps({"inputs": one}).encode())


@pytest.fixture(scope="module")
def classifier(final):
    """(model URI, loaded pyfunc) of a tiny CoCoDiff classifier registered through final's code path."""
    import mlflow
    import torch

    from service.tracking.registry import log_classifier_model
    from trainers.cocodiff_classifier import build_classifier
    from trainers.config import build_config
    from trainers.configs import CoCoDiffConfig

    _, uri, _, _ = final
    cfg = build_config(CoCoDiffConfig, {}, {"backbone.encoder": "stgcn", "backbone.base_channels": 8,
                                            "backbone.units_per_stage": [1]})
    torch.manual_seed(0)
    model = build_classifier(cfg.backbone, 6).eval()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    artifacts = (final[0] / "mlartifacts").as_uri()          # not ./mlruns of wherever pytest runs
    run = client.create_run(client.create_experiment("cocodiff-toy", artifact_location=artifacts)).info.run_id
    log_classifier_model(run, [(cfg, model)], 6, (3, 16, 25, 2), [f"action {i}" for i in range(6)], "cocodiff-toy")
    return "models:/cocodiff-toy@final", mlflow.pyfunc.load_model("models:/cocodiff-toy@final")


def test_the_classifier_is_served_the_same_way(final, classifier, tmp_path):
    tmp, _, env, _ = final
    model, loaded = classifier
    x = np.random.default_rng(0).normal(size=(5, 3, 16, 25, 2)).astype(np.float32)
    folder = Path(loaded._model_impl.context.artifacts["bundle"]).parents[1]
    assert (folder / "code" / "trainers" / "cocodiff_classifier.py").is_file()
    assert not any("skeldiff" in r for r in (folder / "requirements.txt").read_text().split())
    with serving(model, env, tmp, tmp_path / "serve.log") as url:
        status, body = post(url, json.dumps({"inputs": x.tolist()}).encode())
        assert status == 200 and body["predictions"] == loaded.predict(x).tolist()
        nan = x[:1].copy()
        nan[0, 1, 2, 3, 0] = np.inf
        assert_refused_then_serving(url, [json.dumps({"inputs": x[:, :, :, :18].tolist()}).encode(),
                                          json.dumps({"inputs": nan.tolist()}).encode()],
                                    json.dumps({"inputs": x[:1].tolist()}).encode())


@pytest.fixture(scope="module")
def fresh_python(final, tmp_path_factory) -> Path:
    """The python of a new virtual environment holding only the TDSM model's requirements.txt (no skeldiff, no
    Ray): a pip install of torch, mlflow and the text encoder (~2.5 min here with a warm pip cache, ~5 cold)."""
    import mlflow

    tmp = tmp_path_factory.mktemp("fresh")
    mlflow.set_tracking_uri(final[1])
    folder = Path(mlflow.artifacts.download_artifacts(MODEL, dst_path=str(tmp / "model")))
    requirements = (folder / "requirements.txt").read_text().split()
    assert not any(r.startswith(("skeldiff", "ray")) for r in requirements)
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True, timeout=300)
    py = tmp / "venv" / "bin" / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(folder / "requirements.txt")],
                         capture_output=True, text=True, timeout=1500)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return py


def predict_elsewhere(py: Path, model: str, uri: str, x: np.ndarray, params: dict | None, tmp: Path) -> list:
    """Load the model by name from the tracking store in that environment and predict; (labels or ids)."""
    np.save(tmp / "x.npy", x)
    script = ("import importlib.util, json, numpy as np, mlflow\n"
              "assert importlib.util.find_spec('service') is None and importlib.util.find_spec('ray') is None\n"
              f"out = mlflow.pyfunc.load_model({model!r}).predict(np.load({str(tmp / 'x.npy')!r}), params={params!r})\n"
              "print(json.dumps(out['label'].tolist() if hasattr(out, 'columns') else out.tolist()))\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "MLFLOW_TRACKING_URI": uri}
    res = subprocess.run([str(py), "-c", script], capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_the_models_load_in_a_fresh_environment_with_only_their_requirements(final, loaded, classifier,
                                                                             fresh_python, tmp_path):
    """No skeldiff in the environment: the model's own copy of trainers/ and requirements.txt are all it has."""
    tmp, uri, _, _ = final
    x = np.load(next((tmp / "results" / "chain").glob("prepared-*")) / "data.npy")[:5].astype(np.float32)
    params = {"classes": ["wave a hand", "clap"], "top_k": 2}
    assert predict_elsewhere(fresh_python, MODEL, uri, x, params, tmp_path) == \
        loaded.predict(x, params=params)["label"].tolist()
    y = np.random.default_rng(0).normal(size=(4, 3, 16, 25, 2)).astype(np.float32)
    assert predict_elsewhere(fresh_python, classifier[0], uri, y, None, tmp_path) == classifier[1].predict(y).tolist()
