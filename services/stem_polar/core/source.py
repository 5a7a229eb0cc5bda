"""Frame sources: the pipeline reads a scan as contiguous blocks of flattened probe positions.

A source exposes ``n_frames``, ``frame_shape`` (ky, kx), ``scan_shape`` (H, W) and ``read(start, stop)``
returning an (stop - start, ky, kx) array. Only one block is in memory at a time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Protocol

import numpy as np


class FrameSource(Protocol):
    n_frames: int
    frame_shape: tuple[int, int]
    scan_shape: tuple[int, int]
    dtype: np.dtype
    name: str

    def read(self, start: int, stop: int) -> np.ndarray: ...


class ArraySource:
    """In-memory (N, ky, kx) or (H, W, ky, kx) array (tests, small data)."""

    def __init__(self, data: np.ndarray, scan_shape: tuple[int, int] | None = None, name: str = "<array>"):
        data = np.asarray(data)
        if data.ndim == 4:
            if scan_shape is not None and tuple(scan_shape) != data.shape[:2]:
                raise ValueError(f"{name}: scan shape {tuple(scan_shape)} does not match data scan axes {data.shape[:2]}")
            scan_shape = data.shape[:2]
            data = data.reshape(-1, *data.shape[2:])
        elif data.ndim != 3:
            raise ValueError(f"{name}: 4D-STEM data must be 3-D (N, ky, kx) or 4-D (H, W, ky, kx), got shape {data.shape}")
        if scan_shape is None:
            raise ValueError(f"{name}: 3-D data needs a scan shape (H, W)")
        check_scan_shape(data.shape[0], scan_shape, name)
        self.data = data
        self.n_frames = data.shape[0]
        self.frame_shape = tuple(data.shape[1:])
        self.scan_shape = tuple(int(s) for s in scan_shape)
        self.dtype = data.dtype
        self.name = name

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.data[start:stop]

    def frames_view(self) -> np.ndarray:
        """The (N, ky, kx) frames themselves (no copy; readers must not write into them)."""
        return self.data


def check_scan_shape(n_frames: int, scan_shape, name: str) -> None:
    if len(scan_shape) != 2 or min(scan_shape) < 1:
        raise ValueError(f"{name}: scan shape must be two positive integers H W, got {scan_shape}")
    h, w = (int(s) for s in scan_shape)
    if h * w != n_frames:
        raise ValueError(f"{name}: scan shape {h} x {w} = {h * w} positions but the data hold {n_frames} patterns")


def iter_chunks(source, chunk: int, start: int = 0, stop: int | None = None,
                buffers: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (start, stop, block) over ``source`` in blocks of ``chunk`` frames.

    With ``buffers`` > 0 and a source offering ``read_into``, blocks are read into a ring of that many
    preallocated arrays (no page faults from fresh allocations): a block is valid until ``buffers`` - 1
    further blocks have been taken.
    """
    stop = source.n_frames if stop is None else stop
    ring = None
    if buffers and hasattr(source, "read_into"):
        ring = [np.empty((chunk,) + tuple(source.frame_shape), dtype=source.dtype) for _ in range(buffers)]
    for i, a in enumerate(range(start, stop, chunk)):
        b = min(a + chunk, stop)
        if ring is not None:
            yield a, b, source.read_into(a, b, ring[i % len(ring)][:b - a])
        else:
            yield a, b, source.read(a, b)


def prefetch_chunks(gen, enabled: bool = True):
    """Items of ``gen`` with the next one read in a background thread while the current one is processed
    (I/O overlap); ``enabled=False`` yields them in the caller's thread."""
    if not enabled:
        yield from gen
        return
    with ThreadPoolExecutor(max_workers=1) as ex:
        it = iter(gen)
        fut = ex.submit(next, it, None)
        while True:
            item = fut.result()
            if item is None:
                return
            fut = ex.submit(next, it, None)
            yield item


def auto_chunk(frame_shape, target_bytes: int = 64 << 20) -> int:
    """Frames per block so that a float32 block is about ``target_bytes``."""
    per = int(np.prod(frame_shape)) * 4
    return max(1, int(target_bytes // per))
