"""A warm helper process that draws a job's figures while the job itself writes its HDF5 outputs.

h5py holds the GIL while it writes and compresses, so a thread cannot draw meanwhile; a second process can, on the
core the job leaves idle. A service starts the helper in its warm-up (:func:`start`); everything else (CLIs, tests,
notebooks) never starts it and draws in its own process, with the same function and the same files.

    drawing = draw_later(write_pngs, out_dir, planes)   # starts drawing now, in the helper when there is one
    write_map(...)                                        # meanwhile, in this process
    outputs.update(drawing.result())                      # the helper's result, or drawn here now

A helper that died (killed, out of memory) costs nothing but the overlap: the figures are drawn in process.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from .report_page import warm_up_figures

log = logging.getLogger("diffractflow.figures")

_POOL: ProcessPoolExecutor | None = None
_LOCK = threading.Lock()


def _ready() -> bool:
    return True


def start() -> None:
    """Start the helper (forkserver: it inherits no threads) and pay matplotlib's one-time costs in it now."""
    global _POOL
    with _LOCK:
        if _POOL is None or getattr(_POOL, "_broken", False):
            _POOL = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("forkserver"),
                                        initializer=warm_up_figures)
        pool = _POOL
    pool.submit(_ready).result()


def running() -> bool:
    """Whether figures go to a helper process (a service after :func:`start`)."""
    return _POOL is not None and not getattr(_POOL, "_broken", False)


def stop() -> None:
    global _POOL
    with _LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


class Drawing:
    """Figures being drawn: :meth:`result` returns what ``fn(*args)`` returns (drawn here if there is no helper)."""

    def __init__(self, fn: Callable[..., Any], args: tuple, future: Future | None):
        self._fn, self._args, self._future = fn, args, future

    @property
    def in_helper(self) -> bool:
        return self._future is not None

    def result(self) -> Any:
        if self._future is not None:
            try:
                return self._future.result()
            except BrokenProcessPool as exc:  # the helper died: the figures are still wanted
                log.warning("figure helper process lost (%s); drawing in this process", exc)
        return self._fn(*self._args)


def draw_later(fn: Callable[..., Any], *args: Any) -> Drawing:
    """Start ``fn(*args)`` (a module-level function of picklable arguments that writes files) in the helper; without
    a helper it runs when :meth:`Drawing.result` is called."""
    pool = _POOL
    if pool is None:
        return Drawing(fn, args, None)
    try:
        return Drawing(fn, args, pool.submit(fn, *args))
    except (BrokenProcessPool, RuntimeError) as exc:  # broken, or shut down meanwhile
        log.warning("figure helper process unavailable (%s); drawing in this process", exc)
        return Drawing(fn, args, None)
