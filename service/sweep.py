"""Hyper-parameter sweeps: `python -m service.sweep {tdsm,cocodiff} [--smoke] [--splits NAME ...]`.

Ray Tune samples configs from search_spaces/<method>.yaml; each trial trains in its Tune trial process (one
worker) or on a Ray Train TorchTrainer (N workers, DDP; service.trial) and is ranked on validation data (TDSM:
classes carved from the seen ones; CoCoDiff: a draw of the training split), never on test. Every trial is a
nested MLflow run under one parent run per split; the best config is written as YAML for
`python -m service.final`. The driver, Tuner and MLflow parent logic is shared; what differs per method is in
`SWEEP_METHODS` here and `service.trial.WORKERS`.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from service import THREAD_ENV_DEFAULTS
from service.cli import (
    DEFAULT_STORAGE,
    METHOD_CONFIGS,
    SIGTERM_RECEIVED,
    Terminated,
    add_config_args,
    exits_cleanly,
    install_sigterm_handler,
    lock_dir,
    resolve_config,
    sigterm_stops_tune,
)
from service.search_space import SearchSpace, check_against_config, format_value, load_search_space, param_label
from service.splits import (
    REPO_SPACES,
    default_splits,
    load_splits,
    resolve_chain,
    splits_file,
)
from service.tracking import (
    CREDENTIAL_VARS,
    HTTP_DEFAULTS,
    MLflowReporter,
    column_key,
    resolve_tracking_uri,
    share_runs_view,
    standard_tags,
    ui_link,
)
from trainers.cocodiff import CoCoDiffConfig
from trainers.config import TDSMConfig, build_config, dump_yaml, to_plain
from trainers.errors import InputError
from trainers.io import atomic_write_text

STATE_FILE = "skeldiff_sweep.json"
TRIAL_ID_TAG = "ray_trial_id"      # = service.trial.TRIAL_TAG (not imported here: trial imports torch)


SWEEP_EXAMPLES = """examples:
  python -m service.sweep tdsm --smoke                  # embedded default: skeleton chain + 4 trials, minutes on 2 CPUs
  python -m service.sweep tdsm --splits synthetic-skeleton synthetic-u12 --num-samples 32 \\
      --workers-per-trial 2 --gpus-per-worker 1 --tracking-uri http://mlflow:5000
  python -m service.sweep cocodiff --splits ntu60-xsub --config service/configs/cocodiff_paper.yaml --search optuna
  python -m service.sweep tdsm --smoke --resume         # continue the latest such sweep after a crash or Ctrl-C

Trials are ranked on <metric>_max of the search space (e.g. val/zsl_top1_max: the best validation score a trial
reached, the value of the checkpoint it keeps), never on test; then: python -m service.final --from <best_config.yaml>
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.sweep", description=__doc__.splitlines()[0],
                                epilog=SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=["tdsm", "cocodiff"],
                   help="tdsm: zero-shot (TDSM); cocodiff: supervised classification (CoCoDiff)")
    p.add_argument("--space", type=Path, help="search space YAML (default: search_spaces/<method>.yaml)")
    p.add_argument("--num-samples", type=int, help="trials per split (default: 16, or the space's smoke count)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha",
                   help="asha (default): stop weak trials early at their evaluations (reduction factor 2); "
                        "fifo: every trial trains all train.steps")
    p.add_argument("--search", choices=["random", "optuna"], default="random",
                   help="random (default): independent draws from the space; optuna: TPE guided by finished "
                        "trials (needs the optuna extra: pip install -e '.[optuna]')")
    p.add_argument("--max-concurrent", type=int, help="concurrent trials (default: fit the cluster's CPUs/GPUs)")
    p.add_argument("--workers-per-trial", type=int, default=1,
                   help="Ray Train workers per trial (DDP when > 1; tdsm only)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per Ray Train worker (default 0: CPU; fractions share a GPU, e.g. 0.5); also used by "
                        "the skeleton chain's encoder")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="also the torch thread count per worker")
    p.add_argument("--trial-retries", type=int, default=1, help="restarts of a crashed trial (from its checkpoint)")
    p.add_argument("--trial-driver", choices=["auto", "direct", "train"], default="auto",
                   help="auto (default): direct for one worker per trial, else train; direct: the Tune trial runs "
                        "its worker loop itself (starts in seconds); train: a Ray Train TorchTrainer per trial "
                        "(needed for DDP)")
    p.add_argument("--splits", nargs="+",
                   help="named splits from --splits-file (default: the data flags, else the method's embedded default)")
    p.add_argument("--splits-file", type=Path, help="default: search_spaces/<method>_splits.yaml")
    p.add_argument("--experiment-name", help="MLflow experiment (default: <method>-<split>-sweeps)")
    p.add_argument("--name", help="sweep name (default: <method>-<split>[-smoke]-<time>; --resume: the latest)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--storage-path", type=Path, default=DEFAULT_STORAGE,
                   help="Ray Tune/Train results, checkpoints and the cached skeleton chain (shared storage on a cluster)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else start a local one)")
    p.add_argument("--resume", action="store_true", help="continue the sweep named by --name (or the latest one)")
    p.add_argument("--smoke", action="store_true", help="a tiny sweep that finishes in minutes on 2 CPU cores")
    p.add_argument("--ray-logs", action="store_true",
                   help="also print everything Ray's workers print (default: only our own lines; the rest stays in "
                        "Ray's log files, path printed at start)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the search (the same command samples the same configs) and of trial training")
    add_config_args(p)
    return p


# ----------------------------------------------------------------------------------------------
# Splits, config, space
# ----------------------------------------------------------------------------------------------

def _resolve(p: Any) -> Any:
    """An absolute path string for a path-like value; None and non-paths (lists of ids, counts) unchanged."""
    return None if p is None else (str(Path(p).resolve()) if isinstance(p, (str, Path)) else p)


def tdsm_absolute_paths(tree: dict[str, Any]) -> dict[str, Any]:
    """Resolve relative data/text paths: trials and Ray jobs run in other working directories."""
    cfg = build_config(TDSMConfig, tree)
    d, t = cfg.data, cfg.text
    tree = to_plain(cfg)
    tree["data"].update(features_dir=_resolve(d.features_dir), unseen=_resolve(d.unseen), seen=_resolve(d.seen),
                        val_unseen=_resolve(d.val_unseen) if not isinstance(d.val_unseen, int) else d.val_unseen)
    tree["text"].update(class_names=_resolve(t.class_names),
                        descriptions=[_resolve(p) for p in t.descriptions] if t.descriptions else t.descriptions,
                        cache_dir=_resolve(t.cache_dir))
    return tree


def cocodiff_absolute_paths(tree: dict[str, Any]) -> dict[str, Any]:
    """Resolve relative data/text paths of a CoCoDiff config (see tdsm_absolute_paths)."""
    cfg = build_config(CoCoDiffConfig, tree)
    t = cfg.text
    tree = to_plain(cfg)
    tree["data"]["prepared_dir"] = _resolve(cfg.data.prepared_dir)
    tree["text"].update(class_names=_resolve(t.class_names),
                        synonyms=[_resolve(p) for p in t.synonyms] if t.synonyms is not None else None,
                        descriptions=[_resolve(p) for p in t.descriptions] if t.descriptions else t.descriptions,
                        cache_dir=_resolve(t.cache_dir))
    return tree


def absolute_paths(tree: dict[str, Any], method: str = "tdsm") -> dict[str, Any]:
    """The method's config tree with its data/text paths made absolute."""
    return SWEEP_METHODS[method].absolute_paths(tree)


def sweep_experiment(method: str, split: str) -> str:
    """Sweeps of a split get their own MLflow experiment: its charts never mix trials with demo or final runs."""
    return f"{method}-{split}-sweeps"


def sweep_dir_name(method: str, split: str, smoke: bool, storage: Path, name: str | None, resume: bool) -> str:
    """The Tune experiment name: given, the latest matching one (resume), or a new timestamped one."""
    if name:
        return name
    prefix = f"{method}-{split}{'-smoke' if smoke else ''}-"
    if resume:
        found = sorted(p.name for p in storage.glob(prefix + "*") if (p / STATE_FILE).is_file())
        if not found:
            raise InputError(f"--resume: no sweep named {prefix}* under {storage}")
        return found[-1]
    return prefix + time.strftime("%Y%m%d-%H%M%S")


# ----------------------------------------------------------------------------------------------
# What the shared driver needs to know about each method
# ----------------------------------------------------------------------------------------------

def prepare_tdsm_sweep(cfg: TDSMConfig) -> tuple:
    """(task, class names, text features): shared by every trial of a split through the object store."""
    from trainers.tdsm_task import prepare_tdsm

    return prepare_tdsm(cfg)


def prepare_cocodiff_sweep(cfg: CoCoDiffConfig) -> tuple:
    """(data, class names, fine text, coarse text); names are read even when no text is encoded (baseline)."""
    from service.cocodiff_data import prepare_cocodiff_inputs

    return prepare_cocodiff_inputs(cfg)


def tdsm_best_config(tree: dict[str, Any], run) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fix the trial's t_test to the one it chose on validation (final runs do not tune it again)."""
    t_best = int(run.data.tags.get("best_t_test", tree["eval"]["t_test"]))
    tree["eval"].update(t_test=t_best, tune_t_test=False)
    return tree, {"best_t_test": t_best}


def cocodiff_best_config(tree: dict[str, Any], run) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trial's config as is (a classifier has no inference-time choice)."""
    return tree, {"best_step": int(run.data.tags.get("best_step", 0))}


def tdsm_split_name(cfg: TDSMConfig) -> str:
    return Path(cfg.data.features_dir).name if cfg.data.source == "features" else "synthetic-u5"


def cocodiff_split_name(cfg: CoCoDiffConfig) -> str:
    from trainers.cocodiff_fit import dataset_label

    return dataset_label(cfg)


@dataclass(frozen=True)
class SweepMethod:
    """Per-method pieces of the sweep driver (the worker loops are in `service.trial.WORKERS`)."""

    prepare: Callable[[Any], tuple]                        # config -> data shared by every trial of a split
    absolute_paths: Callable[[dict[str, Any]], dict[str, Any]]
    split_name: Callable[[Any], str]                       # default split name when --splits is not given
    best_config: Callable[[dict[str, Any], Any], tuple[dict[str, Any], dict[str, Any]]]  # (tree, run) -> (tree, notes)
    multi_worker: bool                                     # its fit loop supports DDP (--workers-per-trial > 1)


SWEEP_METHODS: dict[str, SweepMethod] = {
    "tdsm": SweepMethod(prepare_tdsm_sweep, tdsm_absolute_paths, tdsm_split_name, tdsm_best_config,
                        multi_worker=True),
    "cocodiff": SweepMethod(prepare_cocodiff_sweep, cocodiff_absolute_paths, cocodiff_split_name,
                            cocodiff_best_config, multi_worker=True),
}


# ----------------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------------

# Lines of Ray's workers that are ours (the chain encoder's progress, warnings of our code). Everything else workers
# print (Ray Train's INFO lines, internal threads' tracebacks, C++ core_worker messages) stays in Ray's log files.
OWN_WORKER_LINES = ("encoder step", "chain:", "synthetic:", "warning:", "error:", "note:")
WORKER_COUNT_HINT = "PYTHON worker processes have been started"


def route_worker_logs(forward_all: bool) -> None:
    """Forward only our own lines from Ray's workers to this terminal (all of them with `--ray-logs`).

    Ray prints what its workers write through one handler of its log dispatcher (ray.init(log_to_driver=True));
    it is replaced by a filtering one. Should that internal handler move, workers' output is not forwarded at all.
    """
    import ray._private.worker as ray_worker

    dispatcher = getattr(ray_worker, "global_worker_stdstream_dispatcher", None)
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if forward_all or dispatcher is None or printer is None or getattr(printer, "routed", False):
        return                                                 # routed already (a second ray.init in one process)
    ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)  # noqa: SLF001

    def ours(batch: dict[str, Any]) -> None:
        lines = [line for line in batch.get("lines", []) if line.lstrip().startswith(OWN_WORKER_LINES)]
        if lines:
            printer({**batch, "lines": lines}, ignore_prefix=ignore_prefix)

    def raylet_messages(batch: dict[str, Any], ignore_prefix: bool) -> None:
        # The raylet's messages (a worker killed for memory, a crash) stay, except its hint that many worker
        # processes started at once: every trial starts a Train controller and workers, so it is expected here.
        if batch.get("pid") == "raylet" and any(WORKER_COUNT_HINT in line for line in batch.get("lines", [])):
            return
        printer(batch, ignore_prefix=ignore_prefix)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", ours)
    raylet_messages.routed = True
    ray_worker.print_to_stdstream = raylet_messages     # what ray's error-message listener prints through


def connect_ray(address: str | None, forward_all: bool = False) -> None:
    """Attach to a running cluster (--address, $RAY_ADDRESS, `ray job submit`) or start a local one."""
    import logging

    import ray

    # Train's controller polls every 2 s by default; each report would cost that much (RAY_MLFLOW_NOTES.md).
    # A finished trial's workers release their CPUs a little late; waiting for them is not a failure.
    tuned = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
             **THREAD_ENV_DEFAULTS}   # a worker imports torch before any service module: set its wait policy here
    for key, value in tuned.items():
        os.environ.setdefault(key, value)
    # Inside `ray job submit`, Ray merges this with the job's runtime env and refuses conflicting keys: only
    # add what the job did not set itself.
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    preset = set(job_env.get("env_vars") or {})
    env = {"env_vars": {key: os.environ[key] for key in tuned if key not in preset}}
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers of an existing cluster do not inherit this process's environment: forward MLflow's HTTP limits and
    # the tracking credentials (service.tracking.move_credentials) so the URI itself never carries a secret.
    forwarded = (*HTTP_DEFAULTS, *CREDENTIAL_VARS) if address else tuple(HTTP_DEFAULTS)
    env["env_vars"].update({key: os.environ[key] for key in forwarded if key in os.environ and key not in preset})
    context = ray.init(address=address or None, runtime_env=env, log_to_driver=True)
    install_sigterm_handler()   # ray.init's own handler would exit without closing the MLflow runs
    if not forward_all:
        route_worker_logs(forward_all)
        # Tune's status table and trial errors are printed, not logged; its INFO records ("Wrote the latest version
        # of all result files ...") are not for the user, its warnings (e.g. a trial that cannot fit) are.
        for name in ("ray.tune", "ray.train", "ray.air"):
            logging.getLogger(name).setLevel(logging.WARNING)
        session = (getattr(context, "address_info", None) or {}).get("session_dir") or "/tmp/ray/session_latest"
        print(f"Ray's own output (workers, Train controllers): {session}/logs on each node, or `ray logs`; "
              "--ray-logs shows it here", file=sys.stderr)


def default_concurrency(workers: int, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """Trials that fit the cluster at once: workers x CPUs (and GPUs) per trial, never oversubscribed."""
    import ray

    res = ray.cluster_resources()
    by_cpu = int(res.get("CPU", 1) // max(1e-9, workers * cpus_per_worker))
    by_gpu = int(res.get("GPU", 0) // (workers * gpus_per_worker)) if gpus_per_worker else by_cpu
    return max(1, min(by_cpu, by_gpu))


class MLflowTrialCloser(tune.Callback):
    """Tune callback (driver side): mark each trial's MLflow run finished / early-stopped / failed.

    A run opened in a worker stays RUNNING when ASHA stops the trial (the worker's code after its last report
    never runs), so the driver closes it. A trial the scheduler stopped ends FINISHED with tag
    trial_state=early_stopped (it ran as intended, only shorter); only a trial that failed ends FAILED.
    """

    def __init__(self, uri: str, experiment: str, total_steps: int):
        self.uri, self.experiment, self.total_steps = uri, experiment, total_steps
        self.started: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.time()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, failed=True)
        # Workers' tracebacks are not forwarded to this terminal (route_worker_logs): say why the trial failed.
        error_file = getattr(trial, "error_file", None)
        lines = Path(error_file).read_text(errors="replace").strip().splitlines() if error_file and \
            Path(error_file).is_file() else []
        print(f"trial {trial.trial_id} failed: {lines[-1] if lines else 'no error message'} "
              f"(traceback: {error_file})", file=sys.stderr)

    def _close(self, trial, failed: bool) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        from service.trial import TRIAL_TAG

        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            return
        runs = client.search_runs([exp.experiment_id], f"tags.{TRIAL_TAG} = '{trial.trial_id}'", max_results=1)
        if not runs:
            return
        run = runs[0]
        step = int((trial.last_result or {}).get("step", 0))
        state = "failed" if failed else ("finished" if step >= self.total_steps else "early_stopped")
        client.set_tag(run.info.run_id, "trial_state", state)
        timing = trial_timing(self.started.pop(trial.trial_id, None), trial.last_result or {}, time.time())
        if timing:
            client.log_batch(run.info.run_id, [Metric(key, value, int(time.time() * 1000), step)
                                               for key, value in timing.items()])
        if run.info.status == "RUNNING" or failed:
            client.set_terminated(run.info.run_id, "FAILED" if failed else "FINISHED")


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


def search_algorithm(kind: str, seed: int, concurrency: int):
    """The seeded searcher: the same command samples the same configs (random search: Tune's variant generator)."""
    if kind == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise InputError("--search optuna needs the optional extra: pip install -e '.[optuna]'") from None
        return OptunaSearch(seed=seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # A SearchGenerator takes its concurrency itself (Tune ignores max_concurrent_trials for it).
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=seed)


# ----------------------------------------------------------------------------------------------
# What a researcher reads: the ranked trials (stderr, trials.csv) and a runs-table view in MLflow
# ----------------------------------------------------------------------------------------------

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


def ranked_trials(children: list, space: SearchSpace, best_run_id: str | None = None) -> list[dict[str, Any]]:
    """One row per trial run: the ones the best config may come from by objective (rank 1 = best; among ties, the
    run the best config came from), then the rest."""
    rows = []
    for run in children:
        tags, value = run.data.tags, run.data.metrics.get(space.objective)
        row = {"rank": "", "trial": tags.get(TRIAL_ID_TAG, ""), space.objective: value,
               **{key: run.data.params.get(key) for key in space.params}}
        if space.inference is not None:
            row["best_t_test"] = tags.get("best_t_test")
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


def format_trials_table(rows: list[dict[str, Any]], space: SearchSpace) -> str:
    """The ranked trials as a short fixed-width table (searched keys by their short names)."""
    columns = ["rank", "trial", space.objective, *space.params,
               *(["best_t_test"] if space.inference is not None else []), "best_step", "trial_state"]
    headers = {key: param_label(key) for key in space.params} | {"best_t_test": "t_test", "best_step": "step",
                                                                  "trial_state": "state"}
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


def view_columns(space: SearchSpace) -> list[str]:
    """The runs-table columns that tell trials apart: objective, searched params, chosen t_test, state."""
    return [column_key("metrics", space.objective), column_key("metrics", space.metric),
            *(column_key("params", key) for key in space.params),
            *([column_key("tags", "best_t_test")] if space.inference is not None else []),
            column_key("tags", "best_step"), column_key("tags", "trial_state"), column_key("tags", TRIAL_ID_TAG)]


def report_trials(parent: MLflowReporter, experiment: str, uri: str, name: str, sweep_path: Path, split: str,
                  space: SearchSpace, best_run_id: str | None = None) -> dict[str, Any]:
    """Print the ranked trials, write them as trials.csv (sweep folder and parent run), share a runs-table view;
    log the sweep's own overhead on the parent run."""
    client = parent.client
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent.run_id}'", max_results=1000)
    rows = ranked_trials(children, space, best_run_id)
    print(f"[{split}] trials of sweep {name}, best {space.objective} first:\n{format_trials_table(rows, space)}",
          file=sys.stderr)
    out = atomic_write_text(sweep_path / "trials.csv", trials_csv(rows))
    parent.log_artifact(out)
    share_runs_view(client, exp_id, name, view_columns(space), search_filter=f"tags.sweep = '{name}'",
                    order_by=column_key("metrics", space.objective), expanded=[parent.run_id])
    return {"trials_csv": str(out), "mlflow_view": ui_link(uri, exp_id, name), **report_overhead(parent, split, rows)}


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


# ----------------------------------------------------------------------------------------------
# One split
# ----------------------------------------------------------------------------------------------

def run_split(args, method: str, split: str, base: dict[str, Any], space: SearchSpace, num_samples: int,
              uri: str) -> dict[str, Any]:
    """Sweep one split; returns the summary (best trial, metric, best-config path)."""
    import ray

    from service.trial import trial_resources, tune_trial

    cfg = build_config(METHOD_CONFIGS[method], base)
    storage = args.storage_path.expanduser().resolve()
    name = sweep_dir_name(method, split, args.smoke, storage, args.name, args.resume)
    sweep_path = storage / name
    state_path = sweep_path / STATE_FILE
    lock_dir(sweep_path)                        # a second driver on this sweep is refused, never a second writer
    state = json.loads(state_path.read_text()) if args.resume and state_path.is_file() else {}
    experiment = args.experiment_name or state.get("experiment") or sweep_experiment(method, split)
    driver = sweep_driver(state, args.trial_driver, args.workers_per_trial, name)

    print(f"[{split}] preparing data and text once for the whole sweep ...", file=sys.stderr)
    t0 = time.perf_counter()
    data_ref = ray.put(SWEEP_METHODS[method].prepare(cfg))
    prep_s = time.perf_counter() - t0

    parent = MLflowReporter.start(uri, experiment, name, run_id=state.get("parent_run_id"),
                                  tags=standard_tags(split=split, phase="sweep", method=method, sweep=name))
    if parent.run_id != state.get("parent_run_id"):     # new sweep, or its parent run was deleted: a new parent
        parent.log_params({"sweep.num_samples": num_samples, "sweep.scheduler": args.scheduler,
                           "sweep.search": args.search, "sweep.seed": args.seed,
                           "sweep.workers_per_trial": args.workers_per_trial, "sweep.split": split,
                           "sweep.metric": space.metric, "sweep.objective": space.objective})
        parent.log_text(yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False), "search_space.yaml")
        parent.log_text(dump_yaml(cfg), "base_config.yaml")
        sweep_path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(state_path, json.dumps({"parent_run_id": parent.run_id, "tracking_uri": uri,
                                                  "experiment": experiment, "split": split, "driver": driver}))

    settings = {
        "method": method, "metric": space.metric, "base": base, "space": space.model_dump(mode="json"),
        "default_T": cfg.diffusion.num_train_timesteps if space.inference is not None else None,
        "seed": args.seed, "workers_per_trial": args.workers_per_trial, "gpus_per_worker": args.gpus_per_worker,
        "cpus_per_worker": args.cpus_per_worker, "trial_retries": args.trial_retries,
        "tracking_uri": uri, "experiment": experiment, "parent_run_id": parent.run_id, "split": split, "sweep": name,
        "storage_path": str(storage / f"{name}-train"), "data_ref": data_ref,
        "driver": driver,
    }
    trainable = tune.with_resources(tune.with_parameters(tune_trial, settings=settings), trial_resources(settings))
    n_evals = -(-cfg.train.steps // cfg.train.eval_every)
    scheduler = (tune.schedulers.ASHAScheduler(time_attr="training_iteration", max_t=n_evals + 1, grace_period=1,
                                               reduction_factor=2)
                 if args.scheduler == "asha" and n_evals > 1 else tune.schedulers.FIFOScheduler())
    concurrency = args.max_concurrent or default_concurrency(args.workers_per_trial, args.cpus_per_worker,
                                                             args.gpus_per_worker)
    search_alg = search_algorithm(args.search, args.seed, concurrency)
    run_config = tune.RunConfig(
        name=name, storage_path=str(storage),
        failure_config=tune.FailureConfig(max_failures=args.trial_retries),
        callbacks=[MLflowTrialCloser(uri, experiment, cfg.train.steps)], verbose=1)
    if args.resume and tune.Tuner.can_restore(str(sweep_path)):
        print(f"[{split}] resuming {sweep_path}", file=sys.stderr)
        tuner = tune.Tuner.restore(str(sweep_path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space.tune_param_space(),
            # Ranked (Tune's status table, ASHA) on the objective, the key the best config is chosen on too.
            tune_config=tune.TuneConfig(metric=space.objective, mode=space.mode, scheduler=scheduler,
                                        search_alg=search_alg, num_samples=num_samples,
                                        max_concurrent_trials=None if args.search == "random" else concurrency,
                                        # direct trials reuse the trial process (no new actor, torch imported
                                        # once): the first metric ~2 s after start instead of ~5.5 s.
                                        reuse_actors=driver == "direct"),
            run_config=run_config)
    print(f"[{split}] sweep {name}: {num_samples} trials, {concurrency} at a time, "
          f"{args.workers_per_trial} worker(s) each ({driver} driver), {args.search} search with seed {args.seed}; "
          f"objective {space.objective} ({space.mode} of {space.metric} over a trial's evaluations)", file=sys.stderr)
    t1 = time.perf_counter()
    with sigterm_stops_tune():
        results = tuner.fit()
    fit_s = time.perf_counter() - t1
    if SIGTERM_RECEIVED.is_set():        # Tune stopped gracefully and saved its state: resumable with --resume
        parent.finish("KILLED")
        raise Terminated(f"sweep {name} stopped")
    summary = finish_split(parent, experiment, uri, name, sweep_path, split, space, method)
    summary.update(prepare_s=round(prep_s, 2), fit_s=round(fit_s, 1), errors=results.num_errors,
                   trials=len(results), seed=args.seed, experiment=experiment)
    parent.log_metrics({"sweep/fit_seconds": fit_s, "sweep/prepare_seconds": prep_s,
                        f"sweep/best_{space.objective.replace('/', '_')}": summary.get("best_metric", float("nan"))}, 0)
    summary.update(report_trials(parent, experiment, uri, name, sweep_path, split, space, summary.get("best_run_id")))
    if summary.get("best_run_id") is None:      # every trial failed or reported no finite metric: nothing to rank
        from service.encoder import input_error_cause

        failures = [r.error for r in results if r.error is not None]
        causes = [input_error_cause(e) for e in failures]
        why = next((str(c) for c in causes if c is not None), str(failures[0]).strip().splitlines()[-1] if failures else "")
        summary.update(input_error=bool(failures) and None not in causes, error=(
            f"[{split}] no trial produced a finite {space.metric} ({len(failures)} of {len(results)} trials failed"
            f"{': ' + why if why else ''}); no best config written"))
        parent.set_tags({"sweep_error": summary["error"][:5000]})
        parent.finish("FAILED")
        return summary
    parent.finish("FINISHED")
    return summary


def sweep_driver(state: dict[str, Any], choice: str, workers: int, name: str) -> str:
    """The trial driver of this sweep: a resumed sweep keeps the one it started with (its trials' checkpoints live
    where that driver put them, and Tune restores each trial's reserved resources); sweeps whose state file
    predates the choice ran TorchTrainers."""
    from service.trial import trial_driver

    wanted = trial_driver(choice, workers)
    if not state:
        return wanted
    stored = state.get("driver", "train")
    if (choice != "auto" and wanted != stored) or (stored == "direct" and workers > 1):
        raise InputError(f"--resume: sweep {name} was started with the {stored} trial driver "
                         f"({'one worker per trial' if stored == 'direct' else 'a TorchTrainer per trial'}); resume it "
                         f"with that driver (--trial-driver auto or {stored}, and the same --workers-per-trial)")
    return stored


def eligible_for_best(run, metric: str) -> bool:
    """A trial run the best config may come from: it reported a finite `metric` and did not fail.

    A failed trial (a diverged loss, a crash after its retries) may have reported good validation scores before
    it failed; its config is not one that trains, so it never wins. ASHA-stopped trials (status KILLED, tag
    trial_state=early_stopped) stay eligible: their best reported value is real.
    """
    value = run.data.metrics.get(metric)
    failed = run.info.status == "FAILED" or run.data.tags.get("trial_state") == "failed"
    return value is not None and math.isfinite(value) and not failed


def finish_split(parent: MLflowReporter, experiment: str, uri: str, name: str, sweep_path: Path, split: str,
                 space: SearchSpace, method: str = "tdsm") -> dict[str, Any]:
    """Pick the best child run from MLflow (robust to a stale Tune snapshot) and write its config."""
    client = parent.client
    exp = client.get_experiment_by_name(experiment)
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'",
                                  max_results=1000)
    metric = f"{space.metric}_max"
    scored = [r for r in children if eligible_for_best(r, metric)]
    if not scored:
        return {"split": split, "best_run_id": None, "children": len(children)}
    best = max(scored, key=lambda r: r.data.metrics[metric] if space.mode == "max" else -r.data.metrics[metric])
    local = Path(client.download_artifacts(best.info.run_id, "config.yaml", str(sweep_path)))
    best_tree, notes = SWEEP_METHODS[method].best_config(yaml.safe_load(local.read_text()), best)
    best_cfg = build_config(METHOD_CONFIGS[method], best_tree)
    chosen = "".join(f", {k} = {v}" for k, v in notes.items())
    header = (f"# best config of sweep {name} (split {split})\n# trial run {best.info.run_id}: "
              f"{metric}={best.data.metrics[metric]:.2f}{chosen} (chosen on validation)\n"
              f"# parent run {parent.run_id}; tracking {uri}\n")
    out = atomic_write_text(sweep_path / "best_config.yaml", header + dump_yaml(best_cfg))
    parent.log_artifact(out)
    parent.set_tags({"best_run_id": best.info.run_id, "best_config": str(out)})
    return {"split": split, "best_run_id": best.info.run_id, "best_trial": best.data.tags.get("ray_trial_name"),
            "best_metric": round(best.data.metrics[metric], 3), "metric": metric, **notes,
            "best_config": str(out), "children": len(children), "parent_run_id": parent.run_id}


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # a bar per download reads as noise
    method = SWEEP_METHODS[args.method]
    if args.workers_per_trial > 1 and not method.multi_worker:
        raise InputError(f"--workers-per-trial {args.workers_per_trial}: {args.method} trials run one worker "
                         "(its fit loop has no DDP yet)")
    from service.trial import trial_driver

    trial_driver(args.trial_driver, args.workers_per_trial)          # direct with DDP: refused before Ray starts
    space_path = args.space or REPO_SPACES / f"{args.method}.yaml"
    space = load_search_space(space_path)
    if space.method != args.method:
        raise InputError(f"{space_path}: a search space for {space.method}, not {args.method}")
    smoke_cfg = space.smoke.config if (args.smoke and space.smoke) else {}
    if args.smoke:
        space = space.for_smoke()
    num_samples = args.num_samples or (space.smoke.num_samples if args.smoke and space.smoke else 16)
    cfg = resolve_config(args.method, args, extra=smoke_cfg)
    searched = [item.split("=", 1)[0].strip() for item in args.overrides
                if item.split("=", 1)[0].strip() in space.params]
    if searched:     # each trial's sampled value would silently replace it
        raise InputError(f"--set {searched[0]}: {space_path} searches this key (params.{searched[0]}); fix it there "
                         "(e.g. {choice: [VALUE]}) or pass a --space without it")
    names = args.splits or default_splits(args.method, args)
    splits = (load_splits(splits_file(args.method, args.splits_file), names) if names
              else [(method.split_name(cfg), {})])
    if args.print_config:    # as service.run: each split applied, its chain resolved to cached paths, nothing trained
        from service.run import resolved_config_yaml

        print("---\n".join(resolved_config_yaml(args.method, cfg, split, overrides if names else None,
                                              splits_file(args.method, args.splits_file),
                                              args.storage_path.expanduser().resolve())
                             for split, overrides in splits), end="")
        return 0
    uri = resolve_tracking_uri(args.tracking_uri)
    config_cls = METHOD_CONFIGS[args.method]
    storage = args.storage_path.expanduser().resolve()

    def split_tree(overrides: dict[str, Any]) -> dict[str, Any]:
        tree = method.absolute_paths(build_config(config_cls, to_plain(cfg), overrides).model_dump(mode="json"))
        check_against_config(space, config_cls, tree, space_path)
        return tree

    for _, overrides in splits:      # every config and space checked before Ray starts or a chain trains
        split_tree({k: v for k, v in overrides.items() if k != "chain"})
    connect_ray(args.address, forward_all=args.ray_logs)
    from service.encoder import train_encoder_on_ray

    encoder_on_ray = functools.partial(train_encoder_on_ray, storage=storage / "chain-train", tracking_uri=uri,
                                       cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker)
    split_trees = [(split, split_tree(resolve_chain(overrides, storage, encoder_on_ray))) for split, overrides in splits]
    summaries = [run_split(args, args.method, split, tree, space, num_samples, uri) for split, tree in split_trees]
    import ray

    ray.shutdown()  # flush the workers' forwarded logs now, so the JSON summary stays the last stdout line
    for s in summaries:
        at = f" at t_test={s['best_t_test']}" if "best_t_test" in s else ""
        print(f"[{s['split']}] best trial {s.get('best_trial')} ({s.get('best_run_id')}): "
              f"{s.get('metric')}={s.get('best_metric')}{at}; "
              f"{s.get('children')} trial runs in {s.get('fit_s')} s", file=sys.stderr)
        print(f"[{s['split']}] best config: {s.get('best_config')}", file=sys.stderr)
        if s.get("trials_csv"):
            print(f"[{s['split']}] ranked trials: {s['trials_csv']}; MLflow runs table of this sweep (experiment "
                  f"{s.get('experiment')}): {s.get('mlflow_view')}", file=sys.stderr)
        print(f"[{s['split']}] final runs: python -m service.final --from {s.get('best_config')}", file=sys.stderr)
    print(f"browse: mlflow ui --workers 1 --backend-store-uri {uri}" if uri.startswith("sqlite") else f"browse: {uri}",
          file=sys.stderr)
    print(json.dumps({"sweeps": summaries, "tracking_uri": uri}))
    failed = [s for s in summaries if not s.get("best_run_id")]
    for s in failed:      # last on stderr; exit 2 when the trials failed on bad input (e.g. a diverging config)
        print(f"error: {s.get('error') or s['split'] + ': no best trial'}", file=sys.stderr)
    return 0 if not failed else (2 if all(s.get("input_error") for s in failed) else 1)


if __name__ == "__main__":
    sys.exit(main())
