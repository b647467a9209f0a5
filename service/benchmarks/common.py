"""What every benchmark shares: the machine description, timed calls with their CPU share, per-phase peak
memory, table formatting and the JSON report."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from trainers.errors import InputError
from trainers.io import atomic_write_text
from trainers.runtime import cpu_has_fast_bf16

MIB = 2**20


def log(msg: str) -> None:
    """Progress goes to stderr so stdout holds only the table."""
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Machine, timing and memory
# ----------------------------------------------------------------------------------------------

def resolve_bench_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; asking for cuda without one is an input error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: CUDA is not available on this machine")
    return torch.device(name)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on; the load average exposes other work sharing the cores."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cpu_amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "cpu_avx512_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        # Threading knobs that change CPU timings a lot on a shared machine.
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                               "MKL_NUM_THREADS")},
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_bf16"] = torch.cuda.is_bf16_supported()
        info["gpu_memory_mib"] = round(torch.cuda.get_device_properties(device).total_memory / MIB)
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_busy_fraction(interval: float = 0.5) -> float | None:
    """Share of all CPUs busy over `interval` seconds (/proc/stat); sampled while this process idles, it is
    the load from everything else."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]                                  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])
    try:
        busy0, total0 = sample()
        time.sleep(interval)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(1, total1 - total0)


@dataclass
class Timed:
    """Wall seconds of the timed calls, the CPU share they got, and the last call's result."""

    times_s: list[float]
    # Process CPU seconds / (wall seconds x torch threads) over the timed calls, on CPU devices. Near 1 for
    # compute-bound work on an idle machine; well below 1 means other processes took the cores.
    cpu_share: float | None
    result: Any

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def time_calls(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device, label: str) -> Timed:
    """Time `iters` calls after `warmup` untimed ones (kernel selection, first-touch allocations)."""
    result = None
    for i in range(warmup):
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        log(f"  {label}: warm-up {i + 1}/{warmup} {format_seconds(time.perf_counter() - start)}")
    times = []
    cpu_start = time.process_time()
    for i in range(iters):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        log(f"  {label}: {i + 1}/{iters} {format_seconds(times[-1])}")
    cpu_share = None
    if device.type == "cpu" and times:
        cpu_share = (time.process_time() - cpu_start) / (sum(times) * torch.get_num_threads())
    return Timed(times, cpu_share, result)


def _libc_malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0): hand freed heap pages back to the OS so the next phase starts from a true RSS."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    return (lambda: trim(0)) if trim is not None else (lambda: None)


_malloc_trim = _libc_malloc_trim()


def _proc_status_kib(key: str) -> int | None:
    """A 'VmRSS:' / 'VmHWM:' line of /proc/self/status in KiB, or None off Linux."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0, clear_refs mode 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _ru_maxrss_kib() -> int:
    scale = 1024 if sys.platform == "darwin" else 1   # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // scale


def memory_method(device: torch.device) -> str:
    """How `PeakMemory` measures on this device, in words (written into the report)."""
    if device.type == "cuda":
        return ("CUDA: torch.cuda.max_memory_allocated() during the phase minus memory_allocated() at its start "
                "(tensors only, not the caching allocator's reserve)")
    if _proc_status_kib("VmHWM") is not None and _reset_rss_peak():
        return ("CPU: process RSS high-water mark (VmHWM, reset per phase via /proc/self/clear_refs) minus RSS at "
                "the phase start, after gc and malloc_trim; one fresh process per model size")
    return ("CPU: increase of getrusage ru_maxrss over the phase (a lower bound: a phase below an earlier peak "
            "reads 0); one fresh process per model size")


class PeakMemory:
    """Peak memory of one phase above its starting point, in MiB (`peak_mib` after the block exits)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib = 0.0

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        _malloc_trim()
        self._hwm = _proc_status_kib("VmHWM") is not None and _reset_rss_peak()
        self._start = _proc_status_kib("VmRSS") if self._hwm else _ru_maxrss_kib()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._start) / MIB
        else:
            end = _proc_status_kib("VmHWM") if self._hwm else _ru_maxrss_kib()
            self.peak_mib = max(0, end - self._start) / 1024


def format_seconds(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


# ----------------------------------------------------------------------------------------------
# Tables and the report
# ----------------------------------------------------------------------------------------------

def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def min_cpu_share(*timings: dict[str, Any]) -> float | None:
    shares = [t["cpu_share"] for t in timings if t.get("cpu_share") is not None]
    return min(shares) if shares else None


def format_share(share: float | None) -> str:
    return "-" if share is None else f"{share:.2f}"


CONTENDED_SHARE = 0.7    # below this CPU share a measurement is flagged as starved by other processes


def write_report(path: Path, report: dict[str, Any]) -> None:
    """The JSON report, written through a temporary name."""
    atomic_write_text(path, json.dumps(report, indent=2))
