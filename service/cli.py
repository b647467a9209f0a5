"""Shared command-line plumbing: config from YAML + shortcuts + --set, and one-line errors with exit code 2."""

from __future__ import annotations

import argparse
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
from typing import Any

from trainers.cocodiff import CoCoDiffConfig
from trainers.config import TDSMConfig, build_config, load_yaml, parse_override
from trainers.errors import InputError
from trainers.runtime import apply_thread_policy

METHOD_CONFIGS = {"tdsm": TDSMConfig, "cocodiff": CoCoDiffConfig}
# Ray results and checkpoints, and the cached skeleton chain (service.encoder): shared storage on a cluster.
DEFAULT_STORAGE = Path(os.environ.get("SKELDIFF_RESULTS", "~/skeldiff_results"))
# Shortcut flags and config keys that name the data a run trains on (their absence means: the embedded default).
DATA_FLAGS = ("features", "unseen", "seen", "val_unseen", "class_names", "descriptions")
DATA_KEYS = ("data.", "text.class_names", "text.descriptions", "text.synonyms")
# Shortcuts that name zero-shot inputs (feature folders, class splits): TDSM's data model only.
TDSM_ONLY_SHORTCUTS = ("features", "unseen", "seen", "val_unseen")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--config/--set/--print-config and the data/text shortcuts (the data ones are TDSM-only)."""
    g = parser.add_argument_group("configuration")
    g.add_argument("--config", type=Path, help="YAML config (nested, same keys as --print-config)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one dotted key, e.g. --set optim.lr=3e-4 (repeatable; wins over shortcuts)")
    g.add_argument("--print-config", action="store_true",
                   help="print the config that will run as YAML (loadable by --config) and exit: the named or "
                        "default split applied, a skeleton chain resolved to its cached paths (generated and "
                        "prepared if missing, never trained: '# (built on first run)' marks features not built yet)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="shortcut for --set train.threads=N: CPU threads of the fit loop (0 = auto, see README)")
    d = parser.add_argument_group("data and text shortcuts")
    d.add_argument("--features", type=Path, help="tdsm: folder of pre-extracted features (SA-DVAE layout)")
    d.add_argument("--unseen", type=Path, help="tdsm: unseen (test) class ids, ru*.npy")
    d.add_argument("--seen", type=Path,
                   help="tdsm: seen class ids, rs*.npy (default: the other classes with training samples)")
    d.add_argument("--val-unseen", help="tdsm: validation classes within the seen ones: rv*.npy or a count N")
    d.add_argument("--class-names", type=Path, help="one class name per line")
    d.add_argument("--descriptions", type=Path, action="append", help="class descriptions, one per line (repeatable)")
    d.add_argument("--text-encoder", help="minilm | open_clip:MODEL:PRETRAINED_OR_PATH")


def shortcut_overrides(args: argparse.Namespace, method: str = "tdsm") -> dict[str, Any]:
    """Dotted overrides implied by the shortcut flags that were given; TDSM-only flags are refused otherwise."""
    if method != "tdsm":
        given = [f"--{flag.replace('_', '-')}" for flag in TDSM_ONLY_SHORTCUTS if getattr(args, flag) is not None]
        if given:
            raise InputError(f"{', '.join(given)}: zero-shot data flags are TDSM-only; for {method} set the data with "
                             "--set data.source=prepared --set data.prepared_dir=DIR (or --config)")
    out: dict[str, Any] = {}
    if args.features is not None:
        out["data.source"] = "features"
        out["data.features_dir"] = str(args.features)
    for flag, key in (("unseen", "data.unseen"), ("seen", "data.seen"), ("class_names", "text.class_names"),
                      ("text_encoder", "text.encoder")):
        if getattr(args, flag) is not None:
            out[key] = str(getattr(args, flag))
    if getattr(args, "threads", None) is not None:
        out["train.threads"] = args.threads
    if args.val_unseen is not None:
        out["data.val_unseen"] = int(args.val_unseen) if args.val_unseen.isdigit() else args.val_unseen
    if args.descriptions:
        out["text.descriptions"] = [str(p) for p in args.descriptions]
    return out


def names_data(args: argparse.Namespace) -> bool:
    """Whether the command line names its data (a shortcut flag, a data/text-file --set, a --config data section)."""
    if any(getattr(args, flag, None) for flag in DATA_FLAGS):
        return True
    if any(item.split("=", 1)[0].strip().startswith(DATA_KEYS) for item in args.overrides):
        return True
    tree = load_yaml(args.config) if getattr(args, "config", None) else {}
    return "data" in tree or any(k in (tree.get("text") or {}) for k in ("class_names", "descriptions", "synonyms"))


def resolve_config(method: str, args: argparse.Namespace, extra: dict[str, Any] | None = None):
    """--config, then shortcuts, then `extra`, then --set; validated into the method's config."""
    base = load_yaml(args.config) if args.config else {}
    overrides = {**shortcut_overrides(args, method), **(extra or {})}
    overrides.update(parse_override(item) for item in args.overrides)
    return build_config(METHOD_CONFIGS[method], base, overrides, source=args.config)


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
    """Bad input -> 'error: <one line>' on stderr and exit code 2; Ctrl-C -> 130; SIGTERM -> 143."""

    @functools.wraps(main)
    def wrapper(*a, **kw) -> int:
        apply_thread_policy()   # CPU threads sized to this process's cores, before any parallel work
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
        locks_before = set(_held_locks)
        SIGTERM_RECEIVED.clear()
        try:
            return main(*a, **kw) or 0
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
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


def lock_dir(folder: Path) -> Path:
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
            raise InputError(f"{folder} is in use by pid {holder} (another run on the same dir); wait for it, "
                             "stop it, or pass another --run-dir / --name") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks[folder.resolve()] = fd
    return path
