"""A sweep's trials in MLflow: each trial's child run (found again on retry), its closing by the driver, the best
child, and what a researcher reads: run names, the ranked trials table / trials.csv, a shared runs-table view.

`space` arguments are a search space (service.methods.search_space.SearchSpace), read by attribute only.
"""

from __future__ import annotations

import colorsys
import csv
import functools
import io
import json
import math
import socket
import sys
import time
import zlib
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from service.storage import Storage
from service.tracking.store import MLflowReporter, patient_client, search_pages


class TrialSpace(Protocol):
    """What the trial views read of a search space (service.methods.search_space.SearchSpace)."""

    objective: str              # the ranked metric: f"{metric}_max"
    metric: str
    mode: str                   # max | min
    params: dict[str, Any]      # searched dotted keys

SHARED_VIEW_PREFIX = "mlflow.sharedViewState."   # experiment tags the UI reads a shared runs-table view from


def column_key(kind: str, name: str) -> str:
    """A runs-table column as the MLflow UI names it: kind is metrics, params, tags or attributes."""
    return f"{kind}.`{name}`"


def share_runs_view(client: MlflowClient, experiment_id: str, key: str, columns: list[str], search_filter: str = "",
                    order_by: str | None = None, expanded: list[str] = (),
                    charts: dict[str, Any] | None = None) -> None:
    """Store a runs-table view (visible columns, filter, sort) in the experiment, as the UI's Share button does.

    The UI opens it from `.../#/experiments/<id>/runs?viewStateShareKey=<key>` (see `ui_link`); it reads the tag
    as plain JSON. `charts` (`chart_view`) adds the chart view's cards and sections. The UI takes only its own
    whitelist of keys from the tag (MLflow 3.17: the search facets, columns, runsHiddenMode, compareRunCharts,
    compareRunSections, isAccordionReordered, ...; not runsExpanded).
    """
    state = {"searchFilter": search_filter, "orderByKey": order_by or "attributes.start_time", "orderByAsc": False,
             "selectedColumns": columns, "runsExpanded": {run_id: True for run_id in expanded},
             "runsHiddenMode": "SHOW_ALL", "runListHidden": False, **(charts or {})}
    client.set_experiment_tag(experiment_id, f"{SHARED_VIEW_PREFIX}{key}", json.dumps(state))


# Chart sections of the sweep's own cost (the parent's sweep/*, each trial's trial/*): collapsed, after the rest.
OVERHEAD_SECTIONS = ("sweep", "trial")


def chart_section(metric: str) -> str:
    """The chart-view section the MLflow UI files a metric under: its prefix up to the last `/`."""
    prefix = metric.rsplit("/", 1)[0] if "/" in metric else ""
    return {"": "Model metrics", "system": "System metrics"}.get(prefix, prefix)


def chart_card(kind: str, metric: str, section: str, runs: int) -> dict[str, Any]:
    """One chart card as the UI stores it (3.17's RunsChartsBarCardConfig / RunsChartsLineCardConfig fields).
    isGenerated=False: the UI keeps it as given instead of regenerating it from the logged metrics."""
    card = {"uuid": f"skeldiff-{kind.lower()}-{metric}", "type": kind, "runsCountToCompare": runs,
            "metricSectionId": f"skeldiff-section-{section}", "deleted": False, "isGenerated": False,
            "displayName": metric, "metricKey": metric, "selectedMetricKeys": [metric]}
    if kind == "LINE":
        card |= {"lineSmoothness": 0, "xAxisScaleType": "linear", "scaleType": "linear", "range": {},
                 "xAxisKey": "step", "selectedXAxisMetricKey": "", "yAxisKey": "metric", "yAxisExpressions": [],
                 "ignoreOutliers": False, "useGlobalXaxisKey": True, "useGlobalLineSmoothing": True}
    return card


def chart_view(space: TrialSpace, metric_keys: set[str], trials: int) -> dict[str, Any]:
    """The chart view of a sweep, objective first: its best value per trial (bars), then its curve and the raw
    metric's over steps; the other sections after it, the overhead sections (sweep/*, trial/*) collapsed last.

    Without this the UI sorts sections by name (sweep/ before val/) and opens on bar charts of the parent's
    overhead figures. Metrics not named here still get charts: the UI adds them to their section.
    """
    lead = chart_section(space.objective)
    runs = max(10, trials)
    cards = [chart_card("BAR", space.objective, lead, runs), chart_card("LINE", space.objective, lead, runs),
             chart_card("LINE", space.metric, chart_section(space.metric), runs)]
    sections = {chart_section(k) for k in metric_keys} | {chart_section(space.metric)}
    rest = sorted(sections - {lead} - set(OVERHEAD_SECTIONS))
    order = [lead, *rest, *OVERHEAD_SECTIONS]
    return {"compareRunCharts": cards, "isAccordionReordered": True,
            "compareRunSections": [{"uuid": f"skeldiff-section-{name}", "name": name, "isReordered": True,
                                    "display": name not in OVERHEAD_SECTIONS, "deleted": False,
                                    "isGenerated": False} for name in order]}


# Distinct colours for a sweep's trials in the UI (run tag mlflow.runColor, which the UI reads and its colour
# picker writes): hues a golden angle apart, so neighbouring trial indices never look alike.
RUN_COLOR_TAG = "mlflow.runColor"
SWEEP_COLOR = "#808080"       # the parent run: grey, apart from every trial's colour


def trial_color(index: int) -> str:
    """The hex colour of the sweep's `index`-th trial: hue index x 137.5 degrees, fixed saturation/lightness."""
    r, g, b = colorsys.hls_to_rgb((index * 137.508 % 360) / 360, 0.45, 0.7)
    return "#" + "".join(f"{round(255 * c):02x}" for c in (r, g, b))


def trial_index(trial_id: str) -> int:
    """A Tune trial id's counter (`229a7_00003` -> 3); another id's stable hash."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else zlib.crc32(trial_id.encode())


# `mlflow ui`'s own default port: the first one tried for a local store's UI.
UI_PORT = 5000


def is_tracking_server(uri: str) -> bool:
    """An MLflow server (its UI is at the same URL), not a local store that `mlflow ui` must serve."""
    return uri.startswith(("http://", "https://"))


@functools.lru_cache(maxsize=1)
def local_ui_port() -> int:
    """The port of a local store's `mlflow ui` in the printed links and command: 5000 when free here, else the
    first free port above it; fixed for the process, so every link of a sweep and its command agree."""
    for port in range(UI_PORT, UI_PORT + 100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:     # taken (another UI or server): its pages would not be this store's
                continue
            return port
    return UI_PORT


def ui_command(uri: str) -> str:
    """How to browse the store: a server's URL, or the exact `mlflow ui` command (port included) that serves a
    local store where `ui_link` points (--workers 1: README "Quick start"; --app-name skeldiff: service/tracking/ui.py,
    the experiment list opens runs tables)."""
    if is_tracking_server(uri):
        return uri.rstrip("/")
    return f"mlflow ui --app-name skeldiff --workers 1 --backend-store-uri {uri} --port {local_ui_port()}"


# The UI keeps its GenAI / Model training toggle in the browser (localStorage, GenAI by default) and does not
# follow the experiment's mlflow.experimentKind (MLflow 3.17-3.18, mlflow/mlflow#24498): a link must name the
# workflow, or it opens the GenAI overview instead of the runs table.
WORKFLOW_PARAM = {"workflowType": "machine_learning"}


def ui_link(uri: str, experiment_id: str, view_key: str | None = None, charts: bool = False) -> str:
    """Where to look: the MLflow UI's runs table (`charts`: its chart view) of an experiment, on the server in use or
    on the local `mlflow ui` that `ui_command` starts."""
    base = uri.rstrip("/") if is_tracking_server(uri) else f"http://127.0.0.1:{local_ui_port()}"
    query = {**({"viewStateShareKey": view_key} if view_key else {}),
             **({"compareRunsMode": "CHART"} if charts else {}), **WORKFLOW_PARAM}
    return f"{base}/#/experiments/{experiment_id}/runs?{urlencode(query, quote_via=quote)}"


# Short names of searched keys in run names and tables (other keys: their last dotted part).
PARAM_LABELS = {"diffusion.num_train_timesteps": "T", "module.num_train_timesteps": "T", "loss.margin": "τ",
                "loss.triplet_weight": "λ", "optim.lr": "lr", "model.hidden_size": "width", "model.depth": "depth",
                "diffusion.prediction_type": "pred", "module.beta_schedule": "β"}


def param_label(key: str) -> str:
    """Short name of a searched key: `optim.lr` -> `lr`, `loss.margin` -> `τ`."""
    return PARAM_LABELS.get(key, key.rsplit(".", 1)[-1])


def format_value(value: Any) -> str:
    """Two significant digits, exponent without padding (`2.1e-3`); ints and strings as they are."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e4:
        return str(int(value))
    if 0.01 <= abs(value) < 1e4:
        return f"{value:.2g}" if abs(value) < 10 else f"{value:.3g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def trial_label(sampled: dict[str, Any]) -> str:
    """A trial's run name: what differs between trials, e.g. `T=50 τ=0.52 λ=0.93 lr=2.1e-3`."""
    return " ".join(f"{param_label(k)}={format_value(v)}" for k, v in sampled.items())


TIMING_KEYS = ("trial/start_to_first_metric_s", "trial/wall_s", "trial/overhead_share")


def trial_timing(started: float | None, result: dict[str, Any], ended: float) -> dict[str, float]:
    """A trial's start-up and overhead, from the driver's clock (trial start, end) and its last result.

    start -> first metric: Tune starting the trial (actor, imports, data from the object store, MLflow run, model
    build) until the worker logged its first metric. Overhead: the share of the trial's wall time not spent in its
    fit loop (`compute_s`, which already excludes the loop's MLflow logging, Tune reports and checkpoint copies).
    Empty when the trial reported nothing since this start (a retried or restored trial keeps its previous
    attempt's last result until it reports again: its first metric then predates the start) or the numbers do not
    fit together (clocks of another node). The first metric's time comes from the worker's clock, the start and
    end from the driver's: on a cluster they agree to NTP's accuracy.
    """
    first, compute = result.get("first_metric_time"), result.get("compute_s")
    if started is None or first is None or compute is None:
        return {}
    wall = ended - started
    if wall <= 0 or first < started or first > ended or not 0 <= compute <= wall:
        return {}
    return {TIMING_KEYS[0]: first - started, TIMING_KEYS[1]: wall, TIMING_KEYS[2]: 1.0 - compute / wall}


def _cell(value: Any) -> str:
    """A param as logged by MLflow (a string) or a metric, in the short form of run names."""
    if value is None:
        return ""
    if isinstance(value, str):
        try:
            value = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            return value
    return format_value(value) if math.isfinite(value) else str(value)


def ranked_trials(children: list, space: TrialSpace, best_run_id: str | None = None,
                  chosen: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One row per trial run: the ones the best config may come from by objective (rank 1 = best; among ties, the
    run the best config came from), then the rest. `chosen`: the tags a trial sets on what it chose on validation
    (Method.chosen_tags, e.g. TDSM's best_t_test), one column each."""
    rows = []
    for run in children:
        tags, value = run.data.tags, run.data.metrics.get(space.objective)
        row = {"rank": "", "trial": tags.get(TRIAL_TAG, ""), space.objective: value,
               **{key: run.data.params.get(key) for key in space.params}}
        row.update({tag: tags.get(tag) for tag in chosen})
        row.update(best_step=tags.get("best_step"), trial_state=tags.get("trial_state", run.info.status.lower()),
                   **{key.split("/")[1]: run.data.metrics.get(key) for key in TIMING_KEYS},
                   run_name=run.info.run_name, run_id=run.info.run_id)
        rows.append((eligible_for_best(run, space.objective), row))
    sign = 1.0 if space.mode == "max" else -1.0
    rows.sort(key=lambda er: (not er[0], -sign * er[1][space.objective] if er[0] else 0.0,
                              er[1]["run_id"] != best_run_id, er[1]["trial"]))
    for i, (eligible, row) in enumerate(rows, 1):
        row["rank"] = i if eligible else "-"
    return [row for _, row in rows]


def format_trials_table(rows: list[dict[str, Any]], space: TrialSpace, chosen: tuple[str, ...] = ()) -> str:
    """The ranked trials as a short fixed-width table (searched keys by their short names; a chosen tag by its name
    without `best_`)."""
    columns = ["rank", "trial", space.objective, *space.params, *chosen, "best_step", "trial_state"]
    headers = ({key: param_label(key) for key in space.params} | {tag: tag.removeprefix("best_") for tag in chosen}
               | {"best_step": "step", "trial_state": "state"})
    cells = [[headers.get(c, c) for c in columns]] + [[_cell(r.get(c)) if c != "rank" else str(r[c]) for c in columns]
                                                      for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells)


def trials_csv(rows: list[dict[str, Any]]) -> str:
    """The ranked trials as CSV, full-precision values and full dotted keys."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["rank"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def view_columns(space: TrialSpace, chosen: tuple[str, ...] = ()) -> list[str]:
    """The runs-table columns that tell trials apart: objective, searched params, what they chose, state."""
    return [column_key("metrics", space.objective), column_key("metrics", space.metric),
            *(column_key("params", key) for key in space.params), *(column_key("tags", tag) for tag in chosen),
            column_key("tags", "best_step"), column_key("tags", "trial_state"), column_key("tags", TRIAL_TAG)]


def report_trials(parent: MLflowReporter, experiment: str, uri: str, name: str, sweep_path: Storage, split: str,
                  space: TrialSpace, best_run_id: str | None = None, chosen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Print the ranked trials, write them as trials.csv (sweep folder and parent run), share a runs-table view;
    log the sweep's own overhead on the parent run."""
    client = parent.client
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    children = list(search_pages(client, [exp_id], f"tags.mlflow.parentRunId = '{parent.run_id}'"))
    rows = ranked_trials(children, space, best_run_id, chosen)
    print(f"[{split}] trials of sweep {name}, best {space.objective} first:\n"
          f"{format_trials_table(rows, space, chosen)}",
          file=sys.stderr)
    text = trials_csv(rows)
    out = (sweep_path / "trials.csv").write_text(text)
    parent.log_text(text, "trials.csv")
    logged = {key for run in children for key in run.data.metrics}
    share_runs_view(client, exp_id, name, view_columns(space, chosen), search_filter=f"tags.sweep = '{name}'",
                    order_by=column_key("metrics", space.objective), expanded=[parent.run_id],
                    charts=chart_view(space, logged, len(children)))
    return {"trials_csv": str(out), "mlflow_view": ui_link(uri, exp_id, name),
            "mlflow_charts": ui_link(uri, exp_id, name, charts=True), "children": len(rows),
            **report_overhead(parent, split, rows)}


def report_overhead(parent: MLflowReporter, split: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The sweep's own cost in its parent run: median and worst trial start -> first metric and overhead share
    (per trial: the child runs' trial/* metrics and trials.csv)."""
    out: dict[str, Any] = {}
    for key in ("start_to_first_metric_s", "overhead_share"):
        values = sorted(v for r in rows if isinstance(v := r.get(key), float) and math.isfinite(v))
        if values:
            out[f"{key}_median"] = round(values[len(values) // 2], 3)
            out[f"{key}_max"] = round(values[-1], 3)
    if out:
        parent.log_metrics({f"sweep/{k}": v for k, v in out.items()}, 0)
        print(f"[{split}] trial start -> first metric: median {out.get('start_to_first_metric_s_median')} s, "
              f"max {out.get('start_to_first_metric_s_max')} s; Ray + MLflow overhead: median "
              f"{100 * out.get('overhead_share_median', float('nan')):.0f} % of a trial's wall time", file=sys.stderr)
    return out


def eligible_for_best(run, metric: str) -> bool:
    """A trial run the best config may come from: it reported a finite `metric` and did not fail.

    A failed trial (a diverged loss, a crash after its retries) may have reported good validation scores before
    it failed; its config is not one that trains, so it never wins. ASHA-stopped trials (status KILLED, tag
    trial_state=early_stopped) stay eligible: their best reported value is real.
    """
    value = run.data.metrics.get(metric)
    failed = run.info.status == "FAILED" or run.data.tags.get("trial_state") == "failed"
    return value is not None and math.isfinite(value) and not failed


TRIAL_TAG = "ray_trial_id"


def find_or_start_child_run(uri: str, experiment: str, parent_run_id: str, trial_id: str, run_name: str,
                            tags: dict[str, str]) -> MLflowReporter:
    """The trial's MLflow run, found by its Ray trial id so a retried or resumed trial never duplicates it."""

    client = patient_client(uri, f"trial {trial_id}")
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        found = client.search_runs([exp.experiment_id], filter_string=f"tags.{TRIAL_TAG} = '{trial_id}'",
                                   max_results=1)
        if found:
            return MLflowReporter.start(uri, experiment, run_name, run_id=found[0].info.run_id)
    return MLflowReporter.start(uri, experiment, run_name, parent_run_id=parent_run_id, tags={
        RUN_COLOR_TAG: trial_color(trial_index(trial_id)), **tags, TRIAL_TAG: trial_id})


def close_trial_run(uri: str, experiment: str, trial_id: str, step: int, total_steps: int, failed: bool,
                    timing: dict[str, float]) -> None:
    """The driver's end of a trial's run: tag trial_state (finished / early_stopped / failed), log its timing, and
    end it when its worker could not (ASHA stops a trial inside its report, so the worker's own finish never runs)."""
    client = patient_client(uri, f"closing trial {trial_id}")     # the driver waits out a server restart
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return
    runs = client.search_runs([exp.experiment_id], f"tags.{TRIAL_TAG} = '{trial_id}'", max_results=1)
    if not runs:
        return
    run = runs[0]
    state = "failed" if failed else ("finished" if step >= total_steps else "early_stopped")
    client.set_tag(run.info.run_id, "trial_state", state)
    if timing:
        client.log_batch(run.info.run_id, [Metric(key, value, int(time.time() * 1000), step)
                                           for key, value in timing.items()])
    if run.info.status == "RUNNING" or failed:
        client.set_terminated(run.info.run_id, "FAILED" if failed else "FINISHED")


def close_orphans(client, experiment_id: str, parent_run_id: str) -> int:
    """End the sweep's trial runs still RUNNING once every trial is over (a worker lost with its node, a closer
    that gave up on the tracking server): FAILED, tagged trial_state=lost. No run stays RUNNING forever."""
    lost = [r for r in search_pages(client, [experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                    "attributes.status = 'RUNNING'")]
    for run in lost:
        client.set_tag(run.info.run_id, "trial_state", "lost")
        client.set_terminated(run.info.run_id, "FAILED")
        print(f"warning: trial run {run.info.run_id} ({run.info.run_name}) was still RUNNING after the sweep: "
              "marked FAILED (its worker was lost)", file=sys.stderr)
    return len(lost)


def best_child(client: MlflowClient, experiment_id: str, parent_run_id: str, metric: str, mode: str):
    """The best trial run of a sweep by `metric`, among those eligible (eligible_for_best); None if there is none.

    MLflow sorts by the metric (missing and NaN values last; ties by start time, newest first) and pages through
    every child, so a sweep of any size is ranked, and a tie goes to the same run as a max() over the default order.
    """
    order = [f"metrics.`{metric}` {'DESC' if mode == 'max' else 'ASC'}"]
    for run in search_pages(client, [experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", order):
        if eligible_for_best(run, metric):
            return run
    return None
