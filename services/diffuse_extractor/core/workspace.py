"""Reusable large arrays, so that successive stills do not pay for fresh memory.

A 6 Mpixel still needs ~20 arrays of 25-75 MB. Freshly mapped memory costs a page fault per
4 KB page on first touch (several ms per array, more than the arithmetic done on it), and glibc
returns blocks over 32 MB to the kernel on free, so a new still would fault them all again.
``Workspace.get(name, shape, dtype)`` hands back the array issued last time under ``name`` when
nothing outside the workspace still references it (checked with the reference count under a
lock, so a result the caller keeps is never overwritten); otherwise a new array.
``Workspace.release`` / ``Workspace.empty`` recycle arrays by shape for the static per-geometry
arrays of an evicted cache entry.
"""
from __future__ import annotations

import sys
import threading

import numpy as np


class Workspace:
    """Named reusable arrays and a small free list, see the module docstring."""

    def __init__(self, max_free_bytes: int = 400 * 2**20, keep: int = 1):
        self._named: dict[str, list[np.ndarray]] = {}
        self.keep = keep
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.max_free_bytes = max_free_bytes
        self.reused = 0
        self.allocated = 0

    @staticmethod
    def _unused(buf: np.ndarray, holders: int) -> bool:
        # references: the holders inside the workspace, the caller's loop variable, ``buf`` here and
        # the argument of getrefcount; any more is a view (or array) someone outside still holds
        return sys.getrefcount(buf) <= holders + 3

    def get(self, name: str, shape, dtype=np.float32, capacity: int = 0) -> np.ndarray:
        """An uninitialised array of ``shape``, reusing one issued before under ``name`` if it is free.

        Up to ``keep`` buffers per name are kept (1 by default, to bound memory: a caller looping
        ``res = extract(...)`` should drop the previous result first to reuse its memory). A new
        buffer holds at least ``capacity`` elements, so slightly larger later requests fit.
        """
        shape = tuple(int(s) for s in np.atleast_1d(shape))
        dtype = np.dtype(dtype)
        size = int(np.prod(shape))
        with self._lock:
            bufs = self._named.setdefault(name, [])
            for buf in bufs:
                if buf.dtype == dtype and buf.size >= size and self._unused(buf, 1):
                    self.reused += 1
                    return buf[:size].reshape(shape)
            buf = None
            new = np.empty(max(size, int(capacity), 1), dtype)
            self.allocated += 1
            bufs.append(new)
            if len(bufs) > self.keep:
                bufs.pop(0)
            return new[:size].reshape(shape)

    def release(self, arrays) -> None:
        """Offer arrays (no longer needed by their owner) for ``empty``; extra ones are dropped."""
        with self._lock:
            for a in arrays:
                if isinstance(a, np.ndarray) and a.base is None and a.ndim and a.strides[-1] != 0:
                    self._free.append(a)
            total = 0
            keep = []
            for a in reversed(self._free):
                if total + a.nbytes <= self.max_free_bytes:
                    keep.append(a)
                    total += a.nbytes
            self._free = keep[::-1]

    def empty(self, shape, dtype=np.float32) -> np.ndarray:
        """An uninitialised array, taken from the free list when one of that shape and dtype is unused."""
        shape = tuple(int(s) for s in np.atleast_1d(shape))
        dtype = np.dtype(dtype)
        with self._lock:
            for i in range(len(self._free)):  # (enumerate's reused tuple would hold a reference)
                a = self._free[i]
                if a.shape == shape and a.dtype == dtype and self._unused(a, 1):
                    self.reused += 1
                    return self._free.pop(i)
                del a
        self.allocated += 1
        return np.empty(shape, dtype)

    def clear(self) -> None:
        with self._lock:
            self._named.clear()
            self._free.clear()


#: the process-wide workspace used by the extraction
WORKSPACE = Workspace()
