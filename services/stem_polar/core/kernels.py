"""Compiled per-tile kernels of the CPU engine (numba, from Debian's ``python3-numba`` when present).

Both passes of the seed's pipeline need e = log(I+1) of every raw pixel. numpy's float32 log1p costs about
1 ns per pixel on one core here, plus a uint16 -> float32 copy and one BLAS call per product. For integer
data these kernels read each raw frame once per pass and take e from a 65536-entry float32 table (~0.6 ns
per pixel, a scalar gather; the table holds numpy's float32 log1p of 0..65535, so e is the numpy engine's
value; wider or signed integers clip at 0 and use log1p above 65535) into a cache-resident row:

* ``pass1_frames``: e' = e - ref, bg = e' . w_bg + ref . w_bg, and the float32 tile sums of raw x,
  D = e' - bg and D^2 (the caller merges them into float64 every <= 256 frames);
* ``pass2_frames``: the matched-filter products e . W_c (four templates per sweep of the row) and the CoM
  moments x . [Mx, My, G] of the frame's guessed gate (one sweep of the raw row).

Float data, and data without the log, keep the numpy path. Measured and rejected (numba 0.56 here): loops
written inline in a 2-D kernel or merged into one loop with several outputs (LLVM left them scalar, 2-10x
slower than the one-output 1-D helpers below), a vectorised float32 log polynomial instead of the table
(1.3 vs 0.8 ns per pixel) and numba's own uint16 -> float32 conversion (0.7 vs numpy's 0.4 ns per pixel).

Native-endian uint16 and float32 frames go to the C kernels of ``native.py`` instead when they build and load
(the same sums with log(I+1) evaluated in SIMD registers, 2-3x faster per pass; float32 has no numba kernel):
``pass1``/``pass2`` below pick the backend per block. ``STEM_POLAR_KERNELS`` selects: ``numpy`` (the numpy engine), ``numba`` (these numba
kernels only), anything else the fastest available. ``available()`` is False when neither numba nor the
native library can be used. Compiled code is cached on disk (``cache=True``) when a cache directory is writable,
else compiled once per process (``warmup`` reports the first-call seconds). The kernels release the GIL
(the engine's worker threads run them in parallel on their own tiles and accumulators).
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

from . import native

try:  # pragma: no cover - depends on the machine
    from numba import njit

    _HAVE_NUMBA = True
except Exception:  # noqa: BLE001 - any import problem means "not available"
    _HAVE_NUMBA = False

LUT_SIZE = 65536


def _choice() -> str:
    return os.environ.get("STEM_POLAR_KERNELS", "").strip().lower()


def _native_wanted() -> bool:
    return _choice() not in ("numpy", "numba") and native.available()


def available() -> bool:
    """Compiled kernels of some kind exist here (numba, or the native library for uint16 data)."""
    return _HAVE_NUMBA or native.available()


def enabled() -> bool:
    """The fused kernels unless none is available or ``STEM_POLAR_KERNELS=numpy`` is set."""
    if _choice() == "numpy":
        return False
    return _HAVE_NUMBA or _native_wanted()


def backend(dtype) -> str:
    """Which kernels a pass over frames of ``dtype`` uses: 'native', 'numba' or 'numpy'."""
    dt = np.dtype(dtype)
    if not enabled() or not supports(dt):
        return "numpy"
    if native.supports_dtype(dt) and _native_wanted():
        return "native"
    return "numba"


_LUT = None


def log_table() -> np.ndarray:
    """float32 log1p of the float32 values 0..65535 (numpy's log1p: the values the numpy engine uses)."""
    global _LUT
    if _LUT is None:
        _LUT = np.log1p(np.arange(LUT_SIZE, dtype=np.float32))
    return _LUT


def supports(dtype) -> bool:
    """The compiled kernels handle native-endian integer data (numba: any width; native: uint16) and float32
    (native only); other floats keep numpy's log1p."""
    dt = np.dtype(dtype)
    if native.supports_dtype(dt) and _native_wanted():
        return True
    return dt.kind in "iu" and dt.isnative and _HAVE_NUMBA


def is_wide(dtype) -> bool:
    """Integers that can be negative or exceed 65535 (checked per pixel)."""
    dt = np.dtype(dtype)
    return not (dt.kind == "u" and dt.itemsize <= 2)


def _jit(**kw):
    """njit(nogil, cache) with a silent fallback to no disk cache when no cache directory is usable."""
    def deco(fn):
        try:
            return njit(nogil=True, cache=True, **kw)(fn)
        except Exception:  # noqa: BLE001 - e.g. "cannot cache function: no locator available"
            return njit(nogil=True, cache=False, **kw)(fn)
    return deco


if _HAVE_NUMBA:
    _FM = {"reassoc", "contract", "nsz"}

    # Every inner loop is its own small function over 1-D rows: numba optimises each function on its own,
    # and LLVM vectorises these one-output loops; the same loops written inline in a 2-D kernel, or merged
    # into one loop with several outputs, stayed scalar here (2-10x slower).
    @_jit(fastmath=_FM)
    def _row_lut_shift(row, lut, ref, out):
        for k in range(row.shape[0]):
            out[k] = lut[np.int64(row[k])] - ref[k]

    @_jit(fastmath=_FM)
    def _row_lut(row, lut, out):
        for k in range(row.shape[0]):
            out[k] = lut[np.int64(row[k])]

    @_jit(fastmath=_FM)
    def _row_wide(row, lut, ref, shift, out):
        for k in range(row.shape[0]):
            v = np.int64(row[k])
            if v <= 0:
                e = np.float32(0.0)
            elif v < 65536:
                e = lut[v]
            else:
                e = np.float32(math.log1p(np.float32(v)))
            out[k] = e - ref[k] if shift else e

    @_jit(fastmath=_FM)
    def _dot(a, b):
        s = np.float32(0.0)
        for k in range(a.shape[0]):
            s += a[k] * b[k]
        return s

    @_jit(fastmath=_FM)
    def _dot4(e, w0, w1, w2, w3):
        """Four dot products in one sweep of e (e read once)."""
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        s2 = np.float32(0.0)
        s3 = np.float32(0.0)
        for k in range(e.shape[0]):
            v = e[k]
            s0 += w0[k] * v
            s1 += w1[k] * v
            s2 += w2[k] * v
            s3 += w3[k] * v
        return s0, s1, s2, s3

    @_jit(fastmath=_FM)
    def _dot_raw3(row, m0, m1, m2):
        """Three dot products of a raw frame (as float32) in one sweep (the CoM moments)."""
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        s2 = np.float32(0.0)
        for k in range(row.shape[0]):
            v = np.float32(row[k])
            s0 += m0[k] * v
            s1 += m1[k] * v
            s2 += m2[k] * v
        return s0, s1, s2

    @_jit(fastmath=_FM)
    def _acc_raw(raw, row):
        for k in range(row.shape[0]):
            raw[k] += np.float32(row[k])

    @_jit(fastmath=_FM)
    def _acc_dshift(s1, sq, d, bg):
        for k in range(d.shape[0]):
            v = d[k] - bg
            s1[k] += v
            sq[k] += v * v

    @_jit(fastmath=_FM)
    def _acc_d_nobg(s1, sq, d):
        for k in range(d.shape[0]):
            v = d[k]
            s1[k] += v
            sq[k] += v * v

    @_jit(fastmath=_FM)
    def pass1_frames(block, idx, wide, lut, ref, bgw, use_bg, acc, bgs, ebuf):
        """Pass-1 sums of the frames block[idx] (one group), one sweep of each raw frame plus two of its
        cache-resident row of e' = log1p(x) - ref: float32 ``acc`` rows [sum x, sum D, sum D^2] with
        D = e' - bg (bg = 0 without ``use_bg``; the caller keeps at most 256 frames per float32 accumulator);
        bgs[t] = bg of frame t (it holds ref . w_bg on entry: bg = e' . w_bg + ref . w_bg)."""
        for t in range(idx.shape[0]):
            row = block[idx[t]]
            if wide:
                _row_wide(row, lut, ref, True, ebuf)
            else:
                _row_lut_shift(row, lut, ref, ebuf)
            _acc_raw(acc[0], row)
            if use_bg:
                bg = _dot(ebuf, bgw) + bgs[t]
                bgs[t] = bg
                _acc_dshift(acc[1], acc[2], ebuf, np.float32(bg))
            else:
                _acc_d_nobg(acc[1], acc[2], ebuf)

    @_jit(fastmath=_FM)
    def pass2_frames(block, idx, wide, lut, WT, MT, with_com, out_p, out_r, ebuf):
        """Pass-2 products of the frames block[idx]: out_p[t, c] = e . WT[c] (e = log1p(x) from the table, in
        a cache-resident row) and, with ``with_com``, out_r[t, j] = x . MT[j] on the raw frame (CoM moments)."""
        for t in range(idx.shape[0]):
            row = block[idx[t]]
            if wide:
                _row_wide(row, lut, lut, False, ebuf)
            else:
                _row_lut(row, lut, ebuf)
            nP = WT.shape[0]
            c = 0
            while c + 4 <= nP:
                out_p[t, c], out_p[t, c + 1], out_p[t, c + 2], out_p[t, c + 3] = _dot4(
                    ebuf, WT[c], WT[c + 1], WT[c + 2], WT[c + 3])
                c += 4
            while c < nP:
                out_p[t, c] = _dot(ebuf, WT[c])
                c += 1
            if with_com:
                out_r[t, 0], out_r[t, 1], out_r[t, 2] = _dot_raw3(row, MT[0], MT[1], MT[2])

    @_jit(fastmath=_FM)
    def _log_rows(block, idx, wide, lut, ref, shift, out):
        for t in range(idx.shape[0]):
            row = block[idx[t]]
            if wide:
                _row_wide(row, lut, ref, shift, out[t])
            elif shift:
                _row_lut_shift(row, lut, ref, out[t])
            else:
                _row_lut(row, lut, out[t])


def _native_block(block):
    """The block as the native kernels take it (C-contiguous uint16 or float32), or None when they do not apply
    (a copy when it is not contiguous: float32 has no other compiled backend, uint16 none without numba)."""
    if not (native.supports_dtype(block.dtype) and block.ndim == 2 and _native_wanted()):
        return None
    if native.supports(block):
        return block
    if block.dtype == np.float32 or not _HAVE_NUMBA:
        return np.ascontiguousarray(block)
    return None


def pass1(block, idx, wide: bool, ref, bgw, use_bg: bool, acc, bgs, scratch, bg_vectors=None) -> None:
    """Pass-1 sums of frames block[idx] (see ``pass1_frames``) with the fastest kernel for the block;
    ``scratch``: a C-contiguous (>= 2, P) float32 array; ``bg_vectors``: see ``native.pass1``."""
    nb = _native_block(block)
    if nb is not None:
        native.pass1(nb, idx, ref, bgw, use_bg, acc, bgs, bg_vectors)
    else:
        pass1_frames(block, idx, wide, log_table(), ref, bgw, use_bg, acc, bgs, scratch[0])


def pass2(block, idx, wide: bool, WT, MT, with_com: bool, out_p, out_r, scratch) -> None:
    """Pass-2 products of frames block[idx] (see ``pass2_frames``) with the fastest kernel for the block;
    ``scratch``: a C-contiguous (>= 2, P) float32 array."""
    nb = _native_block(block)
    if nb is not None:
        native.pass2(nb, idx, WT, MT, with_com, out_p, out_r, scratch[:2])
    else:
        pass2_frames(block, idx, wide, log_table(), WT, MT, with_com, out_p, out_r, scratch[0])


def pass2_gate(block, idx, wide: bool, WT, gate, MT, with_com: bool, out_p, out_r, scratch) -> None:
    """As ``pass2`` with the native kernel that forms the CoM moments from one gate row when it applies
    (``gate`` = (frame_shape, G, dx, dy), see ``native.pass2_gate``); else ``pass2`` with the moment rows MT."""
    nb = _native_block(block) if gate is not None else None
    if nb is not None and native.gate_rows_fit(gate[0][1]):
        native.pass2_gate(nb, idx, gate[0], WT, gate[1], gate[2], gate[3], with_com, out_p, out_r, scratch[:2])
    else:
        pass2(block, idx, wide, WT, MT, with_com, out_p, out_r, scratch)


def log_rows(block, idx, wide: bool, lut, ref, shift: bool, out) -> None:
    """out[t] = log(1 + block[idx[t]]) from the table (float32), minus ``ref`` when ``shift``.

    ``wide`` (integers beyond 16 bits or signed): values <= 0 give 0, values above 65535 use log1p."""
    _log_rows(block, idx, wide, lut, ref if shift else lut, shift, out)  # (ref unused without shift)


def warmup(dtype=np.uint16, n_pix: int = 64) -> float:
    """Compile (or load from the disk cache) the pass kernels for raw data of ``dtype`` (C-contiguous, writable
    and read-only, as memory-mapped files give); returns the seconds spent (paid once per process)."""
    t0 = time.perf_counter()
    if np.dtype(dtype) == np.uint16:
        native.available()  # build (first run on this machine) or load the native library
    if not _HAVE_NUMBA or not supports(dtype):
        return time.perf_counter() - t0
    block = np.ones((2, n_pix), dtype=dtype)
    idx = np.arange(2, dtype=np.int64)
    f32 = np.ones(n_pix, dtype=np.float32)
    out = np.empty((2, n_pix), dtype=np.float32)
    for b in (block, block.copy()):
        pass1_frames(b, idx, is_wide(dtype), log_table(), f32, f32, True, np.zeros((3, n_pix), dtype=np.float32),
                     np.zeros(2), out[0])
        pass2_frames(b, idx, is_wide(dtype), log_table(), out, np.ones((3, n_pix), dtype=np.float32), True,
                     np.empty((2, 2), dtype=np.float32), np.empty((2, 3), dtype=np.float32), out[0].copy())
        b.flags.writeable = False
    return time.perf_counter() - t0


__all__ = ["available", "enabled", "backend", "supports", "is_wide", "log_table", "log_rows", "pass1", "pass2",
           "warmup"]
