"""Core pieces against independent references: nanoBragg's RNG, mosaic domains, crystal shapes and
polarisation (a direct numpy transcription of nanoBragg's per-pixel formulas), tricubic interpolation
(planted polynomial), file formats (A.mat, HKL + cache, Fdump, SMV, raw float)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diff_sim_refiner.core import io as nbio
from diff_sim_refiner.core.config import BeamConfig, CrystalConfig, DetectorConfig
from diff_sim_refiner.core.geometry import detector_geometry, lattice_vectors, mosaic_matrices
from diff_sim_refiner.core.physics import FTable
from diff_sim_refiner.core.rng import Ran1, mosaic_domain_axes
from diff_sim_refiner.core.simulator import prepare, simulate

F64 = torch.float64
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nanobragg"
need_data = pytest.mark.skipif(not (DATA / "A.mat").is_file(), reason=f"nanoBragg example data not found at {DATA}")


# ----------------------------------------------------------------------------- random numbers
def test_ran1_core_is_the_minimal_standard_generator():
    """Park & Miller's check value: 10000 steps from 1 give 1043618065."""
    r = Ran1(1)
    r.idum = 1
    for _ in range(10000):
        r._step()
    assert r.idum == 1043618065


def test_ran1_deviates_are_single_precision_uniforms_and_seeded():
    a = [Ran1.from_seed(42)() for _ in range(1)]
    r1, r2 = Ran1.from_seed(42), Ran1.from_seed(42)
    x = np.array([r1() for _ in range(5000)])
    y = np.array([r2() for _ in range(5000)])
    assert np.array_equal(x, y) and x[0] == a[0]
    assert np.array_equal(x.astype(np.float32).astype(np.float64), x)  # float32 values, as nanoBragg's float ran1
    assert 0.0 < x.min() and x.max() < 1.0
    assert abs(x.mean() - 0.5) < 0.02 and abs(x.var() - 1 / 12) < 0.01
    z = np.array([Ran1.from_seed(43)() for _ in range(3)])
    assert not np.array_equal(z, x[:3])


def test_mosaic_domains_are_rotations_within_the_spread():
    cfg = CrystalConfig(mosaic_spread_deg=2.0, mosaic_domains=50, mosaic_seed=7)
    U = mosaic_matrices(cfg)
    assert U.shape == (50, 3, 3)
    assert torch.equal(U[0], torch.eye(3, dtype=F64))
    eye = torch.eye(3, dtype=F64).expand(50, 3, 3)
    assert torch.allclose(U @ U.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(U), torch.ones(50, dtype=F64), atol=1e-12)
    angles = torch.rad2deg(torch.arccos(((U.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)))
    assert float(angles.max()) <= 2.0 + 1e-9 and float(angles[1:].min()) > 0
    axes, g = mosaic_domain_axes(50, 7)
    assert np.allclose(np.linalg.norm(axes, axis=1), 1.0)
    np.testing.assert_allclose(angles[1:].numpy(), 2.0 * g[1:], rtol=1e-9)
    # a different seed gives different domains, the same seed the same
    assert not torch.allclose(U, mosaic_matrices(cfg.replace(mosaic_seed=8)))
    assert torch.equal(U, mosaic_matrices(cfg))


# ----------------------------------------------------------------------------- physics vs a transcription
def _nanobragg_pixel(pos, lattice_real, recip_A, Nabc, F, shape, kahn, beam, polar_axis, lam, pixel, close,
                     fudge=1.0, point_pixel=False):
    """nanoBragg's per-pixel arithmetic for one source/phi/domain/sub-pixel, written out with numpy."""
    air = np.linalg.norm(pos)
    diff = pos / air
    q = (diff - beam) / lam
    h, k, l = lattice_real @ q
    hkl = np.array([h, k, l])
    h0 = np.ceil(hkl - 0.5)
    Na, Nb, Nc = Nabc
    if shape == "SQUARE":
        Fl = 1.0
        for x, n in zip(hkl, Nabc):
            if n > 1:
                Fl *= n if x == 0 else math.sin(math.pi * x * n) / math.sin(math.pi * x)
    else:
        d = hkl - h0
        dstar = d @ recip_A
        rad = float(dstar @ dstar) * (Na * Nb * Nc) ** 2
        if shape == "ROUND":
            hr = float((d * d * np.array(Nabc) ** 2).sum())
            x = math.pi * math.sqrt(hr * fudge)
            # nanoBragg's expression cancels catastrophically for x -> 0 (the direct-beam pixel): use its limit there
            s3 = 1.0 - x * x / 10 if x < 1e-3 else 3 * (math.sin(x) / x - math.cos(x)) / (x * x)
            Fl = Na * Nb * Nc * 0.723601254558268 * s3
        elif shape == "GAUSS":
            Fl = Na * Nb * Nc * math.exp(-(rad / 0.63 * fudge))
        else:
            Fl = Na * Nb * Nc * float(rad * fudge < 0.3969)
    c2t = float(diff @ beam)
    if kahn != 0:
        B_in = np.cross(polar_axis, beam)
        B_in /= np.linalg.norm(B_in)
        E_in = np.cross(beam, B_in)
        E_in /= np.linalg.norm(E_in)
        psi = -math.atan2(diff @ B_in, diff @ E_in)
    else:
        psi = 0.0
    polar = 0.5 * (1 + c2t ** 2 - kahn * math.cos(2 * psi) * (1 - c2t ** 2))
    omega = 1 / air ** 2 if point_pixel else pixel ** 2 / air ** 2 * close / air
    return 7.94079248018965e-30 * 1e26 * F * F * Fl * Fl * polar * omega


@pytest.mark.parametrize("shape,kahn,point_pixel", [("SQUARE", 0.0, False), ("ROUND", 0.7, False),
                                                    ("GAUSS", 0.0, True), ("TOPHAT", -0.5, False)])
def test_shapes_and_polarisation_match_nanobragg_formulas(shape, kahn, point_pixel):
    crystal = CrystalConfig(cell_a=50, cell_b=60, cell_c=70, cell_alpha=80, cell_beta=95, cell_gamma=100,
                            N_cells=(4, 6, 3), default_F=30.0, misset_deg=(12, -7, 33), shape=shape)
    det = DetectorConfig(fpixels=40, spixels=30, pixel_size_mm=0.2, distance_mm=60, detector_convention="ADXV",
                         point_pixel=point_pixel, detector_rotz_deg=4.0)
    beam = BeamConfig(wavelength_A=1.1, fluence=1e26, polarization_factor=kahn)
    img = simulate(crystal, det, beam, dtype=F64).numpy()
    g = detector_geometry(det, beam)
    lat = lattice_vectors(crystal, 1.1)
    rng = np.random.default_rng(0)
    picks = [tuple(x) for x in rng.integers(0, (30, 40), size=(40, 2))] + [np.unravel_index(img.argmax(), img.shape)]
    for s, f in picks:
        pos = (g.pix0 + (f + 0.5) * g.pixel_size * g.fdet + (s + 0.5) * g.pixel_size * g.sdet).numpy()
        ref = _nanobragg_pixel(pos, lat.real.numpy(), lat.recip.numpy(), (4, 6, 3), 30.0, shape, kahn,
                               g.beam.numpy(), g.polar.numpy(), 1.1e-10, float(g.pixel_size),
                               float(g.close_distance), point_pixel=point_pixel)
        assert img[s, f] == pytest.approx(ref, rel=1e-7, abs=1e-12 * max(img.max(), 1e-30))
    assert img.max() > 0


def test_tricubic_interpolation_reproduces_a_planted_cubic():
    h, k, l = np.meshgrid(np.arange(-8, 9), np.arange(-6, 7), np.arange(-7, 8), indexing="ij")
    poly = lambda h, k, l: 50 + 2 * h - 0.5 * k ** 2 + 0.1 * l ** 3 + 0.05 * h * k * l  # noqa: E731
    grid = torch.as_tensor(poly(h, k, l), dtype=F64)
    table = FTable(grid, (-8, -6, -7), 0.0, True)
    pts = torch.as_tensor(np.random.default_rng(1).uniform([-5, -3, -4], [5, 3, 4], size=(200, 3)), dtype=F64)
    got = table.lookup(pts, torch.ceil(pts - 0.5))
    want = poly(pts[:, 0], pts[:, 1], pts[:, 2])
    assert torch.allclose(got, want, atol=1e-9)
    # stencil leaving the grid -> nearest neighbour (nanoBragg's fall-back); outside the grid -> default_F
    edge = torch.tensor([[7.8, 0.2, 0.1], [20.0, 0.0, 0.0]], dtype=F64)
    got = table.lookup(edge, torch.ceil(edge - 0.5))
    assert float(got[0]) == pytest.approx(float(poly(8, 0, 0)))
    assert float(got[1]) == 0.0


def test_interpolation_is_automatic_when_a_crystal_is_thin():
    table = nbio.HKLTable.from_reflections(np.array([[0, 0, 0], [1, 2, 3]]), np.array([10.0, 20.0]))
    det = DetectorConfig(fpixels=8, spixels=8)
    p_thin = prepare(CrystalConfig(N_cells=(2, 5, 5)), det, BeamConfig(), table)
    p_thick = prepare(CrystalConfig(N_cells=(3, 5, 5)), det, BeamConfig(), table)
    p_forced = prepare(CrystalConfig(N_cells=(2, 5, 5), interpolate=False), det, BeamConfig(), table)
    assert p_thin.ftable.interpolate and not p_thick.ftable.interpolate and not p_forced.ftable.interpolate


def test_oversampling_and_phi_steps_average_terms():
    """Photons are averaged, not summed, over sub-pixels and phi steps (nanoBragg's steps divisor)."""
    c = CrystalConfig(N_cells=(5, 5, 5), default_F=100.0, misset_deg=(5, 3, -2))
    det = DetectorConfig(fpixels=64, spixels=64)
    one = simulate(c, det, dtype=F64)
    two = simulate(c.replace(phi_steps=3, osc_range_deg=0.0), det, dtype=F64)  # 3 identical steps
    assert torch.allclose(one, two, rtol=1e-12)


# ----------------------------------------------------------------------------- file formats
@need_data
def test_mosflm_matrix_gives_the_documented_cell():
    a, b, c = nbio.read_mosflm_matrix(DATA / "A.mat", 0.9768)
    cell = nbio.reciprocal_to_real_cell(a, b, c)
    np.testing.assert_allclose(cell, (26.75, 31.31, 33.67, 88.69, 71.53, 68.14), atol=0.01)
    lat = lattice_vectors(CrystalConfig(mosflm_matrix=nbio.read_mosflm_raw(DATA / "A.mat")), 0.9768)
    np.testing.assert_allclose(lat.cell_parameters(), cell, atol=1e-9)


@need_data
def test_hkl_file_ranges_cache_and_fdump(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFF_SIM_REFINER_CACHE", str(tmp_path / "cache"))
    t = nbio.read_hkl(DATA / "scaled.hkl")
    assert t.n_reflections == 64333
    assert (t.h_min, t.h_max, t.k_min, t.k_max, t.l_min, t.l_max) == (-24, 24, -28, 28, -31, 30)
    assert t.F.shape == (49, 57, 62)
    assert t.F[23 + 24, 15 + 28, -1 + 31] == pytest.approx(23.00)
    assert list((tmp_path / "cache").glob("hkl-*.npz"))
    t2 = nbio.read_hkl(DATA / "scaled.hkl")  # from the binary cache
    assert np.array_equal(t.F, t2.F) and t2.h_min == -24
    nbio.write_fdump(tmp_path / "Fdump.bin", t)
    t3 = nbio.read_fdump(tmp_path / "Fdump.bin")
    assert np.array_equal(t3.F, t.F) and (t3.h_min, t3.k_min, t3.l_min) == (-24, -28, -31)
    raw = (tmp_path / "Fdump.bin").read_bytes()
    assert raw.startswith(b"-24 24 -28 28 -31 30\n\f")
    assert len(raw) == len(b"-24 24 -28 28 -31 30\n\f") + 8 * 50 * 58 * 63


def test_hkl_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.hkl"
    bad.write_text("1 2 3 x\n")
    with pytest.raises(nbio.FormatError, match="bad.hkl"):
        nbio.read_hkl(bad, cache=False)
    with pytest.raises(nbio.FormatError, match="missing.hkl"):
        nbio.read_hkl(tmp_path / "missing.hkl")


def test_smv_and_float_round_trip(tmp_path):
    img = (np.arange(12 * 7) * 37 % 65535).astype(np.uint16).reshape(7, 12)
    nbio.write_smv(tmp_path / "a.img", img, {"PIXEL_SIZE": 0.1, "DISTANCE": 100.0, "BEAMLINE": "fake"})
    hdr, back = nbio.read_smv(tmp_path / "a.img")
    assert np.array_equal(back, img)
    assert hdr["SIZE1"] == "12" and hdr["SIZE2"] == "7" and float(hdr["PIXEL_SIZE"]) == 0.1
    assert (tmp_path / "a.img").stat().st_size == 512 + 2 * img.size
    f = np.random.default_rng(2).random((5, 9)).astype(np.float32)
    nbio.write_floatfile(tmp_path / "f.bin", f)
    assert np.array_equal(nbio.read_floatfile(tmp_path / "f.bin", 9, 5), f)
    with pytest.raises(nbio.FormatError):
        nbio.read_floatfile(tmp_path / "f.bin", 10, 5)


def test_fast_and_general_kernels_agree():
    """The square-crystal fast path and the general per-option path give the same photons."""
    from diff_sim_refiner.core.simulator import render

    c = CrystalConfig(cell_a=40, cell_b=50, cell_c=60, N_cells=(6, 4, 5), default_F=10.0, misset_deg=(3, 40, 9),
                      mosaic_spread_deg=0.5, mosaic_domains=3, phi_steps=2, osc_range_deg=0.4)
    table = nbio.HKLTable.from_reflections(np.array([[h, k, l] for h in range(-5, 6) for k in range(-5, 6)
                                                     for l in range(-5, 6)]), np.arange(11 ** 3) % 17 + 1.0)
    det = DetectorConfig(fpixels=50, spixels=40, oversample=2, distance_mm=70)
    beam = BeamConfig(wavelength_A=0.9, polarization_factor=0.9, dispersion_pct=0.2, dispersion_steps=2)
    p = prepare(c, det, beam, table, dtype=F64)
    fast = render(p, det)
    p.force_general = True
    general = render(p, det)
    assert float(fast.max()) > 0
    assert torch.allclose(fast, general, rtol=1e-10, atol=1e-14)


def test_spot_cutoff_is_exact_near_peaks_and_bounded_elsewhere():
    from diff_sim_refiner.core.compare import compare

    c = CrystalConfig(N_cells=(10, 10, 10), default_F=100.0, misset_deg=(5, 3, -2))
    det = DetectorConfig(fpixels=128, spixels=128)
    full = simulate(c, det, dtype=F64).numpy()
    wide = simulate(c, det, dtype=F64, spot_cutoff=1e6).numpy()
    assert np.allclose(wide, full, rtol=1e-12)
    sparse = simulate(c, det, dtype=F64, spot_cutoff=4.0).numpy()
    m = compare(sparse, full)
    assert m["pearson"] > 0.999 and m["max_peak_offset_px"] < 0.05
    assert 0.85 < m["sum_ratio"] <= 1.0  # the skipped sincg tails hold a few % of the photons
    assert (sparse <= full * (1 + 1e-12) + 1e-300).all()
    # every skipped term is below the stated bound relative to the peak height N^6 * F^2 * scale
    bound = 1.0 / (10 ** 2 * math.sin(math.pi * 4.0 / 10) ** 2)
    assert float((full - sparse).max()) <= bound * float(full.max()) * 1.5


def test_divergence_and_dispersion_source_grid_follows_nanobragg():
    from diff_sim_refiner.core.geometry import beam_sources

    g = detector_geometry(DetectorConfig(fpixels=8, spixels=8))
    rnd = BeamConfig(hdiv_range_mrad=2.0, vdiv_range_mrad=2.0, hdiv_steps=3, vdiv_steps=3)
    dirs, lams = beam_sources(rnd, g)
    assert dirs.shape == (5, 3)  # the four corners fall outside nanoBragg's elliptical cut
    sq, _ = beam_sources(rnd.replace(round_div=False), g)
    assert sq.shape == (9, 3)
    ang = torch.rad2deg(torch.arccos((sq @ g.beam).clamp(-1, 1)))
    assert torch.allclose(torch.linalg.vector_norm(sq, dim=1), torch.ones(9, dtype=F64))
    assert float(ang.max()) == pytest.approx(math.degrees(math.hypot(1e-3, 1e-3)), rel=1e-6)
    _, lams = beam_sources(BeamConfig(wavelength_A=1.0, dispersion_pct=1.0, dispersion_steps=3), g)
    np.testing.assert_allclose(lams.numpy() * 1e10, [0.995, 1.0, 1.005], rtol=1e-12)


def test_curved_detector_puts_every_pixel_at_the_distance():
    from diff_sim_refiner.core.simulator import _subpixel_positions

    det = DetectorConfig(fpixels=30, spixels=20, curved_detector=True, distance_mm=90.0)
    p = prepare(CrystalConfig(default_F=1.0), det, BeamConfig(), dtype=F64)
    f, s = torch.meshgrid(torch.arange(30), torch.arange(20), indexing="ij")
    pos = _subpixel_positions(p, f.reshape(-1), s.reshape(-1))
    assert torch.allclose(torch.linalg.vector_norm(pos, dim=-1), torch.full((600, 1), 0.09, dtype=F64), rtol=1e-12)
    img = simulate(CrystalConfig(N_cells=(5, 5, 5), default_F=10.0), det, dtype=F64)
    assert torch.isfinite(img).all() and float(img.max()) > 0
