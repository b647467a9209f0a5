"""The MLflow store: URI resolution (credentials out of the URI, a remote server probed), experiments, paged
searches, and `MLflowReporter`, the Reporter bound to one run (a context manager that ends it FINISHED, KILLED or
FAILED).

Uses `MlflowClient` with explicit run ids (no fluent "active run" state), so the same code works in the
driver, in a Ray Train worker and in a Tune callback. Ray's own `MLflowLoggerCallback` is not used: it cannot nest
trials under a parent run per split, nor find a retried or resumed trial's run instead of opening a second one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.git_utils import get_git_commit
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

from trainers.errors import InputError, ServiceUnavailable, short_repr
from trainers.tracking import Artifacts

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
# MLflow 3 opens an experiment without this tag in its GenAI view ("No data"); custom_model_development is the
# value its UI uses for model-training experiments (runs table with metric columns, model-metric charts).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


# MLflow's HTTP client retries 7 times with exponential backoff (about 250 s against a dead server) and waits
# 120 s per request; these defaults (used unless the user set them) keep a lost server from stalling a run.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD")
PROBE_TIMEOUT_S = 15.0   # a loaded server can take seconds for its first answer; refused connects fail at once
_checked: set[str] = set()   # servers already probed by this process


def redact_uri(uri: str) -> str:
    """The URI without its user:password@ part (what may be printed, logged or stored)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def move_credentials(uri: str) -> str:
    """A URI without its password, which goes where the client reads it instead: MLflow's HTTP client reads
    MLFLOW_TRACKING_USERNAME/PASSWORD, libpq (postgresql stores) reads PGPASSWORD. Ray workers inherit them
    (see service.orchestration.cluster.connect_ray), so no URI that is pickled, stored or printed carries the secret."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    scheme = parts.scheme.split("+", 1)[0]
    if scheme in ("http", "https"):
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
        return urlunsplit(parts._replace(netloc=host))
    if scheme == "postgresql":
        if password:
            os.environ["PGPASSWORD"] = unquote(password)
        return urlunsplit(parts._replace(netloc=f"{user}@{host}"))
    if password:
        raise InputError(f"tracking URI {redact_uri(uri)}: a password in a {parts.scheme} URI would be stored with "
                         "every run; use an http(s) server with MLFLOW_TRACKING_USERNAME/PASSWORD")
    return uri


def check_tracking_server(uri: str) -> None:
    """Fail in seconds, naming the URI, when an http(s) tracking server does not answer or refuses the login."""
    import requests

    if not uri.startswith(("http://", "https://")) or uri in _checked:
        return
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    probe = uri.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name"
    try:
        answer = requests.get(probe, params={"experiment_name": "Default"}, timeout=PROBE_TIMEOUT_S,
                              auth=(user, password or "") if user else None)
    except requests.RequestException as err:
        timed_out = isinstance(err, requests.Timeout)
        reason = f"timed out after {PROBE_TIMEOUT_S:.0f} s" if timed_out else "connection failed"
        raise InputError(f"tracking server {uri} is unreachable ({reason}): start it, or fix --tracking-uri / "
                         "$MLFLOW_TRACKING_URI") from None
    if answer.status_code in (401, 403):
        raise InputError(f"tracking server {uri} refused the credentials (HTTP {answer.status_code}): set "
                         "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    if answer.status_code >= 500:
        raise InputError(f"tracking server {uri} answered HTTP {answer.status_code}: is it an MLflow server?")
    _checked.add(uri)


def check_uri_syntax(uri: str, where: str) -> None:
    """A URI that urllib can split (`http://[::1` cannot: ValueError deep inside MLflow); the message names where it
    came from and never echoes a password."""
    try:
        parts = urlsplit(uri)
        parts.port                                      # noqa: B018 - parsing the port raises on a bad one
    except ValueError as err:
        raise InputError(f"{where} {short_repr(redact_uri_text(uri))}: not a valid URI ({err}); expected e.g. "
                         "http://host:5000 or sqlite:///path/mlflow.db") from None


def redact_uri_text(uri: str) -> str:
    """A URI string without anything between '://' and the last '@' (works on URIs urllib cannot parse)."""
    head, sep, rest = uri.partition("://")
    return f"{head}{sep}{rest.rsplit('@', 1)[1]}" if sep and "@" in rest else uri


def resolve_tracking_uri(cli_value: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite in the working directory; local paths made absolute,
    credentials moved into the environment (the result is safe to print and store), a remote server probed.

    Ray jobs and trials run in other directories, so a relative sqlite path would point somewhere else there.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):   # child processes inherit the environment: no secret in it either
        check_uri_syntax(os.environ["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = move_credentials(os.environ["MLFLOW_TRACKING_URI"])
    if cli_value:
        check_uri_syntax(cli_value, "--tracking-uri")
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(Path.cwd() / uri[len('sqlite:///'):]).resolve()}"
    elif "://" not in uri and uri.endswith(".db"):
        uri = f"sqlite:///{Path(uri).resolve()}"
    uri = move_credentials(uri)
    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        check_tracking_server(uri)
    return uri


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """Experiment id for `name`, created once as a model-training experiment; local stores get an absolute artifact
    folder beside the DB."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in exp.tags:      # created by an older version, or by hand
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return exp.experiment_id
    location = None
    uri = client.tracking_uri
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / DEFAULT_ARTIFACTS).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    except mlflow.exceptions.MlflowException:
        # Created concurrently by another process: read it back.
        return client.get_experiment_by_name(name).experiment_id


def standard_tags(**extra: Any) -> dict[str, str]:
    """Tags every skeldiff run carries."""
    # MLflow's own source tag (its UI shows it on the run page); SKELDIFF_GIT_COMMIT for a checkout without .git (a
    # Ray job's working dir, an image). Not mlflow's resolve_tags(): it reads sys.argv[0], Ray's script in a worker.
    commit = os.environ.get("SKELDIFF_GIT_COMMIT") or get_git_commit(str(Path(__file__).resolve().parent)) or "unknown"
    tags = {MLFLOW_GIT_COMMIT: commit, "host": socket.gethostname()}
    tags.update({k: str(v) for k, v in extra.items() if v is not None})
    return tags


# How long a run rides out a tracking server that does not answer (a restart, a network blip) before it gives up,
# and how often it tries again meanwhile. Metrics are buffered in memory and training goes on; every other call
# (params, tags, artifacts, the run's end) waits for the server.
OUTAGE_S = float(os.environ.get("SKELDIFF_TRACKING_OUTAGE_S", "300"))
RETRY_EVERY_S = 5.0
UNREACHABLE = ("Max retries exceeded", "Connection refused", "Connection aborted", "RemoteDisconnected",
               "Read timed out", "NewConnectionError", "too many 50")


def is_unreachable(err: BaseException) -> bool:
    """A server that does not answer (refused, reset, timed out, 5xx after MLflow's own retries), not one that
    refused the request."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    text = str(err)
    return isinstance(err, (mlflow.exceptions.MlflowException, OSError)) and any(s in text for s in UNREACHABLE)


class Outage:
    """Keeps one tracking server's outage: the warning when it starts, the note when it ends, the deadline."""

    def __init__(self, uri: str, what: str):
        self.uri, self.what = redact_uri(uri), what
        self.since: float | None = None
        self.next_try = 0.0
        self.total_s = 0.0          # seconds the server was unreachable, over every outage so far
        self.buffered = 0           # metric values that waited for it

    @property
    def down(self) -> bool:
        return self.since is not None

    def seconds(self) -> float:
        """Seconds unreachable so far, the outage going on included."""
        return self.total_s + (time.monotonic() - self.since if self.since is not None else 0.0)

    def failed(self, err: BaseException, pending: int = 0) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
            print(f"warning: tracking server {self.uri} unreachable ({self.what}): "
                  f"{str(err).strip().splitlines()[0][:160]}; buffering metrics and retrying every "
                  f"{RETRY_EVERY_S:.0f} s for up to {OUTAGE_S:.0f} s", file=sys.stderr)
        elif now - self.since > OUTAGE_S:
            raise ServiceUnavailable(
                f"tracking server {self.uri} unreachable for {now - self.since:.0f} s ({self.what}); "
                f"{pending} buffered metric values not logged. Re-run the same command once it is back: the run "
                "resumes and is marked FAILED or finished then") from None
        self.next_try = now + RETRY_EVERY_S

    def recovered(self, flushed: int = 0) -> None:
        if self.since is not None:
            down = time.monotonic() - self.since
            self.total_s += down
            self.buffered += flushed
            print(f"note: tracking server {self.uri} back after {down:.0f} s ({self.what}); "
                  f"{flushed} buffered metric values logged", file=sys.stderr)
        self.since = None

    def call(self, fn, *args, recover: bool = True, **kwargs):
        """fn(*args), waiting out an outage (a quick attempt every RETRY_EVERY_S) up to OUTAGE_S; recover=False
        leaves the end of the outage to the caller (MLflowReporter flushes its buffered metrics first)."""
        while True:
            try:
                with quick_attempts(self.down):
                    result = fn(*args, **kwargs)
            except Exception as err:
                if not is_unreachable(err):
                    raise
                self.failed(err)
                time.sleep(max(0.0, self.next_try - time.monotonic()))
                continue
            if recover:
                self.recovered()
            return result


class PatientClient:
    """An MlflowClient whose every call waits out an outage of the tracking server (Outage.call)."""

    def __init__(self, client: MlflowClient, outage: Outage):
        self._client, self._outage = client, outage
        self.tracking_uri = client.tracking_uri

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: self._outage.call(attr, *args, **kwargs)


def patient_client(uri: str, what: str) -> PatientClient:
    """MlflowClient(uri) riding out a tracking server outage of up to OUTAGE_S (a warning, then ServiceUnavailable)."""
    return PatientClient(MlflowClient(uri), Outage(uri, what))


@contextlib.contextmanager
def quick_attempts(enabled: bool):
    """While a server is known to be down, one HTTP attempt per call instead of MLflow's retries with backoff
    (~14 s each): the caller retries on its own schedule. MLflow reads the variable at each request."""
    if not enabled:
        yield
        return
    key = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
    before = os.environ.get(key)
    os.environ[key] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


class MLflowReporter:
    """Reporter (see trainers.tracking) bound to one MLflow run. Rides out a tracking server outage of up to
    OUTAGE_S: metrics are buffered (training goes on), other calls wait; past it, ServiceUnavailable (exit 3)."""

    def __init__(self, client: MlflowClient | PatientClient, run_id: str):
        self.raw = client._client if isinstance(client, PatientClient) else client
        self.run_id = run_id
        self.finished = False
        self.pending: list[Metric] = []
        self.outage = Outage(self.raw.tracking_uri, f"run {run_id}")
        self.client = PatientClient(self.raw, self.outage)   # what callers use directly waits out outages too

    def _send(self, fn, *args, **kwargs):
        result = self.outage.call(fn, *args, recover=False, **kwargs)
        if self.pending or self.outage.down:
            self._flush()             # the buffered metrics first, then the note that the server is back
        return result

    def _flush(self) -> None:
        try:
            with quick_attempts(self.outage.down):
                self.raw.log_batch(self.run_id, metrics=self.pending)
        except Exception as err:
            if not is_unreachable(err):
                raise
            self.outage.failed(err, len(self.pending))
            return
        flushed, self.pending = len(self.pending), []
        self.outage.recovered(flushed)

    @classmethod
    def start(cls, tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None, run_id: str | None = None) -> "MLflowReporter":
        """Open a new run (or re-open `run_id` when resuming), nested under `parent_run_id` when given."""
        client = patient_client(tracking_uri, f"opening run {run_name or run_id}")
        if run_id is not None:
            try:
                stage = client.get_run(run_id).info.lifecycle_stage
            except mlflow.exceptions.MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":     # e.g. a server gone mid-run: not a stale id
                    raise
                stage = "missing"
            if stage == "active":
                client.update_run(run_id, status="RUNNING")
                return cls(client, run_id)
            print(f"note: MLflow run {run_id} is {stage} in {tracking_uri}; starting a new run", file=sys.stderr)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(ensure_experiment(client, experiment), run_name=run_name, tags=all_tags)
        return cls(client, run.info.run_id)

    def __enter__(self) -> MLflowReporter:
        return self

    def __exit__(self, kind, err, tb) -> None:
        """End the run unless finish() already did: FINISHED, KILLED on Ctrl-C / SIGTERM, FAILED on any error."""
        if not self.finished:
            self.finish("FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")

    def log_params(self, params: dict[str, Any]) -> None:
        # One call: MLflow's client splits a batch into requests its server accepts (100 params each).
        self._send(self.raw.log_batch, self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._send(self.raw.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        if not self.outage.down or time.monotonic() >= self.outage.next_try:
            self._flush()          # while the server is down: buffered, retried every RETRY_EVERY_S

    def log_evaluation(self, metrics: dict[str, float], step: int, artifacts: Artifacts,
                       checkpoint_dir: Path | None) -> None:
        self.log_metrics(metrics, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._send(self.raw.log_artifact, self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self._send(self.raw.log_text, self.run_id, text, name)

    def log_figure(self, figure, name: str) -> None:
        """A matplotlib figure as an image artifact `name` (e.g. plots/val_confusion.png), then closed."""
        try:
            self._send(self.raw.log_figure, self.run_id, figure, name)
        finally:
            import matplotlib.pyplot as plt

            plt.close(figure)

    def finish(self, status: str = "FINISHED") -> None:
        self._send(self.raw.set_terminated, self.run_id, status=status)
        self.finished = True


def encoder_experiment(prepared_name: str) -> str:
    """The experiment of encoders trained on a prepared folder: `encoder-<its name>` (the embedded skeleton chain's:
    encoder-prepared-raw-12x46-s0)."""
    return f"encoder-{prepared_name}"


def start_encoder_run(tracking_uri: str, prepared_name: str, config: dict[str, Any], out: Path, unseen: list[int],
                      experiment: str | None = None, **params: Any) -> MLflowReporter:
    """The MLflow run of one encoder training (`service.encoder train`, the skeleton chain of run / final / sweep):
    run `<encoder name>-<out folder>` (the chain's out folder: encoder-<cache key>) of `encoder_experiment`, tag
    phase=encoder; params: the encoder config, the unseen classes and `params`, all as `encoder.*`. A context
    manager: the run ends FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED."""
    reporter = MLflowReporter.start(tracking_uri, experiment or encoder_experiment(prepared_name),
                                    f"{config['name']}-{Path(out).name}",
                                    tags=standard_tags(phase="encoder", method="encoder"))
    with contextlib.ExitStack() as stack:     # a refused log_params still ends the run (FAILED)
        stack.enter_context(reporter)
        reporter.log_params({f"encoder.{k}": v for k, v in {**config, "unseen": unseen, **params}.items()})
        stack.pop_all()
    return reporter


PAGE = 100   # runs per search request: every search pages on, none stops silently at MLflow's 1000 default


def experiment_ids(client) -> list[str]:
    """Every active experiment's id, page by page."""
    ids, token = [], None
    while True:
        page = client.search_experiments(max_results=PAGE, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def search_pages(client, ids: list[str], filter_string: str, order_by: list[str] | None = None):
    """Yield the matching runs page by page (PAGE per request) until the last page."""
    token = None
    while True:
        page = client.search_runs(ids, filter_string, order_by=order_by, max_results=PAGE, page_token=token)
        yield from page
        token = page.token
        if not token:
            return
