"""The fused numba kernels against the numpy path (bit-identical outputs), and the v3 artifact whose
geometric multipliers are recomputed on reading."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from diffuse_extractor import ExtractionParams, extract_still, synthetic
from diffuse_extractor.core import extract as ex
from diffuse_extractor.core import kernels
from diffuse_extractor.core import masks as mk

needs_numba = pytest.mark.skipif(not kernels.available(), reason="numba is not importable here")


def _extract(monkeypatch, engine, *args, **kw):
    monkeypatch.setenv(kernels.ENV, engine)
    assert kernels.enabled() == (engine != "numpy")
    ex.clear_process_cache()
    res = extract_still(*args, **kw)
    table = {k: np.array(v) for k, v in res.table.items()}  # copies: the workspace reuses memory
    return table, [f.copy() for f in res.flags], res.info


def _assert_same(a, b):
    ta, fa, ia = a
    tb, fb, ib = b
    assert list(ta) == list(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)  # same bits (NaN == NaN here)
    for x, y in zip(fa, fb):
        np.testing.assert_array_equal(x, y)
    assert ia == ib


@needs_numba
@pytest.mark.parametrize("with_background", [False, True])
def test_fused_extraction_is_bit_identical_to_numpy(synthetic_still, monkeypatch, with_background):
    """Two panels (one tilted), Bragg and outlier masks, hot pixels, optional background, auto beamstop."""
    s = synthetic_still
    rng = np.random.default_rng(5)
    bkg = [rng.uniform(0, 20, d.shape).astype(np.float32) for d in s.data] if with_background else None
    hot = [np.zeros(d.shape, np.uint8) for d in s.data]
    hot[1][5:9, 30:33] = mk.MaskBit.HOT
    data = [d.copy() for d in s.data]
    data[0][100, 120] += 1e5  # an unpredicted bright pixel for the outlier mask
    params = ExtractionParams(gain=1.7, background_scale=0.8)
    args = (s.experiment, data, s.reflections)
    kw = dict(params=params, background=bkg, dynamic_flags=hot)
    fused = _extract(monkeypatch, "numba", *args, **kw)
    ref = _extract(monkeypatch, "numpy", *args, **kw)
    assert fused[2]["n_outlier_pixels"] >= 1 and fused[2]["n_masked_hot"] == 12
    assert len(fused[0]["intensity"]) > 0.5 * sum(d.size for d in data)
    _assert_same(fused, ref)


@needs_numba
def test_fused_extraction_constant_panel_in_a_varying_column(synthetic_still, monkeypatch):
    """Panel 1 without sensor data (efficiency 1 there, a broadcast), panel 0 with: mixed column."""
    s = synthetic_still
    det = s.experiment.detector
    mu = det[1].get_mu()
    det[1].set_mu(0.0)
    try:
        fused = _extract(monkeypatch, "numba", s.experiment, s.data, s.reflections)
        ref = _extract(monkeypatch, "numpy", s.experiment, s.data, s.reflections)
    finally:
        det[1].set_mu(mu)
        ex.clear_process_cache()
    sel = fused[0]["panel"] == 1
    assert (fused[0]["efficiency"][sel] == 1).all() and (fused[0]["efficiency"][~sel] > 1).all()
    _assert_same(fused, ref)


@needs_numba
@pytest.mark.parametrize("b", [1, 3, 4])
def test_bin_weighted_matches_the_numpy_binning(b):
    """Block sums (float64, rows then columns) and counts, partial blocks at the far edges."""
    rng = np.random.default_rng(2)
    d = rng.uniform(0, 100, (37, 53)).astype(np.float32)
    w = rng.uniform(0.5, 2, d.shape).astype(np.float32)
    good = rng.random(d.shape) > 0.2
    ref = d * w
    ref[~good] = 0.0
    shape = (-(-37 // b), -(-53 // b))
    s, n = np.empty(shape), np.empty(shape)
    kernels.bin_weighted(d, w, True, good, b, s, n)
    np.testing.assert_array_equal(s, mk._bin_sum(ref, b))
    np.testing.assert_array_equal(n, mk._bin_count(good, b))


@needs_numba
def test_fused_outlier_flags_match_numpy(monkeypatch):
    rng = np.random.default_rng(8)
    data = [rng.poisson(50, (60, 70)).astype(np.float32) for _ in range(2)]
    data[0][10, 10] = 5000
    data[1][40, 3] = 4000
    flags = [np.zeros(d.shape, np.uint8) for d in data]
    flags[1][40, 3] = mk.MaskBit.UNTRUSTED  # flagged: not an outlier
    rbin = [np.add.outer(np.arange(60), np.arange(70)) // 7 for _ in data]
    weights = [rng.uniform(0.9, 1.1, d.shape).astype(np.float32) for d in data]
    for w in (None, weights):
        monkeypatch.setenv(kernels.ENV, "numba")
        fo, fn = mk.outlier_flags(data, flags, rbin, w)
        monkeypatch.setenv(kernels.ENV, "numpy")
        ro, rn = mk.outlier_flags(data, flags, rbin, w)
        assert fn == rn == 1
        for x, y in zip(fo, ro):
            np.testing.assert_array_equal(x, y)
        assert fo[0][10, 10] and not fo[1].any()


def test_artifact_v3_recomputes_coordinates_and_multipliers_exactly(synthetic_still, tmp_path):
    """v3 does not store the four geometric multipliers: they come back bit for bit; a v2 file (which
    stores them) still reads the same; a changed recomputation is refused."""
    from diffuse_extractor.artifacts import InputError, read_still, write_still

    s = synthetic_still
    params = ExtractionParams(beamstop="none", air_path_fraction=0.6)
    res = extract_still(s.experiment, s.data, s.reflections, params=params)
    t = {k: np.array(v) for k, v in res.table.items()}
    p3 = write_still(tmp_path / "v3.h5", res, s.experiment, parameters=params.as_dict(), inputs={},
                     schema_version=3)
    p2 = write_still(tmp_path / "v2.h5", res, s.experiment, parameters=params.as_dict(), inputs={},
                     schema_version=2)
    with h5py.File(p3, "r") as f:
        assert int(f.attrs["schema_version"]) == 3
        for c in ("polarisation", "efficiency", "solid_angle", "air"):
            assert c not in f["entry/pixels"]
        assert f["entry/pixels/x"].dtype == np.uint16  # pixel coordinates stay stored
    with h5py.File(p2, "r") as f:
        assert int(f.attrs["schema_version"]) == 2 and f["entry/pixels/x"].dtype == np.uint16
    a3, a2 = read_still(p3), read_still(p2)
    for c in ("h", "k", "l", "q", "intensity", "sigma", "panel", "x", "y", "polarisation", "efficiency",
              "solid_angle", "air", "lorentz", "background"):
        np.testing.assert_array_equal(a3["pixels"][c], t[c], err_msg=c)
        np.testing.assert_array_equal(a2["pixels"][c], t[c], err_msg=c)
        assert a3["pixels"][c].dtype == t[c].dtype, c
    np.testing.assert_array_equal(a3["pixels"]["correction"], a2["pixels"]["correction"])
    np.testing.assert_array_equal(a3["pixels"]["raw"], a2["pixels"]["raw"])
    assert np.ptp(t["air"]) > 0 and (t["panel"] == 1).any()  # the air path fraction mattered, two panels
    only = read_still(p3, columns=["x", "air"])
    assert set(only["pixels"]) == {"x", "air"}
    np.testing.assert_array_equal(only["pixels"]["air"], t["air"])
    with h5py.File(p3, "r+") as f:  # a reader whose recomputation differs must not return its values
        g = f["entry/pixels"]
        chk = g.attrs["check_air"].copy()
        chk[0] = np.nextafter(chk[0], np.float32(2))
        g.attrs["check_air"] = chk
    with pytest.raises(InputError, match="air"):
        read_still(p3, columns=["air"])
    np.testing.assert_array_equal(read_still(p3, columns=["x"])["pixels"]["x"], t["x"])  # not recomputed


@needs_numba
def test_fused_extraction_is_bit_identical_on_a_pilatus_6m_still(thaumatin_cbfs, monkeypatch):
    """The real detector (parallax, module gaps, beamstop and its arm, 6.2 Mpixel): same table, masks, info."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    from diffuse_extractor.artifacts import read_image

    expt = ExperimentListFactory.from_filenames([str(thaumatin_cbfs[0])])[0]
    expt.crystal = synthetic.make_crystal((57.8, 57.8, 150.3))
    data, fmask = read_image(expt, 0)
    fused = _extract(monkeypatch, "numba", expt, data, None, format_mask=fmask)
    ref = _extract(monkeypatch, "numpy", expt, data, None, format_mask=fmask)
    assert fused[2]["n_masked_beamstop"] > 1000 and fused[2]["n_masked_bragg"] > 1000
    _assert_same(fused, ref)
    ex.clear_process_cache()


@pytest.mark.parametrize("k", [1, 2])
def test_cropped_dilation_equals_the_full_one(k):
    rng = np.random.default_rng(k)
    for shape in ((40, 50), (7, 9)):
        for _ in range(20):
            m = np.zeros(shape, bool)
            y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
            m[max(y - 3, 0):y + 2, max(x - 2, 0):x + 4] = rng.random((min(y + 2, shape[0]) - max(y - 3, 0),
                                                                       min(x + 4, shape[1]) - max(x - 2, 0))) > 0.3
            np.testing.assert_array_equal(mk._dilate_cropped(m, k), mk.ndi.binary_dilation(m, iterations=k))
    assert not mk._dilate_cropped(np.zeros((5, 5), bool), 1).any()


@needs_numba
def test_box_filter_and_hot_dead_kernel_match_scipy_and_numpy(monkeypatch):
    """The run-statistics kernels: the box filter equals scipy's ``uniform_filter(mode="constant")`` bit for bit
    (odd shapes, panels smaller than the box), and the fused HOT/DEAD rule gives the numpy path's flags on
    statistics with many pixels close to each threshold."""
    from scipy.ndimage import uniform_filter

    from diffuse_extractor.core import runstats

    rng = np.random.default_rng(3)
    for shape in [(61, 47), (4, 9), (2, 3)]:
        a = rng.random(shape) * rng.integers(0, 500, shape)
        rows = np.empty(shape)
        kernels.box_rows(a, 7, rows)
        got = np.empty(shape)
        for y in range(shape[0]):
            kernels.box_cols_row(rows[y], 7, got[y])
        np.testing.assert_array_equal(got, uniform_filter(a, 7, mode="constant"))
    n_st = 8
    # (the streaming kernel keeps size + 1 rows: panels shorter than the box and than the ring too)
    for shape, size in [((120, 90), 7), ((5, 11), 7), ((3, 4), 7), ((9, 40), 3)]:
        n = rng.integers(0, n_st + 1, shape).astype(np.uint16)
        mean = rng.gamma(2.0, 5.0, shape)
        hot = rng.random(shape) < 0.02
        mean[hot] *= rng.uniform(3.0, 8.0, hot.sum())  # around the 5x factor
        total = np.round(mean * n)
        sumsq = total * total / np.maximum(n, 1) + rng.uniform(0, 8, shape) * total  # variance around 4x mean
        n_zero = np.where(rng.random(shape) < 0.03, n, 0).astype(np.uint16)
        total[n_zero == n] = 0.0
        sumsq[n_zero == n] = 0.0
        st = runstats.RunningPixelStats([n], [total], [sumsq], [n_zero], [f"s{k}" for k in range(n_st)])
        monkeypatch.setenv(kernels.ENV, "numba")
        fast = st.hot_dead_flags(size=size)[0]
        monkeypatch.setenv(kernels.ENV, "numpy")
        slow = st.hot_dead_flags(size=size)[0]
        np.testing.assert_array_equal(fast, slow, err_msg=str((shape, size)))
        if shape == (120, 90):  # both rules exercised
            assert (slow & mk.MaskBit.HOT).sum() > 20 and (slow & mk.MaskBit.DEAD).sum() > 20


def test_paint_disks_kernel_matches_numpy_path_and_lattice_count(monkeypatch):
    """The Bragg disks painted by the numba kernel equal the numpy path's pixel for pixel (spots inside, on the
    edges and off the panel, fractional radii, two panels), and a disk of radius 2 centred on a pixel centre
    covers the 13 pixel centres of the integer lattice within distance 2."""
    from diffuse_extractor.core import mask_kernels
    from diffuse_extractor.core.masks import MaskBit, paint_disks

    assert mask_kernels.enabled()
    rng = np.random.default_rng(17)
    shapes = [(97, 131), (60, 45)]
    m = 400
    panel = rng.integers(0, 2, m)
    x = rng.uniform(-8, 139, m)
    y = np.where(panel == 0, rng.uniform(-8, 105, m), rng.uniform(-8, 68, m))
    for radius in (0.7, 2.0, 3.45, 6.0):
        got = [np.zeros(s, np.uint8) for s in shapes]
        n1 = paint_disks(got, panel, x, y, radius, MaskBit.BRAGG)
        monkeypatch.setenv("DIFFUSE_EXTRACTOR_KERNELS", "numpy")
        ref = [np.zeros(s, np.uint8) for s in shapes]
        n2 = paint_disks(ref, panel, x, y, radius, MaskBit.BRAGG)
        monkeypatch.delenv("DIFFUSE_EXTRACTOR_KERNELS")
        assert n1 == n2 == m
        assert all(np.array_equal(a, b) for a, b in zip(got, ref)) and sum(int(a.sum()) for a in got) > 0
    one = [np.zeros((20, 20), np.uint8)]
    paint_disks(one, np.array([0]), np.array([10.5]), np.array([7.5]), 2.0, MaskBit.BRAGG)
    assert int((one[0] != 0).sum()) == 13 and one[0][7, 10] and one[0][7, 12] and not one[0][9, 12]


@needs_numba
@pytest.mark.parametrize("lam", [0.3, 3.0, 40.0])
def test_isotropic_profile_clipping_kernel_matches_numpy(monkeypatch, lam):
    """``kernels.shell_clip_sums`` gives ``background.isotropic_profile`` the numpy path's shells, values, errors and
    pixel counts bit for bit (Poisson counts with bright outliers to clip, a sample stride, a gain, NaN pixels)."""
    from diffuse_extractor.core import background as bg

    rng = np.random.default_rng(int(lam * 10))
    n = 200_000
    q = rng.uniform(0.05, 0.6, n).astype(np.float32)
    e = rng.uniform(0.5, 1.5, n).astype(np.float32)
    inten = (rng.poisson(lam * e * (1 + q)) / e).astype(np.float32)
    inten[rng.random(n) < 0.02] *= 40
    inten[:50] = np.nan
    for kw in ({}, {"gain": 1.7, "max_sample": 30_000}):
        out = []
        for engine in ("numba", "numpy"):
            monkeypatch.setenv(kernels.ENV, engine)
            out.append(bg.isotropic_profile(q, inten, e, **kw))
        a, b = out
        for name in ("q", "b", "sigma", "n_pixels"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert np.isfinite(a.b).sum() > 20 and a.n_pixels.sum() < min(n, kw.get("max_sample", n))  # some clipped


@needs_numba
def test_untrusted_and_overload_kernel_matches_numpy(monkeypatch):
    """``kernels.trust_flags`` gives ``masks.untrusted_and_overload`` the numpy path's flags: values at and around the
    trusted limits (a limit that float32 rounds), NaN, a format mask, untrusted rectangles, two panels."""
    det = synthetic.make_detector()
    rng = np.random.default_rng(2)
    panels = list(det)
    for p in panels:
        p.set_trusted_range((-0.1, 1000.3))
        p.add_mask(3, 4, 9, 6)  # an untrusted rectangle
    data = [rng.normal(0, 400, tuple(p.get_image_size()[::-1])).astype(np.float32) for p in panels]
    d = data[0]
    d[0, :6] = [np.float32(-0.1), np.float32(1000.3), np.nan, np.nextafter(np.float32(1000.3), np.float32(0)), 2e6, -5]
    good = [rng.random(x.shape) > 0.01 for x in data]
    for fmask in (None, good, [None] * len(data)):
        out = {}
        for engine in ("numba", "numpy"):
            monkeypatch.setenv(kernels.ENV, engine)
            out[engine] = mk.untrusted_and_overload(det, data, fmask)
        for a, b in zip(out["numba"], out["numpy"]):
            np.testing.assert_array_equal(a, b)
        f = out["numba"][0]
        assert f[0, 0] == mk.MaskBit.UNTRUSTED and f[0, 1] == mk.MaskBit.OVERLOAD and f[0, 2] == 0
        assert f[0, 3] == 0 and f[0, 4] == mk.MaskBit.OVERLOAD and f[0, 5] == mk.MaskBit.UNTRUSTED
