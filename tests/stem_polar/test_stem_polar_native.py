"""The native (C) kernels of the CPU engine (``core.native``) against float64 formulas and the numba kernels.

``make setup`` needs a C compiler for these kernels (Debian's gcc is installed with the set-up); the last test
checks the fallback to numba when there is none.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from stem_polar.core import kernels, native
from stem_polar.core.config import PolarConfig
from stem_polar.core.pipeline import run_pipeline
from stem_polar.core.source import ArraySource
from stem_polar.core.stages import GatedCoM

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")


def _frames(n=41, p=1003, seed=0, dtype=np.uint16):
    """uint16 frames with every regime: all-small vectors (table path), mixed vectors and large counts (polynomial),
    the 16-bit extremes, and a row length that leaves a partial last vector. float32: the same scaled to
    non-integer values, with negative ones (the log clips them at 0; raw sums and moments keep them)."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.uniform(0.2, 6, p), (n, p))
    x[:, p // 3:p // 2] = rng.poisson(300, (n, p // 2 - p // 3))  # a bright-field-like block
    x[::5, ::37] = rng.integers(1000, 65536, x[::5, ::37].shape)  # scattered large counts
    x[0, :4] = [0, 31, 32, 65535]
    x = np.clip(x, 0, 65535).astype(np.uint16)
    if np.dtype(dtype) == np.float32:
        return (x * np.float32(0.73) - np.float32(0.4)).astype(np.float32)
    return x


def test_log_is_within_one_ulp_of_float64_for_every_uint16():
    x = np.arange(65536, dtype=np.uint16).reshape(1, -1)
    out = native.log_rows(x, np.array([0]))[0]
    exact = np.log1p(np.arange(65536, dtype=np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    err = np.abs(out.astype(np.float64) - exact)
    assert out[0] == 0.0
    assert (err <= ulp).all(), f"max error {np.max(err / ulp):.2f} ulp at x = {int(np.argmax(err / ulp))}"


def test_float32_log_matches_float64():
    """float32 frames: log(1 + max(x, 0)) with 1 + x rounded to float32 first, so the error is absolute
    (~1e-7) rather than relative for tiny x; negative values give 0."""
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.uniform(-5, 1e5, 4000), rng.uniform(0, 1e-3, 500), [0.0, -0.0, 1e-30, 3.4e38]])
    x = x.astype(np.float32)[None, :]
    out = native.log_rows(x, np.array([0]))[0]
    exact = np.log1p(np.maximum(x[0].astype(np.float64), 0))
    np.testing.assert_allclose(out, exact, rtol=2.4e-7, atol=1.2e-7)
    assert (out[x[0] <= 0] == 0).all()


def test_small_count_table_equals_polynomial_bitwise():
    """A vector of small counts takes the table; the same counts among a large one take the polynomial: the
    values must be the same bits, so results do not depend on the neighbours of a pixel."""
    small = np.tile(np.arange(64, dtype=np.uint16), 4).reshape(1, -1)  # vectors with all counts < 32 exist
    mixed = small.copy()
    mixed[0, ::16] = 40000  # every vector now holds a large count
    a = native.log_rows(small, np.array([0]))[0]
    b = native.log_rows(mixed, np.array([0]))[0]
    keep = mixed[0] != 40000
    np.testing.assert_array_equal(a[keep], b[keep])


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
@pytest.mark.parametrize("use_bg", [True, False])
@pytest.mark.parametrize("n_frames", [1, 2, 29])  # single frame, one pair, pairs plus a single
def test_pass1_equals_direct_sums(use_bg, n_frames, dtype):
    x = _frames(dtype=dtype)
    p = x.shape[1]
    rng = np.random.default_rng(1)
    idx = rng.permutation(len(x))[:n_frames].astype(np.int64)
    ref = rng.normal(2.0, 0.5, p).astype(np.float32)
    w = (rng.random(p) < 0.3).astype(np.float32)
    w /= w.sum()
    c0 = float(ref.astype(np.float64) @ w) if use_bg else 0.0
    acc = np.zeros((3, p), dtype=np.float32)
    bg = np.full(n_frames, c0)
    native.pass1(x, idx, ref, w, use_bg, acc, bg)
    raw = x[idx].astype(np.float64)
    e = np.log1p(np.maximum(raw, 0))
    bg_ref = e @ w if use_bg else np.zeros(n_frames)
    d = e - ref - bg_ref[:, None]
    np.testing.assert_allclose(acc[0], raw.sum(axis=0), rtol=1e-6)
    np.testing.assert_allclose(acc[1], d.sum(axis=0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(acc[2], (d * d).sum(axis=0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(bg, bg_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
@pytest.mark.parametrize("n_rows", [1, 4, 5, 6, 11])  # one sweep of 5 rows, more sweeps, remainders
@pytest.mark.parametrize("with_com", [True, False])
def test_pass2_equals_direct_products(n_rows, with_com, dtype):
    x = _frames(dtype=dtype)
    p = x.shape[1]
    rng = np.random.default_rng(2)
    idx = np.r_[np.arange(5, 30), [3, 3, 40]].astype(np.int64)  # repeated and odd-count frames
    W = rng.normal(size=(n_rows, p)).astype(np.float32)
    M = rng.uniform(-1, 1, (3, p)).astype(np.float32)
    op = np.full((len(idx), n_rows + 2), np.nan, dtype=np.float32)  # wider than needed: extra columns untouched
    orr = np.full((len(idx), 3), np.nan, dtype=np.float32)
    native.pass2(x, idx, W, M, with_com, op, orr, np.empty((2, p), dtype=np.float32))
    raw = x[idx].astype(np.float64)
    s_ref = np.log1p(np.maximum(raw, 0)) @ W.T.astype(np.float64)
    np.testing.assert_allclose(op[:, :n_rows], s_ref, rtol=1e-5, atol=1e-5 * np.abs(s_ref).max())
    assert np.isnan(op[:, n_rows:]).all()
    if with_com:
        r_ref = raw @ M.T.astype(np.float64)
        np.testing.assert_allclose(orr, r_ref, rtol=1e-5, atol=1e-5 * np.abs(r_ref).max())
    else:
        assert np.isnan(orr).all()


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
@pytest.mark.parametrize("n_rows", [0, 1, 4, 5, 6, 11])  # moments only, one sweep of <= 5 rows, more sweeps
@pytest.mark.parametrize("with_com", [True, False])
@pytest.mark.parametrize("shape", [(20, 48), (3, 16)])
def test_pass2_gate_equals_direct_products(n_rows, with_com, dtype, shape):
    """The pass-2 kernel that forms the CoM moments from a gate row and the pixel offsets about an off-centre,
    sub-pixel centre: the same products as the three moment rows of ``GatedCoM.M``."""
    ky, kx = shape
    if not native.gate_rows_fit(kx):
        pytest.skip(f"vector width does not divide {kx}")
    p = ky * kx
    x = _frames(p=p, dtype=dtype)
    rng = np.random.default_rng(5)
    idx = np.r_[np.arange(5, 30), [3, 3, 40]].astype(np.int64)
    W = rng.normal(size=(n_rows, p)).astype(np.float32)
    g = rng.random((ky, kx))
    cy, cx = 0.37 * ky, 0.61 * kx
    com = GatedCoM(g, cy, cx)
    op = np.full((len(idx), n_rows + 2), np.nan, dtype=np.float32)
    orr = np.full((len(idx), 3), np.nan, dtype=np.float32)
    native.pass2_gate(x, idx, (ky, kx), W, com.G[0], com.dx, com.dy, with_com, op, orr, np.empty(2 * p, np.float32))
    raw = x[idx].astype(np.float64)
    if n_rows:
        s_ref = np.log1p(np.maximum(raw, 0)) @ W.T.astype(np.float64)
        np.testing.assert_allclose(op[:, :n_rows], s_ref, rtol=1e-5, atol=1e-5 * np.abs(s_ref).max())
    assert np.isnan(op[:, n_rows:]).all()
    if with_com:
        yy, xx = np.indices((ky, kx), dtype=np.float64)
        r_ref = raw @ np.stack([(g * (xx - cx)).ravel(), (g * (yy - cy)).ravel(), g.ravel()], axis=1)
        np.testing.assert_allclose(orr, r_ref, rtol=1e-5, atol=1e-5 * np.abs(r_ref).max())
        np.testing.assert_allclose(orr, raw @ com.M.astype(np.float64), rtol=1e-5, atol=1e-5 * np.abs(r_ref).max())
    else:
        assert np.isnan(orr).all()


def test_pass2_gate_needs_whole_vector_rows():
    """A detector width the vector width does not divide: the native call refuses it, and ``kernels.pass2_gate``
    takes the three moment rows instead (same products)."""
    ky, kx = 7, 20
    x = _frames(p=ky * kx)
    idx = np.arange(9, dtype=np.int64)
    com = GatedCoM(np.random.default_rng(6).random((ky, kx)), 3.2, 9.7)
    W = np.ones((2, ky * kx), np.float32)
    op, orr = np.empty((9, 2), np.float32), np.empty((9, 3), np.float32)
    assert not native.gate_rows_fit(kx)
    with pytest.raises(ValueError):
        native.pass2_gate(x, idx, (ky, kx), W, com.G[0], com.dx, com.dy, True, op, orr,
                          np.empty(2 * ky * kx, np.float32))
    kernels.pass2_gate(x, idx, False, W, ((ky, kx), com.G[0], com.dx, com.dy), np.ascontiguousarray(com.M.T), True,
                       op, orr, np.empty((4, ky * kx), np.float32))
    np.testing.assert_allclose(orr, x[idx].astype(np.float64) @ com.M.astype(np.float64), rtol=1e-5)


def test_native_equals_numba_kernels():
    """The two compiled backends on the same frames: float32-level agreement."""
    x = _frames(n=64, p=4096, seed=3)
    p = x.shape[1]
    rng = np.random.default_rng(4)
    idx = np.arange(64, dtype=np.int64)
    ref = rng.normal(1, 0.2, p).astype(np.float32)
    w = np.full(p, 1 / p, dtype=np.float32)
    a1, a2 = np.zeros((3, p), np.float32), np.zeros((3, p), np.float32)
    b1, b2 = np.full(64, 0.5), np.full(64, 0.5)
    kernels.pass1_frames(x, idx, False, kernels.log_table(), ref, w, True, a1, b1, np.empty(p, np.float32))
    native.pass1(x, idx, ref, w, True, a2, b2)
    np.testing.assert_array_equal(a1[0], a2[0])  # integer sums below 2^24: exact on both
    for r in (1, 2):
        np.testing.assert_allclose(a2[r], a1[r], rtol=1e-5, atol=1e-5 * np.abs(a1[r]).max())
    np.testing.assert_allclose(b2, b1, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_pipeline_native_equals_numpy_engine(scan, monkeypatch, same_results, dtype):
    """The whole seed pipeline on uint16 and float32 data: native kernels vs the numpy engine."""
    d = scan["data"].astype(dtype)
    if dtype == np.float32:
        d = d * np.float32(0.9) - np.float32(0.2)  # non-integer, some negative values
    lab = scan["labels"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert kernels.backend(dtype) == "native"
        a = run_pipeline(ArraySource(d), lab, PolarConfig(), chunk=64, threads=2)
        monkeypatch.setenv("STEM_POLAR_KERNELS", "numpy")
        assert kernels.backend(dtype) == "numpy"
        b = run_pipeline(ArraySource(d), lab, PolarConfig(), chunk=64, threads=2)
    assert a.report["engine"] == {"path": "cpu-engine", "threads": 2, "kernels": "native"}  # recorded in run.json
    assert b.report["engine"]["kernels"] == "numpy"
    same_results(a, b)


def test_bad_arguments_raise_before_the_kernel_runs():
    x = _frames(n=4, p=64)
    with pytest.raises(IndexError):
        native.pass2(x, np.array([0, 9]), np.zeros((1, 64), np.float32), np.zeros((3, 64), np.float32), True,
                     np.empty((2, 1), np.float32), np.empty((2, 3), np.float32), np.empty(128, np.float32))
    with pytest.raises(ValueError, match="float32"):
        native.pass1(x, np.array([0]), np.zeros(64, np.float64), np.zeros(64, np.float32), True,
                     np.zeros((3, 64), np.float32), np.zeros(1))


def test_without_a_compiler_the_engine_falls_back_to_numba(tmp_path):
    """No cc/gcc on PATH and an empty cache: the native library is unavailable, status says why, and uint16 data
    uses the numba kernels."""
    env = dict(os.environ, PATH=str(tmp_path), CC="", STEM_POLAR_NATIVE_CACHE=str(tmp_path / "cache"))
    code = ("import numpy as np; from stem_polar.core import kernels, native; "
            "print(native.available(), kernels.backend(np.uint16), native.status())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    available, backend, status = out.stdout.strip().split(" ", 2)
    assert available == "False" and "no C compiler" in status
    assert backend == ("numba" if kernels._HAVE_NUMBA else "numpy")


def test_256_bit_build_gives_the_same_log():
    """Machines without AVX-512 get 8-lane vectors (other table sizes and a 16-count small table): build that
    variant here (on a machine without AVX-512 it is the default build) and check it against float64 for every
    uint16, and against the default build."""
    import ctypes

    lib = ctypes.CDLL(str(native.build(native.FLAGS + ("-mno-avx512f",))))
    lib.sp_vector_pixels.restype = ctypes.c_int
    assert lib.sp_vector_pixels() == 8
    lib.sp_log_rows_u16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                                    ctypes.c_void_p]
    x = np.arange(65536, dtype=np.uint16).reshape(1, -1)
    idx = np.zeros(1, dtype=np.int64)
    out = np.empty((1, 65536), dtype=np.float32)
    lib.sp_log_rows_u16(x.ctypes.data, idx.ctypes.data, 1, 65536, out.ctypes.data)
    exact = np.log1p(np.arange(65536, dtype=np.float64))
    err = np.abs(out[0].astype(np.float64) - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert out[0, 0] == 0.0 and err.max() <= 1.0
    np.testing.assert_allclose(out[0], native.log_rows(x, idx)[0], rtol=2.5e-7, atol=0)


def test_without_numba_a_strided_uint16_block_still_uses_the_native_kernels(monkeypatch):
    """With numba missing, the native kernels are the only compiled backend: a non-contiguous block is copied
    for them instead of failing."""
    monkeypatch.setattr(kernels, "_HAVE_NUMBA", False)
    x = _frames(n=40, p=512)
    strided = x[::2]  # every other frame: not C-contiguous
    assert not strided.flags.c_contiguous and kernels.backend(np.uint16) == "native"
    idx = np.arange(20, dtype=np.int64)
    W = np.random.default_rng(5).normal(size=(3, 512)).astype(np.float32)
    M = np.ones((3, 512), dtype=np.float32)
    op, orr = np.empty((20, 3), np.float32), np.empty((20, 3), np.float32)
    kernels.pass2(strided, idx, False, W, M, True, op, orr, np.empty((4, 512), np.float32))
    raw = strided.astype(np.float64)
    np.testing.assert_allclose(op, np.log1p(raw) @ W.T.astype(np.float64), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(orr[:, 0], raw.sum(axis=1), rtol=1e-6)


def _load_variant(flags):
    import ctypes

    lib = ctypes.CDLL(str(native.build(native.FLAGS + flags)))
    V, S, I = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int  # noqa: E741
    lib.sp_log_rows_u16.argtypes = [V, V, S, S, V]
    lib.sp_pass2_u16.argtypes = [V, V, S, S, V, S, V, V, I, V, S, V, V]
    lib.sp_log_gather.restype = I
    return lib


def test_table_gather_and_series_builds_give_the_same_bits():
    """Counts >= 32 take log(1 + x) from a gathered 65536-entry table (AVX2 builds) or from the series (AVX-512
    builds): build both here and check every uint16 against float64 (1 ulp) and the two builds against each other
    bit for bit, in the log and in a pass over dense frames (no count below 32: every vector takes that path)."""
    gather, series = _load_variant(("-DSP_LOG_GATHER=1",)), _load_variant(("-DSP_LOG_GATHER=0",))
    assert (gather.sp_log_gather(), series.sp_log_gather()) == (1, 0)
    x = np.arange(65536, dtype=np.uint16).reshape(1, -1)
    idx = np.zeros(1, dtype=np.int64)
    outs = []
    for lib in (gather, series):
        out = np.empty((1, 65536), dtype=np.float32)
        lib.sp_log_rows_u16(x.ctypes.data, idx.ctypes.data, 1, 65536, out.ctypes.data)
        outs.append(out[0])
    exact = np.log1p(np.arange(65536, dtype=np.float64))
    err = np.abs(outs[0].astype(np.float64) - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert outs[0][0] == 0.0 and err.max() <= 1.0
    np.testing.assert_array_equal(outs[0], outs[1])

    dense = (_frames(n=9, p=1003) + 100).astype(np.uint16)  # every count >= 100
    p = dense.shape[1]
    rng = np.random.default_rng(6)
    W = rng.normal(size=(5, p)).astype(np.float32)
    M = rng.uniform(-1, 1, (3, p)).astype(np.float32)
    zrow = np.zeros(p, np.float32)
    ids = np.arange(9, dtype=np.int64)
    res = []
    for lib in (gather, series):
        op, orr = np.empty((9, 5), np.float32), np.empty((9, 3), np.float32)
        lib.sp_pass2_u16(dense.ctypes.data, ids.ctypes.data, 9, p, W.ctypes.data, 5, zrow.ctypes.data, M.ctypes.data,
                         1, op.ctypes.data, 5, orr.ctypes.data, np.empty(2 * p, np.float32).ctypes.data)
        res.append((op, orr))
    np.testing.assert_array_equal(res[0][0], res[1][0])
    np.testing.assert_array_equal(res[0][1], res[1][1])
    s_ref = np.log1p(dense.astype(np.float64)) @ W.T.astype(np.float64)
    np.testing.assert_allclose(res[0][0], s_ref, rtol=1e-5, atol=1e-5 * np.abs(s_ref).max())
