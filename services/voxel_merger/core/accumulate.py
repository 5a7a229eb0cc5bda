"""Per-voxel sums of weighted observations, combinable by addition.

An observation is (I, σ, w) with a weight w that must not depend on the observed counts.
For the diffuse-extractor's tables w is the pixel's exposure e = 1/correction, so that
w·I = raw − background (net counts): the merged mean Σw·I/Σw = Σ net counts / Σ exposure is
the pooled (mdx2-like) estimator, unbiased for Poisson counts.  Weighting by 1/σ² with σ from
each pixel's own counts would pull the mean towards the harmonic mean (−24 % at 5 photons).
Without a stored weight, w defaults to 1/σ² (then Σw²σ² = Σw and nothing changes).

State per voxel and per half-dataset: ``count``, ``sum_w`` (Σw), ``sum_wi`` (Σw·I) and
``sum_w2v`` (Σw²σ²).  mean = Σw·I/Σw, σ = √(Σw²σ²)/Σw (error propagation for any fixed
weights).  These sums are associative, so one accumulator per still (or per replica)
merges into the whole by plain addition (LiberTEM-style map + reduce).

A per-still multiplicative scale b (I_obs ≈ b·I_ref, so I → I/b, σ → σ/b) turns the
weight into b·w (an exposure scales like the signal), so w·I and w²σ² are unchanged and
only sum_w → b·sum_w: a single-still accumulator can be scaled exactly at merge time.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import numpy as np

from . import kernels
from .grid import GlobalGrid
from .kernels import accumulate_hkl, accumulate_ids
from .params import DEFAULTS

__all__ = [
    "FIELDS",
    "VoxelAccumulator",
    "observation_weights",
    "blocked_sums",
    "block_shift_for",
    "half_of_still",
    "scale_sums",
    "sparse_sums",
]

FIELDS = ("count", "sum_w", "sum_wi", "sum_w2v")
N_FIELDS = len(FIELDS)


def half_of_still(still_id: str | int, seed: int = DEFAULTS.half_seed) -> int:
    """Deterministic pseudo-random half (0 or 1) of a still: the same in every job and partition."""
    digest = hashlib.blake2b(f"{seed}:{still_id}".encode(), digest_size=8).digest()
    return digest[0] & 1


def observation_weights(intensity: np.ndarray, sigma: np.ndarray, scale=None, weight=None):
    """(w, w·I, w²σ²) of observations (I, σ) with weight ``weight`` (default 1/σ²), then the scale b.

    The scale b (scalar or per observation) means I → I/b, σ → σ/b, w → b·w: only w changes.
    Arithmetic order is the one of the numba kernels (w·I, then w·(w·σ·σ)).
    """
    intensity = np.asarray(intensity, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    v = sigma * sigma
    if weight is None:
        w = np.reciprocal(v)
    else:
        w = np.array(weight, dtype=np.float64)
    wi = w * intensity
    w2v = w * (w * v)
    if scale is not None and not (np.isscalar(scale) and scale == 1.0):
        w *= np.asarray(scale, dtype=np.float64)
    return w, wi, w2v


def scale_sums(sums: np.ndarray, b: float) -> np.ndarray:
    """Apply a still's scale b (I → I/b) to accumulated sums of shape (4, ...) in place: Σw → b·Σw."""
    sums[1] *= b
    return sums


def block_shift_for(n_voxels: int, min_shift: int = 16) -> int:
    """log2 block size: >= 2**min_shift voxels and at most 65535 blocks (so block keys fit uint16)."""
    shift = min_shift
    while (n_voxels >> shift) >= 65535:
        shift += 1
    return shift


def blocked_sums(ids: np.ndarray, weights: Sequence[np.ndarray | None], shift: int
                 ) -> Iterator[tuple[int, int, list[np.ndarray]]]:
    """Group observations by voxel block (2**shift voxels) and bincount inside each block.

    Yields (block, length, [sum per field]) where a field weight of None means counts.
    Grouping uses a stable radix sort on uint16 block keys (O(n)), so total cost is
    O(n + touched blocks · block size), independent of the full grid size.
    """
    bsize = 1 << shift
    keys = ids >> shift
    kmin, kmax = int(keys.min()), int(keys.max())
    if kmin == kmax:
        local = ids - (kmin << shift)
        length = int(local.max()) + 1
        yield kmin, length, [np.bincount(local, weights=w, minlength=length).astype(np.float64, copy=False)
                             for w in weights]
        return
    order = np.argsort(keys.astype(np.uint16 if kmax < 65536 else np.uint32), kind="stable")
    ks = keys[order]
    sid = ids[order]
    sw = [None if w is None else w[order] for w in weights]
    bounds = np.flatnonzero(np.diff(ks)) + 1
    starts = np.concatenate(([0], bounds))
    stops = np.concatenate((bounds, [len(ks)]))
    for a, z in zip(starts.tolist(), stops.tolist()):
        blk = int(ks[a])
        local = sid[a:z] - (blk << shift)
        length = min(bsize, int(local.max()) + 1)
        yield blk, length, [np.bincount(local, weights=None if w is None else w[a:z],
                                        minlength=length).astype(np.float64, copy=False) for w in sw]



#: grids up to this many voxels use the compiled kernel's int32 slot map (256 MiB); larger ones sort the ids
SLOT_MAP_MAX_VOXELS = 1 << 26


def sparse_sums(ids: np.ndarray, intensity: np.ndarray, sigma: np.ndarray, n_voxels: int, weight=None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Sums of one batch of observations per voxel they touch, without a grid-sized array.

    ``ids``: voxel ids (-1 or >= ``n_voxels``: outside); ``weight`` as in :meth:`_SumStore.add_ids`. Returns
    ``(voxel ids (m,) increasing, sums (4, m) count, Σw, Σw·I, Σw²σ², observations per voxel usable or not (m,),
    usable observations)``; a voxel whose observations are all unusable has zero sums. The sums equal, bit for
    bit, what :class:`VoxelAccumulator` adds for the same observations (same arithmetic, same order).
    Memory: O(observations), plus the kernel's slot map (4 bytes per voxel, kept for the next still) on grids
    up to :data:`SLOT_MAP_MAX_VOXELS`."""
    ids = np.asarray(ids, dtype=np.int64)
    if kernels.available() and n_voxels <= SLOT_MAP_MAX_VOXELS:
        uids, s, n_all, used = kernels.sparse_ids(ids, intensity, sigma, n_voxels, weight)
        order = np.argsort(uids)
        return uids[order], np.ascontiguousarray(s[order].T), n_all[order], used
    inside = (ids >= 0) & (ids < n_voxels)
    uids, inv, n_all = np.unique(ids[inside], return_inverse=True, return_counts=True)
    I, sig = np.asarray(intensity)[inside], np.asarray(sigma)[inside]
    wt = None if weight is None else np.asarray(weight)[inside]
    ok = _valid_mask(np.zeros(inv.size, np.int64), I, sig, wt)
    if ok is not None:
        inv, I, sig = inv[ok], I[ok], sig[ok]
        wt = None if wt is None else wt[ok]
    w, wi, w2v = observation_weights(I, sig, None, wt)
    s = np.stack([np.bincount(inv, weights=x, minlength=uids.size).astype(np.float64, copy=False)
                  for x in (None, w, wi, w2v)])
    return uids, s, n_all, int(inv.size)

_TORCH = None


def optional_torch():
    """torch if importable (in-place scatter-add without grid-sized temporaries), else False."""
    global _TORCH
    if _TORCH is None:
        try:
            import torch  # torch (~1 s): optional fast path, loaded on the first accumulation only

            _TORCH = torch
        except ImportError:  # pragma: no cover - torch is a project dependency
            _TORCH = False
    return _TORCH


def _valid_mask(ids: np.ndarray, intensity: np.ndarray, sigma: np.ndarray, weight: np.ndarray | None = None):
    """None when every observation is usable (fast path), else a boolean mask.

    Usable: voxel id >= 0, finite I and σ, and either σ > 0 (weight 1/σ²) or, with a stored
    weight, 0 < w < inf and σ >= 0 (a pixel with zero counts may carry σ = 0; dropping it would
    bias the mean up).
    """
    ok = True
    if ids.size:
        smin = 0.0 if weight is not None else np.nextafter(0.0, 1.0)
        if ids.min() < 0:
            ok = False
        elif not (sigma.min() >= smin and np.isfinite(sigma.max())):
            ok = False
        elif not np.isfinite(intensity.sum()):
            ok = False
        elif weight is not None and not (weight.min() > 0 and np.isfinite(weight.max())):
            ok = False
    if ok:
        return None
    m = (ids >= 0) & np.isfinite(sigma) & np.isfinite(intensity)
    if weight is None:
        m &= sigma > 0
    else:
        m &= (sigma >= 0) & (weight > 0) & np.isfinite(weight)
    return m


class _SumStore:
    """Shared logic of the in-memory and HDF5-backed accumulators (see ``add_sums`` / ``iter_blocks``)."""

    grid: GlobalGrid
    n_halves: int

    def _init_meta(self):
        self.still_ids: list[str] = []
        self.n_obs = 0
        self.n_dropped = 0

    # subclasses implement: add_sums(ids, half, sums(list of 4 arrays or None for count)),
    # read_range(start, stop) -> (4, n_halves, stop-start), iter_blocks(), _bump_meta

    def add_ids(self, ids: np.ndarray, intensity: np.ndarray, sigma: np.ndarray,
                half: int | np.ndarray = 0, scale=None, still_id: str | None = None, weight=None) -> int:
        """Accumulate observations already mapped to voxel ids (-1 = outside). Returns number used.

        ``weight``: per-observation weight independent of the counts (exposure); None = 1/σ².
        """
        ids = np.asarray(ids, dtype=np.int64)
        intensity = np.asarray(intensity, dtype=np.float64)
        sigma = np.asarray(sigma, dtype=np.float64)
        if weight is not None:
            weight = np.asarray(weight, dtype=np.float64)
        if not (ids.shape == intensity.shape == sigma.shape) or (weight is not None and weight.shape != ids.shape):
            raise ValueError(f"ids, intensity, sigma (and weight) must have the same shape: "
                             f"{ids.shape}, {intensity.shape}, {sigma.shape}"
                             f"{'' if weight is None else ', ' + str(weight.shape)}")
        n_in = ids.size
        mask = _valid_mask(ids, intensity, sigma, weight)
        if mask is not None:
            ids, intensity, sigma = ids[mask], intensity[mask], sigma[mask]
            if weight is not None:
                weight = weight[mask]
            if scale is not None and np.ndim(scale):
                scale = np.asarray(scale)[mask]
            if np.ndim(half):
                half = np.asarray(half)[mask]
        if still_id is not None and str(still_id) not in self.still_ids:
            self.still_ids.append(str(still_id))
        self.n_obs += ids.size
        self.n_dropped += n_in - ids.size
        if ids.size == 0:
            return 0
        w, wi, w2v = observation_weights(intensity, sigma, scale, weight)
        if np.ndim(half) == 0:
            self.add_sums(ids, int(half), [None, w, wi, w2v])
        else:
            half = np.asarray(half)
            for hh in range(self.n_halves):
                m = half == hh
                if m.any():
                    self.add_sums(ids[m], hh, [None, w[m], wi[m], w2v[m]])
        return int(ids.size)

    def add(self, h, k, l, intensity, sigma, half=0, scale=None, still_id=None, chunk: int | None = None,
            weight=None) -> int:
        """Accumulate observations at fractional hkl (in cache-sized chunks when the scatter is O(n))."""
        h, k, l = np.asarray(h), np.asarray(k), np.asarray(l)
        intensity, sigma = np.asarray(intensity), np.asarray(sigma)
        weight = None if weight is None else np.asarray(weight)
        n = h.size
        if chunk is None:
            chunk = (1 << 18) if getattr(self, "use_torch", False) and optional_torch() else (1 << 22)
        if n <= chunk:
            return self.add_ids(self.grid.voxel_ids(h, k, l), intensity, sigma, half, scale, still_id, weight)
        used = 0
        for a in range(0, n, chunk):
            z = a + chunk
            sc = scale[a:z] if scale is not None and np.ndim(scale) else scale
            hf = half[a:z] if np.ndim(half) else half
            used += self.add_ids(self.grid.voxel_ids(h[a:z], k[a:z], l[a:z]), intensity[a:z], sigma[a:z],
                                 hf, sc, still_id, None if weight is None else weight[a:z])
        return used

    def add_block(self, start: int, s: np.ndarray, half: int | None = None) -> None:
        """Add sums ``s`` (4, n_halves or 1, n) covering voxels [start, start+n); ``half`` routes a
        one-half block into that half (else halves must match, or a one-half store takes their sum)."""
        raise NotImplementedError

    def totals_range(self, start: int, stop: int) -> np.ndarray:
        """Sums over halves, shape (4, stop-start)."""
        return self.read_range(start, stop).sum(axis=1)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Total sums (4, n) at the given voxel ids (all must be valid)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros((N_FIELDS, ids.size))
        if ids.size == 0:
            return out
        shift = self.block_shift
        keys = ids >> shift
        order = np.argsort(keys, kind="stable")
        ks = keys[order]
        bounds = np.flatnonzero(np.diff(ks)) + 1
        for a, z in zip(np.r_[0, bounds].tolist(), np.r_[bounds, ids.size].tolist()):
            blk = int(ks[a])
            start = blk << shift
            stop = min(start + (1 << shift), self.grid.n_voxels)
            tot = self.totals_range(start, stop)
            sel = order[a:z]
            out[:, sel] = tot[:, ids[sel] - start]
        return out


class VoxelAccumulator(_SumStore):
    """In-memory accumulator: dense float64 sums (counts exact below 2**53).

    Stored as (n_halves, n_voxels, 4) so one observation touches one cache line; ``sums``
    is the (4, n_halves, n_voxels) view that the rest of the package reads.
    """

    def __init__(self, grid: GlobalGrid, n_halves: int = 1, use_torch: bool = True, kernel: str = "auto"):
        """``kernel``: "numba" (fused one-pass loop), "vector" (torch index_add_ / np.bincount) or "auto"."""
        if n_halves not in (1, 2):
            raise ValueError(f"n_halves must be 1 or 2, got {n_halves}")
        if kernel not in ("auto", "numba", "vector"):
            raise ValueError(f"kernel must be 'auto', 'numba' or 'vector', got {kernel!r}")
        if kernel == "numba" and not kernels.available():
            raise RuntimeError("kernel='numba' requested but numba cannot be imported")
        self.kernel = "numba" if (kernel == "numba" or (kernel == "auto" and kernels.available())) else "vector"
        self.use_torch = use_torch
        self._tsums = None
        self.grid = grid
        self.n_halves = n_halves
        # fields interleaved per voxel (one cache line per scatter-add); ``sums`` is the (4, halves, voxels) view
        self._data = np.zeros((n_halves, grid.n_voxels, N_FIELDS), dtype=np.float64)
        self.sums = self._data.transpose(2, 0, 1)
        self.block_shift = block_shift_for(grid.n_voxels)
        self._init_meta()

    def _fused(self, half, scale) -> bool:
        return self.kernel == "numba" and np.ndim(half) == 0

    def _book(self, n_in: int, used: int, still_id):
        if still_id is not None and str(still_id) not in self.still_ids:
            self.still_ids.append(str(still_id))
        self.n_obs += used
        self.n_dropped += n_in - used

    def add(self, h, k, l, intensity, sigma, half=0, scale=None, still_id=None, chunk: int | None = None,
            weight=None) -> int:
        if not self._fused(half, scale):
            return super().add(h, k, l, intensity, sigma, half, scale, still_id, chunk, weight)
        h = np.asarray(h)
        if not (h.shape == np.shape(k) == np.shape(l) == np.shape(intensity) == np.shape(sigma)) or (
                weight is not None and np.shape(weight) != h.shape):
            raise ValueError("h, k, l, intensity, sigma (and weight) must have the same shape")
        used = accumulate_hkl(self.grid, self._data[int(half)], h.ravel(), np.ravel(k), np.ravel(l),
                              np.ravel(intensity), np.ravel(sigma), scale,
                              None if weight is None else np.ravel(weight))
        self._book(h.size, used, still_id)
        return used

    def add_ids(self, ids, intensity, sigma, half=0, scale=None, still_id=None, weight=None) -> int:
        if not self._fused(half, scale):
            return super().add_ids(ids, intensity, sigma, half, scale, still_id, weight)
        ids = np.asarray(ids)
        if not (ids.shape == np.shape(intensity) == np.shape(sigma)) or (
                weight is not None and np.shape(weight) != ids.shape):
            raise ValueError(f"ids, intensity, sigma (and weight) must have the same shape: "
                             f"{ids.shape}, {np.shape(intensity)}, {np.shape(sigma)}")
        used = accumulate_ids(self._data[int(half)], ids.ravel(), np.ravel(intensity), np.ravel(sigma), scale,
                              None if weight is None else np.ravel(weight))
        self._book(ids.size, used, still_id)
        return used

    def add_sums(self, ids: np.ndarray, half: int, sums: Sequence[np.ndarray | None]) -> None:
        """Add per-observation (or per-voxel) sums; None in ``sums`` means one count each.

        Uses torch's in-place ``index_add_`` on the shared numpy buffer when available (cost
        O(n), no grid-sized temporaries); otherwise np.bincount, dense or per voxel block.
        """
        n = self.grid.n_voxels
        torch = optional_torch() if self.use_torch else False
        if torch:
            if self._tsums is None:
                self._tsums = torch.from_numpy(self._data)
            src = np.empty((ids.size, N_FIELDS))
            for f, w in enumerate(sums):
                src[:, f] = 1.0 if w is None else w
            self._tsums[half].index_add_(0, torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)),
                                         torch.from_numpy(src))
            return
        target = self.sums[:, half, :]
        if ids.size * 4 >= n:  # dense bincount over the whole grid is cheapest
            for f, w in enumerate(sums):
                target[f] += np.bincount(ids, weights=w, minlength=n)
            return
        for blk, length, parts in blocked_sums(ids, sums, self.block_shift):
            start = blk << self.block_shift
            seg = target[:, start:start + length]
            for f in range(N_FIELDS):
                seg[f] += parts[f]

    def read_range(self, start: int, stop: int) -> np.ndarray:
        return self.sums[:, :, start:stop]

    def add_block(self, start: int, s: np.ndarray, half: int | None = None) -> None:
        stop = start + s.shape[-1]
        if half is not None:
            self.sums[:, half, start:stop] += s.sum(axis=1)
        elif s.shape[1] == self.n_halves:
            self.sums[:, :, start:stop] += s
        else:
            self.sums[:, 0, start:stop] += s.sum(axis=1)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Total sums (4, n) at the given voxel ids."""
        return self._data[:, np.asarray(ids, dtype=np.int64), :].sum(axis=0).T

    def iter_blocks(self, block: int = 1 << 20) -> Iterator[tuple[int, np.ndarray]]:
        """(start, sums (4, n_halves, len)) for blocks holding any observation."""
        for start in range(0, self.grid.n_voxels, block):
            s = self.sums[:, :, start:start + block]
            if s[0].any():
                yield start, s

    # ------------------------------------------------------------ combining
    def _check_compatible(self, other: "_SumStore"):
        if other.grid != self.grid:
            raise ValueError("cannot combine accumulators on different grids")

    def merge(self, other: "_SumStore", scale: float | None = None, half: int | None = None) -> "VoxelAccumulator":
        """Add another accumulator (in-memory or HDF5) into this one, in place.

        ``scale`` applies a still's multiplicative scale to the other's sums; ``half``
        routes a one-half accumulator into one half of a two-half accumulator.
        """
        self._check_compatible(other)
        for start, s in other.iter_blocks():
            s = np.array(s, dtype=np.float64)
            if scale is not None:
                scale_sums(s, scale)
            stop = start + s.shape[-1]
            if half is not None:
                self.sums[:, half, start:stop] += s.sum(axis=1)
            elif other.n_halves == self.n_halves:
                self.sums[:, :, start:stop] += s
            else:
                self.sums[:, 0, start:stop] += s.sum(axis=1)
        for sid in other.still_ids:
            if sid not in self.still_ids:
                self.still_ids.append(sid)
        self.n_obs += other.n_obs
        self.n_dropped += other.n_dropped
        return self

    def __iadd__(self, other):
        return self.merge(other)

    def __add__(self, other):
        out = self.copy()
        out.merge(other)
        return out

    def copy(self) -> "VoxelAccumulator":
        out = VoxelAccumulator(self.grid, self.n_halves, self.use_torch, self.kernel)
        out.sums[...] = self.sums
        out.still_ids = list(self.still_ids)
        out.n_obs, out.n_dropped = self.n_obs, self.n_dropped
        return out

    def scaled(self, b: float) -> "VoxelAccumulator":
        """Copy with the scale b applied (valid for a single-still accumulator)."""
        out = self.copy()
        scale_sums(out.sums, b)
        return out

    def totals(self) -> np.ndarray:
        """Sums over halves, shape (4, n_voxels)."""
        return self.sums.sum(axis=1)
