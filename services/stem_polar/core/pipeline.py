"""The cluster-guided polarisation pipeline over a streamed scan.

Passes over the data (each chunk is read, processed, and dropped):
  0. sample   - a few blocks spread over the scan: finiteness check, mean pattern, beam centre (detected once,
                used by preprocessing, gates and CoM alike).
  1. stats    - additive partial sums (global / per-cluster / per split-half) -> mu, sigma, mu_c.
  2. maps     - matched filter S_c, softmax confidence and argmax, gated CoM (union or adaptive).
  (r. descan  - optional reference (vacuum) scan -> CoM per position and gate, subtracted.)
Then real-space corrections (rotation/flip, baseline), field conversion, iCoM and the reports.

Usage: ``p = PolarPipeline(source, labels, cfg); p.prepare(); [interactive tweaks of p.cfg]; res = p.run()``.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

try:  # optional: without it the tile products may use several BLAS threads (same results)
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover
    ThreadpoolController = None

from . import engine as eng
from . import kernels
from . import quality as q
from . import stages as st
from .autolabel import autolabel
from .calibration import (
    CenterEstimate,
    deflection_to_field,
    detect_center,
    electron_wavelength_angstrom,
    radial_mask,
)
from .config import PolarConfig
from .source import auto_chunk, iter_chunks, prefetch_chunks
from .xp import get_xp, to_numpy


class InputError(ValueError):
    """Bad input detected before the heavy work starts (or while reading a chunk)."""


@dataclass
class PolarResult:
    scan_shape: tuple[int, int]
    cluster_ids: list[int]  # label values of the clusters that were analysed (order of all per-cluster arrays)
    center: CenterEstimate
    stats: st.Stats
    templates: np.ndarray  # (C, ky, kx)
    gates: np.ndarray  # (C, ky, kx)
    union_gate: np.ndarray  # (ky, kx)
    S: np.ndarray  # (C, H, W) matched-filter scores
    argmax: np.ndarray  # (H, W) cluster id (label value)
    confidence: np.ndarray  # (H, W) max softmax probability
    com_x_raw: np.ndarray  # (H, W) raw CoM, detector frame, calibrated k units
    com_y_raw: np.ndarray
    com_x: np.ndarray  # corrected CoM (descan, rotation, baseline), scan frame, k units
    com_y: np.ndarray
    ex: np.ndarray
    ey: np.ndarray
    icom: Optional[np.ndarray]
    labels: np.ndarray  # (H, W) labels used (given or computed)
    report: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    @property
    def e_mag(self) -> np.ndarray:
        return np.hypot(self.ex, self.ey)

    @property
    def e_angle_deg(self) -> np.ndarray:
        return np.degrees(np.arctan2(self.ey, self.ex))


def _frame_sum(block: np.ndarray) -> np.ndarray:
    """Sum of frames over the first axis as float64: small unsigned integers (uint8/16, fewer than 65537 frames)
    accumulate exactly in uint32 (a few x faster than converting every pixel to float64), others in float64."""
    if block.dtype.kind in "ub" and block.dtype.itemsize <= 2 and len(block) <= 65536:
        return np.add.reduce(block, axis=0, dtype=np.uint32).astype(np.float64)
    return block.sum(axis=0, dtype=np.float64)


def _blas_one_thread(xp):
    """Single-threaded BLAS for the tile products on CPU: they are skinny (a few output columns or rows),
    memory-bound and faster without thread hand-offs; the second core reads the next chunk meanwhile."""
    global _BLAS_CONTROLLER
    if xp is not np or ThreadpoolController is None:
        return contextlib.nullcontext()
    if _BLAS_CONTROLLER is None:  # finding the loaded BLAS libraries takes ~10 ms: once per process
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


_BLAS_CONTROLLER = None


class Tiler:
    """Cache-sized tiles of a chunk, copied (and cast to float32) into one reusable device buffer."""

    def __init__(self, xp, n_pix: int, chunk: int, tile: Optional[int] = None, tile_bytes: int = 4 << 20,
                 stats_bytes: int = 16 << 20):
        self.xp = xp
        self.tile = int(tile) if tile else (max(1, tile_bytes // (4 * n_pix)) if xp is np else chunk)
        # statistics accumulate a (3 + 3C + 1..3, P) block per tile: larger tiles keep that overhead small
        self.tile_stats = max(self.tile, stats_bytes // (4 * n_pix)) if xp is np and not tile else self.tile
        self.buf = xp.empty((max(self.tile, self.tile_stats), n_pix), dtype=xp.float32)

    def ranges(self, n: int, stats: bool = False):
        t = self.tile_stats if stats else self.tile
        for u0 in range(0, n, t):
            yield u0, min(u0 + t, n)

    def load(self, frames):
        """(n, P) raw frames of any dtype -> float32 view of the buffer (valid until the next load)."""
        out = self.buf[:frames.shape[0]]
        out[...] = self.xp.asarray(frames)
        return out


class PolarPipeline:
    def __init__(
        self,
        source,
        labels: Optional[np.ndarray] = None,
        cfg: Optional[PolarConfig] = None,
        device: str = "cpu",
        chunk: Optional[int] = None,
        reference=None,
        declared_ids: Optional[list[int]] = None,
        progress: Optional[Callable[[str, int, int], None]] = None,
        prefetch: bool = True,
        tile: Optional[int] = None,
        threads: Optional[int] = None,
        engine: str = "auto",
    ):
        self.cfg = cfg if cfg is not None else PolarConfig()
        self.source = source
        self.xp = get_xp(device)
        self.device = device
        self.chunk = int(chunk) if chunk else auto_chunk(source.frame_shape)
        if self.chunk < 1:
            raise InputError(f"chunk size must be >= 1 frames, got {chunk}")
        self.reference = reference
        self.progress = progress or (lambda *a: None)
        self.prefetch = prefetch
        w = source.scan_shape[1]
        if self.chunk > w:  # whole scan rows: HDF5 (H, W, ky, kx) blocks are then read without a copy
            self.chunk -= self.chunk % w
        # CPU engine (core.engine: one-group tiles of ~1 MB, worker threads) on numpy unless engine='generic';
        # the array-module path (core.stages, tiles of a few MB on CPU, the whole chunk on a GPU) otherwise
        if engine not in ("auto", "fast", "generic"):
            raise InputError(f"engine must be 'auto', 'fast' or 'generic', got {engine!r}")
        self.fast = self.xp is np and engine != "generic"
        self.threads = int(threads) if threads else eng.default_threads()
        self.tile = int(tile) if tile else eng.default_tile(int(np.prod(source.frame_shape)))
        self.tiler = None if self.fast else Tiler(self.xp, int(np.prod(source.frame_shape)), self.chunk, tile)
        self.warnings: list[str] = []
        self.timings: dict[str, float] = {}
        self.center: Optional[CenterEstimate] = None
        self.mean_sample: Optional[np.ndarray] = None
        self.report: dict = {}
        n = source.n_frames
        if len(source.frame_shape) != 2 or min(source.frame_shape) < 2:
            raise InputError(f"{source.name}: detector frames must be 2-D, got {source.frame_shape}")
        if reference is not None:
            if tuple(reference.frame_shape) != tuple(source.frame_shape):
                raise InputError(
                    f"reference scan {reference.name}: detector {reference.frame_shape} != data {source.frame_shape}")
            if tuple(reference.scan_shape) != tuple(source.scan_shape):
                raise InputError(
                    f"reference scan {reference.name}: scan {reference.scan_shape} != data {source.scan_shape}")
        self.labels = None
        self.declared_ids = list(declared_ids) if declared_ids is not None else None
        self._plan = None
        if labels is not None:
            self.labels = self._check_labels(labels, n)
            self._plan = self._clusters()  # empty clusters reported (and all-empty rejected) before any read
        self._check_physical_inputs()

    # ------------------------------------------------------------------ validation
    def _check_labels(self, labels, n) -> np.ndarray:
        lab = np.asarray(labels)
        if lab.ndim == 2 and tuple(lab.shape) != tuple(self.source.scan_shape):
            raise InputError(f"labels have shape {lab.shape}, expected the scan shape {tuple(self.source.scan_shape)}")
        lab = lab.ravel()
        if lab.size != n:
            raise InputError(f"labels have {lab.size} entries, expected {n} (H*W = "
                             f"{self.source.scan_shape[0]}*{self.source.scan_shape[1]})")
        if lab.dtype.kind == "f":
            if not np.all(np.isfinite(lab)):
                raise InputError("labels contain NaN or inf")
            if not np.all(lab == np.round(lab)):
                raise InputError("labels must be integer cluster ids (got non-integer floats)")
        elif lab.dtype.kind not in "iub":
            raise InputError(f"labels must be integers, got dtype {lab.dtype}")
        return lab.astype(np.int64)

    def _check_physical_inputs(self):
        ph = self.cfg.physical
        cal = self.cfg.calibration
        if ph.enabled and ph.mrad_per_px is None and cal.convergence_angle is None and cal.k_units != "1/Å":
            raise InputError("physical units need the detector's angular pixel size: set physical.mrad_per_px, "
                             "calibration.convergence_angle (mrad, with the BF disk radius detected) or an "
                             "absolute k calibration (--known-spacing)")

    def _clusters(self):
        """Decide the analysed clusters; declared clusters without (enough) members are reported and skipped."""
        cc = self.cfg.clusters
        lab = self.labels
        use = lab[lab >= 0] if cc.ignore_negative else lab
        found, counts = np.unique(use, return_counts=True)
        count_of = dict(zip(found.tolist(), counts.tolist()))
        declared = set(cc.ids or []) | set(self.declared_ids or [])
        ids = sorted(set(count_of) | declared)
        valid, skipped = [], []
        for c in ids:
            k = count_of.get(c, 0)
            if k < cc.min_count:
                skipped.append({"id": int(c), "count": int(k), "reason": "empty cluster" if k == 0 else
                                f"fewer than clusters.min_count={cc.min_count} members"})
            else:
                valid.append(int(c))
        for s in skipped:
            st.warn(f"cluster {s['id']}: {s['reason']} ({s['count']} members); skipped", self.warnings)
        if not valid:
            raise InputError("no cluster has members: every label is unassigned or below clusters.min_count")
        self.n_unassigned = int(np.sum(lab < 0)) if cc.ignore_negative else 0
        return valid, skipped, count_of

    # ------------------------------------------------------------------ pass 0
    def prepare(self) -> CenterEstimate:
        """Sample the scan: check values, build the mean pattern, detect the beam centre (once)."""
        t0 = time.perf_counter()
        src = self.source
        n = src.n_frames
        budget = min(self.cfg.calibration.center_sample_frames, n)
        nblocks = max(1, min(8, budget))
        per = max(1, budget // nblocks)
        starts = np.unique(np.linspace(0, n - per, nblocks).astype(int))
        acc = np.zeros(src.frame_shape, dtype=np.float64)
        cnt = 0
        view = getattr(src, "frames_view", None)
        view = view() if view is not None else None  # zero-copy frames when the source maps them (no read copy)
        def block_sum(s):
            block = np.asarray(view[int(s):int(s) + per] if view is not None else src.read(int(s), int(s) + per))
            self._check_finite(block, int(s))
            return _frame_sum(block), len(block)

        if view is not None and self.fast and self.threads > 1 and len(starts) > 1:
            # mapped frames: the blocks' sums (and page faults) on all cores; added in block order as below
            with ThreadPoolExecutor(max_workers=min(self.threads, len(starts))) as ex:
                sums = list(ex.map(block_sum, starts))
        else:
            sums = map(block_sum, starts)
        for blk_sum, m in sums:
            acc += blk_sum
            cnt += m
        self.mean_sample = acc / cnt
        cal = self.cfg.calibration
        auto = detect_center(self.mean_sample)
        self.auto_center = auto
        if cal.center_y is not None and cal.center_x is not None:
            self.center = CenterEstimate(cal.center_y, cal.center_x, auto.radius, "config")
        else:
            self.center = auto
        self.timings["sample_and_center"] = time.perf_counter() - t0
        return self.center

    def set_center(self, cy: float, cx: float, method: str) -> None:
        """Override the centre (interactive picking); it is then used everywhere."""
        r = self.center.radius if self.center else 0.0
        self.center = CenterEstimate(float(cy), float(cx), r, method)
        self.cfg.calibration.center_y = float(cy)
        self.cfg.calibration.center_x = float(cx)

    def _check_finite(self, block, start):
        if block.dtype.kind in "fc" and not np.all(np.isfinite(block)):
            bad = np.argwhere(~np.isfinite(block.reshape(len(block), -1)).all(axis=1)).ravel()
            raise InputError(f"{self.source.name}: NaN or inf in pattern(s) at flat scan index "
                             f"{[int(start + b) for b in bad[:5]]}{' ...' if len(bad) > 5 else ''}")

    # ------------------------------------------------------------------ main
    def engine_name(self, dtype) -> dict:
        """Which code ran the passes (for run.json): the CPU engine and its kernels, or the array-module path."""
        if not self.fast:
            return {"path": "generic", "array_module": self.xp.__name__}
        return {"path": "cpu-engine", "threads": self.threads,
                "kernels": kernels.backend(dtype) if self.cfg.preprocess.log_transform else "numpy"}

    def run(self) -> PolarResult:
        with _blas_one_thread(self.xp):
            return self._run()

    def _run(self) -> PolarResult:
        cfg = self.cfg
        xp = self.xp
        if self.center is None:
            self.prepare()
        src = self.source
        n = src.n_frames
        h, w = src.scan_shape
        shp = tuple(src.frame_shape)
        P = shp[0] * shp[1]
        cy, cx = self.center.cy, self.center.cx
        t_all = time.perf_counter()

        autolabel_info = None
        if self.labels is None:
            t0 = time.perf_counter()
            lab, autolabel_info = autolabel(src, cfg.autolabel, self.chunk, self.progress)
            self.labels = lab
            self.timings["autolabel"] = time.perf_counter() - t0
        if self._plan is None:
            self._plan = self._clusters()
        ids, skipped, count_of = self._plan
        skipped = list(skipped)
        C = len(ids)
        id_to_idx = {c: i for i, c in enumerate(ids)}
        lab_idx = np.full(n, -1, dtype=np.int64)
        for c, i in id_to_idx.items():
            lab_idx[self.labels == c] = i
        # split halves: a stream of its own (not default_rng(seed), which user tools often also use for labels)
        half_rng = np.random.default_rng(np.random.SeedSequence(cfg.validation.split_seed, spawn_key=(0x5417,)))
        half = half_rng.integers(0, 2, n).astype(np.int8)

        roi_t = cfg.templates.roi_r
        pre = st.Preprocessor(cfg.preprocess, shp, cy, cx, bg_radius=roi_t[1] if roi_t else None)
        e0, bg0 = pre.transform(np, self.mean_sample.reshape(1, -1).astype(np.float32))
        ref = (e0 - bg0[:, None])[0]  # shift for stable sums: preprocessed sample mean, before masking
        ref_x = xp.asarray(ref)
        split = cfg.validation.enable_split_half

        # ---- pass 1: statistics
        t0, c0 = time.perf_counter(), time.process_time()
        part = st.StatsPartial.zeros(C, P)
        lab_x = xp.asarray(lab_idx)
        half_x = xp.asarray(half)

        nonneg = np.dtype(src.dtype).kind in "ub"
        kept_mapped = self.fast and eng.keep_mapped(src)  # pages mapped by pass 1 stay mapped for pass 2
        bg_frames = None  # each frame's background level, kept by pass 1's compiled kernels for pass 2
        if self.fast:
            if eng.pass1_keeps_background(pre, src.dtype):
                bg_frames = np.empty(n)
            part = eng.pass1_stats(src, self.chunk, self.tile, self.threads, lab_idx, C, half if split else None,
                                   pre, ref, check=self._check_finite, prefetch=self.prefetch, keep=kept_mapped,
                                   progress=lambda b, n_: self.progress("pass 1/2: statistics", b, n_),
                                   bg_out=bg_frames)
        # generic (array-module) path
        chunks = [] if self.fast else prefetch_chunks(iter_chunks(src, self.chunk, buffers=3), self.prefetch)
        for a, b, block in chunks:
            self._check_finite(block, a)
            flat = block.reshape(b - a, -1)
            acc = st.StatsAccumulator(xp, C, P, split)
            for u0, u1 in self.tiler.ranges(b - a, stats=True):
                acc.add(self.tiler.load(flat[u0:u1]), lab_x[a + u0:a + u1], half_x[a + u0:a + u1], pre, ref_x,
                        nonneg)
            part = part + acc.partial()  # merge by addition
            self.progress("pass 1/2: statistics", b, n)
        stats = st.finalize_stats(part, ref, shp, C, keep=pre.keep)
        self.timings["pass1_stats"] = time.perf_counter() - t0
        self.timings["pass1_stats_cpu"] = time.process_time() - c0  # CPU seconds of this process (all threads)

        # ---- templates and gates
        t0 = time.perf_counter()
        eps = cfg.templates.eps
        T, norms = st.make_templates(stats.mu_c, stats.mu, stats.sigma, eps)
        keep = norms > 0
        for i in np.flatnonzero(~keep):
            skipped.append({"id": ids[i], "count": int(stats.counts[i]), "reason": "template is identically zero"})
            st.warn(f"cluster {ids[i]}: template is identically zero (cluster mean equals global mean); skipped",
                    self.warnings)
        roi_mask = radial_mask(shp, cy, cx, roi_t) if roi_t is not None else None
        sym_mode = cfg.templates.symmetrize
        G = st.make_gates(T, cfg.templates.top_percent, cfg.templates.smooth_sigma, roi_mask, (cy, cx), sym_mode)
        ssim = None
        if cfg.validation.enable_split_half:
            ssim = st.split_half_ssim(stats, eps, keep)
            for i, s in enumerate(ssim):
                if s is not None and s < cfg.validation.ssim_warn:
                    st.warn(f"cluster {ids[i]}: split-half template SSIM {s:.3f} < {cfg.validation.ssim_warn} "
                            "(unstable template: overfitting or noise)", self.warnings)
        sel = np.flatnonzero(keep)
        if len(sel) == 0:
            raise InputError("no cluster gives a non-zero template")
        ids_v = [ids[i] for i in sel]
        Tv, Gv = T[sel], G[sel]
        stats_v = st.Stats(stats.mu, stats.sigma, stats.mu_c[sel], stats.counts[sel], stats.mu_raw,
                           stats.mu_c_raw[sel], stats.halves)
        # gates built once per run; the union and the dpc.roi cut are re-symmetrised about the beam so every CoM
        # gate's centroid stays at the centre
        resym = (lambda g: st.symmetrize_gate(g, cy, cx)) if sym_mode == "beam" else (lambda g: g)
        union = resym(Gv.max(axis=0))
        dpc_mask = radial_mask(shp, cy, cx, cfg.dpc.roi) if cfg.dpc.roi is not None else None
        com_gates = (Gv if cfg.dpc.gate_mode == "adaptive" else union[None]) * (
            dpc_mask if dpc_mask is not None else 1.0)
        if dpc_mask is not None:
            com_gates = np.array([resym(g) for g in com_gates])
        if np.any(com_gates.reshape(len(com_gates), -1).sum(axis=1) <= 0):
            raise InputError("a CoM gate is empty after dpc.roi: widen dpc.roi or templates.roi_r")
        mf = st.MatchedFilter(Tv, stats.mu, stats.sigma, eps, cfg.preprocess.whiten)
        com = st.GatedCoM(com_gates, cy, cx)
        self.timings["templates_gates"] = time.perf_counter() - t0

        # ---- pass 2: maps
        t0, c0 = time.perf_counter(), time.process_time()
        Cv = len(ids_v)
        S = np.empty((n, Cv), dtype=np.float32)
        amax = np.empty(n, dtype=np.int64)
        conf = np.empty(n, dtype=np.float32)
        cxp = np.empty(n, dtype=np.float64)
        cyp = np.empty(n, dtype=np.float64)
        valid = np.empty(n, dtype=bool)
        adaptive = cfg.dpc.gate_mode == "adaptive"
        temp_auto = cfg.matched_filter.softmax_temp == "auto"
        temp = 1.0 if temp_auto else float(cfg.matched_filter.softmax_temp)  # auto: set from S after the pass
        if self.fast:
            pos = {int(i): k for k, i in enumerate(sel)}
            gate_of_slot = np.array([pos.get(i, -1) for i in range(C)] + [-1], dtype=np.int64)
            lab_slot = np.where(lab_idx >= 0, lab_idx, C)
            S, amax, conf, cxp, cyp, valid = eng.pass2_maps(
                src, self.chunk, self.tile, self.threads, pre, mf, com, temp, adaptive,
                gate_of_slot, lab_slot, prefetch=self.prefetch, mapped=kept_mapped, bg_frames=bg_frames,
                progress=lambda b, n_: self.progress("pass 2/2: matched filter + gated CoM", b, n_))
        # generic (array-module) path
        chunks = [] if self.fast else prefetch_chunks(iter_chunks(src, self.chunk, buffers=3), self.prefetch)
        for a, b, block in chunks:
            flat = block.reshape(b - a, -1)
            for u0, u1 in self.tiler.ranges(b - a):
                x = self.tiler.load(flat[u0:u1])
                r = com.products(xp, x)  # gated moments first: the log below reuses x's memory
                e, bg = pre.transform(xp, x, inplace=True, nonneg=nonneg)
                s = mf.scores(xp, e, bg)
                _, idx, cmax = st.softmax_confidence(xp, s, temp)
                ccx, ccy, ok = com.select(xp, r, idx if adaptive else None)
                i0, i1 = a + u0, a + u1
                S[i0:i1], amax[i0:i1], conf[i0:i1] = to_numpy(s), to_numpy(idx), to_numpy(cmax)
                cxp[i0:i1], cyp[i0:i1], valid[i0:i1] = to_numpy(ccx), to_numpy(ccy), to_numpy(ok)
            self.progress("pass 2/2: matched filter + gated CoM", b, n)
        if temp_auto:  # argmax does not depend on the temperature; the confidence is redone from S (n x C)
            temp = q.auto_temperature(S)
            conf = q.confidence_from_scores(S, temp)
        self.timings["pass2_maps"] = time.perf_counter() - t0
        self.timings["pass2_maps_cpu"] = time.process_time() - c0
        n_invalid = int((~valid).sum())
        if n_invalid:
            st.warn(f"{n_invalid} pattern(s) have no intensity inside their CoM gate; CoM set to 0 there",
                    self.warnings)

        # ---- optional descan reference
        descan_info = None
        if self.reference is not None:
            t0 = time.perf_counter()
            rx = np.empty((n, com.n_gates))
            ry = np.empty((n, com.n_gates))
            if self.fast:
                rx, ry, _ = eng.com_pass(self.reference, self.chunk, self.tile, self.threads, com, all_gates=True,
                                         check=self._check_finite, prefetch=self.prefetch,
                                         progress=lambda b, n_: self.progress("descan reference", b, n_))
            for a, b, block in ([] if self.fast else
                                prefetch_chunks(iter_chunks(self.reference, self.chunk, buffers=3), self.prefetch)):
                self._check_finite(block, a)
                flat = block.reshape(b - a, -1)
                for u0, u1 in self.tiler.ranges(b - a):
                    gx, gy, _ = com.apply_all(xp, self.tiler.load(flat[u0:u1]))
                    rx[a + u0:a + u1], ry[a + u0:a + u1] = to_numpy(gx), to_numpy(gy)
                self.progress("descan reference", b, n)
            if cfg.descan.fit == "plane":
                for g in range(com.n_gates):
                    rx[:, g] = st.fit_plane(rx[:, g].reshape(h, w)).ravel()
                    ry[:, g] = st.fit_plane(ry[:, g].reshape(h, w)).ravel()
            gi = amax if adaptive else np.zeros(n, dtype=np.int64)
            dx = rx[np.arange(n), gi]
            dy = ry[np.arange(n), gi]
            cx_corr, cy_corr = cxp - dx, cyp - dy
            descan_info = {"reference": self.reference.name, "fit": cfg.descan.fit,
                           "mean_descan_px": [float(dy.mean()), float(dx.mean())],
                           "descan_range_px": [float(np.ptp(dy)), float(np.ptp(dx))]}
            self.timings["descan_reference"] = time.perf_counter() - t0
        else:
            cx_corr, cy_corr = cxp, cyp

        # ---- real-space post-processing
        t0 = time.perf_counter()
        cal = cfg.calibration
        kx, ky = cal.kx, cal.ky
        com_x_raw = (cxp * kx).reshape(h, w)
        com_y_raw = (cyp * ky).reshape(h, w)
        ccx_k = (cx_corr * kx).reshape(h, w)
        ccy_k = (cy_corr * ky).reshape(h, w)
        rot = cfg.scan.rotation_deg
        flip = cfg.scan.flip
        rot_info = {"rotation_deg": rot, "flip": flip, "source": "config"}
        if rot == "auto" or flip == "auto":
            flips = (False, True) if flip == "auto" else (bool(flip),)
            est = st.estimate_rotation(ccx_k - np.median(ccx_k), ccy_k - np.median(ccy_k), flips)
            rot_info = dict(est, source="minimum curl of the CoM field (angle modulo 180 deg)")
            rot = est["rotation_deg"] if rot == "auto" else rot
            flip = est["flip"] if flip == "auto" else flip
            rot_info.update(rotation_deg=float(rot), flip=bool(flip))
        rx_, ry_ = st.rotate_vectors(ccx_k, ccy_k, float(rot), bool(flip))
        bcx = st.apply_baseline(rx_, cfg.dpc.baseline, cfg.dpc.baseline_roi)
        bcy = st.apply_baseline(ry_, cfg.dpc.baseline, cfg.dpc.baseline_roi)
        units = {"com": f"k ({cal.k_units}) per detector px calibration: ky={ky}, kx={kx}"}
        phys_info = None
        if cfg.physical.enabled:
            mx, my, how = self._mrad_per_px()
            ax_, ay_ = st.rotate_vectors((cx_corr * mx).reshape(h, w), (cy_corr * my).reshape(h, w),
                                         float(rot), bool(flip))
            ax_ = st.apply_baseline(ax_, cfg.dpc.baseline, cfg.dpc.baseline_roi)
            ay_ = st.apply_baseline(ay_, cfg.dpc.baseline, cfg.dpc.baseline_roi)
            ph = cfg.physical
            ex = deflection_to_field(ax_ * 1e-3, ph.accelerating_voltage_kv, ph.thickness_nm)
            ey = deflection_to_field(ay_ * 1e-3, ph.accelerating_voltage_kv, ph.thickness_nm)
            units["E"] = "V/m (E = -theta p v / (e t))"
            phys_info = {"mrad_per_px_x": mx, "mrad_per_px_y": my, "mrad_source": how,
                         "accelerating_voltage_kv": ph.accelerating_voltage_kv, "thickness_nm": ph.thickness_nm}
        else:  # the same sign as the physical field: the (negative) electron is deflected against E
            ex = -cfg.dpc.field_scale * bcx
            ey = -cfg.dpc.field_scale * bcy
            units["E"] = f"-field_scale x CoM (-{cfg.dpc.field_scale} x k units; E points against the deflection)"
        icom = None
        if cfg.icom:
            step = cal.scan_step_nm or 1.0
            icom = st.integrate_com(bcx, bcy, step)
            units["iCoM"] = f"k units x {'nm' if cal.scan_step_nm else 'scan px'}"
        self.timings["postprocess"] = time.perf_counter() - t0
        self.timings["total_after_sample"] = time.perf_counter() - t_all

        # ---- reports
        argmax_ids = np.asarray(ids_v)[amax].reshape(h, w)
        val = cfg.validation
        coverage = st.gate_coverage(Gv, Tv, val.gate_signal_warn)
        conf_rep = {
            "mean": float(conf.mean()), "median": float(np.median(conf)),
            "p05": float(np.percentile(conf, 5)), "p95": float(np.percentile(conf, 95)),
            "fraction_above_0.9": float((conf > 0.9).mean()),
            "chance_level": 1.0 / Cv,
            "per_cluster_mean": {str(c): float(conf[amax == i].mean()) if np.any(amax == i) else None
                                 for i, c in enumerate(ids_v)},
        }
        conf_rep["temperature"] = float(temp)
        conf_rep["temperature_source"] = "auto: std of S" if temp_auto else "matched_filter.softmax_temp"
        if Cv > 1 and conf_rep["mean"] > val.confidence_saturated:
            conf_rep["note"] = "saturated (~1): the temperature is too low; use softmax_temp: auto or a higher value"
        elif Cv > 1 and conf_rep["mean"] < 1.0 / Cv + val.confidence_flat_margin:
            conf_rep["note"] = "near chance level: clusters are not separated by the templates"
        else:
            conf_rep["note"] = "non-saturated: clusters separated"
        t0 = time.perf_counter()
        quality = self._quality(rx_, ry_, bcx, bcy, com_gates, ids_v, stats_v, cy, cx, conf, Cv, temp, temp_auto,
                                coverage, ex, ey)
        self.timings["quality_checks"] = time.perf_counter() - t0
        given = self.labels
        agree = float(np.mean(argmax_ids.ravel()[np.isin(given, ids_v)] == given[np.isin(given, ids_v)])) \
            if np.any(np.isin(given, ids_v)) else None
        self.report = {
            "scan_shape": [h, w],
            "frame_shape": list(shp),
            "n_frames": n,
            "dtype": str(src.dtype),
            "device": self.device,
            "engine": self.engine_name(src.dtype),
            "chunk_frames": self.chunk,
            "center": {"y": self.center.cy, "x": self.center.cx, "method": self.center.method,
                       "auto_detected": {"y": self.auto_center.cy, "x": self.auto_center.cx},
                       "bf_disk_radius_px": self.center.radius},
            "calibration": {"pixel_size_ky": ky, "pixel_size_kx": kx, "k_units": cal.k_units,
                            "scan_step_nm": cal.scan_step_nm, "convergence_angle_mrad": cal.convergence_angle},
            "clusters": {"ids": ids_v, "counts": {str(c): int(count_of.get(c, 0)) for c in ids_v},
                         "skipped": skipped, "n_unassigned": self.n_unassigned,
                         "labels_source": "computed (autolabel)" if autolabel_info else "given",
                         "autolabel": autolabel_info,
                         "argmax_agreement_with_labels": agree},
            "gate_coverage": {str(c): cov for c, cov in zip(ids_v, coverage)},
            "union_gate_coverage": st.gate_coverage(union[None])[0],
            "confidence": conf_rep,
            "split_half_ssim": ({str(ids[i]): s for i, s in enumerate(ssim)} if ssim is not None else None),
            "quality": quality,
            "dpc": {"gate_mode": cfg.dpc.gate_mode, "baseline": cfg.dpc.baseline, "invalid_frames": n_invalid,
                    "rotation": rot_info, "descan": descan_info, "physical": phys_info},
            "units": units,
            "preprocess_background_radius_px": pre.bg_radius,
            "warnings": self.warnings,
        }
        return PolarResult(
            scan_shape=(h, w), cluster_ids=ids_v, center=self.center, stats=stats_v, templates=Tv, gates=Gv,
            union_gate=union, S=S.T.reshape(Cv, h, w), argmax=argmax_ids, confidence=conf.reshape(h, w),
            com_x_raw=com_x_raw, com_y_raw=com_y_raw, com_x=bcx, com_y=bcy, ex=ex, ey=ey, icom=icom,
            labels=self.labels.reshape(h, w), report=self.report, timings=dict(self.timings),
            warnings=self.warnings,
        )

    def _quality(self, rx_, ry_, bcx, bcy, com_gates, ids_v, stats, cy, cx, conf, Cv, temp, temp_auto, coverage,
                 ex, ey) -> dict:
        """The checks of ``core.quality``; each failing one becomes a warning (the run still writes everything)."""
        cfg, val = self.cfg, self.cfg.validation
        gates = com_gates if cfg.dpc.gate_mode == "adaptive" else [com_gates[0]] * len(ids_v)
        checks = {
            "baseline": q.baseline_check(rx_, ry_, bcx, bcy, cfg.dpc.baseline, val.baseline_removed_warn),
            "gate_bias": q.gate_bias_check(gates, stats.mu_c_raw, [str(c) for c in ids_v], stats.mu_raw, cy, cx,
                                           val.gate_bias_warn_px, val.center_offset_warn_px),
            "confidence": q.confidence_check(conf, Cv, float(temp), "auto (std of S)" if temp_auto else "config",
                                             val.confidence_saturated, val.confidence_flat_margin),
            "gate_signal": q.gate_signal_check({str(c): v for c, v in zip(ids_v, coverage)}),
            "field_split_half_ssim": q.field_split_half_check(ex, ey, val.ssim_warn),
        }
        failed = [k for k, v in checks.items() if not v["ok"]]
        for k in failed:
            st.warn(f"quality check '{k}' failed: {checks[k]['message']}", self.warnings)
        return {"passed": not failed, "failed": failed, "checks": checks}

    def _mrad_per_px(self):
        ph, cal = self.cfg.physical, self.cfg.calibration
        if ph.mrad_per_px is not None:
            return ph.mrad_per_px, ph.mrad_per_px, "physical.mrad_per_px"
        if cal.k_units == "1/Å":
            lam = electron_wavelength_angstrom(ph.accelerating_voltage_kv)
            return lam * cal.kx * 1e3, lam * cal.ky * 1e3, "absolute k calibration x electron wavelength"
        if cal.convergence_angle is not None and self.center.radius > 0:
            m = cal.convergence_angle / self.center.radius
            return m, m, "convergence_angle / detected BF disk radius"
        raise InputError("cannot convert CoM to mrad: no mrad_per_px, absolute k calibration or usable BF disk radius")


def stream_gated_com(source, gates, cy: float, cx: float, chunk: Optional[int] = None, tile: Optional[int] = None,
                     device: str = "cpu", prefetch: bool = True, threads: Optional[int] = None,
                     engine: str = "auto"):
    """Gated CoM alone over a streamed scan (one pass): returns (com_x, com_y, valid) per frame, detector px.

    ``gates`` is one (ky, kx) gate (or (K, ky, kx), the first is used); the same tiled path as the pipeline
    (the CPU engine with ``threads`` workers on numpy, the array-module path with ``engine='generic'`` or CuPy).
    """
    xp = get_xp(device)
    g = np.asarray(gates, dtype=np.float64)
    com = st.GatedCoM(g if g.ndim == 2 else g[0], cy, cx)
    chunk = chunk or auto_chunk(source.frame_shape)
    w = source.scan_shape[1]
    if chunk > w:
        chunk -= chunk % w
    if xp is np and engine != "generic":  # the CPU engine (worker threads, memory-mapped reads)
        tile = int(tile) if tile else eng.default_tile(int(np.prod(source.frame_shape)))
        with _blas_one_thread(xp):
            return eng.com_pass(source, chunk, tile, int(threads) if threads else eng.default_threads(), com,
                                prefetch=prefetch)
    tiler = Tiler(xp, int(np.prod(source.frame_shape)), chunk, tile, tile_bytes=1 << 20)  # one skinny product
    n = source.n_frames
    cxs, cys, oks = np.empty(n), np.empty(n), np.empty(n, dtype=bool)
    with _blas_one_thread(xp):
        for a, b, block in prefetch_chunks(iter_chunks(source, chunk, buffers=3), prefetch):
            flat = block.reshape(b - a, -1)
            for u0, u1 in tiler.ranges(b - a):
                gx, gy, ok = com.apply(xp, tiler.load(flat[u0:u1]))
                cxs[a + u0:a + u1], cys[a + u0:a + u1], oks[a + u0:a + u1] = (
                    to_numpy(gx), to_numpy(gy), to_numpy(ok))
    return cxs, cys, oks


def run_pipeline(source, labels=None, cfg: Optional[PolarConfig] = None, **kw) -> PolarResult:
    """One-call convenience: prepare (centre) and run."""
    p = PolarPipeline(source, labels, cfg, **kw)
    p.prepare()
    return p.run()
