"""Atomic file writes: write to a temporary name in the same folder, then rename over the target."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """torch.save through a temporary file."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: Path, fingerprint: str | None = None) -> dict[str, Any]:
    """torch.load a checkpoint on CPU; one-line InputErrors for an unreadable file and, when `fingerprint` is
    given, for one written under another training config (resuming it would silently mix two runs)."""
    from trainers.errors import InputError

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint gets the same one-line answer
        raise InputError(f"{path}: unreadable checkpoint ({type(err).__name__}); delete it to start over") from None
    if fingerprint is not None and state.get("fingerprint") != fingerprint:
        raise InputError(f"{path}: written with a different training config (or data); use another run dir or "
                         "delete it")
    return state


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
