"""Resume without trusting the storage: Tune's state files are pickles, vouched for by the sweep's MLflow run.

`Tuner.restore()` unpickles the state Tune wrote under `<storage>/<sweep>` (tuner.pkl, experiment_state-*.json
with cloudpickled values, the searcher's state): whoever can write there could run code in the next driver that
resumes it. Storage is shared by every node and, as a bucket, by everyone with write access to it; the MLflow
tracking server is another trust domain. So the sweep records the sha256 of every Tune state file it writes, as
Tune writes it, in an artifact of its MLflow parent run (`TuneStateLedger`), and `--resume` refuses, in one line,
any state file whose content that record does not hold, a sweep with no record, and a local sweep folder that
other users can write (`check_resumable`). What the service itself reads from storage is data, never code:
checkpoints load with torch's weights-only unpickler, configs and state as safe YAML / JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

from ray import tune

from service.storage import Storage
from service.tracking.store import patient_client
from trainers.errors import InputError

LEDGER = "tune_state_sha256.json"
# Files of the sweep folder that are ours (plain data) or Tune's storage check: everything else at its top level is
# Tune state that Tuner.restore may unpickle.
NOT_TUNE_STATE = {"skeldiff_sweep.json", "best_config.yaml", "trials.csv", ".lock", ".validate_storage_marker"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_tune_state(name: str) -> bool:
    return name not in NOT_TUNE_STATE and not name.startswith(".skeldiff-probe")


class TuneStateLedger(tune.Callback):
    """Tune callback (driver side): hash the state files of the driver's staging folder, which Tune uploads to
    storage as they are, and add any new digest to the ledger artifact of the sweep's parent run. Tune asks its
    callbacks for their state (get_state) right after writing its own state files and before uploading them, so
    each version is recorded before storage can hold it; after each step and at the end it looks again. Every
    version ever written is kept: the copy in storage may lag the newest by one upload period."""

    def __init__(self, tracking_uri: str, parent_run_id: str):
        self.tracking_uri, self.parent_run_id = tracking_uri, parent_run_id
        self._known: dict[str, list[str]] | None = None
        self._seen: dict[str, tuple[int, int]] = {}
        self._folder: Path | None = None

    def __getstate__(self):     # Tune pickles its callbacks into tuner.pkl: only what identifies the ledger
        return {"tracking_uri": self.tracking_uri, "parent_run_id": self.parent_run_id}

    def __setstate__(self, state) -> None:
        self.__init__(state["tracking_uri"], state["parent_run_id"])

    def _staging(self, trials) -> Path | None:
        if trials and self._folder is None:
            self._folder = Path(trials[0].storage.experiment_driver_staging_path)
        return self._folder

    def on_step_begin(self, iteration, trials, **info):
        self._staging(trials)

    def get_state(self):
        if self._folder is not None:
            self.record(self._folder)
        return None             # nothing of ours to save: Tune then writes no callback-state pickle either

    def on_step_end(self, iteration, trials, **info):
        if (folder := self._staging(trials)) is not None:
            self.record(folder)

    def on_experiment_end(self, trials, **info):
        self.on_step_end(0, trials)

    def record(self, folder: Path) -> None:
        if not folder.is_dir():
            return
        if self._known is None:
            self._known = read_ledger(self.tracking_uri, self.parent_run_id) or {}
        changed = False
        for path in sorted(folder.iterdir()):
            if not path.is_file() or not is_tune_state(path.name):
                continue
            st = path.stat()
            if self._seen.get(path.name) == (st.st_mtime_ns, st.st_size):
                continue
            self._seen[path.name] = (st.st_mtime_ns, st.st_size)
            digests = self._known.setdefault(path.name, [])
            digest = sha256(path.read_bytes())
            if digest not in digests:
                digests.append(digest)
                changed = True
        if changed:
            patient_client(self.tracking_uri, "recording the sweep's Tune state").log_text(
                self.parent_run_id, json.dumps(self._known, sort_keys=True), LEDGER)


def record_storage_state(sweep: Storage, tracking_uri: str, parent_run_id: str) -> None:
    """Add the digests of the state files now in storage (the final upload of a finished or stopped fit)."""
    known = read_ledger(tracking_uri, parent_run_id) or {}
    changed = False
    for name in filter(is_tune_state, sweep.children()):
        obj = sweep / name
        if obj.is_file() and (digest := sha256(obj.read_bytes())) not in known.setdefault(name, []):
            known[name].append(digest)
            changed = True
    if changed:
        patient_client(tracking_uri, "recording the sweep's Tune state").log_text(
            parent_run_id, json.dumps(known, sort_keys=True), LEDGER)


def read_ledger(tracking_uri: str, parent_run_id: str) -> dict[str, list[str]] | None:
    """The ledger artifact of a sweep's parent run; None when there is none."""
    client = patient_client(tracking_uri, "reading the sweep's Tune state record")
    if LEDGER not in {a.path for a in client.list_artifacts(parent_run_id)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        data = json.loads(Path(client.download_artifacts(parent_run_id, LEDGER, tmp)).read_text())
    if not isinstance(data, dict):
        return None
    return {str(k): [str(d) for d in v] for k, v in data.items() if isinstance(v, list)}


def check_resumable(sweep: Storage, tracking_uri: str, parent_run_id: str | None) -> None:
    """Refuse (one line) to let Tune unpickle state that the sweep's MLflow record does not vouch for."""
    if sweep.is_local:
        check_private(sweep.local)
    if not parent_run_id:
        raise InputError(f"--resume: {sweep} has no sweep state file naming its MLflow parent run; refusing to load "
                         "its Tune state (pickles) without a record of what the sweep wrote")
    known = read_ledger(tracking_uri, parent_run_id)
    if known is None:
        raise InputError(f"--resume: the sweep's parent run {parent_run_id} in {tracking_uri} has no {LEDGER} "
                         f"(a sweep started before the record existed, or not by this service): refusing to load "
                         f"the Tune state in {sweep}; start the sweep again under a new --name")
    for name in filter(is_tune_state, sweep.children()):
        obj = sweep / name
        if obj.is_file() and sha256(obj.read_bytes()) not in known.get(name, []):
            raise InputError(f"--resume: {obj} is not a file this sweep wrote (its sha256 is not in {LEDGER} of "
                             f"parent run {parent_run_id}); refusing to unpickle it. Remove it if a Tune state of "
                             "another version of this file is present, or start the sweep again under a new --name")


def check_private(folder: Path) -> None:
    """A local sweep folder (and what is in it) must be writable by this user only."""
    uid = os.getuid()
    for path in [folder, *(p for p in folder.iterdir() if p.is_file() and is_tune_state(p.name))]:
        st = path.stat()
        if st.st_uid != uid or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise InputError(f"--resume: {path} is writable by other users (mode {stat.filemode(st.st_mode)}, owner "
                             f"uid {st.st_uid}); a resume unpickles what is there: chmod go-w it (and own it) first")
