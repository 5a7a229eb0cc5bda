"""The independent stills generator: CBFs that dxtbx reads with the spec's geometry, rendered diffuse equal to the
reciprocal-space truth times nanoBragg's polarisation and solid angle (evaluated here from the geometry dxtbx
reads back), photon levels as documented, reproducible from the seed."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

import dxtbx  # DIALS/dxtbx are part of the platform (make setup installs them): a missing one is a failure

from diff_sim_refiner.datasets.cbf import CBFHeader, write_minicbf  # noqa: E402
from diff_sim_refiner.datasets.stills import (  # noqa: E402
    DiffuseTruth, StillsRenderer, StillsSpec, _orientations, air_mu_per_mm, diffuse_truth, dose_pair,
    gap_mask, generate_stills, truth_on_voxels)

SMALL = StillsSpec(n_stills=1, n_background_frames=1, modules=(1, 2), seed=7)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One still and one background frame at the default (2 x 3 module) geometry."""
    out = tmp_path_factory.mktemp("stills")
    spec = StillsSpec(n_stills=1, n_background_frames=1)
    r = StillsRenderer(spec)
    return out, spec, generate_stills(out, spec, renderer=r), r


def test_cbf_geometry_and_values_read_back_with_dxtbx(full_run):
    out, spec, truth, r = full_run
    img = dxtbx.load(str(out / "still_0001.cbf"))
    det, beam, scan = img.get_detector(), img.get_beam(), img.get_scan()
    panel = det[0]
    assert len(det) == 1
    assert panel.get_image_size() == (981, 619)
    assert panel.get_pixel_size() == pytest.approx((0.172, 0.172))
    assert panel.get_distance() == pytest.approx(150.0)
    assert beam.get_wavelength() == pytest.approx(1.0)
    bc = panel.get_beam_centre_px(beam.get_s0())
    assert bc == pytest.approx(spec.beam_xy_px, abs=1e-6)
    assert abs(bc[0] - 981 / 2) > 20 and abs(bc[1] - 619 / 2) > 20        # off the array centre
    assert panel.get_origin() == pytest.approx(truth["detector_origin_mm"])
    assert scan.get_oscillation() == pytest.approx((0.0, 0.0))             # a still: Angle_increment 0
    assert scan.get_exposure_times()[0] == pytest.approx(spec.exposure_s)
    assert beam.get_transmission() == pytest.approx(1.0)
    assert panel.get_thickness() == 0.0                                    # no sensor: no QE / parallax
    data = img.get_raw_data().as_numpy_array()
    gaps = gap_mask(spec)
    assert gaps.sum() == 981 * 619 - 6 * 487 * 195
    assert np.all(data[gaps] == -1)
    assert data[~gaps].min() >= 0
    # the counts are Poisson draws of the stated expectation: totals agree to a few sigma
    A = np.asarray(truth["stills"][0]["A"])
    expected = truth["stills"][0]["scale"] * (r.diffuse(A) + r.bragg(A)) + r.background
    n_exp = expected[~gaps].sum()
    assert abs(data[~gaps].sum() - n_exp) < 5 * math.sqrt(n_exp)
    weak = ~gaps & (expected < 20)
    # per-pixel: mean of (counts - expected) over weak pixels ~ 0, variance ~ expected (Poisson)
    resid = data[weak] - expected[weak]
    assert abs(resid.mean()) < 5 * math.sqrt(expected[weak].mean() / weak.sum())
    assert np.var(resid) == pytest.approx(expected[weak].mean(), rel=0.03)
    bkg = dxtbx.load(str(out / "bkg_0001.cbf")).get_raw_data().as_numpy_array()
    assert np.all(bkg[gaps] == -1)
    assert abs(bkg[~gaps].sum() - r.background[~gaps].sum()) < 5 * math.sqrt(r.background[~gaps].sum())
    assert json.loads((out / "truth.json").read_text())["background_frames"] == ["bkg_0001.cbf"]


def test_byte_offset_round_trip_of_extreme_values(tmp_path):
    rng = np.random.default_rng(3)
    a = rng.integers(-1, 2, size=(195, 487))            # one PILATUS module
    a[0, :6] = [1_000_000, -1, 40_000, 0, 127, -128]
    a[5, 5:9] = [32_767, -1, 32_768, 70_000]
    path = write_minicbf(tmp_path / "x_0001.cbf", a, CBFHeader(0.172, 100.0, 1.0, (20.0, 25.0)))
    back = dxtbx.load(str(path)).get_raw_data().as_numpy_array()
    assert np.array_equal(back, a)


def _nanobragg_factors(panel, beam, f, s, kahn):
    """Polarisation (nanoBragg's 0.5 (1 + cos^2 2t - K cos 2psi sin^2 2t), E-vector along x) and pixel solid
    angle over the reference pixel's (A cos(obliquity) / r^2 over A / d^2), from dxtbx's pixel positions."""
    pos = np.array([panel.get_pixel_lab_coord((fi + 0.5, si + 0.5)) for fi, si in zip(f, s)])
    r = np.linalg.norm(pos, axis=1)
    u = pos / r[:, None]
    inc = -np.asarray(beam.get_s0()) / np.linalg.norm(beam.get_s0())      # unit propagation direction
    c2t = u @ inc
    Bv = np.cross([1.0, 0.0, 0.0], inc)
    Bv /= np.linalg.norm(Bv)
    E = np.cross(inc, Bv)
    e, b = u @ E, u @ Bv
    cos2psi = (e * e - b * b) / (e * e + b * b)
    pol = 0.5 * (1 + c2t ** 2 - kahn * cos2psi * (1 - c2t ** 2))
    d = panel.get_distance()
    omega_rel = (d / r) ** 2 * (np.abs(pos @ np.asarray(panel.get_normal())) / r)
    q = u / beam.get_wavelength() - np.asarray(beam.get_s0())              # 1/A, |q| = 1/d
    return pol, omega_rel, q, r


def test_rendered_diffuse_equals_truth_times_polarisation_and_solid_angle(tmp_path):
    spec = replace(SMALL, air_path_fraction=0.0, n_stills=0)            # only the geometry and the truth on disk
    r = StillsRenderer(spec)
    generate_stills(tmp_path, spec, renderer=r)
    img = dxtbx.load(str(tmp_path / "bkg_0001.cbf"))
    panel, beam = img.get_detector()[0], img.get_beam()
    U, scales = _orientations(replace(spec, n_stills=1))
    A = U[0] @ r.B
    diffuse = r.diffuse(A)
    rng = np.random.default_rng(0)
    nf, ns = spec.image_size
    f, s = rng.integers(0, nf, 400), rng.integers(0, ns, 400)
    pol, omega_rel, q, _ = _nanobragg_factors(panel, beam, f, s, 2 * spec.polarization_fraction - 1)
    hkl = q @ np.linalg.inv(A).T
    frac = np.abs(hkl - np.round(hkl))
    ok = (frac.max(1) < 0.47) & ~gap_mask(spec)[s, f]                      # away from nanoBragg's cell faces
    T = diffuse_truth(hkl[:, 0], hkl[:, 1], hkl[:, 2], tmp_path)           # loaded back from disk
    assert ok.sum() > 300 and np.count_nonzero(T[ok] > 1.0) > 20
    np.testing.assert_allclose(diffuse[s, f][ok], T[ok] * pol[ok] * omega_rel[ok], rtol=1e-4, atol=1e-9)   # float32 render
    # an ideal extraction of the noise-free still (background subtracted, corrections divided out, unscaled)
    # gives T wherever the Bragg term vanishes
    bragg = r.bragg(A)
    scale = scales[0]
    expected = scale * (diffuse + bragg) + r.background
    clean = ok & (bragg[s, f] == 0)
    ideal = (expected[s, f] - r.background[s, f]) / (pol * omega_rel) / scale
    np.testing.assert_allclose(ideal[clean], T[clean], rtol=1e-4, atol=1e-9)   # float32 render
    # the polarisation really varies over the detector (K ~ 1, E along x) and the solid angle too
    assert pol[ok].max() - pol[ok].min() > 0.05 and omega_rel[ok].min() < 0.97


def test_air_attenuation_is_nist_and_applied(tmp_path):
    # NIST XCOM / Hubbell & Seltzer: dry air mu/rho = 5.120 cm^2/g at 10 keV (1.23984 A), density 1.20479e-3
    assert air_mu_per_mm(1.23984) == pytest.approx(5.120 * 1.20479e-3 / 10, rel=0.03)
    tiny = replace(SMALL, modules=(1, 1))
    with_air = StillsRenderer(tiny)
    vacuum = StillsRenderer(replace(tiny, air_path_fraction=0.0))
    pos = with_air.pos_mm
    ratio = with_air.background / vacuum.background
    np.testing.assert_allclose(ratio, np.exp(-air_mu_per_mm(1.0) * np.linalg.norm(pos, axis=-1)), rtol=1e-12)


def test_photon_levels_at_dose_1(full_run):
    """Diffuse ~2-4 photons per pixel, background ~2-4 (the brief's levels), Bragg spots far above both."""
    _, spec, _, r = full_run
    U, scales = _orientations(replace(spec, n_stills=2))
    good = ~r.gaps
    bkg = r.background[good].mean()
    assert 2.0 <= bkg <= 4.0, bkg
    for U_i, sc in zip(U, scales):
        A = U_i @ r.B
        d = r.diffuse(A)                                   # unit scale
        assert 2.0 <= d[good].mean() <= 4.0, d[good].mean()
        b = r.bragg(A)
        base = d + r.background
        strong = b > 10 * base
        assert strong.sum() >= 100 and b.max() > 1000, (strong.sum(), b.max())
        assert ndimage.label(strong)[1] >= 40               # separate spots for indexing


def test_same_seed_same_files_and_dose_pair(tmp_path):
    """Same spec -> byte-identical files; the dose pair shares orientations and scales, counts scale by 16."""
    a = generate_stills(tmp_path / "a", SMALL)
    high, low = dose_pair(tmp_path / "pair", SMALL, factor=16.0)       # its own renderer; "high" = SMALL itself
    for name in ("still_0001.cbf", "bkg_0001.cbf", "structure_factors.npz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "pair" / "high" / name).read_bytes()
    assert a["stills"] == high["stills"]
    assert high["stills"][0]["A"] == low["stills"][0]["A"] and high["stills"][0]["scale"] == low["stills"][0]["scale"]
    assert low["diffuse_truth"]["peak_photons"] == pytest.approx(high["diffuse_truth"]["peak_photons"] / 16)
    hi = dxtbx.load(str(tmp_path / "pair" / "high" / "still_0001.cbf")).get_raw_data().as_numpy_array()
    lo = dxtbx.load(str(tmp_path / "pair" / "low" / "still_0001.cbf")).get_raw_data().as_numpy_array()
    good = hi >= 0
    assert hi[good].sum() / lo[good].sum() == pytest.approx(16.0, rel=0.03)


def test_voxel_truth_averages_the_point_truth(tmp_path):
    generate_stills(tmp_path, replace(SMALL, n_stills=0, n_background_frames=0))
    t = DiffuseTruth.load(tmp_path)
    centres = np.array([[1.0, 2.0, 3.0], [2.0, 1.0, -4.0], [3.0, -2.0, 5.0], [0.0, 4.0, 2.0]])
    ndiv = 3
    assert np.allclose(truth_on_voxels(centres, ndiv, tmp_path, sub=1), t(*centres.T))
    # a fine midpoint rule (15^3) agrees with the 3^3 default to a few percent on these halo-centred voxels
    fine = t.on_voxels(centres, ndiv, sub=15)
    coarse = t.on_voxels(centres, ndiv)
    assert np.all(fine > 0)
    np.testing.assert_allclose(coarse, fine, rtol=0.05)
    # the halo centre is the peak: a voxel-mean is below the point value there
    assert np.all(fine < t(*centres.T))
