"""The compiled forward + derivatives kernel behind render_loss (native.grad_pixels, float32 terms, float64 sums):
its gradients against the float64 torch kernel's and a central finite difference of the float64 loss, the
same bits at 1 and 2 threads, the photons equal to the compiled forward render, explicit pixel lists."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diff_sim_refiner.core import native
from diff_sim_refiner.core.config import BeamConfig, CrystalConfig, DetectorConfig
from diff_sim_refiner.core.io import HKLTable
from diff_sim_refiner.core.simulator import _native_grad_plan, prepare, render, render_loss


F64 = torch.float64
START = dict(phi=0.2, mosaic=0.4, misset_x=10.0, a=60.0, gamma=91.0, N=5.3, fluence=1e24)


def _table() -> HKLTable:
    F = np.random.default_rng(0).uniform(10.0, 200.0, size=(21, 21, 21))
    return HKLTable(F=F, h_min=-10, k_min=-10, l_min=-10, default_F=50.0, n_reflections=F.size)


DET = DetectorConfig(distance_mm=100.0, pixel_size_mm=0.1, fpixels=48, spixels=40, beam_center_f=2.45,
                     beam_center_s=2.3, detector_rotx_deg=0.5, oversample=2)


def _prepared(v: dict, dtype, native_on: bool = True):
    c = CrystalConfig(cell_a=v["a"], cell_b=70.0, cell_c=80.0, cell_alpha=88.0, cell_beta=93.0, cell_gamma=v["gamma"],
                      N_cells=(v["N"], 5.0, 4.7), default_F=100.0, misset_deg=(v["misset_x"], 20.0, 30.0),
                      phi_start_deg=v["phi"], osc_range_deg=0.3, phi_steps=2, mosaic_spread_deg=v["mosaic"],
                      mosaic_domains=3, mosaic_seed=7)
    b = BeamConfig(wavelength_A=1.0, polarization_factor=0.6, fluence=v["fluence"])
    p = prepare(c, DET, b, _table(), dtype=dtype)
    p.native = native_on
    return p


with torch.no_grad():
    TARGET = render(_prepared(dict(START, phi=0.25, mosaic=0.35), F64), DET).to(torch.float32)


def _loss_fn(pred, f, s):
    return ((pred.to(F64) - TARGET[s, f].to(F64)) ** 2).sum()


def _grads(dtype, native_on=True, names=tuple(START), **kw):
    leaves = {k: torch.tensor(x, dtype=F64, requires_grad=k in names) for k, x in START.items()}
    loss = render_loss(_prepared(leaves, dtype, native_on), DET, _loss_fn, **kw)
    return float(loss), {k: float(v.grad) for k, v in leaves.items() if k in names}


def test_native_route_taken_and_covers_crystal_parameters():
    leaves = {k: torch.tensor(x, dtype=F64, requires_grad=True) for k, x in START.items()}
    plan = _native_grad_plan(_prepared(leaves, torch.float32))
    assert plan is not None
    leaves_A, D, need_N, need_scale = plan
    assert need_N and need_scale and D.shape == (6, 5, 3, 3)          # phi, mosaic, misset_x, a, gamma
    # detector parameters are not covered: the torch kernel runs
    d = DET.replace(distance_mm=torch.tensor(100.0, dtype=F64, requires_grad=True))
    c = CrystalConfig(cell_a=60.0, cell_b=70.0, cell_c=80.0, N_cells=(5, 5, 5), default_F=100.0)
    assert _native_grad_plan(prepare(c, d, BeamConfig())) is None


def test_native_gradients_match_float64_torch_and_finite_differences():
    loss32, g32 = _grads(torch.float32)
    loss64, g64 = _grads(F64)                                        # the fused torch kernel in float64
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    for k in START:
        assert g64[k] != 0.0, k
        # float32 terms: measured agreement 1e-6 .. 3e-5 relative on this case
        assert g32[k] == pytest.approx(g64[k], rel=2e-4), k
    # central finite differences of the float64 loss (no autograd), for phi and mosaic spread
    for k, h in (("phi", 1e-4), ("mosaic", 1e-4), ("N", 1e-4)):
        vals = []
        for sgn in (1, -1):
            v = dict(START)
            v[k] = START[k] + sgn * h
            with torch.no_grad():
                img = render(_prepared(v, F64), DET)
            vals.append(float(((img - TARGET.to(F64)) ** 2).sum()))
        fd = (vals[0] - vals[1]) / (2 * h)
        assert g32[k] == pytest.approx(fd, rel=1e-3), k


def test_native_gradients_same_bits_at_one_and_two_threads():
    saved = torch.get_num_threads()
    try:
        res = []
        for t in (1, 2):
            torch.set_num_threads(t)
            res.append(_grads(torch.float32, pixel_batch_size=700))
    finally:
        torch.set_num_threads(saved)
    assert res[0] == res[1]
    p = _prepared(START, torch.float32)
    rng = np.random.default_rng(1)
    f = rng.integers(0, DET.fpixels, 1000)
    s = rng.integers(0, DET.spixels, 1000)
    D = rng.normal(size=(p.n_orient, 2, 3, 3)) * 1e-10
    a = native.grad_pixels(p, f, s, D, True, threads=1, block=1000)
    b = native.grad_pixels(p, f, s, D, True, threads=2, block=37)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_native_photons_equal_the_forward_render():
    p = _prepared(START, torch.float32)
    with torch.no_grad():
        img = render(p, DET).numpy()
    s, f = np.nonzero(np.ones_like(img, dtype=bool))
    out, _, _ = native.grad_pixels(p, f, s, None, False)
    # same terms; the compiler may contract the two code paths' products differently: a few float32 ulps
    assert np.abs(out - img.reshape(-1)).max() <= 1e-6 * img.max()
    assert img.max() > 0


def test_explicit_pixel_lists_equal_the_mask_form():
    mask = torch.zeros(DET.spixels, DET.fpixels, dtype=torch.bool)
    mask[5:30, 10:40] = True
    mask[7, 3] = True
    s, f = torch.nonzero(mask, as_tuple=True)
    a = _grads(torch.float32, pixel_mask=mask)
    b = _grads(torch.float32, pixels=(f, s))
    assert a == b
    c = _grads(F64, pixels=(f, s))                                   # the torch route takes pixel lists too
    assert c[0] == pytest.approx(a[0], rel=1e-5)
    with pytest.raises(ValueError, match="outside the detector"):
        _grads(torch.float32, pixels=(f + 100, s))


def test_render_pixels_native_route_matches_torch_route():
    from diff_sim_refiner.core.spot_pixels import render_pixels

    rng = np.random.default_rng(2)
    f = torch.as_tensor(rng.integers(0, DET.fpixels, 600))
    s = torch.as_tensor(rng.integers(0, DET.spixels, 600))
    res = []
    for dtype in (torch.float32, F64):
        leaves = {k: torch.tensor(x, dtype=F64, requires_grad=True) for k, x in START.items()}
        vals = render_pixels(_prepared(leaves, dtype), f, s)
        ((vals.to(F64) - TARGET[s, f].to(F64)) ** 2).sum().backward()
        res.append((vals.detach().to(F64), {k: float(v.grad) for k, v in leaves.items()}))
    (v32, g32), (v64, g64) = res
    assert (v32 - v64).abs().max() <= 1e-6 * v64.max()
    for k in START:
        assert g64[k] != 0.0 and g32[k] == pytest.approx(g64[k], rel=2e-4), k


def test_sparse_mask_forward_equals_full_render_bit_for_bit():
    """render(pixel_mask=...) with a sparse mask renders the listed pixels only (nb_render_pixels), with the
    full render's bits, at 1 and 2 threads."""
    p = _prepared(START, torch.float32)
    mask = torch.zeros(DET.spixels, DET.fpixels, dtype=torch.bool)
    mask[3:9, 4:12] = True
    mask[30, 40] = True                                                    # 49 of 1920 pixels
    saved = torch.get_num_threads()
    try:
        imgs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            with torch.no_grad():
                imgs.append((render(p, DET).numpy(), render(p, DET, pixel_mask=mask).numpy()))
    finally:
        torch.set_num_threads(saved)
    m = mask.numpy()
    for full, sparse in imgs:
        assert np.array_equal(sparse[m], full[m]) and not sparse[~m].any() and full[m].min() > 0
    assert np.array_equal(imgs[0][1], imgs[1][1])
