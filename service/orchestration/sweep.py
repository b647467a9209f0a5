"""The sweep: Ray Tune over one split's search space, trials ranked on validation, the best config written.

Ray Tune samples configs from search_spaces/<method>.yaml; each trial trains in its Tune trial process (one
worker) or on a Ray Train TorchTrainer (N workers, DDP; service.orchestration.trial) and is ranked on validation
data (TDSM: classes carved from the seen ones; CoCoDiff: a draw of the training split), never on test. Every trial
is a nested MLflow run under one parent run per split; the best config is written as YAML for
`python -m service.final`. What differs per method comes from the `Method` object in `SweepOptions`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator

from service.data.chain import resolve_chain
from service.methods.base import Method, SweepOptions, trial_driver
from service.methods.implemented import implementation
from service.methods.search_space import SearchSpace
from service.orchestration.cluster import connect_ray, default_concurrency, input_error_cause
from service.orchestration.encoder import train_encoder_on_ray
from service.orchestration.run import resolved_config_yaml
from service.orchestration.trial import (
    ParentRun,
    TrialResources,
    TrialSettings,
    trial_resources,
    tune_trial,
)
from service.orchestration.tune_state import TuneStateLedger, check_resumable, record_storage_state
from service.process import SIGTERM_RECEIVED, Terminated, lock_dir, sigterm_stops_tune
from service.storage import Storage
from service.tracking.sources import STATE_FILE, read_state
from service.tracking.store import MLflowReporter, resolve_tracking_uri, standard_tags
from service.tracking.trials import (
    RUN_COLOR_TAG,
    SWEEP_COLOR,
    best_child,
    close_orphans,
    close_trial_run,
    report_trials,
    trial_timing,
    ui_command,
)
from trainers.config import build_config, dump_yaml, load_yaml
from trainers.errors import InputError
from trainers.io import stable_hash
from trainers.runtime import apply_thread_policy

STATE_SYNC_S = 10


def tune_param_space(space: SearchSpace) -> dict[str, Any]:
    """The searched params as Tune's sampling domains."""
    def domain(dist):
        if dist.kind == "choice":
            return tune.choice(dist.choice)
        lo, hi = getattr(dist, dist.kind)
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[dist.kind](lo, hi)

    return {key: domain(dist) for key, dist in space.params.items()}


def sweep_experiment(method: str, split: str) -> str:
    """Sweeps of a split get their own MLflow experiment: its charts never mix trials with demo or final runs."""
    return f"{method}-{split}-sweeps"


def sweep_dir_name(method: str, split: str, smoke: bool, storage: Storage, name: str | None, resume: bool) -> str:
    """The Tune experiment name: given, the latest matching one (resume), or a new timestamped one."""
    if name:
        return name
    prefix = f"{method}-{split}{'-smoke' if smoke else ''}-"
    if resume:
        found = sorted(n for n in storage.children() if n.startswith(prefix) and (storage / n / STATE_FILE).is_file())
        if not found:
            raise InputError(f"--resume: no sweep named {prefix}* under {storage}")
        return found[-1]
    return prefix + time.strftime("%Y%m%d-%H%M%S")


# ----------------------------------------------------------------------------------------------
# Tune's side: closing trial runs, the searcher
# ----------------------------------------------------------------------------------------------

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
        lines = read_error_file(error_file)
        print(f"trial {trial.trial_id} failed: {lines[-1] if lines else 'no error message'} "
              f"(traceback: {error_file})", file=sys.stderr)

    def _close(self, trial, failed: bool) -> None:
        result = trial.last_result or {}
        if result.get("tracking_outage_s"):
            print(f"warning: trial {trial.trial_id} could not reach the tracking server for "
                  f"{result['tracking_outage_s']:.0f} s; it buffered {result.get('tracking_buffered', 0)} metric "
                  "values and logged them once the server was back", file=sys.stderr)
        timing = trial_timing(self.started.pop(trial.trial_id, None), result, time.time())
        close_trial_run(self.uri, self.experiment, trial.trial_id, int(result.get("step", 0)), self.total_steps,
                        failed, timing)


def read_error_file(error_file: str | None) -> list[str]:
    """The lines of a failed trial's error file (a local path or, with object storage, a URI); [] if unreadable."""
    if not error_file:
        return []
    try:
        stored = Storage.parse(error_file)
        return stored.read_text().strip().splitlines() if stored.is_file() else []
    except Exception:       # the message is a courtesy: never let it hide the trial's failure
        return []


def search_algorithm(kind: str, seed: int, concurrency: int):
    """The seeded searcher: the same command samples the same configs (random search: Tune's variant generator)."""
    if kind == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise InputError("--search optuna needs the optional extra: pip install -e '.[optuna]'") from None
        return OptunaSearch(seed=seed)
    # A SearchGenerator takes its concurrency itself (Tune ignores max_concurrent_trials for it).
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=seed)


# ----------------------------------------------------------------------------------------------
# One split
# ----------------------------------------------------------------------------------------------

def run_split(opts: SweepOptions, method: Method, split: str, base: dict[str, Any]) -> dict[str, Any]:
    """Sweep one split; returns the summary (best trial, metric, best-config path)."""
    cfg = build_config(method.config_cls, base)
    storage, space, uri = opts.storage, opts.space, opts.tracking_uri
    name = sweep_dir_name(method.name, split, opts.smoke, storage, opts.name, opts.resume)
    sweep_path = storage / name
    # A second driver on this sweep is refused, never a second writer. An object store has no locks: a local lock
    # keyed by the URI refuses a second driver on this machine (one driver per sweep is the rule on a cluster).
    lock_dir(sweep_path.local if storage.is_local else
             Path(tempfile.gettempdir()) / "skeldiff-locks" / stable_hash(sweep_path.root)[:16])
    state = read_state(sweep_path) if opts.resume else {}
    experiment = opts.experiment_name or state.get("experiment") or sweep_experiment(method.name, split)
    driver = sweep_driver(state, opts.trial_driver, opts.workers_per_trial, name)

    print(f"[{split}] preparing data and text once for the whole sweep ...", file=sys.stderr)
    t0 = time.perf_counter()
    data_ref = ray.put(method.prepare(cfg))
    prep_s = time.perf_counter() - t0

    parent = MLflowReporter.start(uri, experiment, name, run_id=state.get("parent_run_id"),
                                  tags={**standard_tags(split=split, phase="sweep", method=method.name, sweep=name),
                                        RUN_COLOR_TAG: SWEEP_COLOR})
    with parent:    # a crash ends the parent run FAILED (Ctrl-C: KILLED), not RUNNING forever
        if parent.run_id != state.get("parent_run_id"):     # new sweep, or its parent run was deleted: a new parent
            parent.log_params({"sweep.num_samples": opts.num_samples, "sweep.scheduler": opts.scheduler,
                               "sweep.search": opts.search, "sweep.seed": opts.seed,
                               "sweep.workers_per_trial": opts.workers_per_trial, "sweep.split": split,
                               "sweep.metric": space.metric, "sweep.objective": space.objective})
            parent.log_text(yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False), "search_space.yaml")
            parent.log_text(dump_yaml(cfg), "base_config.yaml")
            (sweep_path / STATE_FILE).write_text(json.dumps({"parent_run_id": parent.run_id, "tracking_uri": uri,
                                                             "experiment": experiment, "split": split,
                                                             "driver": driver}))

        resources = TrialResources(driver=driver, workers_per_trial=opts.workers_per_trial,
                                   cpus_per_worker=opts.cpus_per_worker, gpus_per_worker=opts.gpus_per_worker)
        settings = TrialSettings(
            method=method, base=base, space=space, seed=opts.seed, resources=resources,
            parent=ParentRun(uri, experiment, parent.run_id), split=split, sweep=name,
            storage_path=str(storage / f"{name}-train"), data_ref=data_ref, options=opts.extra)
        trainable = tune.with_resources(tune.with_parameters(tune_trial, settings=settings), trial_resources(resources))
        n_evals = -(-cfg.train.steps // cfg.train.eval_every)
        scheduler = (tune.schedulers.ASHAScheduler(time_attr="training_iteration", max_t=n_evals + 1, grace_period=1,
                                                   reduction_factor=2)
                     if opts.scheduler == "asha" and n_evals > 1 else tune.schedulers.FIFOScheduler())
        concurrency = opts.max_concurrent or default_concurrency(opts.workers_per_trial, opts.cpus_per_worker,
                                                                 opts.gpus_per_worker)
        search_alg = search_algorithm(opts.search, opts.seed, concurrency)
        run_config = tune.RunConfig(
            name=name, storage_path=str(storage),       # a folder or a URI: Ray resolves it with pyarrow.fs
            # Tune uploads its experiment state at most every sync_period (default 300 s): a driver killed in between
            # resumes from a state minutes old and re-runs the trials finished since. A few KB every 10 s instead.
            sync_config=tune.SyncConfig(sync_period=STATE_SYNC_S),
            failure_config=tune.FailureConfig(max_failures=opts.trial_retries),
            callbacks=[MLflowTrialCloser(uri, experiment, cfg.train.steps), TuneStateLedger(uri, parent.run_id)],
            verbose=1)
        if opts.resume and tune.Tuner.can_restore(str(sweep_path)):
            check_resumable(sweep_path, uri, state.get("parent_run_id"))    # Tune's pickles, vouched for by MLflow
            print(f"[{split}] resuming {sweep_path}", file=sys.stderr)
            tuner = tune.Tuner.restore(str(sweep_path), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=tune_param_space(space),
                # Ranked (Tune's status table, ASHA) on the objective, the key the best config is chosen on too.
                tune_config=tune.TuneConfig(metric=space.objective, mode=space.mode, scheduler=scheduler,
                                            search_alg=search_alg, num_samples=opts.num_samples,
                                            max_concurrent_trials=None if opts.search == "random" else concurrency,
                                            # direct trials reuse the trial process (no new actor, torch imported
                                            # once): the first metric ~2 s after start instead of ~5.5 s.
                                            reuse_actors=driver == "direct"),
                run_config=run_config)
        record_storage_state(sweep_path, uri, parent.run_id)    # tuner.pkl, written by Tuner() straight to storage
        print(f"[{split}] sweep {name}: {opts.num_samples} trials, {concurrency} at a time, "
              f"{opts.workers_per_trial} worker(s) each ({driver} driver), {opts.search} search with seed "
              f"{opts.seed}; objective {space.objective} ({space.mode} of {space.metric} over a trial's evaluations)",
              file=sys.stderr)
        t1 = time.perf_counter()
        with sigterm_stops_tune():
            results = tuner.fit()
        fit_s = time.perf_counter() - t1
        record_storage_state(sweep_path, uri, parent.run_id)       # the state Tune uploaded last
        if SIGTERM_RECEIVED.is_set():        # Tune stopped gracefully and saved its state: resumable with --resume
            parent.finish("KILLED")
            raise Terminated(f"sweep {name} stopped")
        summary = finish_split(parent, experiment, uri, name, sweep_path, split, space, method)
        summary.update(prepare_s=round(prep_s, 2), fit_s=round(fit_s, 1), errors=results.num_errors,
                       trials=len(results), seed=opts.seed, experiment=experiment)
        best_key = f"sweep/best_{space.objective.replace('/', '_')}"
        parent.log_metrics({"sweep/fit_seconds": fit_s, "sweep/prepare_seconds": prep_s,
                            best_key: summary.get("best_metric", float("nan"))}, 0)
        summary.update(report_trials(parent, experiment, uri, name, sweep_path, split, space,
                                     summary.get("best_run_id"), method.chosen_tags))
        if summary.get("best_run_id") is None:      # every trial failed or reported no finite metric: nothing to rank
            failures = [r.error for r in results if r.error is not None]
            causes = [input_error_cause(e) for e in failures]
            last_line = str(failures[0]).strip().splitlines()[-1] if failures else ""
            why = next((str(c) for c in causes if c is not None), last_line)
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
    wanted = trial_driver(choice, workers)
    if not state:
        return wanted
    stored = state.get("driver", "train")
    if (choice != "auto" and wanted != stored) or (stored == "direct" and workers > 1):
        raise InputError(f"--resume: sweep {name} was started with the {stored} trial driver "
                         f"({'one worker per trial' if stored == 'direct' else 'a TorchTrainer per trial'}); resume it "
                         f"with that driver (--trial-driver auto or {stored}, and the same --workers-per-trial)")
    return stored


def finish_split(parent: MLflowReporter, experiment: str, uri: str, name: str, sweep_path: Storage, split: str,
                 space: SearchSpace, method: Method) -> dict[str, Any]:
    """Pick the best child run from MLflow (robust to a stale Tune snapshot) and write its config."""
    client = parent.client
    exp = client.get_experiment_by_name(experiment)
    close_orphans(client, exp.experiment_id, parent.run_id)
    metric = f"{space.metric}_max"
    best = best_child(client, exp.experiment_id, parent.run_id, metric, space.mode)
    if best is None:
        return {"split": split, "best_run_id": None}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(best.info.run_id, "config.yaml", tmp))
        best_tree, notes = method.best_config(load_yaml(local), best.data.tags)   # aliases bounded
    best_cfg = build_config(method.config_cls, best_tree)
    chosen = "".join(f", {k} = {v}" for k, v in notes.items())
    header = (f"# best config of sweep {name} (split {split})\n# trial run {best.info.run_id}: "
              f"{metric}={best.data.metrics[metric]:.2f}{chosen} (chosen on validation)\n"
              f"# parent run {parent.run_id}; tracking {uri}\n")
    text = header + dump_yaml(best_cfg)
    out = (sweep_path / "best_config.yaml").write_text(text)     # a folder or object storage (service.storage)
    parent.log_text(text, "best_config.yaml")
    parent.set_tags({"best_run_id": best.info.run_id, "best_config": str(out)})
    return {"split": split, "best_run_id": best.info.run_id, "best_trial": best.data.tags.get("ray_trial_name"),
            "best_metric": round(best.data.metrics[metric], 3), "metric": metric, **notes,
            "best_config": str(out), "parent_run_id": parent.run_id}



def run_sweeps(opts: SweepOptions, splits: list[tuple[str, dict[str, Any]]],
               split_tree: Callable[[dict[str, Any]], dict[str, Any]]) -> list[dict[str, Any]]:
    """Connect to Ray, build each split's skeleton chain (its encoder on Ray Train workers), then sweep the splits
    one after another; returns their summaries. `split_tree`: a split's overrides -> its checked config tree."""
    storage, uri = opts.storage, opts.tracking_uri
    method = implementation(opts.method)
    if opts.resume:           # Tune's state vouched for before Ray starts (run_split checks again before restoring)
        for split, _ in splits:
            sweep = storage / sweep_dir_name(method.name, split, opts.smoke, storage, opts.name, True)
            if (sweep / "tuner.pkl").is_file():
                check_resumable(sweep, uri, read_state(sweep).get("parent_run_id"))
    connect_ray(opts.address, forward_all=opts.ray_logs)
    encoder_on_ray = functools.partial(train_encoder_on_ray, storage=storage / "chain-train", tracking_uri=uri,
                                       cpus_per_worker=opts.cpus_per_worker, gpus_per_worker=opts.gpus_per_worker)
    trees = [(split, split_tree(resolve_chain(overrides, storage, encoder_on_ray))) for split, overrides in splits]
    summaries = [run_split(opts, method, split, tree) for split, tree in trees]
    ray.shutdown()  # flush the workers' forwarded logs now, so the JSON summary stays the last stdout line
    return summaries


def config_yamls(config_cls: type, cfg: Any, splits: list[tuple[str, dict[str, Any]]], splits_path: Path,
                 storage: Storage, comment: str) -> str:
    """`service.sweep --print-config` with named splits: each split applied, its chain resolved to cached paths
    (generated and prepared if missing, never trained), as YAML documents."""
    return "---\n".join(resolved_config_yaml(config_cls, cfg, split, overrides, splits_path, storage, comment)
                         for split, overrides in splits)


def sweep(opts: SweepOptions, splits: list[tuple[str, dict[str, Any]]],
          split_tree: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """`service.sweep` once its command line is checked: sweep each split, print what to do next; the exit code
    (0; 2 when every failed split failed on bad input; 1 otherwise)."""
    apply_thread_policy()
    uri = resolve_tracking_uri(opts.tracking_uri)
    opts = dataclasses.replace(opts, tracking_uri=uri)
    opts.storage.check_writable()      # a missing bucket or credentials: one line now, not inside Ray later
    summaries = run_sweeps(opts, splits, split_tree)
    for s in summaries:
        chosen = "".join(f" at {tag.removeprefix('best_')}={s[tag]}" for tag in opts.method.chosen_tags if tag in s)
        print(f"[{s['split']}] best trial {s.get('best_trial')} ({s.get('best_run_id')}): "
              f"{s.get('metric')}={s.get('best_metric')}{chosen}; "
              f"{s.get('children')} trial runs in {s.get('fit_s')} s", file=sys.stderr)
        print(f"[{s['split']}] best config: {s.get('best_config')}", file=sys.stderr)
        if s.get("trials_csv"):
            print(f"[{s['split']}] ranked trials: {s['trials_csv']}; MLflow runs table of this sweep (experiment "
                  f"{s.get('experiment')}): {s.get('mlflow_view')}", file=sys.stderr)
            print(f"[{s['split']}] its charts, objective first: {s.get('mlflow_charts')}", file=sys.stderr)
        print(f"[{s['split']}] final runs: python -m service.final --from {s.get('best_config')}", file=sys.stderr)
    print(f"browse: {ui_command(uri)}", file=sys.stderr)
    print(json.dumps({"sweeps": summaries, "tracking_uri": uri}))
    failed = [s for s in summaries if not s.get("best_run_id")]
    for s in failed:      # last on stderr; exit 2 when the trials failed on bad input (e.g. a diverging config)
        print(f"error: {s.get('error') or s['split'] + ': no best trial'}", file=sys.stderr)
    return 0 if not failed else (2 if all(s.get("input_error") for s in failed) else 1)
