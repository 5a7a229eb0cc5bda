"""Hot and dead pixels from running per-pixel statistics across the stills of a run.

On the bus each job extracts one still, so the run's statistics live on the shared volume, next to the
run's ``pixel_stats.h5`` name: every extracting process keeps the sums of the stills *it* added in memory
and in its own part file, ``<name>.parts/<host>-<pid>-<token>.h5`` (:func:`update_run_stats`: add the still
in memory, write the part to a temporary file, ``os.replace``). No lock is shared between replicas, and a
single worker never reads the statistics back. The run's statistics are the sum of every part
(:func:`read_run_stats`; another worker's part is read again only when its file changed), plus a
``<name>`` file of the earlier single-file layout if one exists. A still already counted in any part, by
its id, is not added again, so a redelivered job does not count twice. Per pixel: ``n`` (stills in which
the pixel was trusted and not overloaded), ``sum`` and ``sumsq`` of its counts, ``n_zero`` (stills in
which it read 0). Parts are added in the order of their names; for integer counts (exact in float64)
the sums do not depend on which worker counted which still.

Writing the part (4 arrays of the detector's size, ~0.085 CPU-s for a 6M detector) is deferred: a still is
added in memory at once (this process's flags use it from that still on) and the part file is rewritten at
most once per ``FLUSH_INTERVAL_S`` (a timer thread writes it that long after the first unwritten still;
:func:`flush` / process exit write it at once; ``DIFFUSE_EXTRACTOR_STATS_FLUSH_S=0`` writes every still).
Crash rule: each part file is written whole and atomically and lists exactly the stills its sums hold, so a
still is never counted twice in the files; a worker killed hard (SIGKILL, OOM) loses the stills it added in
its last ``FLUSH_INTERVAL_S`` (2 s: about 3 stills at full speed) from the run's statistics. Its unacknowledged
job is redelivered and counted by the next worker; an already acknowledged still just stays out of the
statistics (the HOT/DEAD rule then sees one still fewer). The bus keeps a running job's lease alive and
redelivers only after ``ack_wait_s`` (30 s) without it, far longer than the flush interval, so a redelivered
still is already on disk in the first worker's part if that worker lived to count it.

Rule (:meth:`RunningPixelStats.hot_dead_flags`), applied from the ``min_stills``-th still of the run on,
with ``mean = sum / n``, ``var = sumsq / n - mean^2`` and ``local`` = the mean of ``mean`` over the
seen pixels of the ``size`` x ``size`` neighbourhood, the pixel itself excluded:

- HOT: ``mean > hot_factor * local`` and ``mean - local > hot_nsigma * sqrt(max(local, 1) / n)`` (far
  above its neighbours in every sense) **and** ``var <= steady_factor * max(mean, 1)``: it is bright
  steadily (Poisson-like scatter between stills). A Bragg peak that lands on a pixel in one still
  raises its mean too, but with a variance of order mean^2 * (n - 1), far above Poisson: not hot.
- DEAD: ``n_zero == n`` (read 0 in every still) while the neighbours predict more than
  ``dead_expected_counts`` counts in all (``local * n``; P(all zero) < e^-20 for a live pixel).

With numba (``core.kernels``) the sums and the rule run as fused kernels with the numpy path's float64
arithmetic (the box filter replicates scipy's ``uniform_filter``): the same flags, ~10x less time.
"""
from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import hdf5plugin  # registers the Blosc filter of the statistics files
import numpy as np
from scipy.ndimage import uniform_filter

from . import kernels
from .errors import InputError
from .masks import MaskBit

SCHEMA = "diffractflow.diffuse_pixel_stats"
SCHEMA_VERSION = 1
PARTS_SUFFIX = ".parts"
#: seconds a counted still may wait in memory before this process's part file is rewritten (0: every still)
FLUSH_INTERVAL_S = float(os.environ.get("DIFFUSE_EXTRACTOR_STATS_FLUSH_S", "2.0"))


@dataclass
class RunningPixelStats:
    """Per-panel running sums (see the module docstring)."""

    n: list[np.ndarray]  # uint16
    total: list[np.ndarray]  # float64 sum of counts
    sumsq: list[np.ndarray]  # float64 sum of squared counts
    n_zero: list[np.ndarray]  # uint16
    still_ids: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, shapes: Sequence[tuple[int, int]]) -> "RunningPixelStats":
        return cls([np.zeros(s, np.uint16) for s in shapes], [np.zeros(s) for s in shapes],
                   [np.zeros(s) for s in shapes], [np.zeros(s, np.uint16) for s in shapes], [])

    @property
    def n_stills(self) -> int:
        return len(self.still_ids)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [a.shape for a in self.n]

    def add(self, data: Sequence[np.ndarray], flags: Sequence[np.ndarray], still_id: str) -> bool:
        """Add one still (pixels without UNTRUSTED/OVERLOAD); False if ``still_id`` was counted already."""
        if still_id in self.still_ids:
            return False
        bad = np.uint8(MaskBit.UNTRUSTED | MaskBit.OVERLOAD)
        for i, d in enumerate(data):
            if kernels.enabled():
                kernels.stats_add(np.ascontiguousarray(d).ravel(), np.ascontiguousarray(flags[i], np.uint8).ravel(),
                                  bad, self.n[i].reshape(-1), self.total[i].reshape(-1), self.sumsq[i].reshape(-1),
                                  self.n_zero[i].reshape(-1))
                continue
            ok = (np.asarray(flags[i]) & bad) == 0
            d = np.where(ok, np.asarray(d, dtype=np.float64), 0.0)
            self.n[i] += ok
            self.total[i] += d
            self.sumsq[i] += d * d
            self.n_zero[i] += ok & (d == 0)
        self.still_ids.append(still_id)
        return True

    def hot_dead_flags(self, *, hot_factor: float = 5.0, hot_nsigma: float = 8.0, steady_factor: float = 4.0,
                       dead_expected_counts: float = 20.0, size: int = 7) -> list[np.ndarray]:
        """HOT/DEAD flags per panel by the rule of the module docstring."""
        out = []
        for n, s, ss, nz in zip(self.n, self.total, self.sumsq, self.n_zero):
            if kernels.enabled():
                f = np.empty(n.shape, np.uint8)
                kernels.hot_dead(np.ascontiguousarray(n), np.ascontiguousarray(s), np.ascontiguousarray(ss),
                                 np.ascontiguousarray(nz), int(size), float(hot_factor), float(hot_nsigma),
                                 float(steady_factor), float(dead_expected_counts), int(MaskBit.HOT),
                                 int(MaskBit.DEAD), f)
                out.append(f)
                continue
            seen = n > 0
            nn = np.maximum(n, 1).astype(np.float64)
            mean = np.where(seen, s / nn, np.nan)
            var = np.where(seen, ss / nn - np.nan_to_num(mean) ** 2, 0.0)
            loc = _local_mean(np.nan_to_num(mean), seen, size)
            m = np.nan_to_num(mean)
            hot = seen & (m > hot_factor * loc) & (m - loc > hot_nsigma * np.sqrt(np.maximum(loc, 1.0) / nn)) \
                & (var <= steady_factor * np.maximum(m, 1.0))
            dead = seen & (nz == n) & (loc * n > dead_expected_counts)
            f = np.zeros(n.shape, np.uint8)
            f[hot] |= MaskBit.HOT
            f[dead] |= MaskBit.DEAD
            out.append(f)
        return out


def _local_mean(values: np.ndarray, seen: np.ndarray, size: int) -> np.ndarray:
    """Mean of ``values`` over the seen pixels of the size x size square around each pixel, the pixel itself
    excluded (a box filter: ~20x cheaper than a median on a 6M detector; one hot pixel moves a neighbour's
    level by 1/(size^2 - 1) of its excess, far below the 5x factor of the rule)."""
    w = seen.astype(np.float64)
    v = np.where(seen, values, 0.0)
    area = float(size * size)
    tot = uniform_filter(v, size, mode="constant") * area - v
    cnt = uniform_filter(w, size, mode="constant") * area - w
    return np.where(cnt > 0.5, tot / np.maximum(cnt, 1.0), 0.0)


def parts_dir(path: str | Path) -> Path:
    """The directory of the per-process part files of the statistics named ``path``."""
    path = Path(path)
    return path.with_name(path.name + PARTS_SUFFIX)


def _signature(p: Path):
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_file(path: Path, shapes=None) -> RunningPixelStats:

    try:
        with h5py.File(path, "r") as f:
            s = f.attrs.get("schema")
            if (s.decode() if isinstance(s, bytes) else s) != SCHEMA:
                raise InputError(f"{path} has schema {s!r}, expected {SCHEMA!r}")
            k = sorted(f["n"].keys())
            st = RunningPixelStats([f["n"][p][()] for p in k], [f["sum"][p][()] for p in k],
                                   [f["sumsq"][p][()] for p in k], [f["n_zero"][p][()] for p in k],
                                   json.loads(f.attrs["still_ids"]))
    except (OSError, KeyError) as exc:
        raise InputError(f"cannot read pixel statistics {path}: {exc}") from exc
    if shapes is not None and [a.shape for a in st.n] != [tuple(x) for x in shapes]:
        raise InputError(f"pixel statistics {path} are for another detector ({[a.shape for a in st.n]})")
    return st


def _write(path: Path, st: RunningPixelStats) -> None:
    """One statistics file, atomically (temporary file + ``os.replace``). Blosc/LZ4 in whole-row chunks
    (~4x smaller than raw, ~0.1 s for a 6M detector on one core)."""

    comp = dict(hdf5plugin.Blosc(cname="lz4", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with h5py.File(tmp, "w", rdcc_nbytes=0) as f:
            f.attrs.update(schema=SCHEMA, schema_version=SCHEMA_VERSION, still_ids=json.dumps(st.still_ids),
                           n_stills=st.n_stills)
            for name, arrays in (("n", st.n), ("sum", st.total), ("sumsq", st.sumsq), ("n_zero", st.n_zero)):
                g = f.create_group(name)
                for i, a in enumerate(arrays):
                    ny, nx = a.shape
                    rows = max(1, min(ny, (1 << 20) // max(1, nx * a.itemsize)))  # ~1 MB chunks of whole rows
                    g.create_dataset(f"panel_{i:03d}", data=a, chunks=(rows, nx), **comp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _sum(parts: Sequence[RunningPixelStats]) -> RunningPixelStats:
    """The run's statistics from its parts (added in the given order)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    out = RunningPixelStats([a.copy() for a in first.n], [a.copy() for a in first.total],
                            [a.copy() for a in first.sumsq], [a.copy() for a in first.n_zero], list(first.still_ids))
    for p in parts[1:]:
        if p.shapes != out.shapes:
            raise InputError(f"pixel statistics parts are for different detectors ({p.shapes} != {out.shapes})")
        for i in range(len(out.n)):
            out.n[i] += p.n[i]
            out.total[i] += p.total[i]
            out.sumsq[i] += p.sumsq[i]
            out.n_zero[i] += p.n_zero[i]
        out.still_ids.extend(p.still_ids)
    return out


class _RunView:
    """This process's view of one run's statistics: its own part (in memory and on disk) and cached copies
    of the other parts, each re-read only when its file changes."""

    def __init__(self, path: Path):
        self.path = path
        self.dir = parts_dir(path)
        self.own_file = self.dir / f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.h5"
        self.own: RunningPixelStats | None = None
        self.own_sig = None
        self.others: dict[str, tuple[tuple, RunningPixelStats]] = {}
        self.lock = threading.Lock()
        self.dirty = False  # stills in ``own`` not yet in ``own_file``
        self.timer: threading.Timer | None = None

    def write_own(self) -> None:
        """Write this process's part now if it holds unwritten stills (call with ``lock`` held)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.dirty and self.own is not None and self.own.n_stills:
            self.dir.mkdir(parents=True, exist_ok=True)
            _write(self.own_file, self.own)
            self.own_sig = _signature(self.own_file)
        self.dirty = False

    def flush(self) -> None:
        with self.lock:
            self.write_own()

    def schedule(self, interval: float) -> None:
        """Mark the part unwritten; write it now (``interval`` <= 0) or ``interval`` s after the first
        unwritten still (call with ``lock`` held)."""
        self.dirty = True
        _register_exit_flush()
        if interval <= 0:
            self.write_own()
        elif self.timer is None:
            self.timer = threading.Timer(interval, self._timed_flush)
            self.timer.daemon = True
            self.timer.start()

    def _timed_flush(self) -> None:
        with self.lock:
            self.timer = None
            if self.dirty:
                self.write_own()

    def refresh(self, shapes=None) -> list[tuple[str, RunningPixelStats]]:
        """The other parts (and a single-file statistics at ``path``), read again where they changed."""
        files = {}
        if self.path.is_file():
            files["0-single-file"] = self.path
        if self.dir.is_dir():
            for p in self.dir.glob("*.h5"):
                if p.name != self.own_file.name:
                    files[p.name] = p
        seen = {}
        for name, p in files.items():
            sig = _signature(p)
            if sig is None:
                continue
            cached = self.others.get(name)
            if cached is None or cached[0] != sig:
                cached = (sig, _read_file(p, shapes))
            seen[name] = cached
        self.others = seen
        return [(name, seen[name][1]) for name in sorted(seen)]

    def own_stats(self, shapes) -> RunningPixelStats:
        """This process's part: kept in memory while its file is the one this process last wrote."""
        if self.own is not None and self.own_sig is not None and _signature(self.own_file) != self.own_sig:
            self.own = None  # the file was removed or replaced (e.g. the run's directory was cleared)
            self.dirty = False
        if self.own is None:
            self.own = RunningPixelStats.empty(shapes)
            self.own_sig = None
        if self.own.shapes != [tuple(x) for x in shapes]:
            raise InputError(f"pixel statistics {self.path} are for another detector ({self.own.shapes})")
        return self.own

    def parts(self, shapes=None) -> list[RunningPixelStats]:
        named = self.refresh(shapes)
        if self.own is not None and self.own.n_stills:
            named.append((self.own_file.name, self.own))
        return [st for _, st in sorted(named, key=lambda t: t[0])]


#: per statistics path (resolved), this process's view; a worker handles a few runs at a time
_VIEWS: "OrderedDict[str, _RunView]" = OrderedDict()
VIEW_ENTRIES = 2
_VIEWS_LOCK = threading.Lock()


def _view(path: Path) -> _RunView:
    key = str(path.resolve())
    with _VIEWS_LOCK:
        v = _VIEWS.pop(key, None) or _RunView(path)
        _VIEWS[key] = v
        while len(_VIEWS) > VIEW_ENTRIES:
            _, old = _VIEWS.popitem(last=False)
            old.flush()  # its unwritten stills go to its part file before the view is dropped
        return v


def flush(path: str | Path | None = None) -> None:
    """Write this process's unwritten stills to its part file(s) now: of the statistics named ``path``, or of
    every run it holds (called at process exit; a worker may call it when it goes idle or stops)."""
    with _VIEWS_LOCK:
        views = list(_VIEWS.values()) if path is None else \
            [v for k, v in _VIEWS.items() if k == str(Path(path).resolve())]
    for v in views:
        v.flush()


_AT_EXIT = []


def _register_exit_flush() -> None:
    """Flush at interpreter exit; registered after h5py is imported (at the top of this module) so that it runs
    before h5py's own exit handler (atexit runs handlers last-in first-out)."""
    if not _AT_EXIT:
        atexit.register(flush)
        _AT_EXIT.append(True)


def read_run_stats(path: str | Path, shapes: Sequence[tuple[int, int]] | None = None) -> RunningPixelStats:
    """The run's statistics named ``path``: the sum of its parts (empty ones of ``shapes`` when there are none
    yet)."""
    path = Path(path)
    v = _view(path)
    with v.lock:
        parts = v.parts(shapes)
    if not parts:
        if shapes is None:
            raise FileNotFoundError(f"pixel statistics {path} do not exist")
        return RunningPixelStats.empty(shapes)
    return _sum(parts)


def update_run_stats(path: str | Path, still_id: str, data: Sequence[np.ndarray],
                     flags: Sequence[np.ndarray]) -> RunningPixelStats:
    """Add one still to this process's part of the run's statistics (unless any part counted it already) and
    schedule the write of that part (module docstring: at most every ``FLUSH_INTERVAL_S``); returns the run's
    statistics (every part, this process's with the still)."""
    path = Path(path)
    shapes = [np.shape(d) for d in data]
    v = _view(path)
    with v.lock:
        v.dir.mkdir(parents=True, exist_ok=True)
        others = v.refresh(shapes)
        own = v.own_stats(shapes)
        if not any(still_id in st.still_ids for _, st in others) and own.add(data, flags, still_id):
            v.schedule(FLUSH_INTERVAL_S)
        parts = [st for _, st in sorted(others + ([(v.own_file.name, own)] if own.n_stills else []),
                                        key=lambda t: t[0])]
    return _sum(parts) if parts else RunningPixelStats.empty(shapes)
