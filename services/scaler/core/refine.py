"""Levenberg-Marquardt refinement of per-still scales b_s and a shared resolution smoother g(|q|).

Model (DIALS convention, I_obs ~ scale * I_reference):

    I_k  ~  b_{s(k)} * g(q_k) * I_h(k)

with one group h per diffuse voxel (or Bragg reflection). As in DIALS' scaling target, each iteration
first recomputes the reference of every group as the weighted least-squares value given the current
scales, I_h = sum w t I / sum w t^2 (t = b g, w = 1/sigma^2), then takes one damped Gauss-Newton step on
sum w (I - t I_h)^2 with I_h held fixed (analytic derivatives: dr/db_s = -g I_h,
dr/dc_j = -b I_h W_j(q)).

The Jacobian has one per-still column and <= 3 smoother columns per row, so J^T W J is an "arrow"
matrix: diagonal in the still block, dense N x M coupling, M x M smoother block. It is accumulated
without materialising J (per-still, per-group and per-q-bin sums) and the small (N + M) system is
solved as ``scipy.sparse``. The smoother is evaluated on a fine |q| grid (``n_q_bins`` bins; relative
quantisation error ~ 1e-4 for a factor that varies by 50 % across the range). The ``sparse_jacobian``
helper builds the explicit J for small problems; tests check the accumulated normal equations
against J^T W J.

Cost per LM iteration: two passes over the observations (reference sums at the trial scales, then
objective + R-factor + normal equations). Engines: fused numba kernels (``core.kernels``; each pass
one loop, float64 accumulators, int32 indices, float32 columns for big tables, the observation range
split over 2 threads with private accumulators) or, without numba, chunked ``np.bincount``. Before
refinement the table is counting-sorted into blocks of 4096 consecutive groups
(:func:`reorder_for_locality`) so that the per-group scatter/gather stays in L1/L2 (~5x faster passes).
"""
from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from . import kernels
from .errors import RefinementFailure
from .params import RELATIVE_DEFAULTS as _D
from .smoother import GaussianSmoother1D

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1 << 20
DEFAULT_THREADS = min(2, os.cpu_count() or 1)
BLOCK_SHIFT = 12  # reorder_for_locality: blocks of 2**12 groups (64 kB of float64 pairs; 224 kB with the smoother)
MIN_OBS_PER_THREAD = 1 << 19


def use_kernels_default() -> bool:
    """The fused numba kernels unless numba is missing or ``SCALER_KERNELS=numpy`` is set."""
    return kernels.available() and os.environ.get("SCALER_KERNELS", "").lower() != "numpy"


@dataclass
class ObservationSet:
    """Flat observations, already indexed: still_index in [0, n_stills), group_index in [0, n_groups).

    ``weight`` is 1/sigma^2. ``still_ids`` maps still_index -> the caller's still id; ``group_keys``
    maps group_index -> voxel id (diffuse groups first) or Miller index (Bragg groups after
    ``n_diffuse_groups``).
    """

    still_index: np.ndarray
    group_index: np.ndarray
    q: Optional[np.ndarray]  # None when no resolution smoother needs it
    intensity: np.ndarray
    weight: np.ndarray
    still_ids: np.ndarray
    n_groups: int
    group_keys: Optional[list] = None
    n_diffuse_groups: Optional[int] = None

    @property
    def n_obs(self) -> int:
        return int(self.intensity.shape[0])

    @property
    def n_stills(self) -> int:
        return int(len(self.still_ids))

    def select(self, mask: np.ndarray) -> "ObservationSet":
        """Subset of observations (indices and group numbering unchanged)."""
        return ObservationSet(self.still_index[mask], self.group_index[mask], None if self.q is None else self.q[mask],
                              self.intensity[mask], self.weight[mask], self.still_ids, self.n_groups,
                              self.group_keys, self.n_diffuse_groups)

    def drop_inplace(self, drop: np.ndarray) -> "ObservationSet":
        """The observations not flagged in ``drop``, moved to the front of this set's own arrays.

        Returns a set of views (no copy of the table); this set's arrays are overwritten.
        """
        arrays = (self.still_index, self.group_index, self.q, self.intensity, self.weight)
        m = self.n_obs - int(np.count_nonzero(drop))
        keep = None if kernels.available() else ~drop
        for a in arrays:
            if a is None:
                continue
            if keep is None:
                kernels.compact(a, drop)
            else:
                a[:m] = a[keep]
        return ObservationSet(*(None if a is None else a[:m] for a in arrays), self.still_ids, self.n_groups,
                              self.group_keys, self.n_diffuse_groups)


def reorder_for_locality(obs: ObservationSet, block: int = 1 << BLOCK_SHIFT, min_obs: int = 2_000_000,
                         inplace: bool = False) -> ObservationSet:
    """Group observations into blocks of ``block`` consecutive groups (stable O(n) counting sort).

    Every pass scatters into / gathers from per-group arrays; with random group order each access is a
    cache miss once there are ~1e6 groups. Within a block the group arrays (64-224 kB) stay in cache,
    which makes those passes ~5x faster. Order does not change any result.
    With the numba kernels each column is scattered into one reused scratch array and copied back
    (peak extra memory: one column); otherwise a radix argsort on 16-bit keys and gathers.
    """
    if obs.n_obs < min_obs:
        return obs
    shift = int(block).bit_length() - 1
    arrays = [obs.still_index, obs.group_index, obs.q, obs.intensity, obs.weight]
    if kernels.available() and (1 << shift) == block and np.issubdtype(obs.group_index.dtype, np.integer):
        g = obs.group_index
        n_blocks = (int(obs.n_groups) - 1 >> shift) + 1
        ranges = split_ranges(obs.n_obs, DEFAULT_THREADS)
        counts = np.array(run_parallel(lambda lo, hi: kernels.block_counts(g[lo:hi], shift, n_blocks), ranges))
        # part p of block k starts after all of block < k and the parts < p of block k (stable order)
        block_start = np.concatenate([[0], np.cumsum(counts.sum(axis=0))[:-1]])
        offsets = block_start[None, :] + np.cumsum(counts, axis=0) - counts
        scratch = {}
        # the group column goes last: it defines the destinations of all others
        for i in (0, 2, 3, 4, 1):
            a = arrays[i]
            if a is None:  # |q| not kept (no smoother)
                continue
            if inplace:
                if a.dtype.itemsize not in scratch:
                    scratch[a.dtype.itemsize] = np.empty(a.shape[0], dtype=a.dtype)
                tmp = scratch[a.dtype.itemsize].view(a.dtype)
            else:
                tmp = np.empty_like(a)
            run_parallel(lambda lo, hi, p: kernels.scatter_by_block(g[lo:hi], shift, offsets[p], a[lo:hi], tmp),
                         [(lo, hi, p) for p, (lo, hi) in enumerate(ranges)])
            if inplace:
                a[...] = tmp
            else:
                arrays[i] = tmp
        if inplace:
            return obs
        return ObservationSet(*arrays, obs.still_ids, obs.n_groups, obs.group_keys, obs.n_diffuse_groups)
    n_blocks = obs.n_groups // block + 1
    key = (obs.group_index // block).astype(np.uint16 if n_blocks < 65536 else np.uint32)
    order = np.argsort(key, kind="stable")
    del key
    if inplace:  # one temporary array at a time instead of a second copy of the whole table
        for a in arrays:
            if a is not None:
                a[...] = a[order]
        return obs
    return ObservationSet(*(None if a is None else a[order] for a in arrays), obs.still_ids, obs.n_groups,
                          obs.group_keys, obs.n_diffuse_groups)


def split_ranges(n: int, n_threads: int, min_per_thread: int = MIN_OBS_PER_THREAD) -> list[tuple[int, int]]:
    """[0, n) as at most ``n_threads`` contiguous ranges of >= ``min_per_thread`` (at least one range)."""
    nt = max(1, min(int(n_threads), n // max(1, min_per_thread)))
    edges = np.linspace(0, n, nt + 1).astype(np.int64)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(nt)]


def run_parallel(fn, arg_tuples: list) -> list:
    """[fn(*args) for args in arg_tuples], one thread each (for kernels that release the GIL)."""
    if len(arg_tuples) == 1:
        return [fn(*arg_tuples[0])]
    with ThreadPoolExecutor(len(arg_tuples)) as ex:
        return list(ex.map(lambda t: fn(*t), arg_tuples))


def count_per_index(idx: np.ndarray, size: int) -> np.ndarray:
    """np.bincount(idx, minlength=size) without an intp copy of a long int32 ``idx``."""
    if kernels.available() and np.issubdtype(idx.dtype, np.integer):
        counts = np.zeros(int(size), dtype=np.int64)
        kernels.group_counts(idx, counts)
        return counts
    counts = np.zeros(int(size), dtype=np.int64)
    for a in range(0, len(idx), DEFAULT_CHUNK):
        counts += np.bincount(idx[a:a + DEFAULT_CHUNK], minlength=int(size))
    return counts


@dataclass
class SmootherSetup:
    """Shared resolution smoother and its restraint weights (relative to the data curvature)."""

    smoother: GaussianSmoother1D
    smoothness_weight: float = _D.smoothness_weight
    ridge_weight: float = 1e-4
    n_q_bins: int = 2048

    def bin_centres(self) -> np.ndarray:
        edges = np.linspace(self.smoother.x0, self.smoother.x1, self.n_q_bins + 1)
        return 0.5 * (edges[:-1] + edges[1:])

    def bin_index(self, q: np.ndarray) -> np.ndarray:
        s = self.smoother
        k = np.floor((np.asarray(q, dtype=np.float64) - s.x0) * (self.n_q_bins / (s.x1 - s.x0)))
        return np.clip(k, 0, self.n_q_bins - 1).astype(np.int16 if self.n_q_bins < 32768 else np.int32)

    def derivative_table(self) -> np.ndarray:
        """(n_q_bins, M): d g / d c_j at each bin centre (rows sum to 1)."""
        return self.smoother.dense_derivatives(self.bin_centres())


def second_difference(m: int) -> np.ndarray:
    """(m-2, m) second-difference operator for the smoothness restraint."""
    d = np.zeros((max(m - 2, 0), m))
    for i in range(m - 2):
        d[i, i:i + 3] = (1.0, -2.0, 1.0)
    return d


DEFAULT_ROTATION_SMOOTHNESS = _D.rotation_smoothness


@dataclass
class RotationRestraint:
    """Smoothness of the per-frame scales of rotation sweeps (issue 17): second differences of ln b along phi.

    ``sequences`` maps a sweep id to (still indices in rotation order, frame positions); positions are the
    frames' places in the sweep (index in rotation order, so a frame missing from the table leaves a gap and
    the divided difference spans it). Stills in no sequence keep free scales. The restraint added to the
    weighted sum of squares is

        sum_sweeps lambda_q * sum_j (D2 ln b)_j^2,   lambda_q = weight * median_s(info_s)

    with info_s = b_s^2 sum_k w_k (d I_k / d b_s)^2 the data's information on ln b_s of one frame of the sweep
    (at the start of refinement, then held fixed). It acts on ln b, so it is invariant under the overall gauge
    b -> k b and does not bias a linear trend of ln b. With ``weight`` r and uniform per-frame information the
    restraint is a smoothing filter with response 1 / (1 + 16 r sin^4(omega / 2)) per frame-frequency omega:
    r = 1 halves the power at a period of ~6 frames and keeps ~87 % of a period-10-frame variation; r = 100
    halves it at ~20 frames; r -> 0 gives free per-frame scales.
    """

    sequences: dict
    weight: float = DEFAULT_ROTATION_SMOOTHNESS

    def operator(self, n_stills: int) -> tuple[sp.csr_matrix, np.ndarray]:
        """(D, sweep number per row): second divided differences, one row per inner frame of each sweep."""
        rows, cols, vals, owner = [], [], [], []
        r = 0
        for q, (idx, pos) in enumerate(self.sequences.values()):
            idx = np.asarray(idx, dtype=np.int64)
            x = np.asarray(pos, dtype=float)
            for j in range(1, len(idx) - 1):
                h0, h1 = x[j] - x[j - 1], x[j + 1] - x[j]
                if h0 <= 0 or h1 <= 0:
                    raise ValueError("rotation sequence positions must increase")
                # 2 / (h0 h1 (h0 + h1)) * [h1, -(h0 + h1), h0]: = (1, -2, 1) for unit spacing
                f = 2.0 / (h0 + h1)
                rows += [r, r, r]
                cols += [idx[j - 1], idx[j], idx[j + 1]]
                vals += [f / h0, -f * (1 / h0 + 1 / h1), f / h1]
                owner.append(q)
                r += 1
        D = sp.csr_matrix((vals, (rows, cols)), shape=(r, int(n_stills)))
        return D, np.asarray(owner, dtype=np.int64)

    def penalty(self, n_stills: int, info: np.ndarray) -> tuple[sp.csc_matrix, list]:
        """P = D^T Lambda D on ln b and the per-sweep lambda_q (from per-still information ``info``)."""
        D, owner = self.operator(n_stills)
        lams = []
        for idx, _pos in self.sequences.values():
            a = info[np.asarray(idx, dtype=np.int64)]
            a = a[a > 0]
            lams.append(float(self.weight * np.median(a)) if a.size else 0.0)
        lam_row = np.asarray(lams)[owner] if len(owner) else np.zeros(0)
        P = (D.T @ sp.diags(lam_row) @ D).tocsc()
        return P, lams


def _divide_by_den(Y: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Y[g] / den[g] with den = 1/var (0 where a group has no weight)."""
    ok = np.isfinite(var) & (var > 0)
    den = np.where(ok, 1.0 / np.where(ok, var, 1.0), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den[:, None] > 0, Y / den[:, None], 0.0)


_DUMMY_KB = np.zeros(1, dtype=np.int16)
_DUMMY_F = np.ones(1)
_DUMMY_WSLOT = np.zeros((1, 1))
_DUMMY_START = np.zeros(1, dtype=np.int64)


@dataclass
class RefinementResult:
    b: np.ndarray
    c: Optional[np.ndarray]
    reference: np.ndarray
    reference_var: np.ndarray
    n_iterations: int
    converged: bool
    r_factor_history: list = field(default_factory=list)
    objective_history: list = field(default_factory=list)
    final_r_factor: float = float("nan")
    shift_history: list = field(default_factory=list)
    final_normal_equations: Optional[dict] = None
    rotation_lambdas: Optional[list] = None


class _Slab:
    """A chunk's partial sum over the index range [offset, offset + len(data)) of a length-``size`` array."""

    __slots__ = ("offset", "data", "size")

    def __init__(self, offset: int, data: np.ndarray, size: int):
        self.offset, self.data, self.size = offset, data, size


class ScalingProblem:
    """Evaluation of references, residuals and normal equations in passes over the observations.

    Two interchangeable engines, equal to rounding: fused numba kernels (``core.kernels``; one loop per
    pass, float64 accumulators, the observation range split over ``n_threads`` threads) and chunked numpy
    (``np.bincount`` per chunk). ``use_kernels`` defaults to the kernels when numba imports.
    """

    def __init__(self, obs: ObservationSet, smoother: Optional[SmootherSetup] = None,
                 chunk: Optional[int] = None, n_threads: Optional[int] = None,
                 use_kernels: Optional[bool] = None):
        self.obs = obs
        self.sm = smoother
        self.chunk = int(chunk or DEFAULT_CHUNK)
        self.n_threads = int(n_threads or DEFAULT_THREADS)
        self.use_kernels = use_kernels_default() if use_kernels is None else bool(use_kernels and kernels.available())
        if smoother is not None and smoother.smoother.n_values > kernels.MAX_M:
            self.use_kernels = False  # the kernels hold <= 5 smoother columns in registers
        self.N = obs.n_stills
        self.G = int(obs.n_groups)
        self._nobs = None
        if self.use_kernels:
            self._prepare_kernel_arrays()
        if smoother is not None:
            self.M = smoother.smoother.n_values
            self.K = smoother.n_q_bins
            if self.use_kernels:
                s = smoother.smoother
                self.qbin = np.empty(obs.n_obs, dtype=np.int16 if self.K < 32768 else np.int32)
                kernels.q_bins(obs.q, float(s.x0), float(self.K / (s.x1 - s.x0)), self.K, self.qbin)
            else:
                self.qbin = smoother.bin_index(obs.q)
            self.Wtab = smoother.derivative_table()
            st, ws = smoother.smoother.weights(smoother.bin_centres())
            self.start_tab, self.wslot = st.astype(np.int64), np.ascontiguousarray(ws)
        else:
            self.M, self.K, self.qbin, self.Wtab = 0, 0, None, None
        if self.use_kernels:
            self.sum_abs_I = float(sum(self._run(lambda lo, hi: kernels.abs_sum(self._I[lo:hi]))))
        else:
            self.sum_abs_I = float(np.sum(np.abs(obs.intensity), dtype=np.float64))

    def _prepare_kernel_arrays(self):
        """Columns in the kernels' dtypes: int32 indices, one float dtype (copies only if needed)."""
        o = self.obs
        self._s = np.ascontiguousarray(o.still_index, dtype=np.int32)
        gdt = np.int32 if self.G < 2**31 else np.int64
        self._g = np.ascontiguousarray(o.group_index, dtype=gdt)
        ft = o.intensity.dtype
        if not (ft in (np.float32, np.float64) and o.weight.dtype == ft):
            ft = np.float64
        self._I = np.ascontiguousarray(o.intensity, dtype=ft)
        self._w = np.ascontiguousarray(o.weight, dtype=ft)

    # ------------------------------------------------------------------ helpers
    def _slices(self):
        n = self.obs.n_obs
        for a in range(0, n, self.chunk):
            yield slice(a, min(a + self.chunk, n))

    def _ranges(self):
        """Contiguous observation ranges, one per kernel thread."""
        return split_ranges(self.obs.n_obs, self.n_threads)

    def _run(self, fn):
        """[fn(lo, hi) for each range], ranges in parallel threads (the kernels release the GIL)."""
        return run_parallel(fn, self._ranges())

    def _kernel_smoother_args(self, gb, lo, hi):
        if gb is None:
            return _DUMMY_KB, _DUMMY_F, _DUMMY_WSLOT, _DUMMY_START
        return self.qbin[lo:hi], np.ascontiguousarray(gb, dtype=np.float64), self.wslot, self.start_tab

    def group_counts(self) -> np.ndarray:
        """Number of observations per group."""
        if self._nobs is None:
            self._nobs = count_per_index(self._g if self.use_kernels else self.obs.group_index, self.G)
        return self._nobs

    def g_bins(self, c: Optional[np.ndarray]) -> Optional[np.ndarray]:
        return None if self.sm is None else self.Wtab @ np.asarray(c, dtype=float)

    def _t(self, sl, b, gb):
        t = b[self.obs.still_index[sl]]
        if gb is not None:
            t = t * gb[self.qbin[sl]]
        return t

    # ------------------------------------------------------------------ passes
    def _map_reduce(self, fn):
        """Sum the dicts ``fn(slice)`` over all chunks; chunks are shared round-robin by ``n_threads``
        threads (numpy releases the GIL in ufuncs, gathers and bincount), each with its own accumulator.
        :class:`_Slab` values (a local bincount over the chunk's index range) are added in place."""
        slices = list(self._slices())
        nt = max(1, min(self.n_threads, len(slices)))

        def run(part):
            acc = {}
            for sl in part:
                for k, v in fn(sl).items():
                    if isinstance(v, _Slab):
                        if k not in acc:
                            acc[k] = np.zeros(v.size)
                        acc[k][v.offset:v.offset + len(v.data)] += v.data
                    elif k in acc:
                        acc[k] += v
                    else:
                        acc[k] = v
            return acc

        if nt == 1:
            return run(slices)
        with ThreadPoolExecutor(nt) as ex:
            parts = list(ex.map(run, [slices[i::nt] for i in range(nt)]))
        acc = parts[0]
        for p in parts[1:]:
            for k, v in p.items():
                acc[k] += v
        return acc

    def reference(self, b: np.ndarray, gb: Optional[np.ndarray]):
        """Weighted LSQ reference per group and its variance 1/sum(w t^2) (inf where unmeasured)."""
        o = self.obs
        G = self.G

        def chunk(sl):
            t = self._t(sl, b, gb)
            wt = o.weight[sl] * t
            gi = o.group_index[sl]
            lo = int(gi.min())
            gl = gi - lo
            return {"num": _Slab(lo, np.bincount(gl, wt * o.intensity[sl]), G),
                    "den": _Slab(lo, np.bincount(gl, wt * t), G)}

        if self.use_kernels:
            num, den = self._reference_kernel(b, gb)
        else:
            acc = self._map_reduce(chunk)
            num, den = acc["num"], acc["den"]
        with np.errstate(divide="ignore", invalid="ignore"):
            ih = np.where(den > 0, num / den, 0.0)
            var = np.where(den > 0, 1.0 / den, np.inf)
        return ih, var

    def normal_equations(self, b, c, gb, ih, var=None, refine_b=True):
        """Data objective, R-factor, J^T W J blocks and rhs = -J^T W r.

        Per-still columns hold I_h fixed (DIALS). With a smoother and ``var`` (= 1/sum w t^2 per group)
        given, the smoother columns are projected as in variable projection (Kaufman): J_c minus its
        component along each group's reference, so a change of g that the references can absorb is
        recognised as (nearly) free and the restraint decides it in one step instead of slow zig-zag.
        """
        N, M, K = self.N, self.M, self.K
        o = self.obs
        project = bool(M) and var is not None

        def chunk(sl):
            out = {}
            s = o.still_index[sl]
            w = o.weight[sl]
            ihk = ih[o.group_index[sl]]
            bk = b[s]
            if gb is not None:
                kb = self.qbin[sl]
                gk = gb[kb]
                t = bk * gk
            else:
                gk = None
                t = bk
            r = o.intensity[sl] - t * ihk
            wr = w * r
            out["f"] = np.array(np.dot(wr, r))
            out["ar"] = np.array(np.sum(np.abs(r)))
            wih = w * ihk
            wih2 = wih * ihk
            if refine_b:
                if gk is None:
                    out["Ass"] = np.bincount(s, wih2, minlength=N)
                    out["rs"] = np.bincount(s, wr * ihk, minlength=N)
                else:
                    out["Ass"] = np.bincount(s, wih2 * gk * gk, minlength=N)
                    out["rs"] = np.bincount(s, wr * ihk * gk, minlength=N)
            if M:
                kb32 = kb.astype(np.int64)
                ws = self.wslot[kb32].T  # (na, n): smoother weights of each observation's window
                st = self.start_tab[kb32]
                slots = np.arange(ws.shape[0])[:, None]
                if refine_b:
                    # J_b^T W J_c: column start(q) + m of still s gets u * W_m(q)
                    u = wih2 * gk * bk
                    idx = (s.astype(np.int64) * M + st)[None, :] + slots
                    out["Usc"] = np.bincount(idx.ravel(), (ws * u).ravel(), minlength=N * M)
                out["Ak"] = np.bincount(kb32, wih2 * bk * bk, minlength=K)
                out["rk"] = np.bincount(kb32, wr * ihk * bk, minlength=K)
                if project:
                    # Y[v, j] = sum_{k in v} w t x_kj with x_kj = -b I_h W_j(q_k)
                    wtx = -(w * t * bk * ihk)
                    gi = o.group_index[sl]
                    lo = int(gi.min())
                    idx = ((gi - lo).astype(np.int64) * M + st)[None, :] + slots
                    out["Y"] = _Slab(lo * M, np.bincount(idx.ravel(), (ws * wtx).ravel()), self.G * M)
            return out

        acc = self._normal_sums_kernel(b, gb, ih, var, refine_b, project) if self.use_kernels \
            else self._map_reduce(chunk)
        f, ar = float(acc["f"]), float(acc["ar"])
        Rf = ar / self.sum_abs_I if self.sum_abs_I > 0 else float("nan")
        out = {"f": f, "R": Rf, "Ass": acc.get("Ass", np.zeros(N)), "rs": acc.get("rs", np.zeros(N))}
        if M:
            W = self.Wtab
            out["Asc"] = acc["Usc"].reshape(N, M) if refine_b else np.zeros((N, M))
            out["Acc"] = (W * acc["Ak"][:, None]).T @ W
            out["rc"] = W.T @ acc["rk"]
            if project:
                Y = acc["Y"].reshape(self.G, M)
                Yd = acc["Yd"] if "Yd" in acc else _divide_by_den(Y, var)
                out["Acc"] = out["Acc"] - Y.T @ Yd
                if refine_b:
                    # the kernel engine summed this in the same pass, the numpy engine needs one more
                    out["Asc"] = out["Asc"] + (acc["X"] if "X" in acc else self._cross_correction(b, gb, ih, Yd))
        return out

    def _cross_correction(self, b, gb, ih, Yd):
        """sum_{k in still s} w g I_h t Yd[v_k, j]: the projected part of the still/smoother coupling."""
        N, M = self.N, self.M
        o = self.obs

        def chunk(sl):
            s = o.still_index[sl]
            gi = o.group_index[sl]
            gk = gb[self.qbin[sl]]
            t = b[s] * gk
            u = o.weight[sl] * gk * ih[gi] * t
            ydg = (Yd[gi] * u[:, None]).T  # (M, n)
            idx = s.astype(np.int64)[None, :] * M + np.arange(M)[:, None]
            return {"x": np.bincount(idx.ravel(), ydg.ravel(), minlength=N * M).reshape(N, M)}

        return self._map_reduce(chunk)["x"]

    # ------------------------------------------------------------------ kernel engine
    def _reference_kernel(self, b, gb):
        """num, den per group; with a smoother also the projection sums (kept for normal_equations)."""
        G, M = self.G, self.M
        bb = np.ascontiguousarray(b, dtype=np.float64)
        with_y = gb is not None

        def part(lo, hi):
            kb, gbv, wslot, start = self._kernel_smoother_args(gb, lo, hi)
            acc = np.zeros((G, 2 + M if with_y else 2))
            kernels.reference_sums(self._s[lo:hi], self._g[lo:hi], self._I[lo:hi], self._w[lo:hi], bb, kb, gbv,
                                   with_y, wslot, start, with_y, acc)
            return acc

        parts = self._run(part)
        acc = parts[0]
        for p in parts[1:]:
            acc += p
        self._yproj = (bb.copy(), None if gb is None else np.array(gb, dtype=np.float64), acc[:, 2:]) if with_y else None
        return acc[:, 0], acc[:, 1]

    def _projection_sums(self, b, gb) -> np.ndarray:
        """(G, M) sums w t b W_j(q) per group for these b, g (from the last reference pass if it matches)."""
        y = getattr(self, "_yproj", None)
        if y is None or not (np.array_equal(y[0], b) and np.array_equal(y[1], gb)):
            self._reference_kernel(b, gb)
            y = self._yproj
        return y[2]

    def _normal_sums_kernel(self, b, gb, ih, var, refine_b, project):
        """The kernel's per-still / per-bin sums; still-by-smoother arrays padded to 5 columns (M <= 5)."""
        N, M, K = self.N, self.M, self.K
        P = kernels.MAX_M
        bb = np.ascontiguousarray(b, dtype=np.float64)
        ihc = np.ascontiguousarray(ih, dtype=np.float64)
        gbv = _DUMMY_F if gb is None else np.ascontiguousarray(gb, dtype=np.float64)
        extra = {}
        cross = bool(project and refine_b)
        Ydp = np.zeros((1, P))
        if project:
            # Y[g, j] = sum_{k in g} w t x_kj, x_kj = -b I_h W_j(q_k): -I_h times the reference pass' sums
            Y = self._projection_sums(bb, gb) * -ihc[:, None]
            Yd = _divide_by_den(Y, var)
            extra = {"Y": Y.reshape(-1), "Yd": Yd}
            if cross:
                Ydp = np.zeros((self.G, P))
                Ydp[:, :M] = Yd
        wdense = np.zeros((max(K, 1), P))
        if M:
            wdense[:, :M] = self.Wtab

        def part(lo, hi):
            kb = _DUMMY_KB if gb is None else self.qbin[lo:hi]
            acc = {"fa": np.zeros(2), "Ass": np.zeros(N), "rs": np.zeros(N), "Usc": np.zeros((N, P)),
                   "Ak": np.zeros(max(K, 1)), "rk": np.zeros(max(K, 1)), "X": np.zeros((N, P))}
            kernels.normal_sums(self._s[lo:hi], self._g[lo:hi], self._I[lo:hi], self._w[lo:hi], bb, ihc, kb, gbv,
                                wdense, M, bool(refine_b), cross, acc["fa"], acc["Ass"], acc["rs"],
                                acc["Usc"], acc["Ak"], acc["rk"], Ydp, acc["X"])
            return acc

        parts = self._run(part)
        acc = parts[0]
        for p in parts[1:]:
            for k, v in p.items():
                acc[k] += v
        fa = acc.pop("fa")
        acc["f"], acc["ar"] = fa[0], fa[1]
        acc["Usc"] = np.ascontiguousarray(acc["Usc"][:, :M]).reshape(-1)
        acc["X"] = acc["X"][:, :M]
        if not cross:
            del acc["X"]
        acc.update(extra)
        return acc


def sparse_jacobian(problem: ScalingProblem, b, c, ih) -> sp.csr_matrix:
    """Explicit J = d r / d (b, c) with I_h fixed, as scipy.sparse CSR (n_obs x (N + M)); small data only."""
    o = problem.obs
    n = o.n_obs
    rows = np.arange(n)
    ihk = ih[o.group_index]
    gb = problem.g_bins(c)
    gk = gb[problem.qbin] if gb is not None else np.ones(n)
    data = [-(gk * ihk)]
    rr = [rows]
    cc = [o.still_index.astype(np.int64)]
    if problem.M:
        start, wts = problem.sm.smoother.weights(problem.sm.bin_centres()[problem.qbin])
        bk = b[o.still_index]
        for m in range(wts.shape[1]):
            data.append(-(bk * ihk * wts[:, m]))
            rr.append(rows)
            cc.append(problem.N + start + m)
    J = sp.coo_matrix((np.concatenate(data), (np.concatenate(rr), np.concatenate(cc))),
                      shape=(n, problem.N + problem.M))
    return J.tocsr()


def _assemble(ne: dict, N: int, M: int, refine_b: bool, restraint: Optional[tuple], c,
              b_restraint: Optional[tuple] = None) -> tuple:
    """Sparse arrow normal matrix (with restraints) and right-hand side for the free parameters.

    ``b_restraint`` = (P, b): the rotation restraint u^T P u on u = ln b enters by Gauss-Newton,
    B^-1 P B^-1 in the still block and -B^-1 P u in the right-hand side (B = diag(b)).
    """
    blocks_rhs = []
    Abb = None
    if refine_b:
        if b_restraint is not None:
            P, bv = b_restraint
            binv = sp.diags(1.0 / bv)
            Abb = (sp.diags(ne["Ass"]) + binv @ P @ binv).tocsc()
            blocks_rhs.append(ne["rs"] - (P @ np.log(bv)) / bv)
        else:
            blocks_rhs.append(ne["rs"])
    if M:
        Acc = ne["Acc"].copy()
        rc = ne["rc"].copy()
        if restraint is not None:
            R, c_ref = restraint
            Acc += R
            rc -= R @ (c - c_ref) if c_ref is not None else R @ c
        blocks_rhs.append(rc)
    rhs = np.concatenate(blocks_rhs)
    if Abb is None and refine_b:
        Abb = sp.diags(ne["Ass"]).tocsc()
    if refine_b and M:
        A = sp.bmat([[Abb, sp.csr_matrix(ne["Asc"])],
                     [sp.csr_matrix(ne["Asc"].T), sp.csr_matrix(Acc)]], format="csc")
    elif refine_b:
        A = Abb
    else:
        A = sp.csc_matrix(Acc)
    return A, rhs


def refine(problem: ScalingProblem, b0: np.ndarray, c0: Optional[np.ndarray], *,
           max_iterations: int = _D.max_iterations, convergence_tolerance: float = _D.convergence_tolerance,
           minimizer: str = _D.minimizer_type, refine_b: bool = True, normalise_b: bool = True,
           progress: Optional[Callable[[int, float], None]] = None,
           rotation: Optional[RotationRestraint] = None) -> RefinementResult:
    """Iterate reference update + damped Gauss-Newton step until the R-factor change < tolerance.

    ``rotation``: smoothness restraint on the per-frame scales of rotation sweeps (see
    :class:`RotationRestraint`); its per-sweep weights are fixed from the starting normal equations.
    """
    if minimizer not in ("lm", "gauss_newton"):
        raise ValueError(f"minimizer_type must be 'lm' or 'gauss_newton', got {minimizer!r}")
    N, M = problem.N, problem.M
    b = np.array(b0, dtype=float)
    c = None if c0 is None else np.array(c0, dtype=float)
    if np.any(~np.isfinite(b)) or np.any(b <= 0):
        raise RefinementFailure("initial per-still scales must be finite and > 0")
    # restraint on the smoother: smoothness (second differences) + weak ridge to unity (which also
    # fixes the exact g <-> reference degeneracy); weights are relative to the data curvature.
    restraint = None
    lam_scale = None

    def restraint_value(cv):
        if restraint is None:
            return 0.0
        R, cref = restraint
        d = cv - cref
        return float(d @ R @ d)

    gb = problem.g_bins(c)
    ih, var = problem.reference(b, gb)
    ne = problem.normal_equations(b, c, gb, ih, var, refine_b)
    if M:
        lam_scale = max(np.trace(ne["Acc"]) / M, 1e-300)
        D2 = second_difference(M)
        R = lam_scale * (problem.sm.smoothness_weight * D2.T @ D2 + problem.sm.ridge_weight * np.eye(M))
        # smoothness acts on c itself (D2 @ 1 = 0), the ridge pulls towards 1: use c_ref = 1 for both
        restraint = (R, np.ones(M))
    P_rot = None
    if rotation is not None and refine_b and rotation.weight > 0 and rotation.sequences:
        P_rot, lams = rotation.penalty(N, ne["Ass"] * b * b)
        if not P_rot.nnz:
            P_rot = None

    def rotation_value(bv):
        if P_rot is None:
            return 0.0
        u = np.log(bv)
        return float(u @ (P_rot @ u))

    def b_restraint(bv):
        return None if P_rot is None else (P_rot, bv)

    F = ne["f"] + restraint_value(c) + rotation_value(b)
    if not math.isfinite(F):
        raise RefinementFailure("objective is not finite at the starting parameters")
    res = RefinementResult(b=b, c=c, reference=ih, reference_var=var, n_iterations=0, converged=False)
    if P_rot is not None:
        res.rotation_lambdas = lams
    res.r_factor_history.append(ne["R"])
    res.objective_history.append(F)
    mu = 1e-3 if minimizer == "lm" else 0.0
    converged = False
    it = 0
    for it in range(1, max_iterations + 1):
        A, rhs = _assemble(ne, N, M, refine_b, restraint, c, b_restraint(b))
        diagA = A.diagonal()
        if not np.all(np.isfinite(diagA)) or not np.all(np.isfinite(rhs)):
            raise RefinementFailure("non-finite normal equations")
        # free parameters: refine_b -> b then c; else only c
        n_b = N if refine_b else 0
        accepted = False
        step_scale = 1.0
        gn_step = None
        if minimizer == "gauss_newton":
            tiny = 1e-12 * max(float(diagA.max()), 1e-300)
            gn_step = spla.spsolve(A + sp.identity(A.shape[0], format="csc") * tiny, rhs)
        for _attempt in range(40):
            if minimizer == "lm":
                Ad = A + sp.diags(mu * np.where(diagA > 0, diagA, 1.0)).tocsc()
                delta = spla.spsolve(Ad, rhs)
            else:
                delta = gn_step * step_scale
            if not np.all(np.isfinite(delta)):
                delta = None
            if delta is not None:
                b_new = b + delta[:n_b] if refine_b else b
                c_new = c + delta[n_b:] if M else c
                gb_new = problem.g_bins(c_new)
                valid = np.all(b_new > 0) and (gb_new is None or (np.all(c_new > 0) and np.all(gb_new > 0)))
            else:
                valid = False
            if valid:
                ih_new, var_new = problem.reference(b_new, gb_new)
                ne_new = problem.normal_equations(b_new, c_new, gb_new, ih_new, var_new, refine_b)
                F_new = ne_new["f"] + restraint_value(c_new) + rotation_value(b_new)
                if math.isfinite(F_new) and F_new <= F * (1 + 1e-13):
                    accepted = True
                    break
            if minimizer == "lm":
                mu = max(mu, 1e-6) * 4.0
                if mu > 1e12:
                    break
            else:
                step_scale *= 0.5
        if not accepted:
            grad_norm = float(np.linalg.norm(rhs))
            scale = float(np.sqrt(np.sum(diagA)) * max(np.sqrt(F), 1e-300))
            if grad_norm <= 1e-8 * max(scale, 1e-300) or F == 0.0:
                converged = True
                break
            raise RefinementFailure(
                f"no step reduces the objective after damping (iteration {it}, |grad|={grad_norm:.3g})")
        shifts = {"per_still_scale": float(np.max(np.abs(b_new - b))) if refine_b else 0.0}
        if M:
            shifts["resolution_smoother"] = float(np.max(np.abs(c_new - c)))
        b, c, gb, ih, var, ne = b_new, c_new, gb_new, ih_new, var_new, ne_new
        if normalise_b and refine_b:
            # exact gauge b -> k b, I_h -> I_h / k: keep mean(b) = 1 (objective unchanged)
            k = float(np.mean(b))
            b = b / k
            ih = ih * k
            var = var * k * k
            # J^T W J and J^T W r transform with the column scaling of J (no extra data pass)
            ne = dict(ne)
            ne["Ass"] = ne["Ass"] * k * k
            ne["rs"] = ne["rs"] * k
            if M:
                ne["Asc"] = ne["Asc"] * k
                # restraint scale and the projected Acc are invariant under this gauge
        dR = abs(res.r_factor_history[-1] - ne["R"])
        dF = (F - F_new) / max(F, 1e-300)
        F = F_new
        res.r_factor_history.append(ne["R"])
        res.objective_history.append(F)
        res.shift_history.append(shifts)
        if minimizer == "lm":
            mu = mu / 3.0
        if progress is not None:
            progress(it, ne["R"])
        log.debug("iteration %d: R=%.6f F=%.6g mu=%.3g", it, ne["R"], F, mu)
        if dR < convergence_tolerance or dF < 1e-12:
            converged = True
            break
    res.b, res.c, res.reference, res.reference_var = b, c, ih, var
    res.final_normal_equations = ne
    res.n_iterations = it
    res.converged = converged
    res.final_r_factor = res.r_factor_history[-1]
    return res
