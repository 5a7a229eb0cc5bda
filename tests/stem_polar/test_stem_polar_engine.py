"""The fast CPU engine (``core.engine``) against the array-module reference path and direct numpy formulas.

The engine reorganises the arithmetic (one-group tiles, column sums instead of one-hot products, the
background and shift folded into sums, skinny products in small blocks, worker threads, memory-mapped
reads); these tests prove the reorganisation computes the seed's quantities: every statistic equals a
direct float64 evaluation of the formulas, and every output equals the generic path.
"""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest

from stem_polar.artifacts import H5Source
from stem_polar.core import engine as eng
from stem_polar.core import stages as st
from stem_polar.core.config import PolarConfig, PreprocessConfig
from stem_polar.core.pipeline import run_pipeline
from stem_polar.core.source import ArraySource

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _run(src, labels, cfg, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_pipeline(src, labels, cfg, **kw)


def _same(a, b, tol=2e-5):
    """Fast and generic runs agree (float32 sums in another order)."""
    np.testing.assert_allclose(a.stats.mu, b.stats.mu, atol=tol)
    np.testing.assert_allclose(a.stats.sigma, b.stats.sigma, atol=tol)
    np.testing.assert_allclose(a.stats.mu_c_raw, b.stats.mu_c_raw, rtol=1e-6)
    np.testing.assert_allclose(a.templates, b.templates, atol=tol)
    np.testing.assert_array_equal(a.gates, b.gates)
    np.testing.assert_allclose(a.S, b.S, atol=1e-4 * np.abs(b.S).max())
    np.testing.assert_array_equal(a.argmax, b.argmax)
    np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-5)
    np.testing.assert_allclose(a.com_x_raw, b.com_x_raw, atol=1e-4)
    np.testing.assert_allclose(a.com_y_raw, b.com_y_raw, atol=1e-4)
    np.testing.assert_allclose(a.ex, b.ex, atol=1e-4)


@pytest.mark.parametrize("case", [
    dict(cfg={}, tile=None, threads=2),  # defaults: log, background, mask, diag whitening, adaptive gating
    dict(cfg={"dpc": {"gate_mode": "union"}, "validation": {"enable_split_half": True}}, tile=3, threads=2),
    dict(cfg={"preprocess": {"log_transform": False, "background_subtract": False, "central_mask_px": 0,
                             "whiten": "none"}}, tile=7, threads=1),
    dict(cfg={"preprocess": {"background_subtract": False}}, tile=40, threads=3),
])
def test_fast_engine_equals_generic_path(scan, case):
    cfg = PolarConfig.model_validate(case["cfg"])
    lab = scan["labels"].copy()
    lab[::37] = -1  # unassigned frames: in the global statistics, no cluster, CoM with every gate
    src = ArraySource(scan["data"])
    fast = _run(src, lab, cfg, chunk=100, tile=case["tile"], threads=case["threads"])
    ref = _run(src, lab, cfg, chunk=100, engine="generic")
    _same(fast, ref)
    if cfg.validation.enable_split_half:
        assert fast.report["split_half_ssim"] == pytest.approx(ref.report["split_half_ssim"], abs=1e-4)


def test_signed_float_input_clipped_like_generic_path(scan):
    d = scan["data"].astype(np.float32) - 3.0  # negative values: clipped at 0 before log1p
    a = _run(ArraySource(d), scan["labels"], PolarConfig(), chunk=64, tile=5, threads=2)
    b = _run(ArraySource(d), scan["labels"], PolarConfig(), chunk=64, engine="generic")
    _same(a, b)


def test_pass1_sums_equal_direct_formulas(scan):
    """Group sums -> StatsPartial rows equal direct float64 sums of D = (log1p(x) - bg) * keep - ref."""
    frames = scan["data"].reshape(-1, 32 * 32)
    n = len(frames)
    rng = np.random.default_rng(1)
    lab = rng.integers(-1, 3, n)  # scattered clusters: every tile is a gather
    half = rng.integers(0, 2, n).astype(np.int8)
    pre = st.Preprocessor(PreprocessConfig(central_mask_px=3), (32, 32), 15.3, 16.2, bg_radius=12)
    ref = rng.normal(2.0, 0.3, 32 * 32).astype(np.float32)
    src = ArraySource(frames.reshape(n, 32, 32), (24, 24))
    p = eng.pass1_stats(src, 100, 6, 2, lab, 3, half, pre, ref)
    e = np.log1p(frames.astype(np.float64))
    bg = e @ pre.bg_weights.astype(np.float64)
    d = e - bg[:, None] - ref.astype(np.float64)[None]  # D_i (the central mask is applied in finalize_stats)
    rows = [np.ones(n, bool), half == 0, half == 1]
    for r, m in enumerate(rows):
        np.testing.assert_allclose(p.s1[r], d[m].sum(axis=0), rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(p.s2[r], (d[m] ** 2).sum(axis=0), rtol=1e-5, atol=1e-3)
        assert p.cnt[r] == m.sum()
    for c in range(3):
        for k, m in enumerate([lab == c, (lab == c) & (half == 0), (lab == c) & (half == 1)]):
            np.testing.assert_allclose(p.cs[k * 3 + c], d[m].sum(axis=0), rtol=1e-5, atol=1e-3)
            assert p.cnt[3 + k * 3 + c] == m.sum()
        np.testing.assert_array_equal(p.raw_c[1 + c], frames[lab == c].sum(axis=0))  # integer sums: exact
    np.testing.assert_array_equal(p.raw_c[0], frames.sum(axis=0))
    # the generic one-hot accumulator gives the same partial sums
    g = st.stats_map(np, frames.astype(np.float32), lab, half, pre, ref, 3, split=True, nonneg=True)
    for f in ("s1", "s2", "cs", "cnt", "raw_c"):
        np.testing.assert_allclose(getattr(p, f), getattr(g, f), rtol=1e-4, atol=1e-2)


def test_pass2_scores_and_com_equal_direct_formulas(scan):
    """S = T . (pre(x) - mu) / (sigma + eps) and CoM with each frame's argmax gate, from the direct formulas."""
    frames = scan["data"].reshape(-1, 32 * 32)
    n = len(frames)
    rng = np.random.default_rng(2)
    pre = st.Preprocessor(PreprocessConfig(central_mask_px=3), (32, 32), 15.3, 16.2, bg_radius=12)
    T = rng.normal(size=(3, 32, 32)) * pre.keep.reshape(1, 32, 32)
    mu, sigma = rng.normal(2, 0.1, (32, 32)), rng.uniform(0.2, 1.0, (32, 32))
    gates = rng.uniform(0, 1, (3, 32, 32))
    mf = st.MatchedFilter(T, mu, sigma, 1e-6, "diag")
    com = st.GatedCoM(gates, 15.3, 16.2)
    lab_slot = rng.integers(0, 4, n)  # slot 3 = unassigned (all gates computed)
    gate_of_slot = np.array([0, 1, 2, -1])
    src = ArraySource(frames.reshape(n, 32, 32), (24, 24))
    S, amax, conf, cx, cy, ok = eng.pass2_maps(src, 128, 9, 2, pre, mf, com, 2.0, True, gate_of_slot, lab_slot)
    e = np.log1p(frames.astype(np.float64))
    z = ((e - (e @ pre.bg_weights)[:, None]) * pre.keep - mu.ravel()) / (sigma.ravel() + 1e-6)
    s_ref = z @ T.reshape(3, -1).T
    np.testing.assert_allclose(S, s_ref, atol=1e-4 * np.abs(s_ref).max())
    np.testing.assert_array_equal(amax, s_ref.argmax(axis=1))
    p = np.exp((s_ref - s_ref.max(axis=1, keepdims=True)) / 2.0)
    np.testing.assert_allclose(conf, (p / p.sum(axis=1, keepdims=True)).max(axis=1), atol=1e-5)
    yy, xx = np.mgrid[0:32, 0:32]
    g = gates.reshape(3, -1)[amax]  # each frame's own (argmax) gate
    w = frames * g
    np.testing.assert_allclose(cx, (w * (xx.ravel() - 16.2)).sum(1) / w.sum(1), atol=1e-4)
    np.testing.assert_allclose(cy, (w * (yy.ravel() - 15.3)).sum(1) / w.sum(1), atol=1e-4)
    assert ok.all()


def test_small_block_products_and_tiles():
    rng = np.random.default_rng(3)
    for c, p, m in [(3, 1000, 700), (5, 70000, 9), (2, 10, 1)]:
        at = rng.normal(size=(c, p)).astype(np.float32)
        x = rng.normal(size=(m, p)).astype(np.float32)
        np.testing.assert_allclose(eng.rmm(at, x), x.astype(np.float64) @ at.T.astype(np.float64),
                                   rtol=1e-4, atol=1e-3 * np.sqrt(p))
    keys = np.array([2, 0, 0, 1, 0, 2, 2, 2, 1])
    tiles = eng.group_tiles(keys, 2)
    seen = []
    for g, sel in tiles:
        idx = np.arange(sel.start, sel.stop) if isinstance(sel, slice) else sel
        assert 1 <= len(idx) <= 2 and np.all(keys[idx] == g)
        seen += list(idx)
    assert sorted(seen) == list(range(len(keys)))
    slices = [(g, sel) for g, sel in tiles if isinstance(sel, slice)]
    assert (2, slice(6, 8)) in slices and (0, slice(1, 3)) in slices  # consecutive frames: views, no gather


def test_memory_mapped_hdf5_matches_hdf5_reads(scan, tmp_path):
    d = scan["data"]
    cfg = PolarConfig()
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("contig", data=d)
        f.create_dataset("chunked", data=d, chunks=(1, 24, 32, 32), compression="gzip")
    mm = H5Source(tmp_path / "c.h5", "contig")
    ch = H5Source(tmp_path / "c.h5", "chunked")
    try:
        v = mm.frames_view()
        assert v is not None and not v.flags.writeable
        np.testing.assert_array_equal(v, d.reshape(-1, 32, 32))
        assert ch.frames_view() is None  # compressed: HDF5 reads
        a = _run(mm, scan["labels"], cfg, chunk=48, threads=2)
        b = _run(ch, scan["labels"], cfg, chunk=48, threads=2)
        c = _run(ArraySource(d), scan["labels"], cfg, chunk=48, engine="generic")
    finally:
        mm.close()
        ch.close()
    np.testing.assert_array_equal(a.S, b.S)  # same frames, same arithmetic
    np.testing.assert_array_equal(a.com_x_raw, b.com_x_raw)
    _same(a, c)


def test_results_do_not_depend_on_thread_scheduling(scan):
    """Tiles are pulled dynamically by the threads, but sums are kept per part and merged in part order."""
    lab = scan["labels"]
    runs = [_run(ArraySource(scan["data"]), lab, PolarConfig(), chunk=288, tile=4, threads=3) for _ in range(3)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r.stats.sigma, runs[0].stats.sigma)
        np.testing.assert_array_equal(r.stats.mu_c, runs[0].stats.mu_c)
        np.testing.assert_array_equal(r.S, runs[0].S)
        np.testing.assert_array_equal(r.ex, runs[0].ex)


def test_memory_mapped_pass_keeps_resident_memory_bounded(tmp_path):
    """Pages of the mapped file are released chunk by chunk: resident memory grows by a few chunks, not by
    the dataset size (the issue's 'memory under 2 GB whatever the dataset size')."""
    import psutil

    n, k = 4096, 64  # 32 MB of uint16 frames
    with h5py.File(tmp_path / "big.h5", "w") as f:
        ds = f.create_dataset("p", shape=(n, k, k), dtype=np.uint16)
        for a in range(0, n, 512):
            ds[a:a + 512] = np.random.default_rng(a).integers(0, 500, (512, k, k), dtype=np.uint16)
    src = H5Source(tmp_path / "big.h5", "p", scan_shape=(64, 64))
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [0]

    def progress(done, total):
        peak[0] = max(peak[0], proc.memory_info().rss - base)

    try:
        gate = np.ones((k, k))
        cx, cy, ok = eng.com_pass(src, 256, 16, 2, st.GatedCoM(gate, 31.5, 31.5), progress=progress)
        whole = np.asarray(src.frames_view(), dtype=np.float64)
    finally:
        src.close()
    xx = np.arange(k) - 31.5
    np.testing.assert_allclose(cx, (whole.sum(axis=1) @ xx) / whole.sum(axis=(1, 2)), atol=1e-4)
    assert ok.all()
    assert peak[0] < 12 * 2**20, peak[0] / 2**20  # chunks of 256 frames = 2 MB each; the file is 32 MB


def _mapped_mb(path) -> float:
    """Resident MB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    tot, cur = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5:
                cur = line.rstrip().endswith(str(path))
            elif cur and line.startswith("Rss:"):
                tot += int(parts[1])
    return tot / 1024


def test_small_mapped_scans_stay_mapped_between_the_passes(tmp_path, monkeypatch):
    """Up to KEEP_MAPPED_BYTES a mapped scan's pages stay mapped from pass 1 to pass 2 (no second page-table
    population): the same results bit for bit as unmapping chunk by chunk, and pass 2 still releases them."""
    from stem_polar.core.pipeline import PolarPipeline

    n, k = 4096, 64  # 32 MB of uint16 frames
    rng = np.random.default_rng(3)
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("p", data=rng.poisson(rng.uniform(0.5, 200, (k, k)), (n, k, k)).astype(np.uint16))
    lab = (np.arange(n) * 3 // n).reshape(64, 64)
    cfg = PolarConfig.model_validate({"dpc": {"gate_mode": "union"}})  # pass 2 reads every frame once
    runs, after_pass1, after_run = [], [], []
    for limit in (1 << 30, 0):
        monkeypatch.setattr(eng, "KEEP_MAPPED_BYTES", limit)
        src = H5Source(path, "p", scan_shape=(64, 64))
        seen = []

        def progress(stage, done, total, seen=seen):
            if stage.startswith("pass 1") and done == total:
                seen.append(_mapped_mb(path))

        try:
            assert eng.keep_mapped(src) == (limit > 0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runs.append(PolarPipeline(src, lab, cfg, chunk=512, threads=2, progress=progress).run())
            after_pass1.append(seen[-1])
            after_run.append(_mapped_mb(path))
        finally:
            src.close()
    assert after_pass1[0] > 30 and after_pass1[1] < 16, after_pass1  # kept: the whole 32 MB; else a few chunks
    assert max(after_run) < 16, after_run  # pass 2 released them
    np.testing.assert_array_equal(runs[0].S, runs[1].S)
    np.testing.assert_array_equal(runs[0].stats.sigma, runs[1].stats.sigma)
    np.testing.assert_array_equal(runs[0].com_x_raw, runs[1].com_x_raw)
    assert not eng.keep_mapped(ArraySource(np.zeros((4, 8, 8), np.uint16), scan_shape=(2, 2)))  # nothing to map


class _RecordingSource(ArraySource):
    """An in-memory scan that records when its pages would be released (``advise('done', ...)``)."""

    def __init__(self, data, scan_shape, log):
        super().__init__(data, scan_shape)
        self.log = log

    def advise(self, what, start, stop):
        self.log.append((what, start, stop))


def test_stream_runs_every_part_releases_a_chunk_only_after_its_parts_and_keeps_chunk_order():
    """The workers take the next chunk's parts without waiting at chunk ends; per chunk, the results come back in
    part order, ``chunk_done`` runs chunk by chunk in order, and a chunk is released only after all its parts
    ran (they read its frames). Frame sums compared with numpy's, for 1 and 3 threads."""
    import threading
    import time as _time

    rng = np.random.default_rng(5)
    data = rng.integers(0, 1000, (300, 4, 4), dtype=np.uint16)
    for threads in (1, 3):
        log, lock = [], threading.Lock()
        src = _RecordingSource(data, (15, 20), log)
        pool = eng._Pool(threads, lambda: None)
        sums = np.zeros(300)
        done_chunks = []

        def work(state, a, block, part):
            _time.sleep(0.001 * (part[0][1].start % 3))  # parts finish out of order
            out = []
            for _, sel in part:
                with lock:
                    log.append(("part", a + sel.start, a + sel.stop))
                out.append((a + sel.start, block[sel].reshape(len(block[sel]), -1).sum(axis=1, dtype=np.float64)))
            return out

        def chunk_done(a, b, block, results):
            starts = [s for r in results for s, _ in r]
            assert starts == sorted(starts)  # part order
            for r in results:
                for s, v in r:
                    sums[s:s + len(v)] = v
            done_chunks.append(a)
            eng.release(src, a, b)

        try:
            pool.stream(eng.frame_blocks(src, 64, keep=True), lambda a, b: [(0, slice(u, min(u + 7, b - a)))
                                                                         for u in range(0, b - a, 7)],
                        work, chunk_done)
        finally:
            pool.close()
        np.testing.assert_array_equal(sums, data.reshape(300, -1).sum(axis=1))
        assert done_chunks == [0, 64, 128, 192, 256]
        for what, a, b in [e for e in log if e[0] == "done"]:
            last_part = max(i for i, e in enumerate(log) if e[0] == "part" and a <= e[1] < b)
            assert log.index((what, a, b)) > last_part


def test_stream_error_in_a_part_propagates_and_stops_the_pass():
    """A failing part raises in the caller (no hang, no silent partial result); later chunks are not finished, and
    no part is still running (reading a block that may be unmapped) when the error reaches the caller."""
    import threading
    import time as _time

    data = np.zeros((256, 4, 4), dtype=np.uint16)
    pool = eng._Pool(2, lambda: None)
    finished, running, lock = [], [0], threading.Lock()

    def work(state, a, block, part):
        with lock:
            running[0] += 1
        try:
            if a == 64 and part[0][1].start == 0:
                raise RuntimeError("part failed")
            _time.sleep(0.05 if a == 64 else 0)  # the failing chunk's other part is still running
            return len(part)
        finally:
            with lock:
                running[0] -= 1

    try:
        with pytest.raises(RuntimeError, match="part failed"):
            pool.stream(eng.frame_blocks(ArraySource(data, (16, 16)), 32, keep=True),
                        lambda a, b: [(0, slice(0, 16)), (0, slice(16, b - a))], work,
                        lambda a, b, block, r: finished.append(a))
        assert running[0] == 0
    finally:
        pool.close()
    assert finished == [0, 32] and not pool.workers
