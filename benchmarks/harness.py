"""What every benchmark measures the same way: wall and CPU time, peak resident memory, the load average, machine
facts, and its JSON in ``benchmarks/results/``. Each benchmark keeps its own JSON keys (the README quotes them) and
takes the values from here.

Benchmarks run as scripts (``python benchmarks/bench_x.py``), so their directory is on ``sys.path`` and they
``import harness``.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import psutil

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"


# ----------------------------------------------------------------------------- machine and load
def load_average(ndigits: Optional[int] = None) -> list[float]:
    """The 1, 5 and 15 minute load averages (runnable processes; this machine has ``os.cpu_count()`` cores)."""
    la = os.getloadavg()
    return [round(x, ndigits) for x in la] if ndigits is not None else list(la)


def machine() -> dict[str, Any]:
    """Facts about the machine and interpreter a figure was taken on."""
    return {"cpu_count": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform(),
            "python": platform.python_version(), "host": platform.node()}


def utc_now() -> str:
    """The time of day, ISO 8601 UTC to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ----------------------------------------------------------------------------- time
def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's waited-for children so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Clock:
    """Wall seconds, this process's CPU seconds and its children's CPU seconds over a ``with`` block (or from
    :meth:`start` until :meth:`read`, or lap by lap)."""

    wall0: float = 0.0
    cpu0: float = 0.0
    children0: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    children_cpu_s: float = 0.0

    def start(self) -> "Clock":
        self.wall0, self.cpu0, self.children0 = time.perf_counter(), time.process_time(), children_cpu_s()
        return self

    def read(self) -> "Clock":
        self.wall_s = time.perf_counter() - self.wall0
        self.cpu_s = time.process_time() - self.cpu0
        self.children_cpu_s = children_cpu_s() - self.children0
        return self

    def lap(self) -> tuple[float, float]:
        """(CPU s, wall s) since :meth:`start` or the previous lap, and start the next lap."""
        wall, cpu = time.perf_counter(), time.process_time()
        out = (cpu - self.cpu0, wall - self.wall0)
        self.wall0, self.cpu0 = wall, cpu
        return out

    def __enter__(self) -> "Clock":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.read()


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[Any, float, float]:
    """(last result, best wall seconds, best CPU seconds) of ``repeats`` calls of ``fn``."""
    best_w = best_c = float("inf")
    out = None
    for _ in range(max(1, repeats)):
        with Clock() as c:
            out = fn()
        best_w, best_c = min(best_w, c.wall_s), min(best_c, c.cpu_s)
    return out, best_w, best_c


# ----------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """This process's resident memory now."""
    return psutil.Process().memory_info().rss


def max_rss_bytes(children: bool = False) -> int:
    """The high-water mark of resident memory (``ru_maxrss``, KiB on Linux) of this process, or of its largest
    waited-for child. A spawned child inherits the parent's pre-exec mark: read a child's own VmHWM when the
    parent is larger."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss * 1024


class PeakRSS:
    """The highest resident memory of this process seen while the ``with`` block runs (sampled every ``interval``
    seconds in a thread, and at entry and exit): ``start``, ``peak`` in bytes, ``peak_gb``."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, self._proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_gb(self) -> float:
        return self.peak / 1e9


# ----------------------------------------------------------------------------- output
def result_path(name: str | os.PathLike) -> Path:
    """``benchmarks/results/<name>.json`` for a bare name, else the path as given."""
    p = Path(name)
    return p if (p.suffix or p.parent != Path(".")) else RESULTS / f"{name}.json"


def read_results(name: str | os.PathLike, default: Any = None) -> Any:
    """A benchmark's earlier JSON (to update it), or ``default`` when there is none."""
    p = result_path(name)
    return json.loads(p.read_text()) if p.exists() else default


def write_results(name: str | os.PathLike, data: Any, indent: int = 2, echo: bool = False) -> Path:
    """Write ``data`` as JSON to :func:`result_path` (directories made; numpy scalars as floats); ``echo`` prints it."""
    p = result_path(name)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=indent, default=float)
    p.write_text(text + "\n")
    if echo:
        print(text)
    return p


__all__ = ["BENCHMARKS", "REPO", "RESULTS", "load_average", "machine", "utc_now", "children_cpu_s", "Clock",
           "best_of", "rss_bytes", "max_rss_bytes", "PeakRSS", "result_path", "read_results", "write_results"]
