"""Checkpoint files of the fit loops: names, the training fingerprint, RNG state, save and restore.

Each loop keeps its own key set and its own non-training keys (thin `_save_last` / `_resume` wrappers); what is
common is how a file is written, checked and loaded back.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainers.errors import InputError, short_repr
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


def restore_rng(path: Path, state: Mapping[str, Any]) -> None:
    """Set the RNG states a checkpoint holds (only the entries present); one that does not load is an InputError."""
    if state.get("torch_rng") is not None:
        set_rng_entry(path, "torch_rng", state["torch_rng"], torch.set_rng_state, torch.get_rng_state())
    cuda = state.get("cuda_rng")
    if cuda is not None:
        if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
            raise bad_entry(path, "cuda_rng", f"a {type(cuda).__name__}, expected a list of uint8 RNG states")
        if torch.cuda.is_available():
            set_rng_entry(path, "cuda_rng", cuda, torch.cuda.set_rng_state_all, None)


def set_rng_entry(path: Path, entry: str, value: Any, setter, like: torch.Tensor | None) -> None:
    """setter(value) for an RNG state entry shaped as `like` (a state of this torch build); InputError otherwise."""
    if like is not None and (not isinstance(value, torch.Tensor) or value.dtype != like.dtype
                             or value.shape != like.shape):
        found = (f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                 else f"a {type(value).__name__}")
        raise bad_entry(path, entry, f"{found}, expected an RNG state ({like.dtype}, shape {tuple(like.shape)})")
    try:
        setter(value)
    except (RuntimeError, TypeError, ValueError) as err:
        raise bad_entry(path, entry, f"not a loadable RNG state ({type(err).__name__})") from None


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
            opt: torch.optim.Optimizer, max_step: int, optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a last.pt written under `fingerprint` (one-line InputError otherwise) into each named module (None:
    skipped), the optimizer and the RNGs; returns the whole checkpoint for the loop's own entries.

    Its contents are checked against the model and config before anything is loaded (check_last): a checkpoint of
    the right fingerprint can still be edited, truncated in a tensor or written by another version."""
    state = load_checkpoint(Path(path), fingerprint, keys)
    check_last(Path(path), state, keys, modules, opt, max_step, optional)
    for key, module in modules.items():
        if module is not None:
            module.load_state_dict(state[key])
    try:
        load_optimizer_state(opt, state["optimizer"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise bad_entry(path, "optimizer", f"not this model's optimizer state ({type(err).__name__})") from None
    restore_rng(Path(path), state)
    return state


# ----------------------------------------------------------------------------------------------
# Contents: what a checkpoint holds must fit the model and config it is loaded into
# ----------------------------------------------------------------------------------------------

def bad_entry(path: Path, entry: str, problem: str) -> InputError:
    """The one-line error about one entry of a checkpoint file."""
    return InputError(f"{path}: entry {entry!r}: {problem} (not written by this model and config, or edited; "
                      "delete it to start over)")


def _names(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    return ", ".join(map(repr, keys[:3])) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_finite(path: Path, entry: str, obj: Any, prefix: str = "") -> None:
    """Every floating tensor (in nested dicts / lists) finite: NaN weights score at chance and exit 0 otherwise."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            raise bad_entry(path, entry, f"{prefix or 'tensor'} holds NaN or inf")
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            check_finite(path, entry, value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_finite(path, entry, value, f"{prefix}[{i}]")


def check_weights(path: Path, entry: str, state: Any, module: nn.Module) -> None:
    """`state` is a state dict of `module`: the same keys, each tensor of its shape, all finite."""
    own = module.state_dict()
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise bad_entry(path, entry, f"a {type(state).__name__}, expected a state dict of tensors")
    missing, extra = own.keys() - state.keys(), state.keys() - own.keys()
    if missing or extra:
        raise bad_entry(path, entry, "; ".join(
            ([f"missing {_names(missing)}"] if missing else []) + ([f"unexpected {_names(extra)}"] if extra else [])))
    for key, value in own.items():
        if state[key].shape != value.shape:
            raise bad_entry(path, entry, f"{key} has shape {tuple(state[key].shape)}, the model's is "
                                         f"{tuple(value.shape)}")
    check_finite(path, entry, dict(state))


def load_weights(path: Path, entry: str, state: Any, module: nn.Module) -> None:
    """check_weights, then load them."""
    check_weights(path, entry, state, module)
    module.load_state_dict(state)


def check_step(path: Path, entry: str, value: Any, max_step: int) -> int:
    """A step counter: an int in [0, max_step] (a float, a string, 10**9 or -5 would train on or stop silently)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_entry(path, entry, f"{short_repr(value)} is a {type(value).__name__}, expected an int step")
    if not 0 <= value <= max_step:
        raise bad_entry(path, entry, f"{value} is outside 0..{max_step} (train.steps)")
    return value


def check_score(path: Path, entry: str, value: Any) -> float:
    """A best-so-far score: a real number (-1 before the first evaluation)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise bad_entry(path, entry, f"{short_repr(value)}, expected a number")
    return float(value)


def check_metrics(path: Path, entry: str, value: Any) -> dict[str, float]:
    """A metrics entry: {name: number}."""
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in value.items()):
        raise bad_entry(path, entry, f"{short_repr(value)}, expected {{metric name: number}}")
    return dict(value)


def check_optimizer(path: Path, state: Any, opt: torch.optim.Optimizer) -> None:
    """An optimizer state of `opt`'s parameter groups: as many groups and parameters, per-parameter tensors of the
    parameter's shape (or scalars), finite."""
    if not isinstance(state, Mapping) or not isinstance(state.get("state"), Mapping) \
            or not isinstance(state.get("param_groups"), list):
        raise bad_entry(path, "optimizer", "expected an optimizer state ('state' and 'param_groups')")
    groups = state["param_groups"]
    if len(groups) != len(opt.param_groups) or any(
            not isinstance(g, Mapping) or not isinstance(g.get("params"), list)
            or len(g["params"]) != len(own["params"]) for g, own in zip(groups, opt.param_groups)):
        raise bad_entry(path, "optimizer", "its parameter groups do not match this model's")
    for group, own in zip(groups, opt.param_groups):
        for pid, param in zip(group["params"], own["params"]):
            for name, value in (state["state"].get(pid) or {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise bad_entry(path, "optimizer", f"state {name} of parameter {pid} has shape "
                                                       f"{tuple(value.shape)}, the parameter's is {tuple(param.shape)}")
        for name, value in group.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise bad_entry(path, "optimizer", f"param_groups {name} is {value}")
    check_finite(path, "optimizer", dict(state["state"]))


def check_last(path: Path, state: Mapping[str, Any], keys: tuple[str, ...], modules: Mapping[str, nn.Module | None],
               opt: torch.optim.Optimizer, max_step: int, optional: tuple[str, ...] = ()) -> None:
    """A last.pt's whole key set, its weights, optimizer state and step (RNG states are checked as they are set)."""
    extra = state.keys() - {*keys, *optional, *modules, "fingerprint", "config"}
    if extra:
        raise bad_entry(path, sorted(extra)[0], f"unexpected entr{'ies' if len(extra) > 1 else 'y'} {_names(extra)}")
    for key, module in modules.items():
        if module is not None:
            check_weights(path, key, state.get(key), module)
        elif state.get(key) is not None:
            raise bad_entry(path, key, "weights of a part this config does not build")
    check_optimizer(path, state["optimizer"], opt)
    check_step(path, "step", state["step"], max_step)


def copy_run_files(src: Path, dst: Path, names: Iterable[str] = RUN_FILES) -> None:
    """Copy the checkpoint files present in src to dst (a Ray checkpoint folder and back)."""
    for name in names:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
