"""The best trial of a sweep, read from a real MLflow store: ranked by MLflow (order_by) over every page, failed
trials and non-finite values never win, ties go to the newest run, `mode: min` ranks the other way."""

from __future__ import annotations

import math
import time

import pytest
from mlflow.tracking import MlflowClient

from service.tracking import store
from service.tracking.store import MLflowReporter, ensure_experiment
from service.tracking.trials import best_child, eligible_for_best

METRIC = "val/zsl_top1_max"


def sweep_with(tmp_path, children: list[tuple[str, float | None, str, dict[str, str]]]):
    """A parent run and its children (name, metric value or None, end status, tags); returns (client, exp, parent)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = MLflowReporter.start(uri, "sweeps", "parent")
    for name, value, status, tags in children:
        child = MLflowReporter.start(uri, "sweeps", name, tags=tags, parent_run_id=parent.run_id)
        if value is not None:
            child.log_metrics({METRIC: value}, 1)
        child.finish(status)
        time.sleep(0.01)                      # distinct start times: ties are broken by the newest start
    other = MLflowReporter.start(uri, "sweeps", "not a child")
    other.log_metrics({METRIC: 1e9}, 1)
    other.finish()
    client = MlflowClient(uri)
    return client, ensure_experiment(client, "sweeps"), parent.run_id


def names(run) -> str:
    return run.info.run_name if run is not None else None


def test_the_best_eligible_child_wins_whatever_the_page_size(tmp_path, monkeypatch):
    client, exp, parent = sweep_with(tmp_path, [
        ("good", 70.0, "FINISHED", {}),
        ("failed-high", 99.0, "FAILED", {}),
        ("tagged-failed", 98.0, "FINISHED", {"trial_state": "failed"}),
        ("nan", math.nan, "FINISHED", {}),
        ("no-metric", None, "FINISHED", {}),
        ("stopped-early", 80.0, "KILLED", {"trial_state": "early_stopped"}),
        ("low", 10.0, "FINISHED", {}),
    ])
    assert names(best_child(client, exp, parent, METRIC, "max")) == "stopped-early"   # ASHA-stopped stays eligible
    assert names(best_child(client, exp, parent, METRIC, "min")) == "low"
    monkeypatch.setattr(store, "PAGE", 1)                                              # one run per request
    assert names(best_child(client, exp, parent, METRIC, "max")) == "stopped-early"
    assert names(best_child(client, exp, parent, METRIC, "min")) == "low"


def test_a_tie_goes_to_the_newest_run_and_no_eligible_child_gives_none(tmp_path):
    client, exp, parent = sweep_with(tmp_path, [("older", 50.0, "FINISHED", {}), ("newer", 50.0, "FINISHED", {})])
    assert names(best_child(client, exp, parent, METRIC, "max")) == "newer"
    nothing = [("failed", 90.0, "FAILED", {}), ("nan", math.nan, "FINISHED", {})]
    client, exp, parent = sweep_with(tmp_path / "b", nothing)
    assert best_child(client, exp, parent, METRIC, "max") is None


@pytest.mark.parametrize(("value", "status", "tags", "eligible"), [
    (1.0, "FINISHED", {}, True), (1.0, "KILLED", {"trial_state": "early_stopped"}, True),
    (1.0, "FAILED", {}, False), (1.0, "FINISHED", {"trial_state": "failed"}, False),
    (math.nan, "FINISHED", {}, False), (None, "FINISHED", {}, False)])
def test_eligibility(tmp_path, value, status, tags, eligible):
    client, exp, parent = sweep_with(tmp_path, [("t", value, status, tags)])
    [run] = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert eligible_for_best(run, METRIC) is eligible
