"""Unit tests of the science core against direct numpy evaluations of the seed's formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stem_polar.core import stages as st
from stem_polar.core.calibration import (
    deflection_to_field,
    detect_center,
    electron_wavelength_angstrom,
    kspace_from_clicks,
    pv_over_e_volts,
)
from stem_polar.core.config import PolarConfig, load_config
from stem_polar.core.pipeline import run_pipeline
from stem_polar.core.source import ArraySource
from stem_polar.core.xp import DeviceError, get_xp

pytestmark = pytest.mark.filterwarnings("ignore:mean confidence > 0.95:UserWarning")


def _direct_preprocess(x, cy, cx, bg_r, mask_r, log, bg):
    k = x.shape[-1]
    yy, xx = np.mgrid[0:x.shape[-2], 0:k]
    r = np.hypot(yy - cy, xx - cx)
    x = x.astype(np.float64)
    if log:
        x = np.log1p(x)
    if bg:
        x = x - x[:, r > bg_r].mean(axis=1)[:, None, None]
    if mask_r > 0:
        x = x * (r > mask_r)
    return x


@pytest.fixture(scope="module")
def frames(scan):
    d = scan["data"]
    return d.reshape(-1, *d.shape[2:])


@pytest.mark.parametrize("pre_on", [False, True])
def test_templates_gates_equal_direct_formulas(scan, frames, pre_on):
    cfg = PolarConfig.model_validate({
        "templates": {"top_percent": 12, "smooth_sigma": 0, "roi_r": [2, 14]},
        "preprocess": {"log_transform": pre_on, "background_subtract": pre_on,
                       "central_mask_px": 3 if pre_on else 0, "whiten": "diag"},
        "dpc": {"baseline": "none", "gate_mode": "union"},
        "matched_filter": {"softmax_temp": 50.0},
    })
    res = run_pipeline(ArraySource(scan["data"]), scan["labels"], cfg, chunk=37)
    cy, cx = res.center.cy, res.center.cx
    x = _direct_preprocess(frames, cy, cx, 14, 3 if pre_on else 0, pre_on, pre_on)
    eps = cfg.templates.eps
    mu, sigma = x.mean(axis=0), x.std(axis=0)
    np.testing.assert_allclose(res.stats.mu, mu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res.stats.sigma, sigma, rtol=1e-4, atol=1e-5)
    lab = scan["labels"]
    assert res.cluster_ids == [0, 1, 2]
    yy, xx = np.mgrid[0:32, 0:32]
    roi = ((np.hypot(yy - cy, xx - cx) >= 2) & (np.hypot(yy - cy, xx - cx) <= 14)).astype(float)
    for i, c in enumerate(res.cluster_ids):
        mu_c = x[lab == c].mean(axis=0)
        t = (mu_c - mu) / (sigma + eps)
        t = t / np.linalg.norm(t)
        np.testing.assert_allclose(res.templates[i], t, atol=2e-5)
        np.testing.assert_allclose(res.stats.mu_c_raw[i], frames[lab == c].mean(axis=0), rtol=1e-5)
        # gates: the top 12 % of the template (and its mirror image about the beam) inside the ROI band
        tt = res.templates[i]
        g = res.gates[i]
        top = tt >= np.percentile(tt, 100 - 12)
        assert np.all(g[top & (roi > 0)] >= 0.5 - 1e-9)  # every selected pixel keeps at least half its weight
        ring = (np.hypot(yy - cy, xx - cx) > 2 - 1.5) & (np.hypot(yy - cy, xx - cx) < 14 + 1.5)  # ROI +- a diagonal px
        assert np.all(g[~ring] == 0) and g.max() <= 1.0 + 1e-12
        # centroid at the beam centre (what the symmetrisation is for)
        assert abs((g * (xx - cx)).sum() / g.sum()) < 1e-9 and abs((g * (yy - cy)).sum() / g.sum()) < 1e-9
        # coverage report = fraction of the detector
        assert res.report["gate_coverage"][str(c)]["coverage"] == pytest.approx(g.sum() / g.size)
    # matched filter and softmax confidence
    z = (x - mu) / (sigma + eps)
    s = np.einsum("ckl,nkl->cn", res.templates, z).reshape(3, 24, 24)
    np.testing.assert_allclose(res.S, s, atol=2e-3 * np.abs(s).max())
    e = np.exp((s - s.max(axis=0)) / 50.0)
    p = e / e.sum(axis=0)
    np.testing.assert_allclose(res.confidence, p.max(axis=0), atol=1e-3)
    np.testing.assert_array_equal(res.argmax, np.asarray(res.cluster_ids)[p.argmax(axis=0)])
    # gated CoM (union gate), detector px from the centre
    gu = res.union_gate  # the max of the gates, re-symmetrised about the beam
    w = frames.astype(float) * gu
    comx = (w * (xx - cx)).sum(axis=(1, 2)) / w.sum(axis=(1, 2))
    comy = (w * (yy - cy)).sum(axis=(1, 2)) / w.sum(axis=(1, 2))
    np.testing.assert_allclose(res.com_x_raw.ravel(), comx, atol=1e-4)
    np.testing.assert_allclose(res.com_y_raw.ravel(), comy, atol=1e-4)
    np.testing.assert_allclose(res.ex, -res.com_x_raw * 1.0)  # baseline none, rotation 0, E = -field_scale C


def test_smoothing_and_whitening_none(scan, frames):
    cfg = PolarConfig.model_validate({"templates": {"top_percent": 10, "smooth_sigma": 1.5},
                                      "preprocess": {"log_transform": False, "background_subtract": False,
                                                     "central_mask_px": 0, "whiten": "none"}})
    res = run_pipeline(ArraySource(scan["data"]), scan["labels"], cfg, chunk=100)
    from scipy.ndimage import gaussian_filter

    t = res.templates[0]
    g = gaussian_filter((t >= np.percentile(t, 90)).astype(float), 1.5)  # smoothing before the symmetrisation
    sym = st.symmetrize_gate(g, res.center.cy, res.center.cx)
    np.testing.assert_allclose(res.gates[0], sym, atol=1e-12)
    x = frames.astype(float)
    s = np.einsum("kl,nkl->n", res.templates[1], x - x.mean(axis=0))  # no whitening: Z = I - mu
    np.testing.assert_allclose(res.S[1].ravel(), s, rtol=1e-3, atol=1e-3 * np.abs(s).max())


def test_chunking_is_map_merge_invariant(scan):
    cfg = PolarConfig()
    a = run_pipeline(ArraySource(scan["data"]), scan["labels"], cfg, chunk=5)
    b = run_pipeline(ArraySource(scan["data"]), scan["labels"], cfg, chunk=10_000)
    np.testing.assert_allclose(a.templates, b.templates, atol=1e-5)
    np.testing.assert_allclose(a.ex, b.ex, atol=1e-5)
    np.testing.assert_array_equal(a.argmax, b.argmax)


@pytest.mark.parametrize("split", [False, True])
def test_stats_partials_add_up(frames, split):
    from stem_polar.core.config import PreprocessConfig

    x = frames[:60].reshape(60, -1).astype(np.float32)
    lab = np.arange(60) % 3
    half = (np.arange(60) // 7) % 2
    pre = st.Preprocessor(PreprocessConfig(central_mask_px=3), (32, 32), 15.3, 16.2)
    ref = pre.apply(np, x[:10]).mean(axis=0)

    def part(sl):
        return st.stats_map(np, x[sl].copy(), lab[sl], half[sl], pre, ref, 3, split, nonneg=True)

    whole = part(slice(0, 60))
    parts = part(slice(0, 25)) + part(slice(25, 60))
    for f in ("s1", "s2", "cs", "cnt", "raw_c"):
        np.testing.assert_allclose(getattr(parts, f), getattr(whole, f), rtol=1e-4, atol=1e-3)
    s = st.finalize_stats(whole, ref, (32, 32), 3, keep=pre.keep)
    y = pre.apply(np, x).astype(np.float64)  # the preprocessed frames, built frame by frame
    np.testing.assert_allclose(s.mu.ravel(), y.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(s.sigma.ravel(), y.std(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s.mu_c[1].ravel(), y[lab == 1].mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(s.mu_raw.ravel(), x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(s.halves[0][0].ravel(), y[half == 0].mean(axis=0), atol=1e-5)
    if split:
        np.testing.assert_allclose(s.halves[1][1].ravel(), y[half == 1].std(axis=0), rtol=1e-4, atol=1e-4)


def test_baselines_direct():
    rng = np.random.default_rng(3)
    c = rng.normal(size=(10, 12))
    np.testing.assert_allclose(st.apply_baseline(c, "median"), c - np.median(c))
    d = c - np.median(c, axis=1)[:, None]
    np.testing.assert_allclose(st.apply_baseline(c, "rowcol"), d - np.median(d, axis=0)[None])
    np.testing.assert_allclose(st.apply_baseline(c, "roi", [0, 3, 0, 4]), c - c[:3, :4].mean())
    # rowcol removes a row drift plus a column offset exactly (all-zero signal)
    drift = np.linspace(0, 2, 10)[:, None] + np.linspace(-1, 1, 12)[None]
    np.testing.assert_allclose(st.apply_baseline(drift, "rowcol"), 0, atol=1e-12)
    with pytest.raises(ValueError, match="outside"):
        st.apply_baseline(c, "roi", [0, 30, 0, 4])


@pytest.mark.parametrize("angle,flip", [(30.0, False), (-65.0, True)])
def test_rotation_estimate_from_curl(angle, flip):
    yy, xx = np.mgrid[0:40, 0:40].astype(float)
    phi = np.exp(-((yy - 14) ** 2 + (xx - 12) ** 2) / 60) - 0.7 * np.exp(-((yy - 27) ** 2 + (xx - 28) ** 2) / 40)
    gy, gx = np.gradient(phi)
    # detector frame = inverse of (mirror x, then rotate by angle)
    a = math.radians(-angle)
    dx = math.cos(a) * gx - math.sin(a) * gy
    dy = math.sin(a) * gx + math.cos(a) * gy
    if flip:
        dx = -dx
    est = st.estimate_rotation(dx, dy)
    assert est["flip"] == flip
    diff = (est["rotation_deg"] - angle + 90) % 180 - 90
    assert abs(diff) < 0.5
    ux, uy = st.rotate_vectors(dx, dy, est["rotation_deg"], est["flip"])
    assert abs(np.corrcoef(ux.ravel(), gx.ravel())[0, 1]) > 0.999


def test_icom_recovers_potential():
    yy, xx = np.mgrid[0:48, 0:40].astype(float)
    phi = np.exp(-((yy - 20) ** 2 + (xx - 15) ** 2) / 50) - np.exp(-((yy - 30) ** 2 + (xx - 28) ** 2) / 30)
    gy = -(yy - 20) / 25 * np.exp(-((yy - 20) ** 2 + (xx - 15) ** 2) / 50) + \
        (yy - 30) / 15 * np.exp(-((yy - 30) ** 2 + (xx - 28) ** 2) / 30)
    gx = -(xx - 15) / 25 * np.exp(-((yy - 20) ** 2 + (xx - 15) ** 2) / 50) + \
        (xx - 28) / 15 * np.exp(-((yy - 30) ** 2 + (xx - 28) ** 2) / 30)
    ic = st.integrate_com(gx, gy, step=1.0)
    assert np.corrcoef(ic.ravel(), phi.ravel())[0, 1] > 0.995
    np.testing.assert_allclose(ic, phi - phi.mean(), atol=0.05)
    ic2 = st.integrate_com(gx / 0.5, gy / 0.5, step=0.5)  # same potential, half the step
    np.testing.assert_allclose(ic2, ic, atol=1e-6)


def test_physical_units_against_textbook_relativity():
    kv = 300.0
    gamma = 1 + kv * 1e3 / 510998.95
    beta2 = 1 - 1 / gamma ** 2
    assert pv_over_e_volts(kv) == pytest.approx(gamma * 510998.95 * beta2, rel=1e-9)
    assert electron_wavelength_angstrom(300) == pytest.approx(0.019687, rel=1e-4)
    assert electron_wavelength_angstrom(200) == pytest.approx(0.025079, rel=1e-4)
    # 1 mrad over 10 nm at 300 kV: E = -theta p v / (e t) ~ -4.89e10 V/m
    e = deflection_to_field(np.array([1e-3]), kv, 10.0)
    assert e[0] == pytest.approx(-1e-3 * gamma * 510998.95 * beta2 / 10e-9, rel=1e-9)
    assert -5.0e10 < e[0] < -4.8e10


def test_detect_center_and_kspace_clicks(render_frames):
    f = render_frames(np.zeros(1), np.zeros(1), np.zeros((1, 1), int), k=48, center=(20.4, 25.7), radius=8,
                      spot_level=0, noise=False, dtype=np.float64)[0]
    c = detect_center(f)
    assert abs(c.cy - 20.4) < 0.05 and abs(c.cx - 25.7) < 0.05
    assert abs(c.radius - 8.0) < 0.6
    # anisotropic k calibration: d = 2 Å -> g = 0.5 1/Å; sx = 0.02, sy = 0.025 1/Å/px
    cy, cx = 64.0, 64.0
    pts = [(cy, cx - 25), (cy, cx + 25), (cy - 20, cx), (cy + 20, cx)]
    k = kspace_from_clicks(pts, cy, cx, known_spacing=2.0)
    assert k["pixel_size_kx"] == pytest.approx(0.02, rel=1e-9)
    assert k["pixel_size_ky"] == pytest.approx(0.025, rel=1e-9)
    assert k["k_units"] == "1/Å"
    k1 = kspace_from_clicks(pts[:2], cy, cx, known_spacing=None)  # relative: radius -> 1.0
    assert k1["pixel_size_k"] == pytest.approx(1 / 25) and k1["pixel_size_kx"] == k1["pixel_size_ky"]
    with pytest.raises(ValueError, match="pairs"):
        kspace_from_clicks(pts[:3], cy, cx)


def test_config_rejects_unknown_and_inconsistent(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("templates:\n  top_percnt: 5\n")
    with pytest.raises(ValueError, match="top_percnt"):
        load_config(p)
    with pytest.raises(ValueError, match="baseline_roi"):
        PolarConfig.model_validate({"dpc": {"baseline": "roi"}})
    with pytest.raises(ValueError, match="inner"):
        PolarConfig.model_validate({"templates": {"roi_r": [10, 5]}})
    p.write_text("templates: {top_percent: 5, roi_r: [8, 80]}\ncalibration: {pixel_size: 1.5, "
                 "pixel_size_units: angstrom, convergence_angle: 20}\n")
    c = load_config(p, {"dpc": {"field_scale": 2.0}})
    assert c.templates.roi_r == [8, 80] and c.dpc.field_scale == 2.0
    assert c.calibration.scan_step_nm == pytest.approx(0.15)


def test_cuda_device_without_cupy_is_a_clear_error():
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        with pytest.raises(DeviceError, match="CuPy is not importable"):
            get_xp("cuda:0")
    else:  # with CuPy: the module itself, or a clear error when no GPU is usable
        try:
            assert get_xp("cuda:0").__name__ == "cupy"
        except DeviceError as exc:
            assert "CUDA device 0" in str(exc) or "CuPy" in str(exc)
    with pytest.raises(DeviceError, match="unknown device"):
        get_xp("tpu")
    assert get_xp("cpu") is np
