"""Observation sources: one still's per-pixel table, streamed in chunks.

The core only needs fractional Miller indices (through the still's own A matrix),
corrected intensity, its σ, optionally a weight independent of the counts (the pixel's
exposure, 1/correction; None = 1/σ²) and optionally |q| (for the scaler's table).  Files are
read by :func:`voxel_merger.artifacts.open_still`; in-memory arrays use :class:`ArrayStill`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np

from .grid import CrystalModel

__all__ = ["ObservationChunk", "StillSource", "ArrayStill"]


@dataclass
class ObservationChunk:
    h: np.ndarray
    k: np.ndarray
    l: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    q_magnitude: np.ndarray | None = None
    weight: np.ndarray | None = None  # per-observation weight (exposure); None = 1/σ²

    def __len__(self) -> int:
        return int(self.h.size)


class StillSource(Protocol):
    still_id: str
    crystal: CrystalModel | None
    n_obs: int

    def iter_chunks(self, chunk: int = 1 << 22) -> Iterator[ObservationChunk]: ...


@dataclass
class ArrayStill:
    """A still held in memory (same interface as a file-backed still)."""

    still_id: str
    h: np.ndarray
    k: np.ndarray
    l: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    q_magnitude: np.ndarray | None = None
    crystal: CrystalModel | None = None
    weight: np.ndarray | None = None

    @property
    def n_obs(self) -> int:
        return int(np.asarray(self.h).size)

    def iter_chunks(self, chunk: int = 1 << 22) -> Iterator[ObservationChunk]:
        n = self.n_obs
        for a in range(0, max(n, 1), chunk):
            if n == 0:
                return
            z = min(a + chunk, n)
            q = None if self.q_magnitude is None else np.asarray(self.q_magnitude)[a:z]
            w = None if self.weight is None else np.asarray(self.weight)[a:z]
            yield ObservationChunk(np.asarray(self.h)[a:z], np.asarray(self.k)[a:z], np.asarray(self.l)[a:z],
                                   np.asarray(self.intensity)[a:z], np.asarray(self.sigma)[a:z], q, w)
