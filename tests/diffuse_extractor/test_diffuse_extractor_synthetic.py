"""Planted ground truth: smooth diffuse + Bragg peaks on a two-panel detector."""
from __future__ import annotations

import numpy as np
import pytest

from diffuse_extractor import ExtractionParams, MaskBit, extract_still
from diffuse_extractor.core import masks as mk


@pytest.fixture(scope="module")
def extracted(synthetic_still):
    s = synthetic_still
    # this crystal's partials fall off with sigma_psi = 3e-4 rad: a 0.003 rad window is 10 sigma (the default 0.01 is
    # sized for mosaic crystals, tests/diffuse_extractor/test_masks_dose.py, and would mask 12 % of these pixels)
    return extract_still(s.experiment, s.data, s.reflections,
                         params=ExtractionParams(beamstop="none", bragg_delpsi_max=0.003))


def test_extracted_diffuse_equals_planted_within_1_percent(synthetic_still, extracted):
    s, res = synthetic_still, extracted
    t = res.table
    assert len(res) > 0.9 * sum(d.size for d in s.data)
    for p in range(2):
        sel = t["panel"] == p
        planted = s.diffuse[p][t["y"][sel], t["x"][sel]]
        rel = np.abs(t["intensity"][sel] / planted - 1.0)
        assert sel.sum() > 20000
        assert rel.max() < 0.01, f"panel {p}: worst {rel.max():.3g}"
        assert np.median(rel) < 1e-5  # everything but the far Bragg tails is exact
        # the correction undone really was large and varied
        assert np.ptp(t["correction"][sel]) > 0.05


def test_no_bragg_pixel_leaks(synthetic_still, extracted):
    s, res = synthetic_still, extracted
    n_bragg = 0
    for p in range(2):
        bragg_px = s.bragg[p] > 0.001 * s.data[p]  # Bragg counts above 0.1% of the pixel's value
        n_bragg += int(bragg_px.sum())
        leaked = bragg_px & (res.flags[p] == 0)
        assert not leaked.any(), f"panel {p}: {leaked.sum()} Bragg pixels unmasked"
    assert n_bragg > 100  # peaks were really planted
    # the mask stays local: well under 10% of the pixels
    assert res.info["n_masked_bragg"] < 0.1 * res.info["n_pixels_total"]


def test_sigma_is_counting_noise_through_corrections(synthetic_still):
    s = synthetic_still
    bkg = [0.2 * d for d in s.data]
    res = extract_still(s.experiment, s.data, None,
                        params=ExtractionParams(beamstop="none", gain=2.0, background_scale=0.5,
                                                use_observed_spots=False),
                        background=bkg)
    t = res.table
    raw = t["raw"].astype(np.float64)
    b = 0.5 * 0.2 * raw
    np.testing.assert_allclose(t["background"], b, rtol=1e-5)
    np.testing.assert_allclose(t["intensity"], (raw - b) * t["correction"], rtol=1e-5)
    var = 2.0 * np.maximum(raw, 2.0) + 0.5 * 2.0 * b
    np.testing.assert_allclose(t["sigma"], np.sqrt(var) * t["correction"], rtol=1e-5)
    assert (t["lorentz"] == 1).all()  # stills: no Lorentz factor
    np.testing.assert_allclose(t["correction"], t["polarisation"] * t["efficiency"] * t["solid_angle"] * t["air"],
                               rtol=1e-6)


def test_columns_are_consistent(synthetic_still, extracted):
    t = extracted.table
    e = synthetic_still.experiment
    A = np.asarray(e.crystal.get_A()).reshape(3, 3)
    q = np.stack([t["qx"], t["qy"], t["qz"]]).astype(np.float64)
    np.testing.assert_allclose(A @ np.stack([t["h"], t["k"], t["l"]]).astype(np.float64), q, atol=2e-6)
    np.testing.assert_allclose(t["q"], np.linalg.norm(q, axis=0), rtol=1e-5)
    # |s1| = |s0|: q + s0 lies on the Ewald sphere
    s0 = np.asarray(e.beam.get_s0())
    np.testing.assert_allclose(np.linalg.norm(q + s0[:, None], axis=0), 1.0 / e.beam.get_wavelength(), rtol=1e-6)
    # flags and table agree: every table pixel is unflagged
    for p in range(2):
        sel = t["panel"] == p
        assert (extracted.flags[p][t["y"][sel], t["x"][sel]] == 0).all()
        assert sel.sum() == (extracted.flags[p] == 0).sum()


def test_dials_prediction_path_matches_dials_for_ub(synthetic_still):
    from dials.algorithms.spot_prediction import StillsReflectionPredictor
    from dials.array_family import flex  # noqa: F401 (registers the table converter)

    e = synthetic_still.experiment
    ref = StillsReflectionPredictor(e).for_ub(e.crystal.get_A())
    _, x, y, hkl = mk.predict_reflections(e)
    assert len(ref) >= 3
    assert set(map(tuple, hkl.tolist())) == set(map(tuple, np.asarray(ref["miller_index"].as_vec3_double(), int).tolist()))


def test_user_shapes_and_overloads(synthetic_still):
    s = synthetic_still
    data = [d.copy() for d in s.data]
    data[1][10, 20] = 2.0e6  # above the trusted maximum (1e6)
    data[0][5, 5] = -3  # below the trusted minimum
    shapes = [mk.Shape.parse("circle:0:100.5,30.5,6"), mk.Shape.parse("polygon:1:50,50,70,50,70,60,50,60")]
    res = extract_still(s.experiment, data, None, params=ExtractionParams(beamstop="none", mask_shapes=shapes))
    f0, f1 = res.flags
    assert f1[10, 20] & MaskBit.OVERLOAD and f0[5, 5] & MaskBit.UNTRUSTED
    yy, xx = np.mgrid[0:160, 0:160]
    inside_c = (xx + 0.5 - 100.5) ** 2 + (yy + 0.5 - 30.5) ** 2 < 6 ** 2 - 1
    assert (f0[inside_c] & MaskBit.USER).all()
    assert not (f0[(xx + 0.5 - 100.5) ** 2 + (yy + 0.5 - 30.5) ** 2 > 7.5 ** 2] & MaskBit.USER).any()
    assert (f1[51:59, 51:69] & MaskBit.USER).all() and not (f1[:45] & MaskBit.USER).any()
    with pytest.raises(ValueError):
        mk.Shape.parse("circle:0:1,2")


def test_beamstop_and_arm_autodetected(synthetic_still):
    s = synthetic_still
    e = s.experiment
    bx, by = e.detector[0].get_beam_centre_px(e.beam.get_s0())
    yy, xx = np.mgrid[0:160, 0:160] + 0.5
    disk = (xx - bx) ** 2 + (yy - by) ** 2 < 12 ** 2
    arm = (np.abs(xx - bx) < 4) & (yy > by)  # arm from the stop to the bottom edge
    trans = np.ones((160, 160))
    trans[arm] = 0.75
    trans[disk] = 0.03
    data = [s.data[0] * trans, s.data[1]]
    res = extract_still(e, data, None, params=ExtractionParams(beamstop="auto", use_observed_spots=False))
    bs = (res.flags[0] & MaskBit.BEAMSTOP) != 0
    assert bs[disk].all() and bs[arm].all()
    far = np.hypot(xx - bx, yy - by) > 20
    far &= ~(np.abs(xx - bx) < 15)
    assert bs[far].mean() < 0.05  # stays local
    assert res.info["beamstop_arm_azimuth_deg"] is not None
    assert not ((res.flags[1] & MaskBit.BEAMSTOP) != 0).any()


def test_hot_and_dead_pixels_from_run_statistics(synthetic_still):
    s = synthetic_still
    det = s.experiment.detector
    stats = mk.RunPixelStatistics(det)
    rng = np.random.default_rng(5)
    for k in range(5):
        frame = [rng.poisson(np.clip(d, 0, None) * 0 + 30.0).astype(float) for d in s.data]
        # a Bragg-like bright blob that moves between stills must not become "hot"
        frame[0][20 + 10 * k, 100] = 5000.0
        frame[0][77, 33] = 900.0  # hot in every still
        frame[1][12, 140] = 0.0  # dead
        flags = mk.untrusted_and_overload(det, frame)
        stats.add(frame, flags)
    hd = stats.hot_dead_flags()
    assert hd[0][77, 33] & MaskBit.HOT and hd[1][12, 140] & MaskBit.DEAD
    assert int((hd[0] != 0).sum() + (hd[1] != 0).sum()) == 2


def test_unpredicted_bright_spot_is_masked_as_outlier(synthetic_still):
    s = synthetic_still
    data = [d.copy() for d in s.data]
    yy, xx = np.mgrid[0:160, 0:160]
    spot = 400.0 * np.exp(-((xx + 0.5 - 120.0) ** 2 + (yy + 0.5 - 130.0) ** 2) / 2.0)
    data[0] = data[0] + spot  # e.g. a second lattice's reflection: neither predicted nor in the table
    on = extract_still(s.experiment, data, s.reflections, params=ExtractionParams(beamstop="none"))
    off = extract_still(s.experiment, data, s.reflections,
                        params=ExtractionParams(beamstop="none", outlier_nsigma=None))
    core = spot > 0.2 * s.data[0]  # where the spot clearly dominates
    assert core.sum() >= 5
    assert (on.flags[0][core] & MaskBit.BRAGG).all()
    assert not (off.flags[0][core] & MaskBit.BRAGG).any()
    # the pixels that stand above both their shell and their own neighbourhood; disks grown around them cover the core
    assert on.info["n_outlier_pixels"] >= 1
    # the smooth planted diffuse itself raises no outliers elsewhere
    clean = extract_still(s.experiment, s.data, s.reflections, params=ExtractionParams(beamstop="none"))
    assert clean.info["n_outlier_pixels"] == 0
