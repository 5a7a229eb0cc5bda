"""Pixel geometry and corrections against dxtbx, DIALS and analytic formulas."""
from __future__ import annotations

import numpy as np
import pytest

from diffuse_extractor import synthetic
from diffuse_extractor.core import corrections as corr
from diffuse_extractor.core import geometry as geo
from diffuse_extractor.core.extract import ExtractionParams, static_pixels


def _sample_pixels(panel, n=400, seed=0):
    rng = np.random.default_rng(seed)
    nx, ny = panel.get_image_size()
    return rng.integers(0, nx, n), rng.integers(0, ny, n)


@pytest.mark.parametrize("parallax", [True, False])
def test_pixel_lab_coords_match_dxtbx_multi_panel(parallax):
    det = synthetic.make_detector(parallax=parallax)
    for i, panel in enumerate(det):
        g = geo.panel_geometry(panel, i)
        xs, ys = _sample_pixels(panel)
        ref = np.array([panel.get_pixel_lab_coord((x + 0.5, y + 0.5)) for x, y in zip(xs, ys)])
        mine = np.stack([g.lab_x[ys, xs], g.lab_y[ys, xs], g.lab_z[ys, xs]], 1)
        assert np.abs(mine - ref).max() < 1e-9  # mm


def test_pilatus_parallax_geometry_matches_dxtbx(thaumatin_cbfs):
    import dxtbx

    panel = dxtbx.load(str(thaumatin_cbfs[0])).get_detector()[0]
    assert "Parallax" in type(panel.get_px_mm_strategy()).__name__
    xs, ys = _sample_pixels(panel, 300, seed=1)
    xm, ym = geo.pixel_mm(panel, xs + 0.5, ys + 0.5)
    ref = np.array([panel.get_pixel_lab_coord((x + 0.5, y + 0.5)) for x, y in zip(xs, ys)])
    f, s, o = (np.asarray(v) for v in (panel.get_fast_axis(), panel.get_slow_axis(), panel.get_origin()))
    mine = o + xm[:, None] * f + ym[:, None] * s
    assert np.abs(mine - ref).max() < 1e-9
    # and the parallax shift is real (tens of microns at the corners), so the test has teeth
    plain = o + ((xs + 0.5) * 0.172)[:, None] * f + ((ys + 0.5) * 0.172)[:, None] * s
    assert np.abs(plain - ref).max() > 0.01


def _dials_lp_qe(experiment_beam, det, s1, panels):
    from dials.algorithms.integration import Corrections, CorrectionsMulti
    from dials.array_family import flex
    from dxtbx import flumpy

    multi = CorrectionsMulti()
    multi.append(Corrections(experiment_beam, det))
    s1f = flumpy.vec_from_numpy(np.ascontiguousarray(s1))
    ids = flex.int(len(s1f), 0)
    return (np.asarray(multi.lp(ids, s1f)),
            np.asarray(multi.qe(ids, s1f, flex.size_t(panels.astype(np.uint64).tolist()))))


@pytest.mark.parametrize("pol_fraction", [0.999, 0.5, 0.8])
def test_polarisation_and_efficiency_match_dials(pol_fraction):
    det = synthetic.make_detector()
    beam = synthetic._beam(1.0, pol_fraction)
    pix = static_pixels(det, beam, ExtractionParams())
    for i, pp in enumerate(pix):
        sel = np.arange(0, pp.u.shape[1], 37)
        g = pp.geom
        lab = np.stack([g.lab_x.ravel()[sel], g.lab_y.ravel()[sel], g.lab_z.ravel()[sel]], 1)
        s1 = lab / np.linalg.norm(lab, axis=1)[:, None] / beam.get_wavelength()
        lp, qe = _dials_lp_qe(beam, det, s1, np.full(len(sel), i))
        np.testing.assert_allclose(pp.polarisation[sel], lp, rtol=1e-6)
        np.testing.assert_allclose(pp.efficiency[sel], 1.0 / qe, rtol=1e-6)
        assert np.ptp(lp) > 0.01 and np.ptp(qe) > 0.001  # non-trivial variation


def test_corrections_match_dials_on_pilatus(thaumatin_cbfs):
    import dxtbx

    img = dxtbx.load(str(thaumatin_cbfs[0]))
    det, beam = img.get_detector(), img.get_beam()
    g = geo.panel_geometry(det[0])
    rng = np.random.default_rng(2)
    idx = rng.integers(0, g.dist.size, 2000)
    u = np.stack([g.lab_x.ravel()[idx], g.lab_y.ravel()[idx], g.lab_z.ravel()[idx]], 1) / g.dist.ravel()[idx, None]
    s1 = u / beam.get_wavelength()
    lp, qe = _dials_lp_qe(beam, det, s1, np.zeros(len(idx), int))
    mine_p = corr.polarisation_correction(s1[:, 0], s1[:, 1], s1[:, 2], beam.get_s0(),
                                          beam.get_polarization_normal(), beam.get_polarization_fraction())
    mine_q = corr.detector_efficiency(g.cos_obliquity.ravel()[idx], det[0].get_mu(), det[0].get_thickness())
    np.testing.assert_allclose(mine_p, lp, rtol=1e-6)
    np.testing.assert_allclose(mine_q, qe, rtol=1e-6)


def _triangle_solid_angle(r1, r2, r3):
    """Van Oosterom & Strackee (1983): solid angle of a flat triangle seen from the origin."""
    n1, n2, n3 = (np.linalg.norm(r, axis=-1) for r in (r1, r2, r3))
    num = np.abs(np.einsum("ij,ij->i", r1, np.cross(r2, r3)))
    den = n1 * n2 * n3 + np.einsum("ij,ij->i", r1, r2) * n3 + np.einsum("ij,ij->i", r1, r3) * n2 \
        + np.einsum("ij,ij->i", r2, r3) * n1
    return 2.0 * np.arctan2(num, den)


def test_solid_angle_matches_analytic_flat_detector():
    det = synthetic.make_detector(parallax=False)
    for i, panel in enumerate(det):
        g = geo.panel_geometry(panel, i)
        omega = corr.solid_angle(g.pixel_area, g.dist, g.cos_obliquity)
        # analytic flat-panel formula: Omega = A d / r^3 with d the sample-to-plane distance
        d = abs(float(np.dot(panel.get_normal(), panel.get_origin())))
        np.testing.assert_allclose(omega, g.pixel_area * d / g.dist ** 3, rtol=1e-12)
        # exact solid angle of the pixel rectangle (two triangles) from dxtbx corner positions
        xs, ys = _sample_pixels(panel, 200, seed=3)
        c = [np.array([panel.get_pixel_lab_coord((float(x + dx), float(y + dy))) for x, y in zip(xs, ys)])
             for dx, dy in ((0, 0), (1, 0), (1, 1), (0, 1))]
        exact = _triangle_solid_angle(c[0], c[1], c[2]) + _triangle_solid_angle(c[0], c[2], c[3])
        np.testing.assert_allclose(omega[ys, xs], exact, rtol=2e-5)
    # the tilted panel really is oblique
    g1 = geo.panel_geometry(det[1], 1)
    assert g1.cos_obliquity.max() < 0.9


@pytest.mark.parametrize("kev,nist", [(10.0, 5.120), (15.0, 1.614), (20.0, 0.7779)])
def test_air_attenuation_matches_nist_dry_air(kev, nist):
    """NIST X-ray mass attenuation coefficients, 'Air, Dry (near sea level)', mu/rho in cm^2/g."""
    wl = 12.398419843 / kev
    mu_rho = corr.air_attenuation_coefficient(wl) * 10.0 / corr.DRY_AIR_DENSITY_G_CM3
    assert mu_rho == pytest.approx(nist, rel=0.03)


def test_q_and_hkl_conventions():
    expt = synthetic.make_experiment()
    A = np.asarray(expt.crystal.get_A()).reshape(3, 3)
    hkl = np.array([[1, 2, 3], [-4, 0, 5], [2, -3, -1]], dtype=float).T
    q = A @ hkl
    h, k, l = geo.fractional_hkl(q[0], q[1], q[2], A)
    np.testing.assert_allclose(np.stack([h, k, l]), hkl, atol=1e-12)
    # |q| = 1/d for a reflection
    uc = expt.crystal.get_unit_cell()
    np.testing.assert_allclose(np.linalg.norm(q, axis=0), [1 / uc.d(tuple(map(int, c))) for c in hkl.T], rtol=1e-10)


def test_rotation_data_lorentz_polarisation_match_dials():
    """Rotation frames (scan width > 0): L/P equals DIALS' Corrections(beam, goniometer, detector).lp."""
    from dials.algorithms.integration import Corrections
    from dxtbx.model import Experiment, GoniometerFactory, ScanFactory

    from diffuse_extractor.core.extract import lab_setting_matrix, rotation_goniometer

    det = synthetic.make_detector()
    beam = synthetic._beam(1.0, 0.95)
    gonio = GoniometerFactory.known_axis((1.0, 0.0, 0.0))
    scan = ScanFactory.make_scan((1, 10), 0.1, (0.0, 0.5), list(range(10)))
    e = Experiment(beam=beam, detector=det, goniometer=gonio, scan=scan, crystal=synthetic.make_crystal())
    assert rotation_goniometer(e) is gonio
    pix = static_pixels(det, beam, ExtractionParams(), gonio)
    ref = Corrections(beam, gonio, det)
    for pp in pix:
        sel = np.arange(0, pp.u.shape[1], 97)
        s1 = pp.geom
        lab = np.stack([s1.lab_x.ravel()[sel], s1.lab_y.ravel()[sel], s1.lab_z.ravel()[sel]], 1)
        lab /= np.linalg.norm(lab, axis=1)[:, None]
        dials_lp = np.array([ref.lp(tuple(v)) for v in lab])
        np.testing.assert_allclose(pp.lorentz[sel] * pp.polarisation[sel], dials_lp, rtol=1e-6)
        assert np.ptp(pp.lorentz[sel]) > 0.05
    # the frame's setting matrix is the crystal's A rotated to the frame's mid-angle (image 3: 1.75 deg)
    A = np.asarray(e.crystal.get_A()).reshape(3, 3)
    t = np.radians(1.75)
    R = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    np.testing.assert_allclose(lab_setting_matrix(e, 3), R @ A, atol=1e-12)
    # stills: no goniometer rotation, A unchanged
    e.scan = ScanFactory.make_scan((1, 1), 0.1, (0.0, 0.0), [0])
    assert rotation_goniometer(e) is None
    np.testing.assert_allclose(lab_setting_matrix(e, 0), A)
