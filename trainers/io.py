"""Atomic file writes: write to a temporary name in the same folder, then rename over the target."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from trainers.errors import InputError


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Run write(tmp_path), fsync, then os.replace(tmp, path): a crash leaves the old file (or none), never half.

    The file gets the usual umask permissions (mkstemp alone would leave it private, 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        Path(tmp).unlink(missing_ok=True)
        # torch.save wraps the OSError of its file object (ENOSPC) in a RuntimeError ("unexpected pos ...").
        cause = err if isinstance(err, OSError) else err.__cause__ or err.__context__
        if isinstance(cause, OSError) and cause.filename in (None, tmp):   # unnamed or the temp name: the target
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """torch.save through a temporary file, written through a Python file object: on a full disk, torch.save to a
    path raises a RuntimeError ("unexpected pos ..."); through a file object the OSError (ENOSPC) comes through.
    Ctrl-C / SIGTERM wait until the file is written: raised inside torch's writer callback, they would surface as
    that same RuntimeError instead of the interrupt the CLIs turn into exit 130 / 143."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            import torch  # here, not at the top: the CLIs import this module (via service.storage) to parse
            torch.save(obj, f)

    with signals_deferred():            # delivered once the file is whole and in place
        return atomic_write(path, write)


@contextlib.contextmanager
def signals_deferred(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
    """Hold SIGINT / SIGTERM for the duration (main thread only), then deliver them to the handlers they had."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


# What a refused pickle says; the message tests and docs/failures.md quote.
REFUSED = "refused: it holds Python objects, and loading them would run code; only tensors and plain data load"


def load_torch(path: Path, what: str = "checkpoint", keys: tuple[str, ...] = ()) -> Any:
    """torch.load(weights_only=True) on CPU: tensors and plain containers only, so a crafted file can never run
    code. Any failure (missing, truncated, foreign pickle, not a dict with `keys`) is a one-line InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing (expected a skeldiff {what})")
    try:
        import torch  # (see atomic_torch_save)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # The weights-only unpickler refuses a global it does not allow before calling it: nothing has run.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise InputError(f"{path}: not a skeldiff {what} ({REFUSED}; found {found.group(1)})") from None
        raise InputError(f"{path}: unreadable {what} (not a torch.save file of tensors and plain data: foreign, "
                         "truncated or corrupt; refused unread)") from None
    except Exception as err:  # noqa: BLE001 - truncated zip, wrong format, I/O error: one answer
        raise InputError(f"{path}: unreadable {what} ({type(err).__name__}: truncated or corrupt; delete it to "
                         "start over)") from None
    if keys:
        missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise InputError(f"{path}: not a skeldiff {what} (no {', '.join(map(repr, missing))} "
                             f"entr{'ies' if len(missing) > 1 else 'y'})")
    return obj


def load_checkpoint(path: Path, fingerprint: str | None = None, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A checkpoint through `load_torch`; when `fingerprint` is given, one written under another training config
    is refused too (resuming it would silently mix two runs)."""
    state = load_torch(path, "checkpoint", keys)
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a skeldiff checkpoint (a {type(state).__name__}, expected a dict)")
    if fingerprint is not None and state.get("fingerprint") != fingerprint:
        raise InputError(f"{path}: written with a different training config (or data); use another run dir or "
                         "delete it")
    return state


def load_npy(path: Path, mmap_mode: str | None = None, what: str = ".npy array"):
    """np.load of one array without pickles; a file that is not one .npy array (a .npz zip archive, which np.load
    opens as an NpzFile, a truncated or foreign file) is a one-line InputError naming it."""
    import numpy as np

    try:
        arr = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"{path}: not a readable {what} ({type(err).__name__}: {str(err)[:120]})") from None
    if not isinstance(arr, np.ndarray):
        if hasattr(arr, "close"):
            arr.close()
        raise InputError(f"{path}: a {type(arr).__name__} (a zip archive of arrays, .npz), expected one {what}")
    return arr


def atomic_save_npy(array, path: Path) -> Path:
    """np.save through a temporary file (a file handle, so numpy does not append '.npy' to the temp name)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return atomic_write(path, write)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write text through a temporary file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON form of obj."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
