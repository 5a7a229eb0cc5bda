"""The compiled forward kernel and spot-local rendering.

- The compiled kernel (core/native.c, the default for float32 renders without gradients) against the float64
  torch render on random orientations and options (triclinic cells, mosaic, phi, oversampling, divergence,
  dispersion, Kahn polarisation, HKL tables), bit-identical under 1 and 2 threads; the golden nanoBragg C images
  are checked through it by test_diff_sim_refiner_golden.py (float32 there is this kernel now).
- Spot-local rendering: kept pixels equal the full render; what is left out obeys spot_local_bound() (hard
  per-term bound, and the stated share of photons) against nanoBragg C's golden images and on random
  orientations; gradients through render_loss on the spot-local pixels (fused kernel) equal plain autograd.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diff_sim_refiner.core import native
from diff_sim_refiner.core.config import R_E_SQR, BeamConfig, CrystalConfig, DetectorConfig
from diff_sim_refiner.core.io import HKLTable
from diff_sim_refiner.core.simulator import (native_ok, prepare, render, render_loss, spot_local_bound,
                                             spot_local_mask)
from diff_sim_refiner.nbargs import build_job, parse_args
from diff_sim_refiner.nbrun import load_structure_factors

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
GOLDEN = SHARED / "golden" / "nanobragg"
DATA = SHARED / "data" / "nanobragg"


def _table(seed: int) -> HKLTable:
    F = np.random.default_rng(seed).uniform(10.0, 200.0, size=(31, 31, 31))
    return HKLTable(F=F, h_min=-15, k_min=-15, l_min=-15, default_F=50.0, n_reflections=F.size)


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    cell = [*rng.uniform(40, 90, 3), *rng.uniform(80, 100, 3)]
    c = CrystalConfig(cell_a=cell[0], cell_b=cell[1], cell_c=cell[2], cell_alpha=cell[3], cell_beta=cell[4],
                      cell_gamma=cell[5], N_cells=tuple(int(n) for n in rng.integers(8, 20, 3)), default_F=80.0,
                      misset_deg=tuple(rng.uniform(-180, 180, 3)), phi_start_deg=float(rng.uniform(0, 10)),
                      osc_range_deg=0.4, phi_steps=int(rng.integers(1, 3)), mosaic_spread_deg=0.3,
                      mosaic_domains=int(rng.integers(1, 4)), mosaic_seed=int(rng.integers(1, 1000)))
    d = DetectorConfig(distance_mm=float(rng.uniform(80, 150)), pixel_size_mm=0.1, fpixels=160, spixels=140,
                       oversample=int(rng.integers(1, 3)), detector_rotx_deg=float(rng.uniform(-3, 3)),
                       point_pixel=bool(seed % 3 == 2))
    b = BeamConfig(wavelength_A=float(rng.uniform(0.8, 1.4)), polarization_factor=[0.0, 0.7, 1.0][seed % 3],
                   nopolar=seed % 4 == 3, hdiv_range_mrad=1.0 if seed % 2 else 0.0, hdiv_steps=2 if seed % 2 else 1,
                   dispersion_pct=0.5 if seed % 3 == 1 else 0.0, dispersion_steps=2 if seed % 3 == 1 else 1)
    return c, d, b, (_table(seed) if seed % 2 == 0 else None)


@pytest.mark.parametrize("seed", range(6))
def test_native_kernel_equals_float64_render(seed):
    """float32 through the compiled kernel agrees with the float64 torch render to 1e-5 of the image maximum and
    its sum to 1e-5 (the float32 torch kernel: ~1e-4), and does not depend on the thread count."""
    assert native.available(), native.status()
    c, d, b, tab = _random_case(seed)
    with torch.no_grad():
        p32 = prepare(c, d, b, tab)
        assert native_ok(p32)
        ref = render(prepare(c, d, b, tab, dtype=torch.float64), d).numpy()
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = render(p32, d).numpy()
            torch.set_num_threads(2)
            two = render(p32, d).numpy()
        finally:
            torch.set_num_threads(before)
    assert np.array_equal(one, two)
    assert ref.max() > 0
    assert np.abs(one.astype(np.float64) - ref).max() <= 1e-5 * ref.max()
    assert abs(one.sum(dtype=np.float64) / ref.sum() - 1.0) <= 1e-5


def test_native_kernel_not_used_where_it_does_not_apply():
    c, d, b, tab = _random_case(0)
    p = prepare(c, d, b, tab, dtype=torch.float64)
    assert not native_ok(p)                                   # float64: the torch kernel
    leaf = torch.tensor(90.0, dtype=torch.float64, requires_grad=True)
    p = prepare(c.replace(cell_gamma=leaf), d, b, tab)
    assert not native_ok(p)                                   # a gradient is needed
    with torch.no_grad():
        assert native_ok(p)


def _golden(name):
    case = json.loads((GOLDEN / "cases.json").read_text())[name]
    job = build_job(parse_args([str(DATA / a) if a in ("A.mat", "scaled.hkl") else a for a in case["args"]]))
    return job, load_structure_factors(job, write_dump=False, log=lambda m: None), np.load(GOLDEN / f"{name}.npy")


@pytest.mark.parametrize("cutoff", [1.5, 4.0])
@pytest.mark.parametrize("name", ["case01_simple_cubic", "case03_triclinic_misset", "case05_hkl_custom_roi",
                                  "case06_phi_osc"])
def test_spot_local_against_nanobragg_c(name, cutoff):
    """Kept pixels reproduce nanoBragg C's image; the photons left out are below spot_local_bound's total share,
    and no left-out pixel exceeds the per-term bound times the brightest pixel."""
    job, tab, gold = _golden(name)
    with torch.no_grad():
        p = prepare(job.crystal, job.detector, job.beam, tab)
        m = spot_local_mask(p, job.detector, cutoff)
        img = render(p, job.detector, pixel_mask=m, crop=True).numpy().astype(np.float64)
    fmin, fmax, smin, smax = job.detector.roi_bounds()
    keep = m[smin:smax + 1, fmin:fmax + 1].numpy()
    gold = gold.astype(np.float64)
    assert 0 < keep.mean() <= 1
    assert keep.mean() < 1 or cutoff >= min(float(n) for n in job.crystal.N_cells) / 2   # N = 5: all kept at K = 4
    assert np.abs(img[keep] - gold[keep]).max() <= 1e-5 * gold.max()
    assert not img[~keep].any()
    bound = spot_local_bound(p, cutoff)
    left = gold[~keep]
    assert left.sum() / gold.sum() <= bound["total"]
    # one term per pixel (cases 01, 03, 05): a left-out pixel is at most per_term x the highest possible peak,
    # r_e^2 x fluence x (pixel / closest distance)^2 x max F^2 x (Na Nb Nc)^2 (polarisation <= 1)
    if name != "case06_phi_osc" and left.size:
        g = p.geom
        Fmax = float(tab.F.max()) if tab is not None else float(job.crystal.default_F)
        peak = (R_E_SQR * float(job.beam.effective_fluence()) * (float(g.pixel_size) / float(g.close_distance)) ** 2
                * Fmax ** 2 * np.prod([float(n) for n in job.crystal.N_cells]) ** 2)
        assert gold.max() <= peak
        assert left.max() <= bound["per_term"] * peak


@pytest.mark.parametrize("seed", range(4))
def test_spot_local_bound_on_random_orientations(seed):
    c, d, b, tab = _random_case(seed)
    with torch.no_grad():
        p = prepare(c, d, b, tab)
        full = render(p, d).numpy().astype(np.float64)
        for cutoff in (2.0, 4.0):
            m = spot_local_mask(p, d, cutoff)
            sl = render(p, d, pixel_mask=m).numpy().astype(np.float64)
            keep = m.numpy()
            assert 0 < keep.mean() <= 1 and (keep.mean() < 1 or cutoff > 2.0)   # mosaic + phi may cover all at 4
            assert np.array_equal(sl[keep], full[keep])
            assert full[~keep].sum() / full.sum() <= spot_local_bound(p, cutoff)["total"]


def test_spot_local_bound_values():
    """per_term = max_i 1 / (N_i^2 sin^2(pi K / N_i)); it tends to 1 / (pi K)^2 for large N."""
    c = CrystalConfig(N_cells=(1000, 1000, 1000))
    p = prepare(c, DetectorConfig(fpixels=8, spixels=8), BeamConfig())
    b = spot_local_bound(p, 5.0)
    assert b["per_term"] == pytest.approx(1.0 / (math.pi * 5.0) ** 2, rel=1e-4)
    assert b["total"] == pytest.approx(6.0 / (math.pi ** 2 * 5.0))


def test_spot_local_gradients_fused_equal_plain_autograd():
    """render_loss over the spot-local pixels: the fused kernel's gradients equal plain autograd's (float64)."""
    c, d, b, tab = _random_case(4)
    with torch.no_grad():
        target = render(prepare(c, d, b, tab, dtype=torch.float64), d)
        mask = spot_local_mask(prepare(c, d, b, tab), d, 2.0)
    assert 0 < mask.float().mean() < 0.9
    grads = []
    for fused in (True, False):
        phi = torch.tensor(float(c.phi_start_deg) + 0.05, dtype=torch.float64, requires_grad=True)
        dist = torch.tensor(d.distance_mm + 0.2, dtype=torch.float64, requires_grad=True)
        p = prepare(c.replace(phi_start_deg=phi), d.replace(distance_mm=dist), b, tab, dtype=torch.float64)
        p.fused_backward = fused
        dd = d.replace(distance_mm=dist)
        loss = render_loss(p, dd, lambda pred, f, s: ((pred - target[s, f]) ** 2).sum(), pixel_mask=mask)
        grads.append((float(loss), float(phi.grad), float(dist.grad)))
    (l1, gp1, gd1), (l2, gp2, gd2) = grads
    assert l1 == pytest.approx(l2, rel=1e-12)
    assert gp1 != 0.0 and gd1 != 0.0
    assert gp1 == pytest.approx(gp2, rel=1e-9)
    assert gd1 == pytest.approx(gd2, rel=1e-9)


def test_cli_spot_local_flag(tmp_path, monkeypatch):
    """`diff-sim-refiner nanobragg -spot_local K`: the kept pixels are nanoBragg C's, the others 0, and the log
    states the share of pixels and the bound."""
    from typer.testing import CliRunner

    from diff_sim_refiner.cli import app

    case = json.loads((GOLDEN / "cases.json").read_text())["case05_hkl_custom_roi"]
    args = [str(DATA / a) if a in ("A.mat", "scaled.hkl") else a for a in case["args"]]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "img.bin"
    res = CliRunner().invoke(app, ["nanobragg", *args, "-spot_local", "4", "-floatfile", str(out), "-nonoise",
                                   "-nopgm", "-noprogress", "-intfile", str(tmp_path / "img.smv")])
    assert res.exit_code == 0, res.output
    assert "spot-local:" in res.output and "kernel: compiled" in res.output
    fpix, spix = case["shape_fast_slow"]
    fmin, fmax, smin, smax = case["crop"]
    img = np.fromfile(out, dtype=np.float32).reshape(spix, fpix)[smin:smax + 1, fmin:fmax + 1].astype(np.float64)
    gold = np.load(GOLDEN / "case05_hkl_custom_roi.npy").astype(np.float64)
    kept = img != 0
    assert 0.01 < kept.mean() < 0.9
    assert np.abs(img[kept] - gold[kept]).max() <= 1e-5 * gold.max()
    assert gold[~kept].sum() / gold.sum() <= 6.0 / (math.pi ** 2 * 4.0)
