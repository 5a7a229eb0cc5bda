"""Fast CPU (numpy) passes over a streamed scan: pass-1 statistics, pass-2 maps, gated CoM.

Same formulas as the array-module code in ``stages`` (which stays the GPU path and the reference), organised
for a CPU:

* frames come as zero-copy views of a memory-mapped contiguous HDF5 dataset (or of an in-memory array) when
  the source offers one, else from buffered reads with background prefetch;
* each chunk is cut into cache-sized tiles that hold frames of ONE group only (cluster label, and split half
  when asked for): sorting a chunk's frames by group turns every per-cluster sum into a column sum, i.e. a
  BLAS matrix-vector product (a few x cheaper than a one-hot matrix product with a few rows);
* tiles are processed by ``threads`` worker threads (numpy and BLAS release the GIL), each with its own
  float32 buffers and accumulators (float32 for at most 256 frames, then float64), merged by addition at the
  end (a static split of the tiles, so results do not depend on timing);
* per tile: one uint16 -> float32 conversion, one log, matrix-vector / skinny matrix products run as BLAS
  "small matrix" calls (``rmm``), no temporaries the size of a tile.

Pass 2 (adaptive gating) computes each frame's CoM moments with the gate of its *label* first (one 3-column
product per tile) and redoes, per chunk, only the frames whose matched-filter argmax differs (a few %).
Softmax, argmax and the CoM ratios run once per chunk, vectorised, not per tile.

With numba (``core.kernels``; integer data with the log on, unless ``STEM_POLAR_KERNELS=numpy``) each pass
runs one compiled kernel per tile instead of the numpy conversion + log1p + products: log(I+1) comes from a
65536-entry table into a cache-resident row per frame, and pass 1 accumulates raw, D = e' - bg and D^2 from
it, pass 2 forms the scores and the guessed-gate CoM moments as dot products (each raw pixel read once per
pass). The tiles, threads, part-ordered merges and the per-chunk finish stay the same. Float data, and data
without the log, keep the numpy path (numpy's log1p; no table applies).

For native-endian uint16 frames the same kernel calls go to ``core.native`` (C, built at first use) when it
loads: log(I+1) in SIMD registers (a register table for vectors of counts below 32, a polynomial otherwise),
frames two or four at a time, pass 1 in one sweep after the frame's background from the outer-ring vectors,
pass 2's scores and moments in one sweep. Compiled calls stream frames, so their tiles are ``KERNEL_TILE``
frames (fewer Python calls); pass 2 finishes chunk i (softmax, argmax, redone moments) in a helper thread
while chunk i + 1 is processed.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, Optional

import numpy as np

from . import kernels, native
from . import stages as st
from .source import iter_chunks, prefetch_chunks

# ----------------------------------------------------------------------------------------- frame blocks


def use_kernels(dtype) -> bool:
    """The numba log-table kernel (``core.kernels``) for native-endian integer data, unless numba is missing
    or ``STEM_POLAR_KERNELS=numpy`` is set (then numpy's log1p)."""
    return kernels.enabled() and kernels.supports(dtype)


def default_threads() -> int:
    """Worker threads for the CPU passes: the CPUs this process may use (at most 16)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return max(1, min(16, n))


KEEP_MAPPED_BYTES = 1 << 30  # datasets up to this size stay mapped from pass 1 to pass 2 (see keep_mapped)


def keep_mapped(source) -> bool:
    """True when pass 1 should leave the pages of a memory-mapped source mapped for pass 2: mapping (page-table
    population) and unmapping cost about 0.1 CPU-s per GB and pass, a quarter of a pass at 128^2 x 128^2; the
    price is resident file pages (page cache, reclaimable) up to ``KEEP_MAPPED_BYTES`` between the passes."""
    if getattr(source, "advise", None) is None:
        return False
    nbytes = int(source.n_frames) * int(np.prod(source.frame_shape)) * np.dtype(source.dtype).itemsize
    return nbytes <= KEEP_MAPPED_BYTES


def frame_blocks(source, chunk: int, check: Optional[Callable] = None, prefetch: bool = True,
                 keep: bool = False, mapped: bool = False):
    """Yield (start, stop, block) with ``block`` a (stop - start, P) array of raw frames, valid until the next
    block is taken (views of a mapped source: until released). Zero-copy views (``source.frames_view()``) when
    available, else ring-buffer reads with a background prefetch thread (a block then stays valid while two
    further blocks are taken). ``check(block, start)`` runs on every block (finiteness of float data).
    ``keep``: used pages of a mapped source stay mapped (the caller releases them, ``release``, or a following
    pass uses them; see ``keep_mapped``); ``mapped``: a previous pass left them mapped, no read-ahead hints."""
    n = source.n_frames
    view = getattr(source, "frames_view", None)
    arr = view() if view is not None else None
    if arr is not None and arr.flags.c_contiguous:
        arr = arr.reshape(n, -1)  # a view (no copy) of the contiguous frames
        advise = getattr(source, "advise", None)
        if advise is None or mapped:
            for a in range(0, n, chunk):
                block = arr[a:min(a + chunk, n)]
                if check is not None:
                    check(block, a)
                yield a, a + len(block), block
            return
        with ThreadPoolExecutor(max_workers=1) as helper:
            advise("willneed", 0, min(chunk, n))
            for a in range(0, n, chunk):
                b = min(a + chunk, n)
                # map (and read ahead) the next block in a helper thread while this one is processed
                nxt = helper.submit(advise, "willneed", b, min(b + chunk, n)) if b < n else None
                block = arr[a:b]
                if check is not None:
                    check(block, a)
                yield a, b, block
                if nxt is not None:
                    nxt.result()
                # unmap pages already used (resident memory stays bounded), in the helper thread: the workers
                # go on with the next block meanwhile (a late reader of this block re-faults from the page cache)
                if not keep:
                    helper.submit(advise, "done", a, b)
        return
    for a, b, block in prefetch_chunks(iter_chunks(source, chunk, buffers=3), prefetch):
        block = block.reshape(b - a, -1)
        if check is not None:
            check(block, a)
        yield a, b, block


def release(source, start: int, stop: int) -> None:
    """Unmap frames [start, stop) of a memory-mapped source (the page cache keeps them); no-op otherwise."""
    advise = getattr(source, "advise", None)
    if advise is not None:
        advise("done", start, stop)


def group_tiles(keys: np.ndarray, tile: int):
    """Tiles of one group each: list of (group, selection) with selection a slice (consecutive frames) or an
    index array, over a chunk whose frames have group ``keys`` (local indices)."""
    n = len(keys)
    out = []
    if n == 0:
        return out
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    cuts = (np.flatnonzero(sk[1:] != sk[:-1]) + 1).tolist()  # (np.r_ costs ~70 us a call: lists here)
    for s, e in zip([0] + cuts, cuts + [n]):
        g = int(sk[s])
        for u in range(s, e, tile):
            v = min(u + tile, e)
            idx = order[u:v]
            if idx[-1] - idx[0] == v - u - 1:  # consecutive frames: a view, no gather
                out.append((g, slice(int(idx[0]), int(idx[-1]) + 1)))
            else:
                out.append((g, idx))
    return out


def _as_index(sel) -> np.ndarray:
    """A tile selection (slice or index array) as int64 frame indices (for the kernels)."""
    if isinstance(sel, slice):
        return np.arange(sel.start, sel.stop, dtype=np.int64)
    return np.asarray(sel, dtype=np.int64)


_SMALL_MNK = 1_000_000  # OpenBLAS (SkylakeX) runs sgemm with M*N*K up to 100^3 on unpacked "small matrix" kernels


def rmm(at: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x @ at.T for a skinny (c, P) ``at``: evaluated as at @ x.T over row blocks of x small enough for BLAS'
    small-matrix kernels (no packing copy of x; ~3x faster than one large product here). Same sums."""
    c, p = at.shape
    m = x.shape[0]
    nsub = int(_SMALL_MNK // (c * p))
    if nsub < 1 or m <= nsub:
        return (at @ x.T).T
    out = np.empty((m, c), dtype=np.result_type(at, x))
    for u in range(0, m, nsub):
        np.matmul(at, x[u:u + nsub].T, out=out[u:u + nsub].T)
    return out


def _split_even(items, parts: int):
    """Contiguous split of a list into ``parts`` lists of near-equal total frame counts."""
    if parts <= 1 or len(items) <= 1:
        return [items]
    sizes = np.array([(s.stop - s.start) if isinstance(s, slice) else len(s) for _, s in items], dtype=float)
    cum = np.cumsum(sizes)
    bounds = np.searchsorted(cum, cum[-1] * np.arange(1, parts) / parts, side="left") + 1
    edges = [0] + [int(min(b, len(items))) for b in bounds] + [len(items)]
    return [items[edges[i]:edges[i + 1]] for i in range(parts) if edges[i + 1] > edges[i]]


class _Worker:
    """Per-thread buffers: a float32 tile, a second float32 tile (pass 2 log), a gather buffer (allocated on
    first use: the compiled kernels need none of them), and a (4, P) float32 scratch row block."""

    def __init__(self, tile: int, n_pix: int, dtype, second: bool = False):
        self._shape = (tile, n_pix)
        self._dtype = dtype
        self._second = second
        self._f = self._e = self._g = None
        self.ones = np.ones(tile, dtype=np.float32)
        self.a2 = np.ones((2, tile), dtype=np.float32)  # pass 1: rows [1, bg] of a tile
        self.out4 = np.empty((4, n_pix), dtype=np.float32)

    @property
    def f(self):
        if self._f is None:
            self._f = np.empty(self._shape, dtype=np.float32)
        return self._f

    @property
    def e(self):
        if self._e is None and self._second:
            self._e = np.empty(self._shape, dtype=np.float32)
        return self._e

    @property
    def g(self):
        if self._g is None:
            self._g = np.empty(self._shape, dtype=self._dtype)
        return self._g

    def load(self, block, sel):
        """Raw frames of a tile as float32 (a copy: the source is never written)."""
        if isinstance(sel, slice):
            src = block[sel]
        else:
            src = np.take(block, sel, axis=0, out=self.g[:len(sel)])
        x = self.f[:src.shape[0]]
        np.copyto(x, src, casting="unsafe")
        return x


class _Pool:
    """A fixed set of worker threads, one ``_Worker`` state each, fed from one task queue.

    ``submit(fn, *args)`` queues fn(state, *args) for whichever thread is free (a thread that gets less CPU
    because other jobs share the machine does not hold the others up) and returns a Future; with one thread
    the task runs at once in the caller's thread. ``split(tiles)`` cuts a chunk's tiles into contiguous parts
    (several per thread, at most ``PART_FRAMES`` frames each); results must depend on the part only
    (per-part accumulators, merged in part order), which keeps them independent of the scheduling."""

    PARTS_PER_THREAD = 4
    PART_FRAMES = 256

    def __init__(self, threads: int, make_state: Callable[[], object]):
        self.threads = max(1, int(threads))
        self.states = [make_state() for _ in range(self.threads)]
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.workers = []
        if self.threads > 1:
            self.workers = [threading.Thread(target=self._loop, args=(s,), daemon=True) for s in self.states]
            for t in self.workers:
                t.start()

    def _loop(self, state):
        while True:
            item = self.tasks.get()
            if item is None:
                return
            fn, args, fut = item
            if fut.set_running_or_notify_cancel():
                _run_into(fut, fn, state, args)

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        if not self.workers:
            fut.set_running_or_notify_cancel()
            _run_into(fut, fn, self.states[0], args)
        else:
            self.tasks.put((fn, args, fut))
        return fut

    def split(self, tiles):
        n = sum((s.stop - s.start) if isinstance(s, slice) else len(s) for _, s in tiles)
        parts = max(self.threads * self.PARTS_PER_THREAD if self.threads > 1 else 1, -(-n // self.PART_FRAMES))
        return _split_even(tiles, parts)

    def stream(self, blocks, tiles_of, work, chunk_done, depth: int = 2) -> None:
        """Every part of every chunk through the workers, without a pause at chunk ends.

        ``blocks`` yields (a, b, block); the parts of ``tiles_of(a, b)`` are queued as the chunk arrives and
        ``chunk_done(a, b, block, results)`` (results = work(state, a, block, part) in part order) runs in the
        calling thread, chunk by chunk in order, while the workers go on with the next chunk: at most ``depth``
        chunks are queued or running, so a block is in use until its ``chunk_done`` returns and ``depth``
        further blocks have not been taken (the sources' ring buffers hold three)."""
        inflight: deque = deque()

        def finish_oldest():
            a, b, block, futs = inflight[0]  # stays listed until done: the error path below waits for its parts
            chunk_done(a, b, block, [f.result() for f in futs])
            inflight.popleft()

        try:
            for a, b, block in blocks:
                parts = self.split(tiles_of(a, b))
                inflight.append((a, b, block, [self.submit(work, a, block, p) for p in parts]))
                if len(inflight) >= depth:
                    finish_oldest()
            while inflight:
                finish_oldest()
        finally:  # on an error: drop the queued parts, wait for the running ones (they read the blocks)
            for *_, futs in inflight:
                for f in futs:
                    f.cancel()
            for *_, futs in inflight:
                wait(futs)

    def close(self):
        for _ in self.workers:
            self.tasks.put(None)
        for t in self.workers:
            t.join()
        self.workers = []


def _run_into(fut: Future, fn, state, args) -> None:
    try:
        fut.set_result(fn(state, *args))
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
        fut.set_exception(exc)


# ----------------------------------------------------------------------------------------- pass 1


class _GroupSums:
    """float64 sums per group g of the shifted preprocessed frames e' = pre(e) - ref (before the per-frame
    background), for frames i in g: raw = sum x_i, s1 = sum e'_i, sq = sum e'_i^2, sbe = sum bg_i e'_i,
    bg1 = sum bg_i, bg2 = sum bg_i^2, cnt."""

    def __init__(self, n_groups: int, n_pix: int):
        self.vec = np.zeros((n_groups, 4, n_pix))  # rows raw, s1, sq, sbe
        self.scal = np.zeros((n_groups, 3))  # bg1, bg2, cnt

    def add_part(self, part: dict) -> None:
        """Add one part's float32 staging sums (at most ``_Pool.PART_FRAMES`` frames each)."""
        for g in sorted(part):
            v32, sc = part[g]
            self.vec[g, :len(v32)] += v32  # (the compiled pass 1 has no sbe row: 3 rows)
            self.scal[g] += sc

    @property
    def raw(self):
        return self.vec[:, 0]

    @property
    def s1(self):
        return self.vec[:, 1]

    @property
    def sq(self):
        return self.vec[:, 2]

    @property
    def sbe(self):
        return self.vec[:, 3]

    @property
    def bg1(self):
        return self.scal[:, 0]

    @property
    def bg2(self):
        return self.scal[:, 1]

    @property
    def cnt(self):
        return self.scal[:, 2]


def _pass1_part_fused(pre, ref32, wide: bool, n_pix: int, bg_out: Optional[np.ndarray] = None):
    """As ``_pass1_part`` for integer data with ``log_transform``, with one compiled kernel per tile
    (``kernels.pass1_frames``): each raw frame is read once, e' = log1p(x) - ref comes from the log table into
    a cache-resident row, bg = e' . w_bg + ref . w_bg, and the float32 part sums of raw x, D = e' - bg and D^2
    are accumulated from it. The group sums then hold D directly: rows [raw, sum D, sum D^2] (sbe 0) with
    bg1 = bg2 = 0 give ``_to_partial`` the same first and second sums (without the sq - 2 sbe + bg2
    cancellation). ``bg_out`` (one float64 per frame of the scan): each frame's bg is kept there (pass 2's
    matched filter needs it; parts write disjoint frames)."""
    c = pre.cfg
    use_bg = bool(c.background_subtract)
    bgw = pre.bg_weights if use_bg else ref32
    c0 = float(np.dot(ref32.astype(np.float64), bgw.astype(np.float64))) if use_bg else 0.0
    # the native kernel's list of background vectors: once per pass, not per call
    bgv = native.background_vectors(bgw) if use_bg and native.available() else None

    def run(state, a, block, tiles):
        part: dict = {}
        for g, sel in tiles:
            if g not in part:
                part[g] = np.zeros((3, n_pix), dtype=np.float32)  # rows raw, sum D, sum D^2 (sbe stays 0)
            idx = _as_index(sel)
            bg = np.full(len(idx), c0)
            kernels.pass1(block, idx, wide, ref32, bgw, use_bg, part[g], bg, state.out4, bgv)
            if bg_out is not None:
                bg_out[a + idx] = bg
        out = {}
        for g, v in part.items():
            cnt = sum((sl.stop - sl.start) if isinstance(sl, slice) else len(sl) for gg, sl in tiles if gg == g)
            out[g] = (v, np.array([0.0, 0.0, cnt], dtype=np.float64))
        return out

    return run


def _pass1_part(pre, ref32, nonneg: bool, n_pix: int):
    """fn(state, block, tiles) -> {group: (float32 (4, P) sums [raw, s1, sq, sbe], float64 [bg1, bg2, cnt])}."""
    c = pre.cfg
    bgw = pre.bg_weights if c.background_subtract else None

    def run(state, a, block, tiles):
        part: dict = {}
        bgs: dict = {}
        tmp = state.out4  # rows raw, s1, sbe, sq of one tile (the order of _GroupSums.vec is raw, s1, sq, sbe)
        for g, sel in tiles:
            if g not in part:
                part[g] = np.zeros((4, n_pix), dtype=np.float32)
                bgs[g] = []
            x = state.load(block, sel)
            n = x.shape[0]
            ones = state.ones[:n]
            np.matmul(ones, x, out=tmp[0])
            if c.log_transform:
                if not nonneg:
                    np.maximum(x, 0, out=x)
                np.log1p(x, out=x)
            if bgw is None:
                np.subtract(x, ref32, out=x)
                np.matmul(ones, x, out=tmp[1])
                tmp[2] = 0
            else:
                a2 = state.a2[:, :n]  # rows [1, bg]
                np.matmul(x, bgw, out=a2[1])  # bg_i = e_i . w_bg (before the shift)
                bgs[g].append(a2[1].copy())
                np.subtract(x, ref32, out=x)
                if 2 * n * n_pix <= _SMALL_MNK:  # [1; bg] @ e' in one small-matrix product
                    np.matmul(a2, x, out=tmp[1:3])
                else:
                    np.matmul(ones, x, out=tmp[1])
                    np.matmul(a2[1], x, out=tmp[2])
            np.einsum("ij,ij->j", x, x, out=tmp[3])
            part[g] += tmp
        out = {}
        for g, v in part.items():
            bg = np.concatenate(bgs[g]).astype(np.float64) if bgs[g] else np.zeros(0)
            cnt = sum((sl.stop - sl.start) if isinstance(sl, slice) else len(sl) for gg, sl in tiles if gg == g)
            out[g] = (v[[0, 1, 3, 2]], np.array([bg.sum(), bg @ bg, cnt], dtype=np.float64))
        return out

    return run


def pass1_stats(source, chunk: int, tile: int, threads: int, lab_idx: np.ndarray, n_clusters: int,
                half: Optional[np.ndarray], pre, ref: np.ndarray, check=None, progress=None,
                prefetch: bool = True, keep: bool = False,
                bg_out: Optional[np.ndarray] = None) -> st.StatsPartial:
    """Pass 1 over the scan -> ``StatsPartial`` (the layout ``stages.finalize_stats`` expects).

    Groups: cluster slot s (0..C-1, C = unassigned label) times split half when ``half`` is given.
    Sums of D_i = e'_i - bg_i follow from the group sums exactly: sum D = s1 - bg1, sum D^2 = sq - 2 sbe + bg2.
    Each part of a chunk sums in float32 (<= 256 frames); parts are added in order into float64 totals.
    ``keep``: leave a mapped source's pages mapped for pass 2 (which unmaps them as it goes).
    ``bg_out`` (float64, one per frame): filled with each frame's background level e . w_bg by the compiled
    kernels (``pass1_keeps_background``), so that pass 2 need not form it again; untouched otherwise.
    """
    C = n_clusters
    n_pix = int(np.prod(source.frame_shape))
    hf = 2 if half is not None else 1
    slot = np.where(lab_idx >= 0, lab_idx, C).astype(np.int64)
    key = slot * hf + (half.astype(np.int64) if half is not None else 0)
    nonneg = np.dtype(source.dtype).kind in "ub"
    ref32 = np.ascontiguousarray(ref, dtype=np.float32)
    fused = pre.cfg.log_transform and use_kernels(source.dtype)
    if fused:
        tile = max(tile, KERNEL_TILE)
        run = _pass1_part_fused(pre, ref32, kernels.is_wide(source.dtype), n_pix, bg_out)
    else:
        run = _pass1_part(pre, ref32, nonneg, n_pix)
    pool = _Pool(threads, lambda: _Worker(tile, n_pix, source.dtype))
    tot = _GroupSums((C + 1) * hf, n_pix)

    def chunk_done(a, b, block, results):
        for r in results:  # part order: the float64 totals do not depend on the scheduling
            tot.add_part(r)
        if not keep:
            release(source, a, b)
        if progress:
            progress(b, source.n_frames)

    try:
        pool.stream(frame_blocks(source, chunk, check, prefetch, keep=True),
                    lambda a, b: group_tiles(key[a:b], tile), run,
                    chunk_done)
    finally:
        pool.close()
    return _to_partial(tot, C, hf)


def pass1_keeps_background(pre, dtype) -> bool:
    """True when ``pass1_stats`` fills ``bg_out``: the compiled kernels with the log and background on."""
    c = pre.cfg
    return bool(c.log_transform and c.background_subtract and use_kernels(dtype))


def _to_partial(s: _GroupSums, C: int, hf: int) -> st.StatsPartial:
    """Rows of ``StatsPartial`` as sums of group rows: [all, half0, half1], [clusters, clusters x half0,
    clusters x half1], counts likewise, raw [all, clusters]. Without halves their rows are 0 (unused)."""
    slots = C + 1
    first = (s.s1 - s.bg1[:, None]).reshape(slots, hf, -1)  # sum of D per group
    second = (s.sq - 2 * s.sbe + s.bg2[:, None]).reshape(slots, hf, -1)  # sum of D^2 per group
    cnt = s.cnt.reshape(slots, hf)
    raw = s.raw.reshape(slots, hf, -1).sum(axis=1)

    def halves(a):  # (slots, hf, ...) -> [half0, half1] summed over slots
        return [a[:, h].sum(axis=0) if hf == 2 else np.zeros_like(a[0, 0]) for h in range(2)]

    def cl_halves(a):  # [cluster c & half h] for h, then c
        return [a[c, h] if hf == 2 else np.zeros_like(a[0, 0]) for h in range(2) for c in range(C)]

    return st.StatsPartial(
        s1=np.stack([first.sum(axis=(0, 1))] + halves(first)),
        s2=np.stack([second.sum(axis=(0, 1))] + halves(second)),
        cs=np.stack([first[c].sum(axis=0) for c in range(C)] + cl_halves(first)),
        cnt=np.array([cnt.sum()] + halves(cnt) + [cnt[c].sum() for c in range(C)] + cl_halves(cnt), dtype=np.float64),
        raw_c=np.stack([raw.sum(axis=0)] + [raw[c] for c in range(C)]),
    )


# ----------------------------------------------------------------------------------------- pass 2


def pass2_maps(source, chunk: int, tile: int, threads: int, pre, mf: st.MatchedFilter, com: st.GatedCoM,
               softmax_temp: float, adaptive: bool, gate_of_slot: Optional[np.ndarray],
               lab_slot: Optional[np.ndarray], progress=None, prefetch: bool = True, mapped: bool = False,
               bg_frames: Optional[np.ndarray] = None):
    """Pass 2: matched-filter scores S (n, C), argmax index, max softmax probability, gated CoM (x, y, valid).

    S = e W - b - bg (1 W) with e = log1p(x) (or x) and bg = e . w_bg, evaluated as ONE product e [W | w_bg].
    CoM moments x M_g use the gate of the frame's label (``gate_of_slot[lab_slot]``, -1 = unknown: all gates)
    in adaptive mode and are recomputed for frames whose argmax picks another gate; union mode uses gate 0.
    ``mapped``: pass 1 left a mapped source's pages mapped (``keep_mapped``); they are unmapped chunk by chunk.
    ``bg_frames``: each frame's bg from pass 1 (``pass1_keeps_background``); the compiled kernels then skip the
    w_bg column (one row fewer per sweep). With the native kernels and a detector width that is a multiple of
    the SIMD width, the CoM moments come from the gate row and the pixel offsets (``native.pass2_gate``).
    """
    n = source.n_frames
    n_pix = int(np.prod(source.frame_shape))
    C = mf.W.shape[1]
    c = pre.cfg
    bgsub = c.background_subtract
    fused = c.log_transform and use_kernels(source.dtype)
    bg_known = bool(bgsub and fused and bg_frames is not None)
    W2T = np.ascontiguousarray((np.concatenate([mf.W, pre.bg_weights[:, None]], axis=1)
                                if bgsub and not bg_known else mf.W).T, dtype=np.float32)  # (C [+1], P)
    b, colsum = mf.b, mf.colsum
    MT = np.ascontiguousarray(com.M.T)  # (3K, P)
    K = com.n_gates
    MgT = [np.ascontiguousarray(MT[3 * g:3 * g + 3]) for g in range(K)]
    nonneg = np.dtype(source.dtype).kind in "ub"
    S = np.empty((n, C), dtype=np.float32)
    amax = np.empty(n, dtype=np.int64)
    conf = np.empty(n, dtype=np.float32)
    cxp = np.empty(n, dtype=np.float64)
    cyp = np.empty(n, dtype=np.float64)
    valid = np.empty(n, dtype=bool)
    if adaptive:
        key = np.asarray(gate_of_slot)[lab_slot].astype(np.int64)  # guessed gate per frame, -1 unknown
    else:
        key = np.zeros(n, dtype=np.int64)  # union: gate 0 for every frame, never redone

    nP = W2T.shape[0]
    # per chunk: [e W | e w_bg] and the guessed-gate moments; two sets, so that one chunk's finish (below, in a
    # helper thread) overlaps the next chunk's products
    P_bufs = [np.empty((chunk, nP), dtype=np.float32) for _ in range(2)]
    R_bufs = [np.empty((chunk, 3), dtype=np.float32) for _ in range(2)]

    wide = kernels.is_wide(source.dtype)
    gates = [(tuple(com.frame_shape), com.G[g], com.dx, com.dy) for g in range(K)]
    # frames whose argmax is not their guessed gate: redone in the calling thread with the native gate kernel
    # (no float copy of the frames, 3 moment products instead of 3K) when it applies
    gate_kernel = (fused and kernels.backend(source.dtype) == "native" and native.gate_rows_fit(com.frame_shape[1])
                   and native.supports_dtype(source.dtype))
    no_rows = np.empty((0, n_pix), dtype=np.float32)
    redo_scratch = np.empty((2, n_pix), dtype=np.float32) if gate_kernel else None
    if fused:
        tile = max(tile, KERNEL_TILE)

    def run_fused(state, tiles, block, P_chunk, R_chunk):
        """As ``run`` in one compiled kernel per tile (``kernels.pass2_frames``): each raw frame is read once,
        e = log1p(x) from the log table into a cache-resident row, scores and CoM moments as dot products."""
        for g, sel in tiles:
            idx = _as_index(sel)
            op = np.empty((len(idx), nP), dtype=np.float32)
            orr = np.empty((len(idx), 3), dtype=np.float32)
            gg = g if g >= 0 else 0
            kernels.pass2_gate(block, idx, wide, W2T, gates[gg], MgT[gg], g >= 0, op, orr, state.out4)
            P_chunk[sel] = op
            if g >= 0:
                R_chunk[sel] = orr

    def run(state, tiles, block, P_chunk, R_chunk):
        """Heavy per-tile work only: two skinny products (CoM moments on raw x, scores on e = log1p(x))."""
        for g, sel in tiles:
            x = state.load(block, sel)
            if g >= 0:
                R_chunk[sel] = rmm(MgT[g], x)
            if c.log_transform:
                e = state.e[:x.shape[0]]
                if nonneg:
                    np.log1p(x, out=e)
                else:
                    np.maximum(x, 0, out=e)
                    np.log1p(e, out=e)
            else:
                e = x
            P_chunk[sel] = rmm(W2T, e)

    def finish(a, bnd, block, P_chunk, R_chunk):
        """Per chunk, vectorised: S, softmax, argmax; CoM moments redone (all gates) where the argmax is not the
        guessed gate (another cluster than the label, or an unassigned label)."""
        m = bnd - a
        p = P_chunk[:m]
        s = p[:, :C] - b[None, :]
        if bg_known:
            s -= bg_frames[a:bnd, None].astype(np.float32) * colsum[None, :]
        elif bgsub:
            s -= p[:, C:C + 1] * colsum[None, :]
        _, idx, cmax = st.softmax_confidence(np, s, softmax_temp)
        r = R_chunk[:m]
        if adaptive:
            bad = np.flatnonzero(idx != key[a:bnd])
            if len(bad) and gate_kernel:  # the moments of each frame's new gate only, from the raw frames
                for g in np.unique(idx[bad]).tolist():
                    sel = bad[idx[bad] == g]
                    rg = np.empty((len(sel), 3), dtype=np.float32)
                    kernels.pass2_gate(block, sel, wide, no_rows, gates[g], MgT[g], True,
                                       np.empty((len(sel), 0), np.float32), rg, redo_scratch)
                    r[sel] = rg
            elif len(bad):
                xb = np.empty((len(bad), n_pix), dtype=np.float32)
                np.copyto(xb, block[bad], casting="unsafe")
                rb = rmm(MT, xb).reshape(len(bad), K, 3)
                r[bad] = np.take_along_axis(rb, idx[bad].reshape(-1, 1, 1), axis=1)[:, 0, :]
        den = r[:, 2]
        ok = den > 0
        safe = np.where(ok, den, 1)
        S[a:bnd] = s
        amax[a:bnd] = idx
        conf[a:bnd] = cmax
        cxp[a:bnd] = np.where(ok, r[:, 0] / safe, 0)
        cyp[a:bnd] = np.where(ok, r[:, 1] / safe, 0)
        valid[a:bnd] = ok

    pool = _Pool(threads, lambda: _Worker(tile, n_pix, source.dtype, second=c.log_transform))
    work = run_fused if fused else run

    def bufs(a):  # chunk i's product buffers: two sets, chunk i + 2 is queued only after chunk i's finish
        i = (a // chunk) % 2
        return P_bufs[i], R_bufs[i]

    def chunk_done(a, bnd, block, _):  # in this thread while the workers run the next chunk's products
        finish(a, bnd, block, *bufs(a))
        release(source, a, bnd)
        if progress:
            progress(bnd, n)

    try:
        pool.stream(frame_blocks(source, chunk, None, prefetch, keep=True, mapped=mapped),
                    lambda a, bnd: group_tiles(key[a:bnd], tile),
                    lambda state, a, block, part: work(state, part, block, *bufs(a)), chunk_done)
    finally:
        pool.close()
    return S, amax, conf, cxp, cyp, valid


# ----------------------------------------------------------------------------------------- gated CoM alone


def com_pass(source, chunk: int, tile: int, threads: int, com: st.GatedCoM, all_gates: bool = False,
             check=None, progress=None, prefetch: bool = True):
    """One pass of gated CoM: (n,) x, y, valid for gate 0, or (n, K) arrays for every gate (``all_gates``)."""
    n = source.n_frames
    n_pix = int(np.prod(source.frame_shape))
    K = com.n_gates if all_gates else 1
    MT = np.ascontiguousarray(com.M[:, :3 * K].T)
    R_bufs = [np.empty((chunk, 3 * K), dtype=np.float32) for _ in range(2)]  # chunk i: R_bufs[i % 2]

    def run(state, a, block, tiles):
        R_chunk = R_bufs[(a // chunk) % 2]
        for _, sel in tiles:
            R_chunk[sel] = rmm(MT, state.load(block, sel))

    cx, cy = np.empty((n, K)), np.empty((n, K))
    ok_all = np.empty((n, K), dtype=bool)

    def chunk_done(a, b, block, _):
        m = b - a
        r = R_bufs[(a // chunk) % 2][:m].reshape(m, K, 3)
        den = r[..., 2]
        ok = den > 0
        safe = np.where(ok, den, 1)
        cx[a:b], cy[a:b], ok_all[a:b] = np.where(ok, r[..., 0] / safe, 0), np.where(ok, r[..., 1] / safe, 0), ok
        release(source, a, b)
        if progress:
            progress(b, n)

    pool = _Pool(threads, lambda: _Worker(tile, n_pix, source.dtype))
    try:
        pool.stream(frame_blocks(source, chunk, check, prefetch, keep=True),
                    lambda a, b: [(0, slice(u, min(u + tile, b - a))) for u in range(0, b - a, tile)], run, chunk_done)
    finally:
        pool.close()
    if not all_gates:
        cx, cy, ok_all = (np.ascontiguousarray(v[:, 0]) for v in (cx, cy, ok_all))
    return cx, cy, ok_all


KERNEL_TILE = 256  # frames per call of a compiled pass kernel: it streams frames, so only call overhead counts


def default_tile(n_pix: int, tile_bytes: int = 1 << 20) -> int:
    """Frames per tile: about ``tile_bytes`` of float32 (stays in a core's L2 cache between the operations)."""
    return max(1, int(tile_bytes // (4 * n_pix)))


__all__ = ["pass1_stats", "pass2_maps", "com_pass", "frame_blocks", "group_tiles", "default_threads",
           "default_tile"]
