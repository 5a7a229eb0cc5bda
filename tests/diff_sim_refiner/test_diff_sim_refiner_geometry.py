"""Detector geometry: pixel lab positions and scattering vectors against dxtbx's own detector and beam
models (DIALS convention), and nanoBragg's pivot / beam-centre conventions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diff_sim_refiner.core.config import BeamConfig, CrystalConfig, DetectorConfig
from diff_sim_refiner.core.geometry import detector_geometry
from diff_sim_refiner.core.simulator import pixel_positions_and_q, prepare

dxtbx_model = pytest.importorskip("dxtbx.model")

F64 = torch.float64
# nanoBragg's "DIALS" frame is DIALS's laboratory frame turned 180 degrees about x (beam +z instead of -z)
TO_DIALS = np.diag([1.0, -1.0, -1.0])


def _pixels(fp: int, sp: int, step: int = 7):
    s, f = np.meshgrid(np.arange(0, sp, step), np.arange(0, fp, step), indexing="ij")
    return torch.as_tensor(f.ravel()), torch.as_tensor(s.ravel())


def _ours(det: DetectorConfig, lam: float):
    p = prepare(CrystalConfig(default_F=1.0), det, BeamConfig(wavelength_A=lam), dtype=F64)
    f, s = _pixels(det.fpixels, det.spixels)
    pos, q = pixel_positions_and_q(p, f, s)
    return p, f.numpy(), s.numpy(), pos[:, 0].numpy() * 1e3, q[:, 0].numpy()


@pytest.mark.parametrize("orgx,orgy,dist,lam", [(64.5, 40.25, 120.0, 1.0), (10.0, 90.0, 250.0, 0.9768)])
def test_dials_convention_matches_dxtbx_simple_detector(orgx, orgy, dist, lam):
    """-dials -ORGX -ORGY -distance: every pixel centre and q equals dxtbx's DetectorFactory.simple + BeamFactory."""
    px = 0.172
    det = DetectorConfig(detector_convention="DIALS", pixel_size_mm=px, fpixels=97, spixels=83, distance_mm=dist,
                         beam_center_f=(orgx - 0.5) * px, beam_center_s=(orgy - 0.5) * px)
    _, f, s, pos_mm, q = _ours(det, lam)
    d = dxtbx_model.DetectorFactory.simple("PAD", dist, ((orgx - 0.5) * px, (orgy - 0.5) * px), "+x", "-y",
                                           (px, px), (97, 83))
    beam = dxtbx_model.BeamFactory.simple(lam)
    panel = d[0]
    s0 = np.array(beam.get_s0())
    for i in range(len(f)):
        lab = np.array(panel.get_pixel_lab_coord((f[i] + 0.5, s[i] + 0.5)))
        np.testing.assert_allclose(TO_DIALS @ pos_mm[i], lab, atol=1e-9)
        s1 = lab / np.linalg.norm(lab) / beam.get_wavelength()
        np.testing.assert_allclose(TO_DIALS @ q[i], s1 - s0, atol=1e-12)
    # beam centre reported by dxtbx on our detector = where our direct beam lands
    bc = panel.get_beam_centre(beam.get_s0())
    np.testing.assert_allclose(bc, ((orgx - 0.5) * px, (orgy - 0.5) * px), atol=1e-9)


def test_rotated_detector_matches_dxtbx_panel_built_from_our_vectors():
    """With rotx/roty/rotz and two-theta, dxtbx's panel from our fdet/sdet/pix0 gives the same pixels and q."""
    px = 0.1
    det = DetectorConfig(detector_convention="DIALS", pixel_size_mm=px, fpixels=64, spixels=48, distance_mm=150.0,
                         detector_rotx_deg=3.0, detector_roty_deg=-4.0, detector_rotz_deg=12.0,
                         detector_twotheta_deg=15.0)
    p, f, s, pos_mm, q = _ours(det, 1.3)
    g = p.geom
    fast = TO_DIALS @ g.fdet.numpy()
    slow = TO_DIALS @ g.sdet.numpy()
    origin = TO_DIALS @ (g.pix0.numpy() * 1e3)
    panel = dxtbx_model.Panel()
    panel.set_frame(tuple(fast), tuple(slow), tuple(origin))
    panel.set_pixel_size((px, px))
    panel.set_image_size((64, 48))
    beam = dxtbx_model.BeamFactory.simple(1.3)
    s0 = np.array(beam.get_s0())
    for i in range(len(f)):
        lab = np.array(panel.get_pixel_lab_coord((f[i] + 0.5, s[i] + 0.5)))
        np.testing.assert_allclose(TO_DIALS @ pos_mm[i], lab, atol=1e-9)
        np.testing.assert_allclose(TO_DIALS @ q[i], lab / np.linalg.norm(lab) / 1.3 - s0, atol=1e-12)


@pytest.mark.parametrize("conv", ["MOSFLM", "DENZO", "ADXV", "XDS", "DIALS", "CUSTOM"])
def test_direct_beam_lands_where_each_convention_says(conv):
    """The direct beam hits the detector at the convention's beam centre (nanoBragg's offsets included)."""
    px = 0.1
    fp, sp = 200, 150
    bf, bs = 7.3, 11.9
    det = DetectorConfig(detector_convention=conv, pixel_size_mm=px, fpixels=fp, spixels=sp, distance_mm=80.0,
                         beam_center_f=bf, beam_center_s=bs)
    g = detector_geometry(det)
    t = g.close_distance / torch.dot(g.beam, g.odet)
    hit = t * g.beam - g.pix0
    F = float(torch.dot(hit, g.fdet)) * 1e3
    S = float(torch.dot(hit, g.sdet)) * 1e3
    expected = {"MOSFLM": (bf + px / 2, bs + px / 2), "DENZO": (bf, bs), "ADXV": (bf, sp * px - bs),
                "XDS": (bf, bs), "DIALS": (bf, bs), "CUSTOM": (bf, bs)}[conv]
    assert F == pytest.approx(expected[0], abs=1e-9)
    assert S == pytest.approx(expected[1], abs=1e-9)
    assert float(g.close_distance) == pytest.approx(0.080, abs=1e-12)


def test_beam_pivot_keeps_the_beam_spot_and_sample_pivot_keeps_the_closest_point():
    base = dict(pixel_size_mm=0.1, fpixels=100, spixels=100, distance_mm=100.0, beam_center_f=4.0, beam_center_s=6.0,
                detector_rotx_deg=5.0, detector_roty_deg=-7.0, detector_rotz_deg=20.0, detector_twotheta_deg=0.0)
    gb = detector_geometry(DetectorConfig(detector_convention="CUSTOM", detector_pivot="BEAM", **base))
    assert float(gb.Fbeam) == pytest.approx(4.0e-3, abs=1e-12)
    assert float(gb.Sbeam) == pytest.approx(6.0e-3, abs=1e-12)
    assert float(gb.distance) == pytest.approx(0.1, abs=1e-12)
    gs = detector_geometry(DetectorConfig(detector_convention="CUSTOM", detector_pivot="SAMPLE", **base))
    assert float(gs.Fclose) == pytest.approx(4.0e-3, abs=1e-12)
    assert float(gs.Sclose) == pytest.approx(6.0e-3, abs=1e-12)
    # axes stay orthonormal and right-handed after all rotations
    for g in (gb, gs):
        M = torch.stack([g.fdet, g.sdet, g.odet])
        assert torch.allclose(M @ M.T, torch.eye(3, dtype=F64), atol=1e-12)


def test_twotheta_swings_detector_about_its_axis():
    """XDS two-theta 30 deg about +x: the detector normal turns by 30 deg, the closest distance is kept."""
    g = detector_geometry(DetectorConfig(detector_convention="XDS", fpixels=100, spixels=100,
                                         detector_twotheta_deg=30.0, distance_mm=100.0))
    ang = math.degrees(math.acos(float(torch.dot(g.odet, torch.tensor([0.0, 0.0, 1.0], dtype=F64)))))
    assert ang == pytest.approx(30.0, abs=1e-9)
    assert float(g.close_distance) == pytest.approx(0.1, abs=1e-12)
    assert float(g.Fclose) == pytest.approx(5e-3, abs=1e-12)
