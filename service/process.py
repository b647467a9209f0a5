"""How a skeldiff process ends: one-line errors with exit code 2, Ctrl-C / SIGTERM (also while Ray Tune runs), and
the run-dir locks held until a CLI's main() returns."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from trainers.errors import InputError, ServiceUnavailable


class Terminated(KeyboardInterrupt):
    """SIGTERM (Kubernetes, Ray, `kill`): unwinds exactly like Ctrl-C, so runs end KILLED and keep last.pt."""


SIGTERM_RECEIVED = threading.Event()   # read after Ray Tune's graceful stop, which returns instead of raising


_DELEGATE_TO_SIGINT = threading.Event()   # set only while Ray Tune's fit() runs (see sigterm_stops_tune)


def on_sigterm(signum, frame) -> None:
    """SIGTERM handler: what Ctrl-C does (Ray Tune's graceful-stop SIGINT handler while a sweep runs)."""
    SIGTERM_RECEIVED.set()
    sigint = signal.getsignal(signal.SIGINT)
    # Only while Tune runs: a SIGINT handler left behind by an earlier (in-process) sweep must not swallow it.
    if _DELEGATE_TO_SIGINT.is_set() and callable(sigint) and sigint is not signal.default_int_handler:
        sigint(signal.SIGINT, frame)
        return
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def sigterm_stops_tune():
    """While Tune's fit() runs, SIGTERM triggers Tune's graceful stop (state saved, resumable) instead of raising."""
    _DELEGATE_TO_SIGINT.set()
    try:
        yield
    finally:
        _DELEGATE_TO_SIGINT.clear()


def install_sigterm_handler() -> None:
    """(Re)install on_sigterm: ray.init replaces the driver's SIGTERM handler with a bare sys.exit."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)


# OSErrors that a CLI reports as one line (exit 2): the folder it was told to write to cannot be written.
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                      errno.EISDIR, errno.EEXIST}


def exits_cleanly(main: Callable[..., int | None]) -> Callable[..., int]:
    """Bad input -> 'error: <one line>' on stderr and exit code 2; a tracking server or object store that stayed
    unreachable -> one line and 3; Ctrl-C -> 130; SIGTERM -> 143."""

    @functools.wraps(main)
    def wrapper(*a, **kw) -> int:
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
        locks_before = set(_held_locks)
        SIGTERM_RECEIVED.clear()
        try:
            return main(*a, **kw) or 0
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except ServiceUnavailable as err:
            print(f"error: {err}", file=sys.stderr)
            return 3
        except OSError as err:
            # A read-only, full or misnamed run / output / cache folder: the environment, not a bug; one line.
            if err.errno not in ENVIRONMENT_ERRNOS or err.filename is None:
                raise
            print(f"error: {err.filename}: {err.strerror} (check the folder's permissions, free space and type)",
                  file=sys.stderr)
            return 2
        except Terminated:
            print("terminated (SIGTERM)", file=sys.stderr)
            return 128 + signal.SIGTERM
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
            for folder in set(_held_locks) - locks_before:    # in-process callers (tests) run main() repeatedly
                os.close(_held_locks.pop(folder))

    return wrapper


_held_locks: dict[Path, int] = {}   # folder -> open file descriptor holding its lock until main() returns


def lock_dir(folder: Path, holder_is: str = "another run on the same dir",
             remedy: str = "pass another --run-dir / --name") -> Path:
    """Take folder/.lock until the CLI's main() returns; another live process holding it -> InputError naming its pid.

    An flock dies with its process (a crash or SIGKILL never leaves a stale lock) and is per open file, so two
    runs on one run dir (or on one sweep) can never both write to it, nor to its MLflow run.
    """
    folder = Path(folder)
    if folder.resolve() in _held_locks:
        return folder / ".lock"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if err.errno in (errno.EAGAIN, errno.EACCES):
            raise InputError(f"{folder} is in use by pid {holder} ({holder_is}); wait for it, stop it, or "
                             f"{remedy}") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks[folder.resolve()] = fd
    return path
