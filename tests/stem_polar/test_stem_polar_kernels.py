"""The numba kernels of the CPU engine (``core.kernels``) against direct float64 formulas and the numpy engine.

The kernels fuse the log table lookup with the pass-1 sums and the pass-2 products; these tests check each
kernel against a direct evaluation of the same quantities, and whole passes / the whole pipeline against
the numpy engine (``STEM_POLAR_KERNELS=numpy``) and the generic array-module path.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from stem_polar.core import engine as eng
from stem_polar.core import kernels, native
from stem_polar.core import stages as st
from stem_polar.core.config import PolarConfig, PreprocessConfig
from stem_polar.core.pipeline import run_pipeline
from stem_polar.core.source import ArraySource

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.skipif(not kernels.available(), reason="numba not importable: numpy engine only")]


def _frames(dtype, n=40, p=1000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.uniform(0.5, 300, p), (n, p))
    if np.dtype(dtype).kind == "i":
        x = x - 20  # negative values: clipped at 0 before the log
        x[0, :5] = [70000, 65535, 65536, 1 << 20, -1]  # beyond the table
    return x.astype(dtype)


def test_log_table_rows_equal_numpy_log1p():
    x = _frames(np.uint16)
    idx = np.array([3, 0, 7, 39], dtype=np.int64)
    out = np.empty((4, x.shape[1]), dtype=np.float32)
    kernels.log_rows(x, idx, False, kernels.log_table(), None, False, out)
    np.testing.assert_array_equal(out, np.log1p(x[idx].astype(np.float32)))  # the numpy engine's values, bitwise
    ref = np.linspace(0, 2, x.shape[1], dtype=np.float32)
    kernels.log_rows(x, idx, False, kernels.log_table(), ref, True, out)
    np.testing.assert_array_equal(out, np.log1p(x[idx].astype(np.float32)) - ref)
    xi = _frames(np.int32)  # signed, beyond 65535: clip at 0, log1p above the table
    kernels.log_rows(xi, idx, True, kernels.log_table(), None, False, out)
    np.testing.assert_allclose(out, np.log1p(np.maximum(xi[idx], 0).astype(np.float64)), rtol=1e-6)
    assert out[1, 0] == pytest.approx(np.log1p(70000), rel=1e-6) and out[1, 4] == 0


@pytest.mark.parametrize("dtype,use_bg", [(np.uint16, True), (np.uint8, False), (np.int32, True)])
def test_pass1_kernel_equals_direct_sums(dtype, use_bg):
    x = _frames(dtype)
    p = x.shape[1]
    rng = np.random.default_rng(1)
    idx = rng.permutation(len(x))[:29].astype(np.int64)  # a gathered tile
    ref = rng.normal(2.0, 0.5, p).astype(np.float32)
    w = (rng.random(p) < 0.3).astype(np.float32)
    w /= w.sum()
    acc = np.zeros((3, p), dtype=np.float32)
    c0 = float(ref.astype(np.float64) @ w) if use_bg else 0.0
    bg = np.full(len(idx), c0)
    kernels.pass1_frames(x, idx, kernels.is_wide(dtype), kernels.log_table(), ref, w, use_bg, acc, bg,
                         np.empty(p, dtype=np.float32))
    raw = x[idx].astype(np.float64)
    e = np.log1p(np.maximum(raw, 0))
    bg_ref = e @ w if use_bg else np.zeros(len(idx))
    d = e - ref - bg_ref[:, None]  # D = log1p(x) - ref - bg
    np.testing.assert_allclose(acc[0], raw.sum(axis=0), rtol=1e-6)
    np.testing.assert_allclose(acc[1], d.sum(axis=0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(acc[2], (d * d).sum(axis=0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(bg, bg_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n_rows", [1, 4, 6, 9])  # 4-row sweeps plus single-row remainders
def test_pass2_kernel_equals_direct_products(n_rows):
    x = _frames(np.uint16)
    p = x.shape[1]
    rng = np.random.default_rng(2)
    idx = np.arange(5, 30, dtype=np.int64)
    W = rng.normal(size=(n_rows, p)).astype(np.float32)
    M = rng.uniform(-1, 1, (3, p)).astype(np.float32)
    op = np.empty((len(idx), n_rows), dtype=np.float32)
    orr = np.empty((len(idx), 3), dtype=np.float32)
    kernels.pass2_frames(x, idx, False, kernels.log_table(), W, M, True, op, orr, np.empty(p, dtype=np.float32))
    raw = x[idx].astype(np.float64)
    s_ref = np.log1p(raw) @ W.T.astype(np.float64)
    r_ref = raw @ M.T.astype(np.float64)
    np.testing.assert_allclose(op, s_ref, rtol=1e-5, atol=1e-5 * np.abs(s_ref).max())
    np.testing.assert_allclose(orr, r_ref, rtol=1e-5, atol=1e-5 * np.abs(r_ref).max())


def _passes(src, lab, pre, ref, mf, com, monkeypatch, kern):
    monkeypatch.setenv("STEM_POLAR_KERNELS", kern)
    half = (np.arange(src.n_frames) % 2).astype(np.int8)
    p = eng.pass1_stats(src, 50, 7, 2, lab, 3, half, pre, ref)
    slot = np.where(lab >= 0, lab, 3)
    m = eng.pass2_maps(src, 50, 7, 2, pre, mf, com, 1.0, True, np.array([0, 1, 2, -1]), slot)
    return p, m


@pytest.mark.parametrize("kern", ["auto", "numba"])
@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_engine_passes_same_with_and_without_kernels(scan, monkeypatch, dtype, kern):
    """Whole passes: compiled kernels (auto: native C for uint16 where it builds; numba) vs the numpy engine on
    the same tiles (float32-level differences)."""
    frames = scan["data"].reshape(-1, 32, 32).astype(dtype)
    if dtype == np.int32:
        frames[::11, 0, :3] = [-5, 70000, 3]
    n = len(frames)
    lab = np.random.default_rng(4).integers(-1, 3, n)
    src = ArraySource(frames, (24, 24))
    pre = st.Preprocessor(PreprocessConfig(central_mask_px=3), (32, 32), 15.3, 16.2, bg_radius=12)
    ref = np.random.default_rng(5).normal(2, 0.2, 1024).astype(np.float32)
    rng = np.random.default_rng(6)
    mf = st.MatchedFilter(rng.normal(size=(3, 32, 32)) * pre.keep.reshape(32, 32), rng.normal(2, 0.1, (32, 32)),
                          rng.uniform(0.2, 1, (32, 32)), 1e-6, "diag")
    com = st.GatedCoM(rng.uniform(0, 1, (3, 32, 32)), 15.3, 16.2)
    assert eng.use_kernels(dtype)
    pk, mk = _passes(src, lab, pre, ref, mf, com, monkeypatch, kern)
    pn, mn = _passes(src, lab, pre, ref, mf, com, monkeypatch, "numpy")
    assert not eng.use_kernels(dtype)  # the environment switch forces the numpy engine
    for f in ("s1", "s2", "cs"):
        a, b = getattr(pk, f), getattr(pn, f)
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.abs(b).max())
    np.testing.assert_array_equal(pk.cnt, pn.cnt)
    np.testing.assert_array_equal(pk.raw_c, pn.raw_c)  # integer sums: exact on both paths
    S_k, S_n = mk[0], mn[0]
    np.testing.assert_allclose(S_k, S_n, atol=1e-5 * np.abs(S_n).max())
    np.testing.assert_array_equal(mk[1], mn[1])  # argmax
    for a, b in zip(mk[2:5], mn[2:5]):  # confidence, com x, com y
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_pipeline_with_kernels_equals_generic_path_on_wide_integers(scan, same_results):
    """int32 data with negative values and values above the table: the seed's outputs as the generic path."""
    d = scan["data"].astype(np.int32) - 2
    d[5, 3, 0, :2] = [80000, 123456]
    lab = scan["labels"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = run_pipeline(ArraySource(d), lab, PolarConfig(), chunk=64, tile=5, threads=2)
        b = run_pipeline(ArraySource(d), lab, PolarConfig(), chunk=64, engine="generic")
    same_results(a, b)


def test_float_data_keeps_numpy_log_and_warmup_reports_time(monkeypatch):
    """float64 keeps numpy's log1p; float32 has native kernels only (none in numba)."""
    assert not kernels.supports(np.float64) and not eng.use_kernels(np.float64)
    assert kernels.supports(np.float32) == native.available()
    monkeypatch.setenv("STEM_POLAR_KERNELS", "numba")
    assert not kernels.supports(np.float32) and kernels.backend(np.float32) == "numpy"
    monkeypatch.delenv("STEM_POLAR_KERNELS")
    assert not kernels.supports(np.dtype(">u2"))  # non-native byte order: numpy path
    assert kernels.supports(np.uint16) and not kernels.is_wide(np.uint16) and kernels.is_wide(np.int16)
    assert kernels.warmup(np.uint16) >= 0.0


@pytest.mark.parametrize("kern", ["auto", "numba"])
def test_pass2_with_pass1_background_levels_equals_pass2_alone(scan, monkeypatch, kern):
    """Pass 1's compiled kernels keep each frame's background level e . w_bg (``bg_out``, the direct float64
    formula); pass 2 given them (no background column in its products) gives the maps of pass 2 alone."""
    monkeypatch.setenv("STEM_POLAR_KERNELS", kern)
    frames = scan["data"].reshape(-1, 32, 32)
    n = len(frames)
    lab = np.random.default_rng(7).integers(-1, 3, n)
    src = ArraySource(frames, (24, 24))
    pre = st.Preprocessor(PreprocessConfig(central_mask_px=3), (32, 32), 15.3, 16.2, bg_radius=12)
    ref = np.random.default_rng(8).normal(2, 0.2, 1024).astype(np.float32)
    rng = np.random.default_rng(9)
    mf = st.MatchedFilter(rng.normal(size=(3, 32, 32)) * pre.keep.reshape(32, 32), rng.normal(2, 0.1, (32, 32)),
                          rng.uniform(0.2, 1, (32, 32)), 1e-6, "diag")
    com = st.GatedCoM(rng.uniform(0, 1, (3, 32, 32)), 15.3, 16.2)
    assert eng.pass1_keeps_background(pre, frames.dtype)
    bg = np.full(n, np.nan)
    eng.pass1_stats(src, 50, 7, 2, lab, 3, None, pre, ref, bg_out=bg)
    e = np.log1p(frames.reshape(n, -1).astype(np.float64))
    np.testing.assert_allclose(bg, e @ pre.bg_weights.astype(np.float64), rtol=1e-6)
    slot = np.where(lab >= 0, lab, 3)
    args = (src, 50, 7, 2, pre, mf, com, 1.0, True, np.array([0, 1, 2, -1]), slot)
    a, b = eng.pass2_maps(*args, bg_frames=bg), eng.pass2_maps(*args)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5 * np.abs(b[0]).max())  # S
    np.testing.assert_array_equal(a[1], b[1])  # argmax
    for x, y in zip(a[2:5], b[2:5]):  # confidence, com x, com y
        np.testing.assert_allclose(x, y, atol=1e-5)
    np.testing.assert_array_equal(a[5], b[5])
