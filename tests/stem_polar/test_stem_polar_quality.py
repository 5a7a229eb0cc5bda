"""Gates symmetric about an off-centre beam, the quality checks (each shown to fail and to pass), the sign of E."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from stem_polar.core import stages as st
from stem_polar.core.config import PolarConfig
from stem_polar.core.pipeline import run_pipeline
from stem_polar.core.source import ArraySource
from stem_polar.synthetic import make_scan

K = 48
# beam 7 px below and 9 px left of the array centre, plus a fractional part
CY, CX = (K - 1) / 2 + 7 + 0.37, (K - 1) / 2 - 9 - 0.21
SPOTS = {0: (0.0, 9.0), 1: (9.0, 0.0), 2: (6.4, 6.4)}


def symmetric_frame(cluster, dy=0.0, dx=0.0, cy=CY, cx=CX):
    """A BF disk and a Friedel-symmetric spot pair (direction per cluster), centro-symmetric about (cy + dy, cx + dx)."""
    yy, xx = np.mgrid[0:K, 0:K].astype(float)
    y0, x0 = cy + dy, cx + dx
    img = 100 * np.clip(5 - np.hypot(yy - y0, xx - x0) + 0.5, 0, 1) + 2
    gy, gx = SPOTS[cluster]
    for s in (1, -1):
        img = img + 60 * np.exp(-((yy - y0 - s * gy) ** 2 + (xx - x0 - s * gx) ** 2) / 2)
    return img


@pytest.fixture(scope="module")
def centro():
    lab = np.arange(12 * 12) % 3
    data = np.stack([symmetric_frame(c) for c in lab]).reshape(12, 12, K, K).astype(np.float32)
    return data, lab


def run(data, lab, **sections):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_pipeline(ArraySource(data), lab, PolarConfig.model_validate(sections), chunk=64)


def test_featureless_pattern_has_zero_centroid_under_beam_symmetrised_gates():
    rng = np.random.default_rng(7)
    yy, xx = np.indices((K, K), dtype=float)
    for cy, cx in [(CY, CX), (10.5, 30.25), (33.9, 12.06)]:
        g = st.symmetrize_gate((rng.random((K, K)) > 0.9).astype(float), cy, cx)
        # a featureless (flat) pattern: CoM = centroid of the gate = the beam centre, to rounding
        assert abs((g * (xx - cx)).sum() / g.sum()) < 1e-9 and abs((g * (yy - cy)).sum() / g.sum()) < 1e-9
        a = 0.5 * (g + g[::-1, ::-1])  # the seed's array flip is off by the beam's offset from the array centre
        assert np.hypot((a * (xx - cx)).sum() / a.sum(), (a * (yy - cy)).sum() / a.sum()) > 1.0


@pytest.mark.parametrize("mode", ["union", "adaptive"])
@pytest.mark.parametrize("smooth", [1.5, 0])
def test_centro_symmetric_patterns_give_zero_com_off_centre_beam(centro, mode, smooth):
    data, lab = centro
    res = run(data, lab, dpc={"gate_mode": mode, "baseline": "none"}, templates={"smooth_sigma": smooth},
              calibration={"center_y": CY, "center_x": CX})
    assert np.abs(res.com_x_raw).max() <= 0.01 and np.abs(res.com_y_raw).max() <= 0.01
    assert res.report["quality"]["checks"]["gate_bias"]["ok"]
    # the seed's array-centre flip on the same scan: px-sized, cluster-dependent biases, and the check says so
    arr = run(data, lab, dpc={"gate_mode": mode, "baseline": "none"},
              templates={"smooth_sigma": smooth, "symmetrize": "array"}, calibration={"center_y": CY, "center_x": CX})
    assert np.abs(arr.com_x_raw).max() > 1.0
    chk = arr.report["quality"]["checks"]["gate_bias"]
    assert not chk["ok"] and chk["max_abs_bias_px"] > 1.0
    assert any("'gate_bias' failed" in w for w in arr.warnings)


def test_detected_centre_leaves_one_common_offset(centro):
    data, lab = centro
    res = run(data, lab, dpc={"gate_mode": "adaptive", "baseline": "none"})
    # the detected centre is off by a few hundredths of a px: the same offset for every cluster (a baseline removes it)
    assert abs(res.center.cy - CY) < 0.15 and abs(res.center.cx - CX) < 0.15
    assert np.ptp(res.com_x_raw) <= 0.01 and np.ptp(res.com_y_raw) <= 0.01


def test_wrong_given_centre_fails_the_centre_check(centro):
    data, lab = centro
    bad = run(data, lab, calibration={"center_y": CY - 3.0, "center_x": CX})
    chk = bad.report["quality"]["checks"]["gate_bias"]
    assert not chk["ok"] and chk["center_offset_px"][0] > 1.5  # +y (diluted by the flat background)


@pytest.fixture(scope="module")
def stripes():
    return make_scan()


def test_seed_settings_warn_on_stripe_domains(stripes):
    s = stripes
    seed = run(s["data"], s["labels"], dpc={"gate_mode": "adaptive", "baseline": "rowcol"},
               matched_filter={"softmax_temp": 2.0})
    q = seed.report["quality"]
    assert not q["passed"]
    b = q["checks"]["baseline"]
    assert not b["ok"] and b["removed_variance_fraction"] > 0.8 and "median" in b["message"]
    assert any("'baseline' failed" in w and "rowcol" in w for w in seed.warnings)
    c = q["checks"]["confidence"]
    assert not c["ok"] and c["mean"] > 0.98  # the seed's fixed temperature saturates
    # the defaults (median baseline, automatic temperature) pass on the same scan and recover the field
    d = run(s["data"], s["labels"])
    assert d.report["quality"]["checks"]["baseline"]["ok"]
    assert d.report["quality"]["checks"]["baseline"]["removed_variance_fraction"] < 1e-6  # a constant only
    assert d.report["quality"]["checks"]["confidence"]["ok"]
    assert 0.3 <= d.report["confidence"]["mean"] <= 0.9
    # what the warning is about: with CoM gates on the disk, rowcol erases the field that median keeps
    disk = {"gate_mode": "adaptive", "roi": [0, 9]}
    med = run(s["data"], s["labels"], dpc=dict(disk, baseline="median"))
    rc = run(s["data"], s["labels"], dpc=dict(disk, baseline="rowcol"))
    assert np.corrcoef(-med.ex.ravel(), s["fx"].ravel())[0, 1] > 0.9
    assert np.corrcoef(-rc.ex.ravel(), s["fx"].ravel())[0, 1] < 0.5
    assert not rc.report["quality"]["checks"]["baseline"]["ok"] and med.report["quality"]["checks"]["baseline"]["ok"]


def test_confidence_check_flat_when_temperature_is_huge(stripes):
    s = stripes
    hot = run(s["data"], s["labels"], matched_filter={"softmax_temp": 1e6})
    c = hot.report["quality"]["checks"]["confidence"]
    assert not c["ok"] and "chance" in c["message"]


def test_gate_signal_and_field_ssim_follow_the_data(stripes):
    s = stripes
    good = run(s["data"], s["labels"])
    g = good.report["quality"]["checks"]
    assert g["gate_signal"]["ok"] and min(g["gate_signal"]["signal_captured"].values()) > 0.6
    assert g["field_split_half_ssim"]["ok"]
    assert run(s["data"], s["labels"], dpc={"gate_mode": "union", "roi": [0, 9]}).report["quality"]["checks"][
        "field_split_half_ssim"]["ok"]
    # random labels: templates are noise, gates of the same size hold little of their signal
    rnd = np.random.default_rng(0).integers(0, 3, 24 * 24)
    bad = run(s["data"], rnd)
    b = bad.report["quality"]["checks"]["gate_signal"]
    assert not b["ok"] and max(b["signal_captured"].values()) < 0.5
    cov_good = [v["coverage"] for v in good.report["gate_coverage"].values()]
    cov_bad = [v["coverage"] for v in bad.report["gate_coverage"].values()]
    assert np.allclose(cov_good, cov_bad, atol=0.02)  # the area alone (top_percent) cannot tell them apart
    # no field at all, Poisson noise only: the field maps are noise and the split-half SSIM says so
    flat = make_scan(amp=0.0, smooth=0.0, seed=3)
    disk = {"dpc": {"gate_mode": "union", "roi": [0, 9]}}  # CoM of the disk only (no Friedel-pair asymmetry)
    f = run(flat["data"], flat["labels"], **disk).report["quality"]["checks"]["field_split_half_ssim"]
    assert not f["ok"] and max(f["ssim_ex"], f["ssim_ey"]) < 0.5


def test_sign_of_e_for_a_known_deflection_in_both_unit_systems():
    h = w = 8
    dx = np.where(np.arange(w)[None, :] < w // 2, 0.6, 0.0) * np.ones((h, 1))  # left half deflected towards +x
    lab = (np.arange(h * w) % 2)
    spots = {0: 0, 1: 1}
    data = np.stack([symmetric_frame(spots[c], 0.0, d) for c, d in zip(lab, dx.ravel())]).reshape(h, w, K, K)
    common = {"dpc": {"gate_mode": "union", "baseline": "roi", "baseline_roi": [0, h, w // 2, w]},
              "calibration": {"center_y": CY, "center_x": CX}}
    px = run(data.astype(np.float32), lab, **common)
    left = dx > 0
    assert px.com_x[left].mean() > 0.3  # the CoM follows the deflection
    assert px.ex[left].mean() < -0.3 and abs(px.ex[~left].mean()) < 0.05  # E points against it (electron charge)
    phys = run(data.astype(np.float32), lab, **common,
               physical={"enabled": True, "thickness_nm": 20, "mrad_per_px": 0.5})
    assert phys.ex[left].mean() < 0 and np.corrcoef(phys.ex.ravel(), px.ex.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("cy, cx", [(15.3, 16.2), (7.0, 9.5), (-1.2, 30.7), (20.5, 3.0)])
def test_mirror_bilinear_equals_general_interpolation(cy, cx):
    """The point reflection as four shifted copies equals scipy's bilinear interpolation at the mirrored
    coordinates (zero beyond the detector), for centres on and off the pixel grid and off the detector."""
    from scipy import ndimage

    g = np.random.default_rng(3).random((24, 32))
    yy, xx = np.indices(g.shape, dtype=np.float64)
    ref = ndimage.map_coordinates(g, [2 * cy - yy, 2 * cx - xx], order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(st.mirror_bilinear(g, cy, cx), ref, rtol=0, atol=1e-14)
