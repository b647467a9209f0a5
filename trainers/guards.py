"""Fail-fast checks on arrays read from disk or given to a model: not finite, not numeric, or so large that fp32/bf16
arithmetic on them overflows. Light (numpy only): the readers and `service.prepare` use them before torch loads. The
training loss's guard is `trainers.fit_loop.LossGuard`."""

from __future__ import annotations

import numpy as np

from trainers.errors import InputError

# Largest |value| accepted in features and prepared skeletons. Real inputs are O(1)-O(1e3) (pooled GCN features,
# metres, normalised pixels); squares of values above ~1.8e19 already overflow fp32 (and bf16 has fp32's range),
# so a 1e6 bound leaves 13 orders of magnitude of headroom for the losses' squares and sums.
MAX_ABS_INPUT = 1e6
def check_numeric_array(arr: np.ndarray, where: str, what: str) -> None:
    """One-line InputError unless `arr` holds real numbers (not strings, objects or complex values)."""
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
            or arr.dtype == np.bool_):
        raise InputError(f"{where}: expected numbers ({what}), got dtype {arr.dtype}")


def check_finite_rows(arr: np.ndarray, where: str, row_names=None, limit: float = MAX_ABS_INPUT) -> None:
    """One-line InputError naming the first row (sample) of `arr` holding NaN, inf or a value above `limit`."""
    flat = np.asarray(arr).reshape(len(arr), -1) if len(arr) else np.zeros((0, 0))
    if flat.size == 0:
        return
    with np.errstate(invalid="ignore", over="ignore"):
        bad = ~np.isfinite(flat).all(axis=1) | (np.abs(flat) > limit).any(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        row = flat[i]
        kind = "NaN or inf" if not np.isfinite(row).all() else f"|value| up to {np.abs(row).max():.3g} (> {limit:g})"
        name = f" ({row_names[i]})" if row_names is not None else ""
        raise InputError(f"{where}: sample {i}{name} holds {kind}; {int(bad.sum())} of {len(flat)} samples affected")


def check_model_input(x, shape: tuple[int, ...], max_rows: int, max_length: int) -> np.ndarray:
    """A deployed model's input as float32 (N, *shape) with 1 <= N <= max_rows (-1 in shape: any length up to
    max_length), finite and within MAX_ABS_INPUT; a one-line InputError otherwise."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise InputError(f"input: expected numbers, got dtype {x.dtype}")
    want = "(N, " + ", ".join("T" if d == -1 else str(d) for d in shape) + ")"
    if x.ndim != len(shape) + 1 or any(d != -1 and d != n for d, n in zip(shape, x.shape[1:])):
        raise InputError(f"input: expected shape {want}, got {tuple(x.shape)}")
    if not 1 <= x.shape[0] <= max_rows:
        raise InputError(f"input: {x.shape[0]} rows; send 1..{max_rows} per call")
    for d, n in zip(shape, x.shape[1:]):
        if d == -1 and not 1 <= n <= max_length:
            raise InputError(f"input: {n} frames; expected 1..{max_length}")
    x = x.astype(np.float32, copy=False)
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(x).reshape(len(x), -1).all(1)
        if not finite.all():
            raise InputError(f"input: row {int(np.argmin(finite))} holds NaN or inf")
        if np.abs(x).max() > MAX_ABS_INPUT:
            raise InputError(f"input: values beyond ±{MAX_ABS_INPUT:g} (expected metres / normalised pixels)")
    return x
