"""Native kernels of the CPU engine: ``native.c`` compiled once per machine by the system C compiler.

The numba kernels (``kernels.py``) take log(I+1) from a 65536-entry table, a scalar gather that costs about
0.55 ns per pixel here and that neither LLVM nor GCC vectorise (an explicit AVX-512 gather is slower still on
this CPU). ``native.c`` evaluates the log in SIMD registers instead and takes frames two at a time, which
makes each pass about 1.6x faster (on AVX2-only CPUs the counts >= 32 come from a hardware gather of a table of
the same values, see ``log_method``); it is written with GCC vector extensions (no intrinsics), so it builds
for whatever the compiler targets with ``-march=native``.

The shared library is built on first use (about 1 s; ``make setup`` and the container build do it ahead)
into ``$STEM_POLAR_NATIVE_CACHE``, else ``$XDG_CACHE_HOME/diffractflow``, else ``~/.cache/diffractflow``, else
the temporary directory, under a name keyed by the source, the flags, the compiler and the CPU, and written
atomically (concurrent workers may build at once). No compiler, a failed build or a failed load: the engine
keeps the numba (or numpy) kernels and ``status()`` says why. Native-endian uint16 frames (the usual
detector format) and float32 frames use these kernels.
"""
from __future__ import annotations

import ctypes
import platform
import threading
from pathlib import Path

import numpy as np

from diffractflow.native import build_library

SOURCE = Path(__file__).with_name("native.c")
SOURCES = (SOURCE, Path(__file__).with_name("native_passes.h"))  # the passes, included once per pixel type
TYPES = {np.dtype(np.uint16): "u16", np.dtype(np.float32): "f32"}  # pixel types with native kernels
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-fPIC", "-shared") + (
    ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ())

_lock = threading.Lock()
_lib = None
_status = "not loaded yet"
_zeros: dict = {}


def build(flags=FLAGS) -> Path:
    """Compile ``native.c`` (if not already in the cache) and return the library's path; raises on failure.
    ``flags``: the compiler flags (the tests also build a 256-bit variant with ``-mno-avx512f`` added)."""
    return build_library(SOURCES, flags, "stem_polar_native", "STEM_POLAR_NATIVE_CACHE", "stem-polar native kernels")


def _load():
    global _lib, _status
    with _lock:
        if _lib is not None or _status != "not loaded yet":
            return _lib
        try:
            lib = ctypes.CDLL(str(build()))
            V, S, I = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int  # noqa: E741
            for sfx in TYPES.values():
                getattr(lib, f"sp_pass1_{sfx}").argtypes = [V, V, S, S, V, V, V, S, I, V, V]
                getattr(lib, f"sp_pass2_{sfx}").argtypes = [V, V, S, S, V, S, V, V, I, V, S, V, V]
                getattr(lib, f"sp_pass2g_{sfx}").argtypes = [V, V, S, S, S, V, S, V, V, V, I, V, S, V, V]
                getattr(lib, f"sp_log_rows_{sfx}").argtypes = [V, V, S, S, V]
                for name in ("sp_pass1", "sp_pass2", "sp_pass2g", "sp_log_rows"):
                    getattr(lib, f"{name}_{sfx}").restype = None
            lib.sp_vector_pixels.argtypes = []
            lib.sp_vector_pixels.restype = I
            lib.sp_log_gather.argtypes = []
            lib.sp_log_gather.restype = I
            _lib, _status = lib, "loaded"
        except Exception as exc:  # noqa: BLE001 - any failure means "use the other kernels"
            _status = f"unavailable: {exc}"
        return _lib


def available() -> bool:
    """True when the native library is built (or builds now) and loads."""
    return _load() is not None


def status() -> str:
    _load()
    return _status


def log_method() -> str | None:
    """How the loaded library takes log(1 + x) of uint16 vectors with a count >= 32: 'table gather' (AVX2
    builds) or 'series' (AVX-512 builds, or SP_LOG_GATHER=0); None when the library is unavailable."""
    lib = _load()
    if lib is None:
        return None
    return "table gather" if lib.sp_log_gather() else "series"


def supports_dtype(dtype) -> bool:
    """Pixel types with native kernels: native-endian uint16 and float32."""
    dt = np.dtype(dtype)
    return dt.isnative and dt in TYPES


def supports(arr: np.ndarray) -> bool:
    """Frames the native kernels take: a C-contiguous (n, P) array of a supported pixel type."""
    return supports_dtype(arr.dtype) and arr.ndim == 2 and arr.flags.c_contiguous


def _fn(name: str, block: np.ndarray):
    return getattr(_load(), f"{name}_{TYPES[np.dtype(block.dtype)]}")


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _f32(a: np.ndarray, shape) -> None:
    if a.dtype != np.float32 or not a.flags.c_contiguous or a.shape != shape:
        raise ValueError(f"expected a C-contiguous float32 array of shape {shape}, got {a.dtype} {a.shape}")


def _check_block(block) -> None:
    if not supports(block):
        raise ValueError(f"native kernels take C-contiguous 2-D uint16 or float32 frames, got {block.dtype} "
                         f"{block.shape}")


def pass1(block, idx, ref, wbg, use_bg: bool, acc, bgs, bg_vectors=None) -> None:
    """As ``kernels.pass1_frames`` for uint16 or float32 frames (float: the log clips negative values at 0):
    acc (3, P) += [x, D, D^2] of frames block[idx]; bgs (float64, one per frame) holds ref . wbg on entry and
    each frame's background on exit. No scratch rows: each frame's background comes from the outer-ring
    vectors first, then one sweep per group of frames forms D. ``bg_vectors``: ``background_vectors(wbg)``
    when the caller keeps it (it is the same for every call of a pass)."""
    _check_block(block)
    n, p = len(idx), block.shape[1]
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    _f32(acc, (3, p))
    _f32(ref, (p,))
    _f32(wbg, (p,))
    if bgs.dtype != np.float64 or len(bgs) != n or not bgs.flags.c_contiguous:
        raise ValueError("pass1: bgs must be contiguous float64 with one value per frame")
    if n and (idx.min() < 0 or idx.max() >= block.shape[0]):
        raise IndexError("pass1: frame index out of range")
    blk = (background_vectors(wbg) if bg_vectors is None else bg_vectors) if use_bg else _NO_BLOCKS
    _fn("sp_pass1", block)(_ptr(block), _ptr(idx), n, p, _ptr(ref), _ptr(wbg), _ptr(blk), len(blk),
                           int(bool(use_bg)), _ptr(acc), _ptr(bgs))


_NO_BLOCKS = np.zeros(1, dtype=np.int64)[:0]


def background_vectors(wbg: np.ndarray) -> np.ndarray:
    """Offsets of the library's SIMD vectors (16 pixels with AVX-512, else 8) that hold a non-zero background
    weight: the background level of a frame is summed over these only."""
    vl = _load().sp_vector_pixels()
    nz = np.flatnonzero(wbg)
    return np.unique(nz - nz % vl).astype(np.int64)


def _zero_row(p: int) -> np.ndarray:
    z = _zeros.get(p)
    if z is None:
        z = _zeros[p] = np.zeros(p, dtype=np.float32)
    return z


def pass2(block, idx, WT, MT, with_com: bool, out_p, out_r, ebuf) -> None:
    """As ``kernels.pass2_frames`` for uint16 or float32 frames: out_p[t, c] = log1p(x) . WT[c] and, with ``with_com``,
    out_r[t, j] = x . MT[j] for frames block[idx]; ebuf: 2P floats of scratch."""
    _check_block(block)
    n, p = len(idx), block.shape[1]
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    nP = WT.shape[0]
    _f32(WT, (nP, p))
    _f32(MT, (3, p))
    _f32(out_p, (n, out_p.shape[1]))
    _f32(out_r, (n, 3))
    if out_p.shape[1] < nP or ebuf.size < 2 * p or not ebuf.flags.c_contiguous:
        raise ValueError("pass2: out_p needs a column per template row, ebuf 2 * P contiguous floats")
    if n and (idx.min() < 0 or idx.max() >= block.shape[0]):
        raise IndexError("pass2: frame index out of range")
    _fn("sp_pass2", block)(_ptr(block), _ptr(idx), n, p, _ptr(WT), nP, _ptr(_zero_row(p)), _ptr(MT),
                           int(bool(with_com)), _ptr(out_p), out_p.shape[1], _ptr(out_r), _ptr(ebuf))


def gate_rows_fit(width: int) -> bool:
    """``pass2_gate`` takes frames whose detector rows are whole SIMD vectors (width a multiple of 16 or 8)."""
    lib = _load()
    return lib is not None and width > 0 and width % lib.sp_vector_pixels() == 0


def pass2_gate(block, idx, frame_shape, WT, G, dx, dy, with_com: bool, out_p, out_r, ebuf) -> None:
    """As ``pass2`` with the CoM moments from one gate row: out_r[t] = [x . (G dx), x . (G dy), x . G] with
    dx[column], dy[row] the pixel offsets from the centre (``GatedCoM.M``'s three columns, formed in the kernel:
    one row streamed instead of three). Frames of ``frame_shape`` (ky, kx) with kx a multiple of the vector
    width (``gate_rows_fit``); WT may have 0 rows."""
    _check_block(block)
    n, p = len(idx), block.shape[1]
    ky, kx = (int(v) for v in frame_shape)
    if ky * kx != p or not gate_rows_fit(kx):
        raise ValueError(f"pass2_gate: frames of {ky} x {kx} pixels with a width that is a multiple of "
                         f"{_load().sp_vector_pixels()} expected, got rows of {p}")
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    nP = WT.shape[0]
    _f32(WT, (nP, p))
    _f32(G, (p,))
    _f32(dx, (kx,))
    _f32(dy, (ky,))
    _f32(out_p, (n, out_p.shape[1]))
    _f32(out_r, (n, 3))
    if out_p.shape[1] < nP or ebuf.size < 2 * p or not ebuf.flags.c_contiguous:
        raise ValueError("pass2_gate: out_p needs a column per template row, ebuf 2 * P contiguous floats")
    if n and (idx.min() < 0 or idx.max() >= block.shape[0]):
        raise IndexError("pass2_gate: frame index out of range")
    _fn("sp_pass2g", block)(_ptr(block), _ptr(idx), n, ky, kx, _ptr(WT), nP, _ptr(G), _ptr(dx), _ptr(dy),
                            int(bool(with_com)), _ptr(out_p), out_p.shape[1], _ptr(out_r), _ptr(ebuf))


def log_rows(block, idx) -> np.ndarray:
    """log1p of frames block[idx] as the native passes compute it (float32 rows)."""
    _check_block(block)
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    out = np.empty((len(idx), block.shape[1]), dtype=np.float32)
    _fn("sp_log_rows", block)(_ptr(block), _ptr(idx), len(idx), block.shape[1], _ptr(out))
    return out


__all__ = ["available", "status", "log_method", "supports", "supports_dtype", "build", "pass1", "pass2", "pass2_gate",
           "gate_rows_fit", "log_rows"]
