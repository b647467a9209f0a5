"""Checkpoint files of the fit loops: names, the training fingerprint, RNG state, save and restore.

Each loop keeps its own key set and its own non-training keys (thin `_save_last` / `_resume` wrappers); what is
common is how a file is written, checked and loaded back.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainers.io import atomic_torch_save, load_checkpoint, stable_hash

LAST, BEST, ENCODER = "last.pt", "best.pt", "encoder.pt"
RUN_FILES = (LAST, BEST, ENCODER)              # what a Ray trial or encoder worker ships with each report


def training_fingerprint(flat: Mapping[str, Any], prefixes: tuple[str, ...] = (), names: Iterable[str] = (),
                         **extra: Any) -> str:
    """stable_hash of the flat config without keys starting with `prefixes` or named in `names`, plus `extra`
    (e.g. the data shape): what training computes; resuming a checkpoint of another fingerprint is refused."""
    names = set(names)
    kept = {k: v for k, v in flat.items() if not k.startswith(prefixes) and k not in names}
    return stable_hash({**kept, **extra})


def rng_state(cuda: bool = False) -> dict[str, Any]:
    """{"torch_rng"} and, with `cuda`, {"cuda_rng"} (None without a GPU): the RNG entries of a last.pt."""
    state: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    if cuda:
        state["cuda_rng"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the RNG states a checkpoint holds (only the entries present)."""
    if state.get("torch_rng") is not None:
        torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an optimizer state, keeping this optimizer's own `fused` choice: load_state_dict takes the saved
    groups' flags, so a checkpoint of the per-tensor AdamW would switch fusing off (and a fused one would force it
    on a device it was not chosen for). Fused AdamW keeps its step counts on the parameters' device."""
    chosen = [group.get("fused") for group in opt.param_groups]
    opt.load_state_dict(state)
    for group, fused in zip(opt.param_groups, chosen):
        group["fused"] = fused
        if fused:
            for p in group["params"]:
                if "step" in opt.state.get(p, {}):
                    opt.state[p]["step"] = opt.state[p]["step"].to(device=p.device, dtype=torch.float32)


def save(path: Path, state: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (a crash never leaves half a file)."""
    return atomic_torch_save(state, Path(path))


def restore(path: Path, fingerprint: str, keys: tuple[str, ...], modules: Mapping[str, nn.Module | None],
            opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a last.pt written under `fingerprint` (one-line InputError otherwise) into each named module (None:
    skipped), the optimizer and the RNGs; returns the whole checkpoint for the loop's own entries."""
    state = load_checkpoint(Path(path), fingerprint, keys)
    for key, module in modules.items():
        if module is not None:
            module.load_state_dict(state[key])
    load_optimizer_state(opt, state["optimizer"])
    restore_rng(state)
    return state


def copy_run_files(src: Path, dst: Path, names: Iterable[str] = RUN_FILES) -> None:
    """Copy the checkpoint files present in src to dst (a Ray checkpoint folder and back)."""
    for name in names:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
