"""What a researcher sees of a sweep: run names, trial states, the MLflow experiment kind and runs-table view,
the ranked trials table and CSV, reproducible sampling (no Ray trials: the driver-side pieces on a sqlite store)."""

from __future__ import annotations

import csv
import io
import json
import math
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from service.methods.base import trial_driver
from service.methods.search_space import load_search_space
from service.orchestration.sweep import MLflowTrialCloser, search_algorithm, sweep_experiment, tune_param_space
from service.orchestration.trial import TrialResources, trial_resources
from service.storage import Storage
from service.tracking.store import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, MLflowReporter, ensure_experiment
from service.tracking.trials import (
    RUN_COLOR_TAG,
    SHARED_VIEW_PREFIX,
    TIMING_KEYS,
    find_or_start_child_run,
    format_trials_table,
    format_value,
    local_ui_port,
    ranked_trials,
    report_overhead,
    report_trials,
    trial_color,
    trial_index,
    trial_label,
    trial_timing,
    trials_csv,
    ui_command,
    ui_link,
)
from trainers.errors import InputError

REPO = Path(__file__).resolve().parents[2]
SPACE = load_search_space(REPO / "search_spaces" / "tdsm.yaml").for_smoke()
CHOSEN = ("best_t_test",)          # TDSM's chosen tag (Method.chosen_tags)


def test_trial_label_names_what_differs():
    sampled = {"diffusion.num_train_timesteps": 50, "loss.margin": 0.5234, "loss.triplet_weight": 0.9312,
               "optim.lr": 0.0021234}
    assert trial_label(sampled) == "T=50 τ=0.52 λ=0.93 lr=2.1e-3"
    assert trial_label({"model.hidden_size": 128, "diffusion.prediction_type": "v_prediction",
                        "module.w_gen": 12.345}) == "width=128 pred=v_prediction w_gen=12.3"
    assert [format_value(v) for v in (1.0, 3e-4, 250000.0, True)] == ["1", "3.0e-4", "2.5e5", "True"]


def test_trials_get_distinct_colours_by_their_tune_counter():
    assert [trial_index(t) for t in ("229a7_00000", "229a7_00003", "tune_trial_229a7_00012")] == [0, 3, 12]
    assert trial_index("odd") == trial_index("odd")
    colors = [trial_color(i) for i in range(20)]
    assert len(set(colors)) == 20 and colors[0] == "#c32222"


def test_objective_is_the_running_maximum_of_the_space_metric():
    assert SPACE.metric == "val/zsl_top1" and SPACE.objective == "val/zsl_top1_max"
    cocodiff = load_search_space(REPO / "search_spaces" / "cocodiff.yaml")
    assert cocodiff.objective == "val/top1_max"


def test_random_search_is_seeded():
    """The same seed samples the same configs (what two runs of one sweep command do); another seed differs."""
    from ray.tune.experiment import Experiment

    def sample(seed: int) -> list[dict]:
        gen = search_algorithm("random", seed, concurrency=8)
        gen.add_configurations([Experiment("e", lambda config: None, config=tune_param_space(SPACE),
                                           num_samples=4)])
        return [trial.config for trial in iter(gen.next_trial, None)]

    first = sample(0)
    assert len(first) == 4 and first == sample(0) and first != sample(1)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One sqlite store for the module (creating one costs seconds); each test uses its own experiments."""
    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


def test_experiments_are_model_training_experiments(client):
    """MLflow 3 opens an experiment without a kind in its GenAI view; new and older experiments get the kind."""
    exp_id = ensure_experiment(client, "fresh")
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    older = client.create_experiment("older")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(older).tags
    assert ensure_experiment(client, "older") == older
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    assert sweep_experiment("tdsm", "synthetic-u5") == "tdsm-synthetic-u5-sweeps"


def test_closer_finishes_early_stopped_trials_and_fails_failed_ones(client):
    uri = client._tracking_client.tracking_uri  # noqa: SLF001
    runs = {tid: MLflowReporter.start(uri, "sweeps", f"trial {tid}", tags={"ray_trial_id": tid})
            for tid in ("a", "b", "c")}
    closer = MLflowTrialCloser(uri, "sweeps", total_steps=300)
    closer.on_trial_complete(0, [], SimpleNamespace(trial_id="a", last_result={"step": 100}))   # ASHA stopped it
    closer.on_trial_complete(0, [], SimpleNamespace(trial_id="b", last_result={"step": 300}))
    closer.on_trial_error(0, [], SimpleNamespace(trial_id="c", last_result={"step": 200}))
    got = {tid: client.get_run(r.run_id) for tid, r in runs.items()}
    assert {tid: (r.info.status, r.data.tags["trial_state"]) for tid, r in got.items()} == {
        "a": ("FINISHED", "early_stopped"), "b": ("FINISHED", "finished"), "c": ("FAILED", "failed")}


def test_trial_timing_is_start_to_first_metric_and_the_share_outside_the_fit_loop():
    started = 1000.0
    timing = trial_timing(started, {"first_metric_time": 1004.5, "compute_s": 30.0}, ended=1040.0)
    assert timing == pytest.approx({TIMING_KEYS[0]: 4.5, TIMING_KEYS[1]: 40.0, TIMING_KEYS[2]: 0.25})
    assert trial_timing(None, {"first_metric_time": 1.0, "compute_s": 1.0}, 2.0) == {}   # start unseen
    assert trial_timing(started, {"step": 3}, 1040.0) == {}                               # reported nothing yet
    # a retried trial that died before reporting again still carries its previous attempt's result
    assert trial_timing(started, {"first_metric_time": 999.0, "compute_s": 30.0}, 1040.0) == {}
    assert trial_timing(started, {"first_metric_time": 1001.0, "compute_s": 99.0}, 1040.0) == {}


def test_closer_logs_each_trials_timing_on_its_run_and_the_parent_gets_median_and_max(client, capsys):
    uri = client._tracking_client.tracking_uri  # noqa: SLF001
    parent = MLflowReporter.start(uri, "sweeps", "sweep")
    run = MLflowReporter.start(uri, "sweeps", "trial t", tags={"ray_trial_id": "t"}, parent_run_id=parent.run_id)
    closer = MLflowTrialCloser(uri, "sweeps", total_steps=300)
    trial = SimpleNamespace(trial_id="t", last_result={"step": 300})
    closer.on_trial_start(0, [], trial)
    closer.started["t"] -= 10.0                                      # the trial started 10 s ago
    trial.last_result.update(first_metric_time=closer.started["t"] + 2.0, compute_s=5.0)
    closer.on_trial_complete(0, [], trial)
    metrics = client.get_run(run.run_id).data.metrics
    wall = metrics[TIMING_KEYS[1]]            # 10 s plus however long the closer's MLflow calls took
    assert metrics[TIMING_KEYS[0]] == pytest.approx(2.0) and 10.0 <= wall < 60.0
    assert metrics[TIMING_KEYS[2]] == pytest.approx(1.0 - 5.0 / wall)
    rows = [{"start_to_first_metric_s": v, "overhead_share": v / 10} for v in (2.0, 9.0, 4.0)] + [{}]
    out = report_overhead(parent, "split", rows)
    assert out == {"start_to_first_metric_s_median": 4.0, "start_to_first_metric_s_max": 9.0,
                   "overhead_share_median": 0.4, "overhead_share_max": 0.9}
    assert client.get_run(parent.run_id).data.metrics["sweep/overhead_share_max"] == 0.9
    assert "first metric: median 4.0 s" in capsys.readouterr().err


def test_trial_driver_direct_for_one_worker_train_for_ddp():
    assert trial_driver("auto", 1) == "direct" and trial_driver("auto", 2) == "train"
    assert trial_driver("train", 1) == "train"
    with pytest.raises(InputError, match="--trial-driver direct"):
        trial_driver("direct", 2)
    direct = TrialResources(driver="direct", workers_per_trial=1, cpus_per_worker=2.0, gpus_per_worker=0.5)
    assert trial_resources(direct) == {"cpu": 2.0, "gpu": 0.5}
    train = TrialResources(driver="train", workers_per_trial=2, cpus_per_worker=2.0, gpus_per_worker=0.5)
    assert trial_resources(train)["cpu"] == 0     # its TorchTrainer's workers hold them


def test_a_resumed_sweep_keeps_the_driver_it_started_with():
    from service.orchestration.sweep import sweep_driver

    assert sweep_driver({}, "auto", 1, "s") == "direct"                                     # a new sweep
    assert sweep_driver({"driver": "direct"}, "auto", 1, "s") == "direct"
    assert sweep_driver({"parent_run_id": "x"}, "auto", 1, "s") == "train"     # state from before the choice
    with pytest.raises(InputError, match="started with the train trial driver"):
        sweep_driver({"parent_run_id": "x"}, "direct", 1, "s")
    with pytest.raises(InputError, match="started with the direct trial driver"):
        sweep_driver({"driver": "direct"}, "auto", 2, "s")


def fake_run(trial: str, value: float | None, status: str = "FINISHED", state: str = "finished", **params):
    metrics = {} if value is None else {"val/zsl_top1_max": value, "val/zsl_top1": value}
    tags = {"ray_trial_id": trial, "trial_state": state, "best_t_test": "5", "best_step": "200"}
    return SimpleNamespace(info=SimpleNamespace(run_name=f"run {trial}", run_id=f"id-{trial}", status=status),
                           data=SimpleNamespace(metrics=metrics, tags=tags,
                                                params={k.replace("__", "."): str(v) for k, v in params.items()}))


def test_ranked_trials_best_first_failed_and_unscored_last():
    runs = [fake_run("a", 40.0, state="early_stopped", optim__lr=0.0021), fake_run("b", 55.5, optim__lr=0.001),
            fake_run("c", 90.0, status="FAILED", state="failed"), fake_run("d", None, state="early_stopped"),
            fake_run("e", math.nan)]
    rows = ranked_trials(runs, SPACE, chosen=CHOSEN)
    assert [(r["rank"], r["trial"]) for r in rows] == [(1, "b"), (2, "a"), ("-", "c"), ("-", "d"), ("-", "e")]
    table = format_trials_table(rows, SPACE, CHOSEN).splitlines()
    assert table[0].split() == ["rank", "trial", "val/zsl_top1_max", "T", "τ", "λ", "lr", "t_test", "step", "state"]
    assert table[2].split()[:3] == ["2", "a", "40"] and "2.1e-3" in table[2] and table[2].endswith("early_stopped")
    tied = [fake_run("x", 50.0), fake_run("y", 50.0)]         # among ties, rank 1 is the run the best config used
    assert [r["trial"] for r in ranked_trials(tied, SPACE, best_run_id="id-y")] == ["y", "x"]
    parsed = list(csv.DictReader(io.StringIO(trials_csv(rows))))
    assert [p["trial"] for p in parsed] == ["b", "a", "c", "d", "e"]
    assert parsed[1]["optim.lr"] == "0.0021" and float(parsed[0]["val/zsl_top1_max"]) == 55.5


def test_report_trials_writes_csv_artifact_and_a_shared_runs_view(client, tmp_path, capsys):
    uri = client._tracking_client.tracking_uri  # noqa: SLF001
    parent = MLflowReporter.start(uri, "tdsm-x-sweeps", "sweep-1", tags={"sweep": "sweep-1"})
    for tid, value in (("t1", 30.0), ("t2", 60.0)):
        child = find_or_start_child_run(uri, "tdsm-x-sweeps", parent.run_id, tid, f"T=10 {tid}",
                                        tags={"sweep": "sweep-1", "trial_state": "finished"})
        child.log_params({"diffusion.num_train_timesteps": 10, "optim.lr": 0.002})
        child.log_metrics({"val/zsl_top1_max": value}, 300)
    out = report_trials(parent, "tdsm-x-sweeps", uri, "sweep-1", Storage.parse(str(tmp_path)), "x", SPACE,
                        chosen=CHOSEN)
    assert "t2" in capsys.readouterr().err.split("first:\n")[1].splitlines()[1]     # rank 1 = the best
    assert [r["trial"] for r in csv.DictReader(open(out["trials_csv"]))] == ["t2", "t1"]
    assert "trials.csv" in {a.path for a in client.list_artifacts(parent.run_id)}
    exp = client.get_experiment_by_name("tdsm-x-sweeps")
    view = json.loads(exp.tags[SHARED_VIEW_PREFIX + "sweep-1"])
    assert view["searchFilter"] == "tags.sweep = 'sweep-1'" and view["orderByKey"] == "metrics.`val/zsl_top1_max`"
    assert {"metrics.`val/zsl_top1_max`", "params.`optim.lr`", "tags.`best_t_test`",
            "tags.`trial_state`"} <= set(view["selectedColumns"])
    runs = f"http://127.0.0.1:{local_ui_port()}/#/experiments/{exp.experiment_id}/runs"   # local store: printed port
    assert out["mlflow_view"] == f"{runs}?viewStateShareKey=sweep-1&workflowType=machine_learning"
    assert out["mlflow_charts"] == (f"{runs}?viewStateShareKey=sweep-1&compareRunsMode=CHART"
                                    "&workflowType=machine_learning")
    # the chart view leads with the objective (best per trial, then its curve), the overhead sections collapsed last
    cards = view["compareRunCharts"]
    assert [(c["type"], c["metricKey"]) for c in cards] == [("BAR", "val/zsl_top1_max"), ("LINE", "val/zsl_top1_max"),
                                                             ("LINE", "val/zsl_top1")]
    sections = view["compareRunSections"]
    assert [(s["name"], s["display"]) for s in sections] == [("val", True), ("sweep", False), ("trial", False)]
    assert {c["metricSectionId"] for c in cards} == {sections[0]["uuid"]} and view["isAccordionReordered"]
    colors = {c.data.tags[RUN_COLOR_TAG] for c in client.search_runs([exp.experiment_id], "tags.ray_trial_id != ''")}
    assert len(colors) == 2 and all(c.startswith("#") and len(c) == 7 for c in colors)     # one per trial
    # the filter the view applies holds exactly this sweep's runs
    assert len(client.search_runs([exp.experiment_id], view["searchFilter"])) == 3


def test_only_our_own_worker_lines_reach_the_terminal(monkeypatch):
    """Ray Train's INFO lines, internal tracebacks and C++ messages stay in Ray's log files; ours are forwarded."""
    import ray._private.worker as ray_worker

    from service.orchestration.cluster import route_worker_logs

    assert hasattr(ray_worker, "print_to_stdstream")          # the handler route_worker_logs replaces is still there
    assert hasattr(ray_worker.global_worker_stdstream_dispatcher, "remove_handler")
    printed = []
    dispatcher = type(ray_worker.global_worker_stdstream_dispatcher)()
    dispatcher.add_handler("ray_print_logs", lambda batch: printed.append(("all", batch["lines"])))
    monkeypatch.setattr(ray_worker, "global_worker_stdstream_dispatcher", dispatcher)
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda batch, ignore_prefix: printed.append(batch["lines"]))
    route_worker_logs(forward_all=False)
    dispatcher.emit({"pid": 1, "is_err": True, "lines": [
        "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/x)",
        "[2026-11-30 17:12:48,735 E 8214 8373] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher'",
        "Traceback (most recent call last):", "ray.train.WorkerGroupError: Training failed",
        "encoder step 15/300: loss 3.280, train top-1 9.4 %"]})
    assert printed == [["encoder step 15/300: loss 3.280, train top-1 9.4 %"]]
    printed.clear()
    for message in ("WARNING: 8 PYTHON worker processes have been started on node: abc", "Task was killed (OOM)"):
        ray_worker.print_to_stdstream({"pid": "raylet", "is_err": False, "lines": [message]}, ignore_prefix=False)
    assert printed == [["Task was killed (OOM)"]]


def test_links_point_at_the_server_in_use_or_at_the_printed_mlflow_ui_command():
    """#21: a server's own URL and port; for a local store, `mlflow ui` with the port the links use."""
    server = "http://mlflow.internal:8080/"
    assert ui_link(server, "7", "sweep 1") == ("http://mlflow.internal:8080/#/experiments/7/runs?viewStateShareKey="
                                               "sweep%201&workflowType=machine_learning")
    assert ui_command(server) == "http://mlflow.internal:8080"
    store = "sqlite:////tmp/x/mlflow.db"
    local_ui_port.cache_clear()
    try:
        port = local_ui_port()
        assert ui_command(store) == (f"mlflow ui --app-name skeldiff --workers 1 --backend-store-uri {store} "
                                     f"--port {port}")
        assert ui_link(store, "7") == f"http://127.0.0.1:{port}/#/experiments/7/runs?workflowType=machine_learning"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:     # e.g. another UI already on it
            taken.bind(("127.0.0.1", port))
            taken.listen()
            local_ui_port.cache_clear()
            other = local_ui_port()
            assert other > port
            assert ui_command(store).endswith(f" --port {other}") and ui_link(store, "7").startswith(
                f"http://127.0.0.1:{other}/")
    finally:
        local_ui_port.cache_clear()
