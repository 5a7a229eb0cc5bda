"""The forward render of the fast kernel in C (``native.c``), compiled once per machine by the system compiler.

Used by :func:`~diff_sim_refiner.core.simulator.render` when no gradient is needed, the kernel is the fast one
(square crystal, nearest-neighbour F, flat detector, no ``dmin``, polarisation and solid angle of the first
sub-pixel), the compute dtype is float32 and the device is the CPU.  Same physics, term for term, as the torch
kernel; each term stays in registers instead of ~25 passes over (orientations x 3 x pixels) arrays, so the
whole-detector render costs a fraction of the torch one (and of nanoBragg.c's).  H = A Q is formed in float64,
the lattice factor in float32, and each pixel's terms are summed in one fixed order, so the image does not
depend on the thread count.

Built on first use (about 1 s) into ``$DIFF_SIM_REFINER_NATIVE_CACHE``, else ``$XDG_CACHE_HOME/diffractflow``,
else ``~/.cache/diffractflow``, else the temporary directory, under a name keyed by the source, flags, compiler
and CPU, written atomically.  No compiler, a failed build or ``DIFF_SIM_REFINER_NATIVE=0``: the torch kernel
renders instead and :func:`status` says why.
"""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from diffractflow.native import build_library

from .physics import polarization_basis

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")

_lock = threading.Lock()
_lib = None
_status = "not loaded yet"


class _Spec(ctypes.Structure):
    _fields_ = [("ov", ctypes.c_int), ("n_src", ctypes.c_int), ("n_orient", ctypes.c_int),
                ("point_pixel", ctypes.c_int), ("polar_mode", ctypes.c_int),
                ("pix0", ctypes.c_double * 3), ("fdet", ctypes.c_double * 3), ("sdet", ctypes.c_double * 3),
                ("px", ctypes.c_double), ("close_distance", ctypes.c_double), ("scale", ctypes.c_double),
                ("kahn", ctypes.c_double), ("E_in", ctypes.c_double * 3), ("B_in", ctypes.c_double * 3),
                ("N", ctypes.c_double * 3), ("dirs", ctypes.c_void_p), ("lams", ctypes.c_void_p),
                ("A", ctypes.c_void_p), ("F", ctypes.c_void_p), ("dims", ctypes.c_int * 3),
                ("mins", ctypes.c_int * 3), ("default_F", ctypes.c_float)]


def build() -> Path:
    """Compile ``native.c`` unless already cached; returns the library path, raises on failure."""
    return build_library((SOURCE,), FLAGS, "diff_sim_refiner_native", "DIFF_SIM_REFINER_NATIVE_CACHE",
                         "diff-sim-refiner native kernel")


def _load():
    global _lib, _status
    with _lock:
        if _lib is not None or _status != "not loaded yet":
            return _lib
        if os.environ.get("DIFF_SIM_REFINER_NATIVE", "1") == "0":
            _status = "disabled by DIFF_SIM_REFINER_NATIVE=0"
            return None
        try:
            lib = ctypes.CDLL(str(build()))
            V = ctypes.c_void_p
            I = ctypes.c_int  # noqa: E741
            L = ctypes.c_long
            lib.nb_render_rows.argtypes = [ctypes.POINTER(_Spec), I, I, I, I, V, L, V, L, V]
            lib.nb_render_rows.restype = None
            lib.nb_abi_version.restype = I
            lib.nb_fused_source.argtypes = [ctypes.POINTER(_Spec), L, V, I, V, V, V, V]
            lib.nb_fused_source.restype = None
            lib.nb_grad_pixels.argtypes = [ctypes.POINTER(_Spec), L, V, V, V, I, V, V, V]
            lib.nb_grad_pixels.restype = I
            lib.nb_render_pixels.argtypes = [ctypes.POINTER(_Spec), L, V, V, V]
            lib.nb_render_pixels.restype = I
            lib.nb_grad_reduce.argtypes = [L, I, V, V, V]
            lib.nb_grad_reduce.restype = None
            if lib.nb_abi_version() != 2:
                raise RuntimeError("native kernel ABI mismatch")
            _lib, _status = lib, "loaded"
        except Exception as exc:  # noqa: BLE001 - any failure means "use the torch kernel"
            _status = f"unavailable: {exc}"
        return _lib


def available() -> bool:
    """True when the native library is built (or builds now) and loads."""
    return _load() is not None


def status() -> str:
    _load()
    return _status


def _vec(t) -> tuple:
    return tuple(float(x) for x in np.asarray(t.detach().cpu().numpy(), dtype=np.float64).reshape(-1))


def _make_spec(p):
    """The C spec of :class:`Prepared` ``p`` and the arrays it points to (keep them alive during the calls)."""
    sp = _Spec()
    sp.ov = int(p.oversample)
    sp.n_src = int(p.src_dirs.shape[0])
    sp.n_orient = int(p.A.shape[0])
    sp.point_pixel = int(bool(p.point_pixel))
    g = p.geom
    sp.pix0[:] = _vec(g.pix0)
    sp.fdet[:] = _vec(g.fdet)
    sp.sdet[:] = _vec(g.sdet)
    sp.px = float(g.pixel_size)
    sp.close_distance = float(g.close_distance)
    sp.scale = float(p.scale.detach())
    if p.nopolar:
        sp.polar_mode = 0
    else:
        kahn = float(p.kahn.detach()) if isinstance(p.kahn, torch.Tensor) else float(p.kahn)
        sp.kahn = kahn
        if kahn == 0.0:
            sp.polar_mode = 1
        else:
            E_in, B_in = polarization_basis(p.polar_axis.detach().to(torch.float64),
                                            p.src_dirs[0].detach().to(torch.float64))
            sp.polar_mode = 2
            sp.E_in[:] = _vec(E_in)
            sp.B_in[:] = _vec(B_in)
    sp.N[:] = _vec(p.N)
    # the float64 orientation matrices and sources prepare() keeps beside the compute-dtype copies
    def f64(t64, t):
        return np.ascontiguousarray((t64 if t64 is not None else t).detach().cpu().numpy(), dtype=np.float64)

    dirs, lams, A = f64(p.src_dirs64, p.src_dirs), f64(p.src_lams64, p.src_lams), f64(p.A64, p.A)
    sp.dirs, sp.lams, sp.A = dirs.ctypes.data, lams.ctypes.data, A.ctypes.data
    ft = p.ftable
    Fa = None
    if ft.F is not None:
        Fa = np.ascontiguousarray(ft.F.detach().cpu().numpy(), dtype=np.float32)
        sp.F = Fa.ctypes.data
        sp.dims[:] = tuple(int(x) for x in Fa.shape)
        sp.mins[:] = tuple(int(x) for x in ft.mins)
    else:
        sp.F = None
    dF = ft.default_F
    sp.default_F = float(dF.detach()) if isinstance(dF, torch.Tensor) else float(dF)
    return sp, (dirs, lams, A, Fa)


make_spec = _make_spec


def render_native(p, fmin: int, fmax: int, smin: int, smax: int, out: np.ndarray,
                  mask: Optional[np.ndarray] = None, threads: int = 1, rows_per_task: int = 8) -> np.ndarray:
    """Render ROI rows ``smin..smax`` x columns ``fmin..fmax`` (inclusive) of :class:`Prepared` ``p`` into the
    float32 array ``out`` (shape (smax - smin + 1, fmax - fmin + 1), C order); pixels where the bool/uint8
    ``mask`` (same shape) is 0 are left untouched.  ``threads`` Python threads take blocks of rows (the C call
    releases the GIL)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native kernel {_status}")
    assert out.dtype == np.float32 and out.flags.c_contiguous
    sp, keep = _make_spec(p)
    W = fmax - fmin + 1
    n = sp.ov * sp.ov
    mk = None if mask is None else np.ascontiguousarray(mask, dtype=np.uint8)
    keep = (keep, mk)  # noqa: F841 - alive until the calls return

    def task(s0: int) -> None:
        s1 = min(s0 + rows_per_task, smax + 1)
        work = np.empty(8 * W * n, dtype=np.float64)
        o = out[s0 - smin:]
        m = 0 if mk is None else mk[s0 - smin:].ctypes.data
        lib.nb_render_rows(ctypes.byref(sp), s0, s1, fmin, fmax + 1, o.ctypes.data, W, m, W, work.ctypes.data)

    starts = range(smin, smax + 1, rows_per_task)
    if threads <= 1:
        for s0 in starts:
            task(s0)
    else:
        with ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(task, starts))
    return out


def grad_pixels(p, f: np.ndarray, s: np.ndarray, D: Optional[np.ndarray], need_N: bool, threads: int = 1,
                block: Optional[int] = None, spec=None):
    """Photons and their derivatives at the pixels (``f``, ``s``: int64 fast / slow indices) of :class:`Prepared`
    ``p`` in one pass (``nb_grad_pixels``): ``(out (P,) float32, J (P, K) float64, JN (P, 3) float64 or None)``
    with ``J[:, k] = d out / d theta_k`` for ``D`` (n_orient, K, 3, 3) = d A_o / d theta_k (float64; None: K = 0)
    and ``JN = d out / d N``.  ``out`` equals :func:`render_native`'s image at those pixels to float32 rounding.
    ``threads`` Python threads take blocks of ``block`` pixels (default: the list in one call for one thread,
    else 4 blocks per thread); every pixel is computed alone, so the results do not depend on either.
    ``spec``: :func:`make_spec`'s result for ``p``, to build it once for many calls."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native kernel {_status}")
    sp, keep = spec if spec is not None else _make_spec(p)
    f = np.ascontiguousarray(f, dtype=np.int64)
    s = np.ascontiguousarray(s, dtype=np.int64)
    P = int(f.shape[0])
    if D is None:
        D = np.zeros((sp.n_orient, 0, 3, 3))
    D = np.ascontiguousarray(D, dtype=np.float64)
    K = int(D.shape[1])
    if D.shape != (sp.n_orient, K, 3, 3):
        raise ValueError(f"grad_pixels: D must be (n_orient={sp.n_orient}, K, 3, 3), got {D.shape}")
    out = np.empty(P, dtype=np.float32)
    J = np.empty((P, K), dtype=np.float64)
    JN = np.empty((P, 3), dtype=np.float64) if need_N else None
    keep = (keep, f, s, D)  # noqa: F841 - alive until the calls return
    if block is None:
        block = max(P, 1) if threads <= 1 else max(1024, -(-P // (4 * threads)))

    def task(p0: int) -> None:
        nb = min(block, P - p0)
        off8 = p0 * 8
        rc = lib.nb_grad_pixels(ctypes.byref(sp), nb, f.ctypes.data + off8, s.ctypes.data + off8, D.ctypes.data, K,
                                out.ctypes.data + p0 * 4, J.ctypes.data + off8 * K,
                                JN.ctypes.data + off8 * 3 if JN is not None else None)
        if rc != 0:
            raise MemoryError("nb_grad_pixels: out of memory")

    starts = range(0, P, block)
    if threads <= 1 or P <= block:
        for p0 in starts:
            task(p0)
    else:
        with ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(task, starts))
    return out, J, JN


def render_pixels_native(p, f: np.ndarray, s: np.ndarray, threads: int = 1) -> np.ndarray:
    """Photons (P,) float32 at the pixels (``f``, ``s``: fast / slow indices) of :class:`Prepared` ``p``, the same
    bits as :func:`render_native` gives them (``nb_render_pixels``: one code path), for sparse pixel sets."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native kernel {_status}")
    sp, keep = _make_spec(p)
    f = np.ascontiguousarray(f, dtype=np.int64)
    s = np.ascontiguousarray(s, dtype=np.int64)
    P = int(f.shape[0])
    out = np.empty(P, dtype=np.float32)
    block = max(P, 1) if threads <= 1 else max(1024, -(-P // (4 * threads)))
    keep = (keep, f, s)  # noqa: F841 - alive until the calls return

    def task(p0: int) -> None:
        nb = min(block, P - p0)
        if lib.nb_render_pixels(ctypes.byref(sp), nb, f.ctypes.data + 8 * p0, s.ctypes.data + 8 * p0,
                                out.ctypes.data + 4 * p0) != 0:
            raise MemoryError("nb_render_pixels: out of memory")

    starts = range(0, P, block)
    if threads <= 1 or P <= block:
        for p0 in starts:
            task(p0)
    else:
        with ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(task, starts))
    return out


def grad_reduce(g: np.ndarray, J: np.ndarray) -> np.ndarray:
    """``g @ J`` (float64) summed in pixel order (``nb_grad_reduce``): the same bits for any thread count."""
    lib = _load()
    g = np.ascontiguousarray(g, dtype=np.float64)
    J = np.ascontiguousarray(J, dtype=np.float64)
    out = np.zeros(J.shape[1], dtype=np.float64)
    lib.nb_grad_reduce(int(J.shape[0]), int(J.shape[1]), g.ctypes.data, J.ctypes.data, out.ctypes.data)
    return out


class FusedSource:
    """Per-source term sums and lattice-factor derivatives for the fused autograd kernel
    (simulator._FusedFastChunk): ``nb_fused_source`` of native.c on float32 unit directions (3, M)."""

    def __init__(self, A, N, dirs, lams, ftable):
        self.sp = sp = _Spec()
        self.A = np.ascontiguousarray(A.detach().cpu().numpy(), dtype=np.float64).reshape(-1, 3, 3)
        self.dirs = np.ascontiguousarray(dirs.detach().cpu().numpy(), dtype=np.float64)
        self.lams = np.ascontiguousarray(lams.detach().cpu().numpy(), dtype=np.float64)
        sp.n_orient, sp.n_src = int(self.A.shape[0]), int(self.dirs.shape[0])
        sp.N[:] = _vec(N)
        sp.A, sp.dirs, sp.lams = self.A.ctypes.data, self.dirs.ctypes.data, self.lams.ctypes.data
        self.F = None
        if ftable.F is not None:
            self.F = np.ascontiguousarray(ftable.F.detach().cpu().numpy(), dtype=np.float32)
            sp.F = self.F.ctypes.data
            sp.dims[:] = tuple(int(x) for x in self.F.shape)
            sp.mins[:] = tuple(int(x) for x in ftable.mins)
        dF = ftable.default_F
        sp.default_F = float(dF.detach()) if isinstance(dF, torch.Tensor) else float(dF)

    def source(self, diff, si: int, need_G: bool, need_Gq: bool, need_GN: bool):
        """(acc (M,), G (O*3, M) or None, Gq (3, M) or None, GN (3, M) or None) as float32 torch tensors."""
        lib = _load()
        d = diff.detach().contiguous()
        M = int(d.shape[1])
        O = self.sp.n_orient
        acc = torch.empty(M, dtype=torch.float32)
        G = torch.empty(O * 3, M, dtype=torch.float32) if need_G else None
        Gq = torch.empty(3, M, dtype=torch.float32) if need_Gq else None
        GN = torch.empty(3, M, dtype=torch.float32) if need_GN else None
        ptr = lambda t: t.data_ptr() if t is not None else None  # noqa: E731
        lib.nb_fused_source(ctypes.byref(self.sp), M, d.data_ptr(), si, acc.data_ptr(), ptr(G), ptr(Gq), ptr(GN))
        return acc, G, Gq, GN


__all__ = ["available", "status", "build", "render_native", "make_spec", "render_pixels_native", "grad_pixels", "grad_reduce", "FusedSource"]
