"""Where results live: a local/NFS folder or an object store (`s3://bucket/prefix`, `gs://...`, anything
`pyarrow.fs.FileSystem.from_uri` takes, which is what Ray Tune/Train resolve their `storage_path` with).

Every file the service writes under `--storage-path` goes through `Storage`: the sweep's state file, best config,
trials.csv and per-trial error markers, final and report tables, the cached skeleton chain. A local location
writes to a temporary name and renames; an object store receives each file in one PUT (readers see the old
object or the new one, never half). S3-compatible stores (MinIO, on-premise) are reached through the standard
`AWS_ENDPOINT_URL`; credentials come only from the standard variables, files or instance roles, never from the
URI (a URI is printed, tagged and pickled).
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from trainers.errors import InputError, ServiceUnavailable
from trainers.io import atomic_write, atomic_write_text

# What an object store reads from the environment: never logged, tagged or stored (service.tracking.store redacts
# them); forwarded to the workers of an existing Ray cluster like MLflow's credentials.
STORAGE_ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                         "AWS_REGION")
STORAGE_SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
SECRET_QUERY_KEYS = {"access_key", "secret_key", "session_token"}


# An object store that does not answer (restarted, a network blip): our own reads and writes retry for up to
# STORAGE_OUTAGE_S with a warning, then fail in one line (trainers.errors.ServiceUnavailable, exit 3). Ray's own
# checkpoint uploads fail the trial instead, which Tune restarts from its last checkpoint (--trial-retries).
STORAGE_OUTAGE_S = float(os.environ.get("SKELDIFF_STORAGE_OUTAGE_S", "120"))
TRANSIENT = ("curlCode: 7", "Couldn't connect", "Connection refused", "connection reset", "timed out", "Timeout",
             "NETWORK_CONNECTION", "SERVICE_UNAVAILABLE", "SLOW_DOWN", "INTERNAL_FAILURE", "Unable to connect")


_patience = [STORAGE_OUTAGE_S]     # check_writable waits less: a wrong endpoint should fail in seconds


def patiently(what: str, fn, *args):
    """fn(*args) for an object store, retried with backoff while the store does not answer."""
    start, delay, warned = time.monotonic(), 1.0, False
    budget = _patience[-1]
    while True:
        try:
            return fn(*args)
        except OSError as err:
            text = str(err)
            if not any(t.lower() in text.lower() for t in TRANSIENT):
                raise
            waited = time.monotonic() - start
            if waited > budget:
                raise ServiceUnavailable(f"object store unreachable for {waited:.0f} s ({what}): "
                                         f"{text.strip().splitlines()[0][:200]}") from None
            if not warned:
                print(f"warning: object store unreachable ({what}): {text.strip().splitlines()[0][:160]}; retrying "
                      f"for up to {budget:.0f} s", file=sys.stderr)
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def is_uri(value: str | os.PathLike) -> bool:
    """A URI with a scheme (s3://, gs://, file://...); a Windows drive letter is not one."""
    return "://" in str(value)


@functools.lru_cache(maxsize=16)
def _filesystem(uri: str):
    """(pyarrow filesystem, path inside it) of a URI; one filesystem object per location and process."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as err:   # pyarrow: ArrowInvalid, OSError ... one line naming the URI
        raise InputError(f"--storage-path {uri}: {str(err).strip().splitlines()[0]}") from None


@dataclass(frozen=True)
class Storage:
    """A file or folder under the results location: `storage / "name"` joins; `str(storage)` is what Ray gets."""

    root: str     # an absolute local path, or a URI without a trailing slash

    @classmethod
    def parse(cls, value: str | os.PathLike) -> Storage:
        """A local path (expanded, made absolute) or a URI, checked to carry no credentials."""
        text = str(value).strip()
        if not text:
            raise InputError("--storage-path is empty (expected a folder or a URI such as s3://bucket/prefix)")
        if not is_uri(text):
            return cls(str(Path(text).expanduser().resolve()))
        parts = urlsplit(text)
        if parts.scheme == "file":
            return cls(str(Path(parts.path).resolve()))
        if "@" in parts.netloc or SECRET_QUERY_KEYS & {k.lower() for k, _ in parse_qsl(parts.query)}:
            raise InputError(f"--storage-path {parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path}: "
                             "credentials in the URI would be printed and stored; set AWS_ACCESS_KEY_ID / "
                             "AWS_SECRET_ACCESS_KEY (or a credentials file, an instance role) instead")
        if not parts.netloc:
            raise InputError(f"--storage-path {text}: no bucket (expected {parts.scheme}://bucket/prefix)")
        return cls(text.rstrip("/"))

    # --- naming ---------------------------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return not is_uri(self.root)

    @property
    def name(self) -> str:
        return self.path_part.rstrip("/").rsplit("/", 1)[-1]

    @property
    def path_part(self) -> str:
        return self.root if self.is_local else urlsplit(self.root).path

    def __truediv__(self, part: str) -> Storage:
        if self.is_local:
            return Storage(str(Path(self.root) / part))
        parts = urlsplit(self.root)
        return Storage(parts._replace(path=f"{parts.path.rstrip('/')}/{part}").geturl())

    @property
    def parent(self) -> Storage:
        if self.is_local:
            return Storage(str(Path(self.root).parent))
        parts = urlsplit(self.root)
        return Storage(parts._replace(path=parts.path.rstrip("/").rsplit("/", 1)[0]).geturl())

    def __str__(self) -> str:
        return self.root

    @property
    def local(self) -> Path:
        """The local path (only for a local location)."""
        if not self.is_local:
            raise ValueError(f"{self.root} is not a local path")
        return Path(self.root)

    def _fs(self):
        fs, path = _filesystem(self.root)
        return fs, path

    # --- reading --------------------------------------------------------------------------------------------
    def is_file(self) -> bool:
        if self.is_local:
            return Path(self.root).is_file()
        import pyarrow.fs

        fs, path = self._fs()
        return patiently(self.root, fs.get_file_info, path).type == pyarrow.fs.FileType.File

    def read_bytes(self) -> bytes:
        if self.is_local:
            return Path(self.root).read_bytes()
        fs, path = self._fs()

        def read() -> bytes:
            with fs.open_input_stream(path) as f:
                return f.read()

        return patiently(self.root, read)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def children(self) -> list[str]:
        """Names directly inside this folder (none when it does not exist)."""
        if self.is_local:
            folder = Path(self.root)
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        import pyarrow.fs

        fs, path = self._fs()
        infos = patiently(self.root, fs.get_file_info, pyarrow.fs.FileSelector(path, allow_not_found=True))
        return sorted(info.base_name for info in infos)

    def files(self) -> list[str]:
        """Every file under this folder, as paths relative to it."""
        if self.is_local:
            folder = Path(self.root)
            return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) \
                if folder.is_dir() else []
        import pyarrow.fs

        fs, path = self._fs()
        infos = patiently(self.root, fs.get_file_info,
                          pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
        return sorted(i.path[len(path.rstrip("/")) + 1:] for i in infos if i.type == pyarrow.fs.FileType.File)

    # --- writing --------------------------------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> Storage:
        """Atomic: a local temporary name renamed over the target; one PUT on an object store."""
        if self.is_local:
            atomic_write(Path(self.root), lambda tmp: tmp.write_bytes(data))
            return self
        fs, path = self._fs()

        def write() -> None:
            with fs.open_output_stream(path) as f:
                f.write(data)

        patiently(self.root, write)
        return self

    def write_text(self, text: str) -> Storage:
        if self.is_local:
            atomic_write_text(Path(self.root), text)
            return self
        return self.write_bytes(text.encode())

    def upload(self, local: Path) -> Storage:
        """Copy a local file or folder here (folders file by file, each write atomic)."""
        local = Path(local)
        if local.is_file():
            if self.is_local:
                atomic_write(Path(self.root), lambda tmp: shutil.copyfile(local, tmp))
                return self
            fs, path = self._fs()

            def copy() -> None:
                with local.open("rb") as src, fs.open_output_stream(path) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)

            patiently(self.root, copy)
            return self
        for p in sorted(local.rglob("*")):
            if p.is_file():
                (self / str(p.relative_to(local))).upload(p)
        return self

    def download(self, local: Path) -> Path:
        """Copy this file or folder to a local path (files first written under a temporary name)."""
        local = Path(local)
        if self.is_file():
            if self.is_local:
                atomic_write(local, lambda tmp: shutil.copyfile(self.root, tmp))
            else:
                atomic_write(local, lambda tmp: tmp.write_bytes(self.read_bytes()))
            return local
        for rel in self.files():
            (self / rel).download(local / rel)
        return local

    def remove(self) -> None:
        """Delete this file or folder (missing: nothing to do)."""
        if self.is_local:
            p = Path(self.root)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            return
        import pyarrow.fs

        fs, path = self._fs()
        info = patiently(self.root, fs.get_file_info, path)
        if info.type == pyarrow.fs.FileType.File:
            patiently(self.root, fs.delete_file, path)
        elif info.type == pyarrow.fs.FileType.Directory:
            patiently(self.root, fs.delete_dir, path)

    def check_writable(self) -> Storage:
        """Fail in seconds, in one line naming the location, when it cannot be written (no bucket, no credentials,
        no server), before a sweep or a final run starts: a probe object written and deleted."""
        probe = self / f".skeldiff-probe-{os.getpid()}"
        _patience.append(10.0)
        try:
            probe.write_bytes(b"")
            probe.remove()
        except (OSError, ServiceUnavailable) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            hint = "" if self.is_local else " (bucket, AWS_* credentials and AWS_ENDPOINT_URL are checked here)"
            raise InputError(f"--storage-path {self.root}: not writable: {first[:300]}{hint}") from None
        finally:
            _patience.pop()
        return self
