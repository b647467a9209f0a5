"""`python -m service.run tdsm` as a user runs it: config printing, one-line bad-input errors with exit code 2, and a
tiny end-to-end run on a generated SA-DVAE folder whose MLflow run, artifacts and resume are read back."""

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
from conftest import CLI_CLASS_NAMES as NAMES
from conftest import TINY_RUN_ARGS as TINY
from conftest import write_feature_folder

ROOT = Path(__file__).resolve().parents[2]
NUM_CLASSES = 12
UNSEEN = [2, 7]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: a generated SA-DVAE folder, split files and prompt files (some deliberately wrong)."""
    root = tmp_path_factory.mktemp("cli")
    write_feature_folder(root / "feats", num_classes=NUM_CLASSES, unseen=UNSEEN)
    np.save(root / "ru.npy", np.array(UNSEEN))
    np.save(root / "rv.npy", np.array([0, 9]))
    np.save(root / "rs_overlap.npy", np.array([0, 1, 2, 3]))
    (root / "names.txt").write_text("\n".join(NAMES) + "\n")
    (root / "desc.txt").write_text("\n".join(f"a person is doing this: {n}" for n in NAMES) + "\n")
    (root / "names_short.txt").write_text("\n".join(NAMES[:8]) + "\n")
    (root / "desc_short.txt").write_text("\n".join(NAMES[:10]) + "\n")
    (root / "bad_key.yaml").write_text("optim:\n  lrr: 0.1\n")
    # A list twice as long as the classes with features (NTU-120 names over NTU-60 features).
    long_names = NAMES + [f"extra action {i}" for i in range(NUM_CLASSES)]
    (root / "names_long.txt").write_text("\n".join(long_names) + "\n")
    (root / "desc_long.txt").write_text("\n".join(f"a person is doing this: {n}" for n in long_names) + "\n")
    return root


def env() -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out.pop("MLFLOW_TRACKING_URI", None)
    return out


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.run", "tdsm", *args]


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=cwd, env=env(), capture_output=True, text=True, timeout=600,
                          check=False)


# ----------------------------------------------------------------------------------------------
# Bad input: all commands start at once (each pays the torch + MLflow import), then each test reads its result
# ----------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "unknown_set_key": (["--set", "optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    "unknown_section": (["--set", "optimizer.lr=0.1"], "unknown config key 'optimizer'"),
    "t_test_not_below_T": (["--set", "eval.t_test=50"], "eval.t_test=50 must be < diffusion.num_train_timesteps"),
    "bad_yaml_key": (["--config", "{ws}/bad_key.yaml"], "{ws}/bad_key.yaml: unknown config key 'optim.lrr'"),
    "missing_yaml": (["--config", "{ws}/nope.yaml"], "{ws}/nope.yaml: config file not found"),
    "features_missing": (["--features", "{ws}/nowhere", "--class-names", "{ws}/names.txt"],
                         "{ws}/nowhere: features folder not found"),
    "class_names_short": (["--features", "{ws}/feats", "--class-names", "{ws}/names_short.txt"],
                          "{ws}/feats/train_label.npy: labels outside the 8 classes of {ws}/names_short.txt"),
    "descriptions_count": (["--features", "{ws}/feats", "--class-names", "{ws}/names.txt", "--descriptions",
                            "{ws}/desc_short.txt"], "{ws}/desc_short.txt: 10 prompts, expected 12"),
    "unseen_seen_overlap": (["--features", "{ws}/feats", "--class-names", "{ws}/names.txt", "--unseen",
                             "{ws}/ru.npy", "--seen", "{ws}/rs_overlap.npy"], "overlap on classes [2]"),
    "unseen_file_missing": (["--features", "{ws}/feats", "--class-names", "{ws}/names.txt", "--unseen",
                             "{ws}/ru_missing.npy"], "{ws}/ru_missing.npy: missing"),
}


@pytest.fixture(scope="module")
def bad_runs(ws) -> dict[str, subprocess.CompletedProcess]:
    procs = {}
    for name, (args, _) in BAD_INPUTS.items():
        cwd = ws / f"cwd_{name}"
        cwd.mkdir()
        procs[name] = subprocess.Popen(command(*[a.format(ws=ws) for a in args], *TINY), cwd=cwd, env=env(),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_error_with_exit_code_2(bad_runs, ws, name):
    result = bad_runs[name]
    expected = BAD_INPUTS[name][1].format(ws=ws)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    assert expected in errors[0]
    assert not (ws / f"cwd_{name}" / "runs").exists()           # nothing started


# ----------------------------------------------------------------------------------------------
# --print-config
# ----------------------------------------------------------------------------------------------

def test_print_config_round_trips(ws, tmp_path):
    first = run_cli(tmp_path, "--features", str(ws / "feats"), "--val-unseen", "3", "--set", "optim.lr=3e-4", *TINY,
                    "--print-config")
    assert first.returncode == 0, first.stderr
    tree = yaml.safe_load(first.stdout)
    assert tree["optim"]["lr"] == 3e-4 and tree["data"]["source"] == "features" and tree["data"]["val_unseen"] == 3
    assert tree["model"]["preset"] == "tiny" and tree["eval"]["t_test_grid"] == [10, 25]
    (tmp_path / "resolved.yaml").write_text(first.stdout)
    second = run_cli(tmp_path, "--config", str(tmp_path / "resolved.yaml"), "--print-config")
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_print_config_applies_a_named_split(tmp_path, capsys, monkeypatch):
    """--print-config shows the split's data (what runs), and that YAML via --config trains the same config."""
    from service.methods.search_space import load_search_space
    from service.run import main
    from trainers.config import build_config, load_yaml
    from trainers.configs import TDSMConfig
    from trainers.tdsm_fit import training_fingerprint

    monkeypatch.chdir(tmp_path)
    assert main(["tdsm", "--split", "synthetic-u12", "--set", "optim.lr=3e-4", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# split synthetic-u12 of ")
    # One comment line per searched key, naming the paper's symbol (README: τ and λ of L = L_diff + λ L_TD).
    comments = [line for line in printed.splitlines() if line.startswith("#   ")]
    assert "#   loss.margin: loguniform [0.1, 3.0]; τ (tau), the margin of L_TD (paper: 1)." in comments
    assert any(line.startswith("#   loss.triplet_weight: uniform [0.1, 2.0]; λ (lambda)") for line in comments)
    assert len(comments) == len(load_search_space(ROOT / "search_spaces" / "tdsm.yaml").params)
    tree = yaml.safe_load(printed)
    assert tree["data"]["unseen"] == [3, 5, 9, 12, 15, 40, 42, 47, 51, 56, 58, 59] and tree["data"]["val_unseen"] == 12
    assert tree["optim"]["lr"] == 3e-4
    (tmp_path / "resolved.yaml").write_text(printed)
    assert main(["tdsm", "--config", str(tmp_path / "resolved.yaml"), "--print-config"]) == 0
    again = capsys.readouterr().out
    assert yaml.safe_load(again) == tree
    assert training_fingerprint(build_config(TDSMConfig, load_yaml(tmp_path / "resolved.yaml"))) == \
        training_fingerprint(build_config(TDSMConfig, tree))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_sweep_prints_each_split_as_service_run_does(tmp_path, capsys, monkeypatch):
    """service.sweep --print-config: one YAML document per split, each what service.run --split prints."""
    from service.run import main as run_main
    from service.sweep import main as sweep_main

    monkeypatch.chdir(tmp_path)
    assert sweep_main(["tdsm", "--splits", "synthetic-u5", "synthetic-u12", "--print-config"]) == 0
    docs = capsys.readouterr().out.split("---\n")
    assert [yaml.safe_load(d)["data"]["val_unseen"] for d in docs] == [5, 12]
    assert run_main(["tdsm", "--split", "synthetic-u12", "--print-config"]) == 0
    assert capsys.readouterr().out == docs[1]


def test_print_config_of_the_paper_preset(tmp_path):
    """The paper preset trains like the official code (README: the paper preset vs the official code)."""
    out = run_cli(tmp_path, "--config", str(ROOT / "service/configs/tdsm_paper.yaml"), "--print-config")
    assert out.returncode == 0, out.stderr
    tree = yaml.safe_load(out.stdout)
    assert tree["optim"] == {**tree["optim"], "grad_clip": 0.0, "lr": 1e-4, "weight_decay": 0.01, "warmup_steps": 100,
                             "min_lr_ratio": 0.0, "batch_size": 256}
    assert tree["train"]["precision"] == "fp32" and tree["train"]["steps"] == 50_000
    assert tree["diffusion"] == {**tree["diffusion"], "num_train_timesteps": 50, "beta_schedule": "scaled_linear",
                                 "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}
    assert tree["eval"]["t_test"] == 25 and tree["model"]["hidden_size"] == 768 and tree["model"]["depth"] == 12
    assert tree["loss"] == {"margin": 1.0, "triplet_weight": 1.0}


# ----------------------------------------------------------------------------------------------
# End to end, resume
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def e2e(ws, tmp_path_factory):
    """The run command, its working directory and tracking URI, and the results of running it twice."""
    cwd = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{cwd / 'm.db'}"
    args = ["--features", str(ws / "feats"), "--unseen", str(ws / "ru.npy"), "--val-unseen", str(ws / "rv.npy"),
            "--class-names", str(ws / "names_long.txt"), "--descriptions", str(ws / "desc_long.txt"),
            "--text-encoder", "minilm", "--tracking-uri", uri, *TINY]
    first = run_cli(cwd, *args)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    run_dir = cwd / summary["run_dir"]
    last_before = (run_dir / "last.pt").read_bytes()
    second = run_cli(cwd, *args)
    assert second.returncode == 0, second.stderr
    return {"args": args, "cwd": cwd, "uri": uri, "first": first, "second": second, "summary": summary,
            "run_dir": run_dir, "last_before": last_before}


def client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(uri)


def all_runs(uri: str):
    c = client(uri)
    return c.search_runs([e.experiment_id for e in c.search_experiments()])


def artifact_paths(uri: str, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for info in client(uri).list_artifacts(run_id, path):
        out += artifact_paths(uri, run_id, info.path) if info.is_dir else [info.path]
    return out


def test_end_to_end_prints_final_metrics(e2e):
    summary = e2e["summary"]
    for key in ("val/zsl_top1_max", "test/zsl_top1", "test/zsl_top1_ensemble"):
        assert 0 <= summary[key] <= 100
    assert summary["best_step"] in (4, 8)                                    # an evaluation step (eval_every=4)
    # Validation: only the kept checkpoint's objective (the in-loop values are MLflow's history, not the result).
    assert [k for k in summary if k.startswith("val/")] == ["val/zsl_top1_max"]
    assert not any(k.endswith(("_t010", "_t025")) for k in summary)          # grid points stay in MLflow
    assert not [k for k in summary if k.startswith("test/") and "best" in k]  # nothing chosen on test
    # 24 names, features for 12 classes, 2 unseen: the 10 classes with samples are the seen ones.
    assert summary["seen_classes"] == NUM_CLASSES - len(UNSEEN)
    assert (e2e["run_dir"] / "best.pt").is_file() and (e2e["run_dir"] / "last.pt").is_file()


def test_end_to_end_mlflow_run(e2e):
    runs = all_runs(e2e["uri"])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == e2e["summary"]["mlflow_run_id"] and run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.preset"] == "tiny" and params["train.steps"] == "8" and params["data.source"] == "features"
    assert params["data.val_unseen"] == str(e2e["args"][5]) and params["derived.val_classes"] == "[0, 9]"
    assert params["derived.unseen_classes"] == str(UNSEEN) and int(params["derived.num_parameters"]) > 0
    assert {"val/zsl_top1", "test/zsl_top1", "train/loss", "train/lr", "val/zsl_top1_t010"} <= set(run.data.metrics)
    assert not [k for k in run.data.metrics if k.startswith("test/") and "best" in k]
    assert params["derived.seen_classes"] == str(NUM_CLASSES - len(UNSEEN))
    assert params["derived.num_train_classes"] == str(NUM_CLASSES - len(UNSEEN) - 2)   # minus the 2 val classes
    assert run.data.metrics["test/zsl_top1"] == pytest.approx(e2e["summary"]["test/zsl_top1"], abs=1e-3)
    artifacts = artifact_paths(e2e["uri"], run.info.run_id)
    assert "config.yaml" in artifacts and "checkpoints/best.pt" in artifacts
    plots = {p for p in artifacts if p.startswith("plots/") and p.endswith(".png")}
    assert {"plots/val_t_test_curve.png", "plots/val_confusion.png", "plots/test_t_test_curve.png",
            "plots/test_confusion.png"} <= plots
    logged = yaml.safe_load(Path(client(e2e["uri"]).download_artifacts(run.info.run_id, "config.yaml")).read_text())
    assert logged["model"]["preset"] == "tiny" and logged["data"]["unseen"] == str(e2e["args"][3])


def test_json_line_and_mlflow_run_carry_the_same_numbers(e2e):
    """Every metric of the JSON line is the MLflow run's value under the same name; best_step is a tag."""
    summary = e2e["summary"]
    run = client(e2e["uri"]).get_run(summary["mlflow_run_id"])
    metric_keys = [k for k in summary if "/" in k]
    assert "val/zsl_top1_max" in metric_keys and "test/zsl_top1" in metric_keys
    for key in metric_keys:
        assert round(run.data.metrics[key], 4) == summary[key], key     # the JSON rounds to 4 decimals
    assert int(run.data.tags["best_step"]) == summary["best_step"]
    assert "best_t_test" in run.data.tags                                # what service.final --from RUN_ID reads
    # The objective is the kept checkpoint's validation top-1: the best of the in-loop evaluations, at best_step.
    history = {m.step: m.value for m in client(e2e["uri"]).get_metric_history(run.info.run_id, "val/zsl_top1")}
    assert summary["val/zsl_top1_max"] == round(max(history.values()), 4)
    assert round(history[summary["best_step"]], 4) == summary["val/zsl_top1_max"]


def test_rerun_resumes_without_new_run_or_steps(e2e):
    second = json.loads(e2e["second"].stdout.strip().splitlines()[-1])
    assert second["mlflow_run_id"] == e2e["summary"]["mlflow_run_id"] and second["run_dir"] == e2e["summary"]["run_dir"]
    assert len(all_runs(e2e["uri"])) == 1
    assert (e2e["run_dir"] / "last.pt").read_bytes() == e2e["last_before"]       # no training step was taken
    assert torch.load(e2e["run_dir"] / "last.pt", weights_only=True)["step"] == 8
    history = client(e2e["uri"]).get_metric_history(second["mlflow_run_id"], "train/loss")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)) and max(steps) == 8
    assert second["val/zsl_top1_max"] == e2e["summary"]["val/zsl_top1_max"]
    assert second["best_step"] == e2e["summary"]["best_step"]


def test_rerun_with_other_evaluation_settings_reuses_training(e2e):
    # The run dir is keyed by the training config: new evaluation settings reuse the checkpoint, and get their own
    # MLflow run because MLflow params cannot change.
    third = run_cli(e2e["cwd"], *e2e["args"], "--set", "eval.noise_draws=2")
    assert third.returncode == 0, third.stderr
    summary = json.loads(third.stdout.strip().splitlines()[-1])
    assert summary["run_dir"] == e2e["summary"]["run_dir"]
    assert summary["mlflow_run_id"] != e2e["summary"]["mlflow_run_id"]
    assert (e2e["run_dir"] / "last.pt").read_bytes() == e2e["last_before"]
    runs = {r.info.run_id: r for r in all_runs(e2e["uri"])}
    assert len(runs) == 2 and runs[summary["mlflow_run_id"]].data.params["eval.noise_draws"] == "2"


# ----------------------------------------------------------------------------------------------
# --print-config of a chain split: what will run, before and after the chain is built
# ----------------------------------------------------------------------------------------------

TINY_CHAIN = ("tiny-chain:\n  chain:\n    per_class: 3\n    unseen_count: 4\n"
              "    encoder: {name: stgcn, base_channels: 8, units_per_stage: [1, 1], steps: 4, batch_size: 8}\n"
              "  data.val_unseen: 4\n")


def test_print_config_of_an_unbuilt_chain_trains_nothing(tmp_path, capsys, monkeypatch):
    """The chain's paths are printed (generate + prepare only) and marked as built on first run."""
    import service.cli.run
    import service.run

    (tmp_path / "splits.yaml").write_text(TINY_CHAIN)
    monkeypatch.setattr(service.cli.run, "DEFAULT_STORAGE", tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    argv = ["tdsm", "--split", "tiny-chain", "--splits-file", str(tmp_path / "splits.yaml"), "--print-config"]
    assert service.run.main(argv) == 0
    printed = capsys.readouterr().out
    tree = yaml.safe_load(printed)
    chain = tmp_path / "results" / "chain"
    assert Path(tree["data"]["features_dir"]).parent == chain and tree["data"]["source"] == "features"
    assert f"features_dir: {tree['data']['features_dir']}  # (built on first run)\n" in printed
    assert list(chain.glob("prepared-*")) and not list(chain.glob("encoder-*")) and not list(chain.glob("features-*"))


@pytest.mark.slow
def test_print_config_of_a_chain_split_is_what_runs(tmp_path):
    """print (chain not built: paths + comment, nothing trained) -> run -> print -> --config that file on the same
    run dir: the same training fingerprint (the run resumes from last.pt, no step taken) and the same numbers."""
    (tmp_path / "splits.yaml").write_text(TINY_CHAIN)
    results = tmp_path / "results"
    chain_env = {**env(), "SKELDIFF_RESULTS": str(results)}
    split = ["--split", "tiny-chain", "--splits-file", str(tmp_path / "splits.yaml")]
    common = [*TINY, "--set", "train.steps=4", "--set", "train.eval_every=2", "--tracking-uri",
              f"sqlite:///{tmp_path / 'm.db'}", "--run-dir", str(tmp_path / "run")]

    def cli(*args):
        out = subprocess.run(command(*args), cwd=tmp_path, env=chain_env, capture_output=True, text=True,
                             timeout=600, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    before = cli(*split, *common, "--print-config").stdout
    tree = yaml.safe_load(before)
    assert tree["data"]["source"] == "features" and tree["data"]["val_unseen"] == 4 and len(tree["data"]["unseen"]) == 4
    assert Path(tree["text"]["class_names"]).is_file() and tree["text"]["descriptions"][0].endswith("descriptions.txt")
    assert f"features_dir: {tree['data']['features_dir']}  # (built on first run)" in before
    assert not list((results / "chain").glob("encoder-*")) and not (tmp_path / "run").exists()   # nothing trained

    summary = json.loads(cli(*split, *common).stdout.strip().splitlines()[-1])
    after = cli(*split, *common, "--print-config").stdout
    assert "(built on first run)" not in after and yaml.safe_load(after) == tree     # the paths did not move
    (tmp_path / "resolved.yaml").write_text(after)
    last = (tmp_path / "run" / "last.pt").read_bytes()
    again = json.loads(cli("--config", str(tmp_path / "resolved.yaml"), *common).stdout.strip().splitlines()[-1])
    assert (tmp_path / "run" / "last.pt").read_bytes() == last                     # resumed: same fingerprint
    assert again["mlflow_run_id"] == summary["mlflow_run_id"]                      # same config hash
    assert {k: v for k, v in again.items() if "/" in k} == {k: v for k, v in summary.items() if "/" in k}
