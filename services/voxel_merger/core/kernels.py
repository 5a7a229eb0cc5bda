"""Optional fused accumulation kernels (numba, from Debian's python3-numba when present).

One pass per observation: validity check, voxel id from fractional hkl, the weight (stored
w, or 1/σ² without one) and the four scatter-adds (count, w, w·I, w²σ²), with no temporaries.
Arithmetic follows the numpy path operation for operation (t = h·ndiv + (0.5 − lo), floor;
v = σ·σ, w = given or 1/v, w·I, w·(w·v), then w·b for a scale b), so results match it to
rounding of the summation order.  ``available()`` is False when numba
cannot be imported; callers then use torch/np.bincount.
"""
from __future__ import annotations

import math
import threading

import numpy as np

try:  # pragma: no cover - depends on the machine
    from numba import njit

    _HAVE_NUMBA = True
except Exception:  # noqa: BLE001 - any import problem means "not available"
    _HAVE_NUMBA = False

__all__ = ["available", "accumulate_hkl", "accumulate_ids", "sparse_ids"]


def available() -> bool:
    return _HAVE_NUMBA


if _HAVE_NUMBA:

    @njit(nogil=True, cache=True)
    def _add_one(sums, vid, x, s, w, b, use_b):
        v = s * s
        if w < 0.0:  # no stored weight: inverse variance
            w = 1.0 / v
        wi = w * x
        w2v = w * (w * v)
        if use_b:
            w = w * b
        sums[vid, 0] += 1.0
        sums[vid, 1] += w
        sums[vid, 2] += wi
        sums[vid, 3] += w2v

    @njit(nogil=True, cache=True)
    def _weight(s, x, wt, has_w, i):
        """0.0 for an unusable observation; else its stored weight, or -1.0 meaning "use 1/sigma^2"."""
        if not (s >= 0.0 and s < math.inf and math.isfinite(x)):
            return 0.0
        if has_w:  # stored weight: sigma = 0 (zero counts) is valid
            w = wt[i]
            if not (w > 0.0 and w < math.inf):
                return 0.0
            return w
        if not s > 0.0:
            return 0.0
        return -1.0

    @njit(nogil=True, cache=True)
    def _hkl_kernel(h, k, l, I, sig, wt, has_w, scale, scale_is_array, b0, use_b, nd, c0, c1, c2, nh, nk, nl, sums):
        n = h.shape[0]
        used = 0
        for i in range(n):
            s = sig[i]
            x = I[i]
            w = _weight(s, x, wt, has_w, i)
            if w == 0.0:
                continue
            th = math.floor(h[i] * nd + c0)
            tk = math.floor(k[i] * nd + c1)
            tl = math.floor(l[i] * nd + c2)
            if not (th >= 0.0 and th < nh and tk >= 0.0 and tk < nk and tl >= 0.0 and tl < nl):
                continue
            vid = (int(th) * nk + int(tk)) * nl + int(tl)
            b = scale[i] if scale_is_array else b0
            _add_one(sums, vid, x, s, w, b, use_b)
            used += 1
        return used

    @njit(nogil=True, cache=True)
    def _ids_kernel(ids, I, sig, wt, has_w, scale, scale_is_array, b0, use_b, nvox, sums):
        n = ids.shape[0]
        used = 0
        for i in range(n):
            s = sig[i]
            x = I[i]
            vid = ids[i]
            if not (vid >= 0 and vid < nvox):
                continue
            w = _weight(s, x, wt, has_w, i)
            if w == 0.0:
                continue
            b = scale[i] if scale_is_array else b0
            _add_one(sums, vid, x, s, w, b, use_b)
            used += 1
        return used

    @njit(nogil=True, cache=True)
    def _sparse_kernel(ids, I, sig, wt, has_w, nvox, slot, uids, sums, n_all):
        """Voxels in first-seen order: ``slot[vid]`` (-1 = not seen) -> row of ``uids``/``sums``/``n_all``.
        ``n_all``: observations per voxel whether usable or not. Returns (touched voxels, usable obs)."""
        n = ids.shape[0]
        m = 0
        used = 0
        for i in range(n):
            vid = ids[i]
            if not (vid >= 0 and vid < nvox):
                continue
            r = slot[vid]
            if r < 0:
                r = m
                slot[vid] = m
                uids[m] = vid
                sums[m, 0] = 0.0
                sums[m, 1] = 0.0
                sums[m, 2] = 0.0
                sums[m, 3] = 0.0
                n_all[m] = 0
                m += 1
            n_all[r] += 1
            w = _weight(sig[i], I[i], wt, has_w, i)
            if w == 0.0:
                continue
            _add_one(sums, r, I[i], sig[i], w, 1.0, False)
            used += 1
        for j in range(m):  # leave the slot map as found (all -1) for the next still
            slot[uids[j]] = -1
        return m, used


def _scale_args(scale, n):
    if scale is None or (np.ndim(scale) == 0 and float(scale) == 1.0):
        return np.ones(1), False, 1.0, False
    if np.ndim(scale) == 0:
        return np.ones(1), False, float(scale), True
    arr = np.ascontiguousarray(scale, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"per-observation scale has shape {arr.shape}, expected ({n},)")
    return arr, True, 1.0, True


def _weight_args(weight, n):
    if weight is None:
        return np.ones(1), False
    arr = np.ascontiguousarray(weight, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"per-observation weight has shape {arr.shape}, expected ({n},)")
    return arr, True


def accumulate_hkl(grid, sums: np.ndarray, h, k, l, intensity, sigma, scale=None, weight=None) -> int:
    """Add observations at fractional hkl into ``sums`` (n_voxels, 4), fields interleaved. Returns the number used.

    ``weight``: per-observation weight (exposure), None = 1/σ²; observations with w <= 0 or non-finite are skipped.
    """
    f64 = lambda a: np.ascontiguousarray(a, dtype=np.float64)  # noqa: E731
    h, k, l, intensity, sigma = f64(h), f64(k), f64(l), f64(intensity), f64(sigma)
    sc, is_arr, b0, use_b = _scale_args(scale, h.size)
    wt, has_w = _weight_args(weight, h.size)
    nd = float(grid.ndiv)
    return int(_hkl_kernel(h, k, l, intensity, sigma, wt, has_w, sc, is_arr, b0, use_b, nd,
                           0.5 - grid.lo[0], 0.5 - grid.lo[1], 0.5 - grid.lo[2],
                           grid.shape[0], grid.shape[1], grid.shape[2], sums))


def accumulate_ids(sums: np.ndarray, ids, intensity, sigma, scale=None, weight=None) -> int:
    """Add observations already mapped to voxel ids (-1 = skip) into ``sums`` (n_voxels, 4)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    sc, is_arr, b0, use_b = _scale_args(scale, ids.size)
    wt, has_w = _weight_args(weight, ids.size)
    return int(_ids_kernel(ids, np.ascontiguousarray(intensity, dtype=np.float64),
                           np.ascontiguousarray(sigma, dtype=np.float64), wt, has_w, sc, is_arr, b0, use_b,
                           sums.shape[0], sums))


#: slot maps of :func:`sparse_ids` (int32 per voxel, all -1 between calls), reused across stills; one per
#: concurrent call (a worker may run jobs in threads)
_SLOTS: list = []
_SLOTS_LOCK = threading.Lock()


def sparse_ids(ids, intensity, sigma, n_voxels: int, weight=None):
    """One still's sums per touched voxel without a grid-sized sum array (needs numba: :func:`available`).

    Returns ``(voxel ids, sums (m, 4), observations per voxel (m,) usable or not, usable observations)`` with the
    voxels in first-seen order (voxels whose observations are all unusable keep zero sums). The sums are
    those :func:`accumulate_ids` adds (same arithmetic, same order of addition per voxel: bit-identical).
    Memory: an int32 slot map of the grid (kept for the next still) and O(observations)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    wt, has_w = _weight_args(weight, ids.size)
    n_voxels = int(n_voxels)
    with _SLOTS_LOCK:
        j = next((j for j, a in enumerate(_SLOTS) if a.size == n_voxels), None)
        slot = _SLOTS.pop(j) if j is not None else None
    if slot is None:
        slot = np.full(n_voxels, -1, dtype=np.int32)
    cap = min(ids.size, n_voxels)
    uids = np.empty(cap, np.int64)
    sums = np.empty((cap, 4), np.float64)
    n_all = np.empty(cap, np.int64)
    # an exception leaves the map dirty: it is then not put back
    m, used = _sparse_kernel(ids, np.ascontiguousarray(intensity, dtype=np.float64),
                             np.ascontiguousarray(sigma, dtype=np.float64), wt, has_w, n_voxels, slot, uids,
                             sums, n_all)
    with _SLOTS_LOCK:
        _SLOTS.append(slot)
        del _SLOTS[:-2]  # at most two grids' maps kept
    return uids[:m], sums[:m], n_all[:m], int(used)
