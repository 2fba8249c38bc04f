"""Helpers shared by the benchmark scripts: device choice, timing, peak memory, tables and result files.

Peak memory of one step
-----------------------
CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory allocated
right before the step (so parameters and inputs are not counted, activations/grads/temporaries are).

CPU: peak resident-set growth of the process during the step:
    ru_maxrss (getrusage, after the step) - current RSS (/proc/self/statm, right before the step).
Two things make that number mean "memory the step needed":
  * the kernel's RSS high-water mark is reset to the current RSS right before the step
    (``echo 5 > /proc/self/clear_refs``), so ru_maxrss afterwards is the step's own peak and not that of
    an earlier allocation (import, input creation, a previous variant). Where the reset is refused, the
    number is only reported when the step itself raised the high-water mark (else NaN);
  * before the measured step (after the timed ones, which keep the default allocator) glibc is told
    (mallopt) to serve every block >= 64 KiB with mmap and to trim freed heap memory, so a freed tensor
    really leaves the RSS and a new one really enters it, instead of being recycled from pages malloc
    kept resident. (PyTorch's CPU allocator does no caching of its own.)
RSS counts touched pages only, which is what a tensor that is written costs.
"""

from __future__ import annotations

import csv
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MB = 2 ** 20

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameter ids (malloc.h)
_M_MMAP_THRESHOLD = -3
_SMALL_BLOCK_BYTES = 64 * 1024


# ----------------------------------------------------------------------------- device
def pick_device(name: str) -> torch.device:
    """'auto' -> the local CUDA device when there is one, else the CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock interval covers the work it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is not None and hasattr(backend, "synchronize"):
            backend.synchronize()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return _cpu_model() or platform.processor() or "cpu"
    return str(device)


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------- timing
@dataclass
class StepTimes:
    """Per timed step: wall ms, process CPU ms (all threads) and involuntary context switches.

    CPU ms well below threads x wall ms, or many involuntary switches, mean other processes took the
    cores: the wall times are then inflated by contention, not by the code.
    """
    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    involuntary_switches: list[int] = field(default_factory=list)


def _involuntary_switches() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


def time_steps(step: Callable[[], object], before_each: Callable[[], None], device: torch.device,
               warmup: int, repeats: int, *, barrier: Callable[[], None] | None = None) -> StepTimes:
    """Times `repeats` calls of step() after `warmup` untimed ones.

    before_each() (e.g. dropping grads) runs outside the timed interval. With `barrier`, every timed
    interval starts and ends on a barrier, so it is the time of the slowest rank.
    """
    times = StepTimes()
    for i in range(warmup + repeats):
        before_each()
        synchronize(device)
        if barrier:
            barrier()
        start, cpu_start, switches_start = time.perf_counter(), time.process_time(), _involuntary_switches()
        step()
        synchronize(device)
        if barrier:
            barrier()
        if i >= warmup:
            times.wall_ms.append((time.perf_counter() - start) * 1e3)
            times.cpu_ms.append((time.process_time() - cpu_start) * 1e3)
            times.involuntary_switches.append(_involuntary_switches() - switches_start)
    return times


def load_average() -> float:
    """1-minute load average (NaN where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan


def busy_machine_warning(loads: Sequence[float], own_threads: int) -> str | None:
    """A warning when the load average (taken at the start and end of a run) shows other processes
    competing for the cores this benchmark uses."""
    cpus = os.cpu_count() or 1
    own = min(cpus, own_threads)
    worst = max(loads, default=math.nan)
    if worst > own + 0.5:
        shown = ", ".join(f"{load:.2f}" for load in loads)
        return (f"WARNING: 1-min load average {shown} (start, end) on {cpus} CPUs while this benchmark uses "
                f"~{own}: other processes competed for the cores, so wall times and speed ratios are "
                f"distorted; rerun on an idle machine.")
    return None


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


# ----------------------------------------------------------------------------- memory
def release_freed_memory_to_os() -> bool:
    """Make RSS track live tensors: glibc serves blocks >= 64 KiB by mmap (unmapped on free), trims its heap.

    Applied only before memory measurements: timed steps run with the default allocator, whose reuse of
    freed heap pages is part of real step time. Returns False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _SMALL_BLOCK_BYTES) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, _SMALL_BLOCK_BYTES) == 1
        libc.malloc_trim(0)  # hand back what earlier (timed) steps left in malloc's free lists
        return ok
    except (OSError, AttributeError):
        return False


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    """ru_maxrss: KiB on Linux."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (and so ru_maxrss) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure_step_peak_bytes(step: Callable[[], object], device: torch.device) -> tuple[float, str]:
    """(peak extra bytes the step needed, method name); NaN where it cannot be measured."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before), "cuda.max_memory_allocated"
    if device.type != "cpu" or not os.path.exists("/proc/self/statm"):
        return math.nan, "unavailable"
    release_freed_memory_to_os()
    was_reset = reset_peak_rss()
    rss_before, max_before = current_rss_bytes(), max_rss_bytes()
    step()
    max_after = max_rss_bytes()
    if not was_reset and max_after <= max_before:
        return math.nan, "rss (peak hidden by an earlier high-water mark)"
    return float(max(0, max_after - rss_before)), "ru_maxrss - rss_before" + (" (hwm reset)" if was_reset else "")


# ----------------------------------------------------------------------------- output
def run_metadata(device: torch.device, command: str) -> dict:
    return {
        "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "host_cpus": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def command_line() -> str:
    return " ".join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(map(str, row)) for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def fmt(value: float, spec: str, suffix: str = "") -> str:
    """format(value, spec) + suffix, or 'n/a' for a value that was not measured."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec) + suffix


def ratio(numerator: float, denominator: float) -> float:
    bad = any(v is None or math.isnan(v) for v in (numerator, denominator)) or denominator <= 0
    return math.nan if bad else numerator / denominator


def write_results(out_dir: Path, stem: str, meta: dict, rows: list[dict],
                  extra: dict | None = None) -> tuple[Path, Path]:
    """<stem>.csv (one row per variant) and <stem>.json (metadata, rows and `extra`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    payload = _nan_to_none({"meta": meta, "results": rows, **(extra or {})})
    json_path.write_text(json.dumps(payload, indent=2, default=_json_default, allow_nan=False) + "\n")
    return csv_path, json_path


def _nan_to_none(value):
    """Strict JSON has no NaN: unmeasured numbers become null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(item) for item in value]
    return value


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
